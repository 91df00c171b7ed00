//! How long a waiting event takes to be released once its data is there, with the default
//! 1 s tick. Prints Markdown tables.
//!
//! - **Push**: the commit is written into the event's own repository (as a `git push` to the
//!   host would), then the host calls `git_data_arrived(identifier)`; measured from that call
//!   to `Outcome::Released` on the outcomes channel. The event is `Origin::User` (first
//!   attempt after an hour), so no fetch is involved: the command wakes the scheduler, which
//!   re-checks the repository. Measured with an otherwise empty queue and with 100 000 other
//!   events waiting.
//! - **Mirror**: an `Origin::Sync` event waits for a commit that its only clone URL, a
//!   `git daemon` on 127.0.0.81, does not have yet. Its first attempt(s) fail; then, `offset`
//!   after the last failure, the commit is written into the mirror (time T); measured from T
//!   to `Outcome::Released`. Nothing tells the engine: the wait is the rest of the current
//!   backoff step (`step - offset`) plus one fetch. Samples run concurrently, one repository,
//!   mirror and thread each, with offsets spread over the step: once with the defaults (after
//!   the first failure, step 20 s), once with `backoff_base` 1 s and `backoff_cap` 4 s (after
//!   the third failure, step 4 s).
//!
//! Run with `cargo bench --bench latency` (about 3 minutes). Without `--bench` (`cargo test
//! --benches`) it runs a small smoke version.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use purgatory_sync::{Admission, Engine, ObjectId, Origin, Outcome, PendingEvent};
use purgatory_sync_testkit::{
    self as testkit, commit, init_bare, loopback_engine, push_all, GitDaemon,
};

/// Longest any single wait in this bench may take before it fails.
const BOUND: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Median, 99th percentile and maximum (sorted in place).
fn spread(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

/// Waits for the outcome of `event_id`, failing on any other outcome or after [`BOUND`].
fn released(engine: &Engine, event_id: &str) -> Instant {
    let outcome = engine
        .outcomes()
        .recv_timeout(BOUND)
        .unwrap_or_else(|_| panic!("no outcome for {event_id} within {BOUND:?}"));
    let at = Instant::now();
    match outcome {
        Outcome::Released { event_id: id, .. } if id == event_id => at,
        other => panic!("expected {event_id} released, got {other:?}"),
    }
}

/// `samples` pushes into one repository, each released by `git_data_arrived`; `background`
/// other events wait meanwhile (distinct identifiers, in 4 other repositories).
fn push_latency(dir: &Path, samples: usize, background: usize) -> Vec<Duration> {
    let source = init_bare(&dir.join(format!("source-{background}.git")));
    let target = init_bare(&dir.join(format!("target-{background}.git")));
    let others: Vec<PathBuf> = (0..4)
        .map(|r| init_bare(&dir.join(format!("others-{background}-{r}.git"))))
        .collect();
    let engine = loopback_engine()
        .thread_name("latbench")
        .user_delay(Duration::from_secs(3600))
        .max_events(background + samples + 1)
        .build()
        .expect("engine builds");
    for i in 0..background {
        let ident = format!("npub1bench/other-{i}");
        let event = PendingEvent::new(format!("{i:064x}"), &ident, &others[i % others.len()])
            .oid(format!("{:040x}", i + 1))
            .clone_url(format!("git://127.0.0.99:9/other-{i}.git"))
            .origin(Origin::User);
        assert_eq!(engine.submit(event), Ok(Admission::pending()));
    }
    let deadline = Instant::now() + BOUND;
    while engine.stats().waiting_events < background {
        assert!(Instant::now() < deadline, "background events not queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    let identifier = "npub1bench/pushed";
    let mut waits = Vec::with_capacity(samples);
    for i in 0..samples {
        let tip = commit(
            &source,
            "main",
            &[("file", format!("{i}\n").as_bytes())],
            &format!("push {i}"),
        );
        let id = format!("push-{i}");
        let event = PendingEvent::new(&id, identifier, &target)
            .oid(tip.to_string())
            .clone_url("git://127.0.0.99:9/pushed.git")
            .origin(Origin::User);
        assert_eq!(engine.submit(event), Ok(Admission::pending()));
        // Let the submit land, and spread the samples over the tick's phase.
        std::thread::sleep(Duration::from_millis(20 + (i as u64 * 37) % 100));
        push_all(&source, &target);
        let start = Instant::now();
        engine.git_data_arrived(identifier);
        waits.push(released(&engine, &id) - start);
    }
    engine.shutdown().expect("clean shutdown");
    waits
}

/// One mirror sample: its event, its mirror repository and the commit it will gain.
struct MirrorSample {
    event_id: String,
    identifier: String,
    mirror: PathBuf,
    file: String,
    offset: Duration,
}

/// One mirror measurement: `samples` events, each waiting for a commit its mirror lacks; the
/// commit is added `offset` after the event's `failures`-th failed attempt, offsets spread
/// over `step`, the backoff step then running.
struct MirrorRun {
    label: &'static str,
    /// `backoff_base` and `backoff_cap`; the defaults when `None`.
    backoff: Option<(Duration, Duration)>,
    failures: usize,
    step: Duration,
    samples: usize,
}

/// Returns (offset, T → released) per sample.
fn mirror_latency(dir: &Path, run: &MirrorRun) -> Vec<(Duration, Duration)> {
    let MirrorRun {
        label,
        backoff,
        failures,
        step,
        samples,
    } = *run;
    let base = dir.join(format!("mirrors-{label}"));
    let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 81), &base).expect("git daemon");
    let mut builder = loopback_engine().thread_name("latbench");
    if let Some((base, cap)) = backoff {
        builder = builder.backoff_base(base).backoff_cap(cap);
    }
    let engine = Arc::new(builder.build().expect("engine builds"));
    let mut plan = Vec::new();
    for k in 0..samples {
        let name = format!("mirror-{k}.git");
        let mirror = daemon.repo(&name);
        let file = format!("sample {label} {k}\n");
        // Commits are deterministic: the same commit written later into the (empty) mirror
        // gets this id.
        let scratch = init_bare(&dir.join(format!("scratch-{label}-{k}.git")));
        let tip: ObjectId = commit(&scratch, "main", &[("file", file.as_bytes())], "tip");
        let local = init_bare(&dir.join(format!("local-{label}-{k}.git")));
        let event_id = format!("{label}-{k}");
        let identifier = format!("npub1bench/mirror-{label}-{k}");
        let event = PendingEvent::new(&event_id, &identifier, &local)
            .oid(tip.to_string())
            .clone_url(daemon.url(&name))
            .origin(Origin::Sync);
        assert_eq!(engine.submit(event), Ok(Admission::pending()));
        plan.push(MirrorSample {
            event_id,
            identifier,
            mirror,
            file,
            // Spread over the step, never at its very end.
            offset: step.mul_f64(k as f64 / samples as f64),
        });
    }
    let writers: Vec<_> = plan
        .into_iter()
        .map(|s| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + BOUND;
                loop {
                    let failed = engine
                        .stats()
                        .recent_failures
                        .iter()
                        .filter(|f| f.identifier == s.identifier)
                        .count();
                    if failed >= failures {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{} never failed", s.event_id);
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(s.offset);
                commit(&s.mirror, "main", &[("file", s.file.as_bytes())], "tip");
                (s.event_id, s.offset, Instant::now())
            })
        })
        .collect();
    let mut released_at = std::collections::HashMap::new();
    while released_at.len() < samples {
        match engine.outcomes().recv_timeout(BOUND) {
            Ok(Outcome::Released { event_id, .. }) => {
                released_at.insert(event_id, Instant::now());
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => panic!("mirror samples not released within {BOUND:?}"),
        }
    }
    let mut out: Vec<(Duration, Duration)> = writers
        .into_iter()
        .map(|w| {
            let (id, offset, written) = w.join().expect("writer thread");
            (offset, released_at[&id].saturating_duration_since(written))
        })
        .collect();
    out.sort();
    let stats = engine.stats();
    assert_eq!(
        stats.fetches_failed as usize,
        samples * failures,
        "{stats:?}"
    );
    Arc::try_unwrap(engine)
        .expect("writers are done")
        .shutdown()
        .expect("clean shutdown");
    drop(daemon);
    out
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    testkit::require_git();
    let dir = tempfile::tempdir().expect("temp dir");
    println!("load average before: {}", common::loadavg());
    println!();

    println!("`git_data_arrived` → `Outcome::Released` (objects written into the repository just before; tick 1 s):");
    println!();
    println!("| other events waiting | samples | median | p99 | max |");
    println!("|---|---|---|---|---|");
    let push_runs: &[(usize, usize)] = if full {
        &[(0, 200), (100_000, 200)]
    } else {
        &[(0, 5)]
    };
    for &(background, samples) in push_runs {
        let mut waits = push_latency(dir.path(), samples, background);
        let (median, p99, max) = spread(&mut waits);
        println!(
            "| {background} | {samples} | {} | {} | {} |",
            ms(median),
            ms(p99),
            ms(max)
        );
    }

    println!();
    println!("A mirror gains the commit (time T) → `Outcome::Released` (tick 1 s; the commit is written `offset` after the event's last failed attempt, so the next attempt is due `step - offset` after T):");
    println!();
    println!("| backoff | failed attempts before T | step | offset | T → released | minus (step − offset) |");
    println!("|---|---|---|---|---|---|");
    let secs_ = Duration::from_secs;
    let mirror_runs = if full {
        vec![
            MirrorRun {
                label: "default",
                backoff: None,
                failures: 1,
                step: secs_(20),
                samples: 8,
            },
            MirrorRun {
                label: "small",
                backoff: Some((secs_(1), secs_(4))),
                failures: 3,
                step: secs_(4),
                samples: 8,
            },
        ]
    } else {
        vec![MirrorRun {
            label: "small",
            backoff: Some((secs_(1), secs_(4))),
            failures: 1,
            step: secs_(1),
            samples: 2,
        }]
    };
    for run in &mirror_runs {
        let (failures, step) = (run.failures, run.step);
        let name = match run.backoff {
            None => "20 s … 120 s (default)".to_owned(),
            Some((b, c)) => format!("{} s … {} s", b.as_secs(), c.as_secs()),
        };
        let mut extra = Vec::new();
        for (offset, wait) in mirror_latency(dir.path(), run) {
            let due = step.saturating_sub(offset);
            let over = wait.as_secs_f64() - due.as_secs_f64();
            extra.push(over);
            println!(
                "| {name} | {failures} | {} | {} | {} | {:+.0} ms |",
                secs(step),
                secs(offset),
                secs(wait),
                over * 1e3
            );
        }
        extra.sort_by(f64::total_cmp);
        eprintln!(
            "{name}: T → released minus the time left of the step: median {:+.0} ms, max {:+.0} ms",
            extra[extra.len() / 2] * 1e3,
            extra[extra.len() - 1] * 1e3
        );
    }
    println!();
    println!("load average after: {}", common::loadavg());
}
