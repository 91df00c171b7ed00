//! Memory per waiting event, state file bytes per event, and the time `submit` takes on the
//! host's thread.
//!
//! A real engine (`testkit::loopback_engine()`, `user_delay` of an hour, so nothing is ever
//! fetched) gets N `Origin::User` events, each waiting for 2 object ids (absent from the
//! repository) with 2 clone URLs on loopback addresses that are never contacted. The events
//! are spread round-robin over a few bare repositories. A counting global allocator (around
//! `System`) tracks the bytes live on the Rust heap; the figure per event is (live bytes once
//! `stats().waiting_events == N`, minus live bytes before the first submit) / N. libgit2's own
//! `malloc`s do not go through it (the engine keeps no libgit2 object between calls); the RSS
//! growth is printed next to it as a cross-check. The state file's size per event is measured
//! after `shutdown()` writes it.
//!
//! Every `submit` is timed on the calling thread. It validates the event, canonicalises the
//! repository path, opens the repository (as a bare one) to ask which object ids it holds, and
//! sends a command to the scheduler. A second table times those
//! repository steps on their own, in an empty repository and in one with history.
//!
//! Run with `cargo bench --bench memory` (about 10 minutes on 2 cores: a million submits on one
//! thread take 5 or 6 of them). Without `--bench` (`cargo test --benches`) it runs a small smoke version.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use purgatory_sync::{Admission, Origin, PendingEvent};
use purgatory_sync_testkit::{git_command, init_bare, loopback_engine};

/// Counts the bytes live on the Rust heap, and their peak since the last [`reset_peak`].
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(by: usize) {
    LIVE.fetch_sub(by, Ordering::Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

/// The process's resident set size, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Median, 99th and 99.9th percentiles and maximum of `samples` (sorted in place).
struct Spread {
    median: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
}

impl Spread {
    fn of(samples: &mut [Duration]) -> Spread {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Spread {
            median: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// One engine filled with `events` waiting events.
struct Run {
    events: usize,
    /// Events sharing one identifier (and so one queue entry).
    per_identifier: usize,
    repos: Vec<PathBuf>,
    repos_label: &'static str,
}

struct Figures {
    live_per_event: f64,
    peak_per_event: f64,
    rss_per_event: f64,
    state_per_event: f64,
    submit: Spread,
    /// The 5 slowest submits: (time, index of the submit).
    slowest: Vec<(Duration, usize)>,
    submit_total: Duration,
    settle: Duration,
}

fn event(i: usize, per_identifier: usize, repos: &[PathBuf]) -> PendingEvent {
    let ident = i / per_identifier;
    PendingEvent {
        id: format!("{i:064x}"),
        identifier: format!("npub1bench/repo-{ident}"),
        repo: repos[ident % repos.len()].clone(),
        oids: vec![format!("{:040x}", 2 * i + 1), format!("{:040x}", 2 * i + 2)],
        clone_urls: vec![
            format!("git://127.0.0.98:9/repo-{ident}.git"),
            format!("git://127.0.0.99:9/repo-{ident}.git"),
        ],
        origin: Origin::User,
        ..Default::default()
    }
}

fn run(r: &Run, dir: &Path) -> Figures {
    let state = dir.join("state.json");
    let _ = std::fs::remove_file(&state);
    let engine = loopback_engine()
        .thread_name("membench")
        .user_delay(Duration::from_secs(3600))
        .max_events(2 * r.events)
        .state_file(&state)
        .checkpoint_interval(Duration::from_secs(24 * 3600))
        .build()
        .expect("engine builds");
    let mut samples = Vec::with_capacity(r.events);
    let before = live();
    let rss_before = rss();
    reset_peak();
    let started = Instant::now();
    for i in 0..r.events {
        let ev = event(i, r.per_identifier, &r.repos);
        let t = Instant::now();
        let admitted = engine.submit(ev);
        samples.push(t.elapsed());
        match admitted {
            Ok(Admission::Pending { .. }) => {}
            other => panic!("event {i}: {other:?}"),
        }
    }
    let submit_total = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while engine.stats().waiting_events != r.events {
        assert!(
            Instant::now() < deadline,
            "{} of {} events waiting after 300 s",
            engine.stats().waiting_events,
            r.events
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let settle = started.elapsed();
    let after = live();
    let peak = PEAK.load(Ordering::Relaxed);
    let rss_after = rss();
    engine.shutdown().expect("clean shutdown");
    let state_bytes = std::fs::metadata(&state).map_or(0, |m| m.len());
    let _ = std::fs::remove_file(&state);
    let n = r.events as f64;
    let mut slowest: Vec<(Duration, usize)> = samples.iter().copied().zip(0..).collect();
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    slowest.truncate(5);
    Figures {
        live_per_event: (after as f64 - before as f64) / n,
        peak_per_event: (peak as f64 - before as f64) / n,
        rss_per_event: (rss_after as f64 - rss_before as f64) / n,
        state_per_event: state_bytes as f64 / n,
        submit: Spread::of(&mut samples),
        slowest,
        submit_total,
        settle,
    }
}

/// A bare repository with `commits` commits on `main` (one small file changed in each),
/// `branches` more branches, all in one pack and `packed-refs`, written by `git fast-import`.
fn repo_with_history(path: &Path, commits: usize, branches: usize) -> PathBuf {
    init_bare(path);
    let mut child = git_command()
        .arg("--git-dir")
        .arg(path)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import starts");
    let mut stream = Vec::new();
    for i in 1..=commits {
        let content = format!("line {i}\n");
        let message = format!("commit {i}\n");
        write!(
            stream,
            "blob\nmark :{}\ndata {}\n{content}\ncommit refs/heads/main\nmark :{}\n\
             committer Bench <bench@example.invalid> {} +0000\ndata {}\n{message}\n\
             M 100644 :{} file-{}.txt\n\n",
            2 * i,
            content.len(),
            2 * i + 1,
            1_700_000_000 + i,
            message.len(),
            2 * i,
            i % 500,
        )
        .unwrap();
    }
    for b in 0..branches {
        let mark = 2 * (1 + b * commits / branches.max(1)) + 1;
        writeln!(stream, "reset refs/heads/branch-{b}\nfrom :{mark}\n").unwrap();
    }
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(&stream)
        .expect("fast-import reads the stream");
    drop(stdin);
    assert!(child.wait().expect("fast-import ends").success());
    let packed = git_command()
        .arg("--git-dir")
        .arg(path)
        .args(["pack-refs", "--all"])
        .status()
        .expect("git pack-refs runs");
    assert!(packed.success());
    path.to_path_buf()
}

/// Times one step `n` times.
fn time_step(n: usize, mut step: impl FnMut()) -> Spread {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        step();
        samples.push(t.elapsed());
    }
    Spread::of(&mut samples)
}

/// The repository work `submit` does, step by step, against `repo`.
fn repository_steps(label: &str, repo: &Path, n: usize) {
    let missing = [
        git2::Oid::from_str("00000000000000000000000000000000000000a1").unwrap(),
        git2::Oid::from_str("00000000000000000000000000000000000000a2").unwrap(),
    ];
    let open = || {
        git2::Repository::open_ext(
            repo,
            git2::RepositoryOpenFlags::NO_SEARCH,
            std::iter::empty::<&std::ffi::OsStr>(),
        )
        .expect("opens")
    };
    let canonical = time_step(n, || {
        std::fs::canonicalize(repo).expect("canonicalises");
    });
    let opened = time_step(n, || {
        assert!(open().is_bare());
    });
    let checked = time_step(n, || {
        let repo = open();
        let odb = repo.odb().expect("odb");
        assert!(!missing.iter().any(|o| odb.exists(*o)));
    });
    let kept = open();
    let odb = kept.odb().expect("odb");
    let cached = time_step(n, || {
        assert!(!missing.iter().any(|o| odb.exists(*o)));
    });
    // A miss makes libgit2 re-read the pack directory and look again; this skips that.
    let no_refresh = git2::OdbLookupFlags::NO_REFRESH;
    let cached_no_refresh = time_step(n, || {
        assert!(!missing.iter().any(|o| odb.exists_ext(*o, no_refresh)));
    });
    for (step, s) in [
        ("`canonicalize`", canonical),
        ("open (`open_ext`, `NO_SEARCH`) and `is_bare`", opened),
        ("open, `odb()`, 2 × `exists` (missing ids)", checked),
        ("2 × `exists` on an odb kept open", cached),
        (
            "2 × `exists_ext(NO_REFRESH)` on an odb kept open",
            cached_no_refresh,
        ),
    ] {
        println!(
            "| {label} | {step} | {} | {} | {} | {} |",
            us(s.median),
            us(s.p99),
            us(s.p999),
            us(s.max)
        );
    }
}

fn main() {
    // `repo_with_history` runs `git fast-import`.
    purgatory_sync_testkit::require_git();
    let full = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().expect("temp dir");
    let empty: Vec<PathBuf> = (0..4)
        .map(|r| init_bare(&dir.path().join(format!("empty-{r}.git"))))
        .collect();
    let (commits, branches) = if full { (20_000, 1_000) } else { (100, 10) };
    let history = vec![repo_with_history(
        &dir.path().join("history.git"),
        commits,
        branches,
    )];
    let runs = if full {
        vec![
            (100_000, 1, &empty, "4 empty"),
            (1_000_000, 1, &empty, "4 empty"),
            (100_000, 10, &empty, "4 empty"),
            (100_000, 1, &history, "1 with history"),
        ]
    } else {
        vec![
            (2_000, 1, &empty, "4 empty"),
            (2_000, 1, &history, "1 with history"),
        ]
    };

    println!("load average before: {}", common::loadavg());
    println!();
    println!(
        "| events | events per identifier | repositories | live heap / event | peak heap / event \
         | RSS growth / event | state file / event | submit median | p99 | p99.9 | max \
         | all submits | until all wait |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for (events, per_identifier, repos, repos_label) in runs {
        let r = Run {
            events,
            per_identifier,
            repos: repos.clone(),
            repos_label,
        };
        let f = run(&r, dir.path());
        println!(
            "| {} | {} | {} | {:.0} B | {:.0} B | {:.0} B | {:.0} B | {} | {} | {} | {} | {:.1} s | {:.1} s |",
            r.events,
            r.per_identifier,
            r.repos_label,
            f.live_per_event,
            f.peak_per_event,
            f.rss_per_event,
            f.state_per_event,
            us(f.submit.median),
            us(f.submit.p99),
            us(f.submit.p999),
            us(f.submit.max),
            f.submit_total.as_secs_f64(),
            f.settle.as_secs_f64(),
        );
        let slowest: Vec<String> = f
            .slowest
            .iter()
            .map(|(d, i)| format!("#{i} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        notes.push(format!(
            "- {} events, {} per identifier, {} repositories: slowest submits {}",
            r.events,
            r.per_identifier,
            r.repos_label,
            slowest.join(", ")
        ));
    }
    println!();
    for note in notes {
        println!("{note}");
    }
    println!(
        "- (a `HashMap` grows, rehashing every entry, when it reaches 7/8 of a power of two: \
         57 344, 114 688, 229 376, 458 752, 917 504 entries)"
    );

    println!();
    println!(
        "The repository steps of one `submit` ({commits} commits, {branches} branches and \
         one pack in the repository with history):"
    );
    println!();
    println!("| repository | step | median | p99 | p99.9 | max |");
    println!("|---|---|---|---|---|---|");
    let n = if full { 100_000 } else { 100 };
    repository_steps("empty", &empty[0], n);
    repository_steps("with history", &history[0], n);
    println!();
    println!("load average after: {}", common::loadavg());
}
