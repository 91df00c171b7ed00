module github.com/purgatory-sync/purgatory-sync/bindings/go

go 1.19
