package purgatorysync

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests serve git on loopback only: a git daemon on 127.0.0.2 (another address than the
// closed port every failing URL points at, 127.0.0.1:1).
const daemonHost = "127.0.0.2"

func git(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	// Keep the user's and the system's git configuration out.
	cmd.Env = append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir,
		"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// served makes base/<name> a bare repository with one commit and returns the commit's id.
func served(t *testing.T, base, name, content string) string {
	t.Helper()
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	if err := os.WriteFile(filepath.Join(work, "README"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	git(t, work, "add", "README")
	git(t, work, "commit", "-q", "-m", content)
	tip := git(t, work, "rev-parse", "HEAD")
	bare := filepath.Join(base, name)
	git(t, work, "clone", "-q", "--bare", work, bare)
	git(t, bare, "config", "uploadpack.allowReachableSHA1InWant", "true")
	return tip
}

// daemon starts `git daemon` serving base on 127.0.0.2 and returns its port; it is killed
// when the test ends.
func daemon(t *testing.T, base string) int {
	t.Helper()
	l, err := net.Listen("tcp", daemonHost+":0")
	if err != nil {
		t.Skipf("cannot listen on %s: %v", daemonHost, err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cmd := exec.Command("git", "daemon", "--reuseaddr", "--base-path="+base, "--export-all",
		"--listen="+daemonHost, fmt.Sprintf("--port=%d", port), "--enable=upload-pack", base)
	if err := cmd.Start(); err != nil {
		t.Fatalf("git daemon: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", fmt.Sprintf("%s:%d", daemonHost, port)); err == nil {
			c.Close()
			return port
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("git daemon did not listen on %s:%d", daemonHost, port)
	return 0
}

func bareRepo(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "relay.git")
	git(t, t.TempDir(), "init", "-q", "--bare", dir)
	return dir
}

func newEngine(t *testing.T, cfg Config) *Engine {
	t.Helper()
	cfg.AllowPrivateAddresses = true
	if cfg.SyncDelay == nil {
		cfg.SyncDelay = Duration(0)
	}
	if cfg.Tick == 0 {
		cfg.Tick = 20 * time.Millisecond
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

func missing(n int) string { return fmt.Sprintf("%040x", 0xdead0000+n) }

func TestReleasesFromARealGitDaemon(t *testing.T) {
	base := t.TempDir()
	tip := served(t, base, "alice/hello.git", "hello")
	port := daemon(t, base)
	e := newEngine(t, Config{})
	repo := bareRepo(t)
	adm, err := e.Submit(Event{
		ID: "ev1", Identifier: "alice/hello", Repo: repo, OIDs: []string{tip},
		CloneURLs:  []string{fmt.Sprintf("git://%s:%d/alice/hello.git", daemonHost, port)},
		RefUpdates: []RefUpdate{{Name: "refs/heads/main", OID: tip}},
	})
	if err != nil || adm.AlreadySatisfied || len(adm.RefusedURLs) != 0 {
		t.Fatalf("Submit: %+v %v", adm, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	o, ok := <-e.Outcomes(ctx)
	if !ok || !o.Released() || o.EventID != "ev1" || o.Refs != "written" {
		t.Fatalf("outcome %+v (channel open: %v)", o, ok)
	}
	if got := git(t, repo, "rev-parse", "refs/heads/main"); got != tip {
		t.Fatalf("refs/heads/main is %s, want %s", got, tip)
	}
	st, err := e.Stats()
	if err != nil || st.Released != 1 || st.Requests == 0 {
		t.Fatalf("Stats: %+v %v", st, err)
	}
	m, err := e.Metrics()
	if err != nil || !strings.Contains(m, "purgatory_sync_released_total 1") {
		t.Fatalf("Metrics: %v\n%s", err, m)
	}
}

// Goroutines submit and cancel while others read outcomes: every event not cancelled gets
// exactly one outcome, a cancelled one at most one, and nothing races (go test -race).
func TestGoroutinesSubmitAndCancelWhileOthersReadOutcomes(t *testing.T) {
	base := t.TempDir()
	var tips []string
	for i := 0; i < 4; i++ {
		tips = append(tips, served(t, base, fmt.Sprintf("r%d.git", i), fmt.Sprintf("r%d", i)))
	}
	port := daemon(t, base)
	e := newEngine(t, Config{EventLifetime: 3 * time.Second, Workers: 8})
	const submitters, perSubmitter = 8, 25
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var mu sync.Mutex
	got := map[string]int{}
	var readers sync.WaitGroup
	for r := 0; r < 4; r++ {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for o := range e.Outcomes(ctx) {
				mu.Lock()
				got[o.EventID]++
				mu.Unlock()
			}
		}()
	}
	cancelled := map[string]bool{}
	var cmu sync.Mutex
	var submitting sync.WaitGroup
	for s := 0; s < submitters; s++ {
		submitting.Add(1)
		go func(s int) {
			defer submitting.Done()
			for i := 0; i < perSubmitter; i++ {
				id := fmt.Sprintf("ev-%d-%d", s, i)
				ev := Event{ID: id, Identifier: fmt.Sprintf("id-%d-%d", s, i), Repo: bareRepo(t)}
				if i%2 == 0 {
					k := (s + i) % len(tips)
					ev.OIDs = []string{tips[k]}
					ev.CloneURLs = []string{fmt.Sprintf("git://%s:%d/r%d.git", daemonHost, port, k)}
				} else {
					ev.OIDs = []string{missing(s*100 + i)} // nil CloneURLs: JSON null
				}
				if _, err := e.Submit(ev); err != nil {
					t.Errorf("Submit %s: %v", id, err)
					return
				}
				if i%5 == 4 {
					if err := e.Cancel(id); err != nil {
						t.Errorf("Cancel %s: %v", id, err)
					}
					cmu.Lock()
					cancelled[id] = true
					cmu.Unlock()
				}
			}
		}(s)
	}
	submitting.Wait()
	want := submitters*perSubmitter - len(cancelled)
	for ctx.Err() == nil {
		mu.Lock()
		n := 0
		for id := range got {
			if !cancelled[id] {
				n++
			}
		}
		mu.Unlock()
		if n == want {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	readers.Wait()
	for s := 0; s < submitters; s++ {
		for i := 0; i < perSubmitter; i++ {
			id := fmt.Sprintf("ev-%d-%d", s, i)
			n := got[id]
			if cancelled[id] && n > 1 || !cancelled[id] && n != 1 {
				t.Errorf("%s (cancelled %v): %d outcomes", id, cancelled[id], n)
			}
		}
	}
}

// The error of one goroutine's call never reaches another's: 32 goroutines make failing calls
// that each name their own value, with runtime.Gosched between them so that goroutines move
// between OS threads.
func TestEachGoroutineGetsItsOwnError(t *testing.T) {
	e := newEngine(t, Config{SyncDelay: Duration(time.Hour)})
	repo := bareRepo(t)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 300; i++ {
				bad := fmt.Sprintf("bad-oid-%d-%d", g, i)
				_, err := e.Submit(Event{ID: fmt.Sprintf("e%d-%d", g, i), Identifier: "x",
					Repo: repo, OIDs: []string{bad}})
				var pe *Error
				if !errors.As(err, &pe) || !errors.Is(err, StatusInvalidObjectID) {
					errs <- fmt.Errorf("goroutine %d: %v", g, err)
					return
				}
				if !strings.Contains(pe.Message, bad) {
					errs <- fmt.Errorf("goroutine %d got another call's error: %q (wanted %s)",
						g, pe.Message, bad)
					return
				}
				runtime.Gosched()
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClosedEngineAndBadConfig(t *testing.T) {
	if _, err := New(Config{Workers: 5000}); !errors.Is(err, StatusInvalidConfig) {
		t.Fatalf("workers 5000: %v", err)
	}
	e, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Submit(Event{ID: "x"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
	if err := e.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
}

// Outcomes' channel closes once the engine is shut down and drained, and when ctx ends.
func TestOutcomesEndWithTheEngineOrTheContext(t *testing.T) {
	e := newEngine(t, Config{EventLifetime: 200 * time.Millisecond})
	if _, err := e.Submit(Event{ID: "gone", Identifier: "x", Repo: bareRepo(t),
		OIDs: []string{missing(1)}, CloneURLs: []string{"git://127.0.0.1:1/x.git"}}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ch := e.Outcomes(ctx)
	o := <-ch
	if o.EventID != "gone" || o.Released() || o.Reason != "lifetime_ended" {
		t.Fatalf("%+v", o)
	}
	short, stop := context.WithCancel(context.Background())
	idle := e.Outcomes(short)
	stop()
	select {
	case _, ok := <-idle:
		if ok {
			t.Fatal("an outcome from an idle engine")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the channel did not close when its context ended")
	}
	if err := e.Shutdown(); err != nil {
		t.Fatal(err)
	}
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("an outcome after the last one")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the channel did not close after shutdown")
	}
}

// The logs of a failed fetch reach the host's LogFunc.
func TestTheLogsOfAFailedFetchReachTheLogFunc(t *testing.T) {
	var mu sync.Mutex
	var lines []string
	if err := SetLogger(LogInfo, func(level LogLevel, target, message string) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, fmt.Sprintf("%d %s %s", level, target, message))
	}); err != nil {
		t.Fatal(err)
	}
	defer SetLogger(LogOff, nil)
	e := newEngine(t, Config{EventLifetime: 2 * time.Second})
	url := "git://127.0.0.1:1/nowhere.git"
	if _, err := e.Submit(Event{ID: "l1", Identifier: "x", Repo: bareRepo(t),
		OIDs: []string{missing(2)}, CloneURLs: []string{url}}); err != nil {
		t.Fatal(err)
	}
	found := func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range lines {
			if strings.Contains(l, url) && strings.Contains(l, "failed") {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(30 * time.Second)
	for !found() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !found() {
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("no log line of the failed fetch of %s: %q", url, lines)
	}
}
