//! The state file at 100 000 waiting events (2 object ids and 2 clone URLs each, in 4 bare
//! repositories): how long `build()` takes to restore them until the engine is up, how long
//! one atomic write takes (what a checkpoint and a shutdown cost), and how long reading and
//! checking the file takes on its own.
//!
//! The fetcher answers `present` without touching the disk, so the restore figure is the
//! engine's own work: parsing, checking every event again, rebuilding the queue.
//!
//! Run with `cargo bench --bench state`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use purgatory_sync::internals::bench::StateBench;
use purgatory_sync::{
    Engine, FailureKind, FetchControl, FetchError, FetchReport, FetchRequest, Fetcher, ObjectId,
};
use purgatory_sync_testkit::init_bare;

const EVENTS: usize = 100_000;
const REPOS: usize = 4;
const IDENTIFIERS: usize = 1_000;

/// Finds nothing and never reads a repository.
struct FindsNothing;

impl Fetcher for FindsNothing {
    fn fetch(&self, _: &FetchRequest, _: &FetchControl) -> FetchReport {
        FetchReport::failed(FetchError::new(FailureKind::NotFound, "bench"))
    }

    fn present(&self, _: &Path, _: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
        Ok(Vec::new())
    }
}

/// A state file in the documented format, written directly: `EVENTS` events with 30 minutes
/// to live, written now.
fn state_json(repos: &[PathBuf]) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut s = String::with_capacity(EVENTS * 400);
    write!(s, r#"{{"version":1,"written_at_ms":{now_ms},"events":["#).unwrap();
    for i in 0..EVENTS {
        let ident = i % IDENTIFIERS;
        let repo = repos[i % REPOS].to_str().unwrap();
        if i > 0 {
            s.push(',');
        }
        write!(
            s,
            concat!(
                r#"{{"id":"{:064x}","identifier":"npub1bench/ident-{}","repo":{:?},"#,
                r#""oids":["{:040x}","{:040x}"],"#,
                r#""clone_urls":["https://git.example.com/ident-{}.git","https://mirror.example.org/ident-{}.git"],"#,
                r#""origin":"{}","ref_updates":[],"remaining_ms":1800000,"waited_ms":0}}"#
            ),
            i,
            ident,
            repo,
            2 * i + 1,
            2 * i + 2,
            ident,
            ident,
            if i % 2 == 0 { "sync" } else { "user" },
        )
        .unwrap();
    }
    s.push_str(r#"],"expired_ids":[],"naughty":[]}"#);
    s.push('\n');
    s
}

fn state(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let repos: Vec<PathBuf> = (0..REPOS)
        .map(|r| init_bare(&dir.path().join(format!("repo-{r}.git"))))
        .collect();
    let master = dir.path().join("master.json");
    std::fs::write(&master, state_json(&repos)).unwrap();
    let parsed = StateBench::read(&master).unwrap();
    assert_eq!(parsed.events(), EVENTS);
    let size = std::fs::metadata(&master).unwrap().len();
    eprintln!("state file of {EVENTS} events: {size} bytes");

    let mut group = c.benchmark_group("state_100k_events");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(EVENTS as u64));

    let written = dir.path().join("written.json");
    group.bench_function("write", |b| {
        b.iter(|| parsed.write(&written).unwrap());
    });

    group.bench_function("read_and_check", |b| {
        b.iter(|| assert_eq!(StateBench::read(&master).unwrap().events(), EVENTS));
    });

    let path = dir.path().join("state.json");
    group.bench_function("restore_build", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Each build restores the same file; the shutdown's write goes elsewhere.
                std::fs::copy(&master, &path).unwrap();
                let start = Instant::now();
                let engine = Engine::builder()
                    .thread_name("bench")
                    .fetcher(FindsNothing)
                    .tick(Duration::from_secs(3600))
                    .user_delay(Duration::from_secs(3600))
                    .sync_delay(Duration::from_secs(3600))
                    .state_file(&path)
                    .build()
                    .unwrap();
                total += start.elapsed();
                assert_eq!(engine.stats().waiting_events, EVENTS);
                engine.shutdown().unwrap();
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, state);
criterion_main!(benches);
