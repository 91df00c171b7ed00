//! One scheduler decision pass at growing queue sizes with 1 % of the entries ready.
//!
//! The queue keeps an index ordered by next attempt, so a pass reads only the ready front: its
//! cost should follow the number of ready entries, not the queue size.
//!
//! Run with `cargo bench --bench scheduler`.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use purgatory_sync::__bench::QueueBench;

fn decision_pass(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision_pass_1pct_ready");
    group.sample_size(20);
    for queued in [1_000usize, 10_000, 100_000] {
        let ready = queued / 100;
        group.throughput(Throughput::Elements(ready as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(queued),
            &queued,
            |b, &queued| {
                b.iter_batched_ref(
                    || QueueBench::new(queued, ready, ready.max(1)),
                    |q| {
                        let dispatched = q.pass();
                        assert_eq!(dispatched, ready);
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();

    // A pass when nothing is ready: the cost of waking on a tick with a full queue.
    let mut idle = c.benchmark_group("decision_pass_none_ready");
    for queued in [1_000usize, 10_000, 100_000] {
        let mut q = QueueBench::new(queued, 0, 8);
        idle.bench_with_input(BenchmarkId::from_parameter(queued), &queued, |b, _| {
            b.iter(|| assert_eq!(q.pass(), 0))
        });
    }
    idle.finish();
}

criterion_group!(benches, decision_pass);
criterion_main!(benches);
