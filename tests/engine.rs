//! The engine through its public API, with a fake clock and fetchers that stand in for git
//! servers by writing objects into real bare repositories. No network.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use purgatory_sync::{
    Admission, Engine, EngineBuilder, ExpiryReason, FailureKind, FakeClock, FetchControl,
    FetchError, FetchReport, FetchRequest, Fetcher, Origin, Outcome, PendingEvent, RefUpdate,
    ShutdownError, StopReason, SubmitError,
};

const WAIT: Duration = Duration::from_secs(10);
/// A tick so long that anything that happens in a test happened because of a command or a
/// clock advance, not because the scheduler woke by itself.
const NEVER_TICK: Duration = Duration::from_secs(3600);

/// A blob's content and its object id.
fn blob(content: &str) -> (String, String) {
    let oid = git2::Oid::hash_object(git2::ObjectType::Blob, content.as_bytes()).unwrap();
    (oid.to_string(), content.to_owned())
}

fn bare(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    git2::Repository::init_bare(&p).unwrap();
    p
}

fn write_blob(repo: &Path, content: &str) {
    git2::Repository::open_bare(repo)
        .unwrap()
        .blob(content.as_bytes())
        .unwrap();
}

/// "Servers" by URL, each holding some blobs; a fetch writes the wanted blobs it holds.
#[derive(Default, Clone)]
struct FakeServers {
    blobs: Arc<HashMap<String, Vec<String>>>,
    fetches: Arc<AtomicUsize>,
}

impl FakeServers {
    fn new(servers: &[(&str, &[&str])]) -> Self {
        FakeServers {
            blobs: Arc::new(
                servers
                    .iter()
                    .map(|(u, b)| (u.to_string(), b.iter().map(|s| s.to_string()).collect()))
                    .collect(),
            ),
            fetches: Arc::default(),
        }
    }
}

impl Fetcher for FakeServers {
    fn fetch(&self, req: &FetchRequest, _: &FetchControl) -> FetchReport {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        for content in self.blobs.get(&req.url).into_iter().flatten() {
            let (oid, _) = blob(content);
            if req.wanted.iter().any(|w| w.to_string() == oid) {
                write_blob(&req.repo, content);
            }
        }
        let present = self.present(&req.repo, &req.wanted).unwrap();
        let error = (present.len() < req.wanted.len())
            .then(|| FetchError::new(FailureKind::Protocol, "server lacks objects"));
        FetchReport::new(present, error)
    }
}

fn builder(name: &str, clock: &FakeClock) -> EngineBuilder {
    purgatory_sync_testkit::loopback_engine()
        .thread_name(name)
        .clock(clock.clone())
        .tick(NEVER_TICK)
        .workers(2)
}

fn event(id: &str, ident: &str, repo: &Path, oids: &[&str], urls: &[&str]) -> PendingEvent {
    PendingEvent {
        id: id.into(),
        identifier: ident.into(),
        repo: repo.into(),
        oids: oids.iter().map(|s| s.to_string()).collect(),
        clone_urls: urls.iter().map(|s| s.to_string()).collect(),
        origin: Origin::Sync,
        ..Default::default()
    }
}

/// Names of this process's live threads (Linux `/proc`).
fn live_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

fn threads_named(prefix: &str) -> usize {
    live_threads()
        .iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .count()
}

/// A new thread names itself once it runs, and a joined thread's kernel task can linger in
/// `/proc` for a moment after `pthread_join` returns, so wait (bounded) for the expected count.
fn wait_threads_named(prefix: &str, expected: usize) -> usize {
    let start = Instant::now();
    loop {
        let n = threads_named(prefix);
        if n == expected || start.elapsed() > WAIT {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn engine_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Engine>();
}

#[test]
fn a_command_wakes_the_scheduler_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("a");
    let clock = FakeClock::new();
    let engine = builder("wake", &clock)
        .sync_delay(Duration::ZERO)
        .fetcher(FakeServers::new(&[("git://m/r", &[&a_text])]))
        .build()
        .unwrap();
    engine
        .submit(event("e", "id", &repo, &[&a], &["git://m/r"]))
        .unwrap();
    // With an hour-long tick and a clock that never moves, only the submit can have woken it.
    let o = engine.outcomes().recv_timeout(WAIT).expect("released");
    assert!(o.is_released(), "{o:?}");
    engine.shutdown().unwrap();
}

#[test]
fn advancing_the_fake_clock_drives_delays_backoff_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("nowhere");
    let clock = FakeClock::new();
    let servers = FakeServers::new(&[("git://m/r", &[])]);
    let engine = builder("clock", &clock)
        .fetcher(servers.clone())
        .event_lifetime(Duration::from_secs(60))
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    engine
        .submit(event("e", "id", &repo, &[&a], &["git://m/r"]))
        .unwrap();
    // Waits until `n` fetches have reported back to the scheduler, which is where backoff is
    // decided.
    let wait_for_fetches = |n: u64| {
        let start = Instant::now();
        let done = || {
            let s = engine.stats();
            s.fetches_succeeded + s.fetches_partial + s.fetches_failed
        };
        while done() < n && start.elapsed() < WAIT {
            std::thread::yield_now();
        }
        done()
    };
    clock.advance(Duration::from_millis(499));
    assert!(outcomes.recv_timeout(Duration::from_millis(50)).is_err());
    assert_eq!(
        servers.fetches.load(Ordering::SeqCst),
        0,
        "not before 500 ms"
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(wait_for_fetches(1), 1);
    clock.advance(Duration::from_secs(19));
    assert!(outcomes.recv_timeout(Duration::from_millis(50)).is_err());
    assert_eq!(servers.fetches.load(Ordering::SeqCst), 1, "backoff is 20 s");
    clock.advance(Duration::from_secs(1));
    assert_eq!(wait_for_fetches(2), 2);
    clock.advance(Duration::from_secs(40));
    match outcomes.recv_timeout(WAIT).expect("expired") {
        Outcome::Expired {
            event_id, missing, ..
        } => {
            assert_eq!(event_id, "e");
            assert_eq!(missing, vec![a.clone()]);
        }
        o => panic!("{o:?}"),
    }
    let err = engine
        .submit(event("e", "id", &repo, &[&a], &["git://m/r"]))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::PreviouslyExpired { ref event_id, refused_for } if event_id == "e" && refused_for == Duration::from_secs(7 * 24 * 3600)),
        "{err:?}"
    );
    engine.shutdown().unwrap();
}

#[test]
fn git_data_arrived_releases_without_a_fetch_and_without_waiting_for_a_tick() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("pushed");
    let clock = FakeClock::new();
    let servers = FakeServers::new(&[]);
    let engine = builder("push", &clock)
        .fetcher(servers.clone())
        .build()
        .unwrap();
    let mut ev = event("e", "id", &repo, &[&a], &["git://m/r"]);
    ev.origin = Origin::User;
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    write_blob(&repo, &a_text); // the user's push
    let start = Instant::now();
    engine.git_data_arrived("id");
    let o = engine.outcomes().recv_timeout(WAIT).expect("released");
    assert!(o.is_released());
    // Generous: the tick is an hour, a release at the next tick would never come.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(servers.fetches.load(Ordering::SeqCst), 0);
    let s = engine.stats();
    assert_eq!((s.released, s.rechecks, s.fetches_started), (1, 1, 0));
    engine.shutdown().unwrap();
}

#[test]
fn a_panicking_fetch_is_a_failed_attempt_and_the_engine_keeps_running() {
    struct PanicFirst(FakeServers);
    impl Fetcher for PanicFirst {
        fn fetch(&self, req: &FetchRequest, c: &FetchControl) -> FetchReport {
            if req.url == "git://panics/r" {
                panic!("injected panic");
            }
            self.0.fetch(req, c)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("a");
    let (b, b_text) = blob("b");
    let clock = FakeClock::new();
    let engine = builder("panic", &clock)
        .sync_delay(Duration::ZERO)
        .workers(1)
        .fetcher(PanicFirst(FakeServers::new(&[(
            "git://good/r",
            &[&a_text, &b_text],
        )])))
        .build()
        .unwrap();
    engine
        .submit(event(
            "e1",
            "id",
            &repo,
            &[&a],
            &["git://panics/r", "git://good/r"],
        ))
        .unwrap();
    assert!(engine.outcomes().recv_timeout(WAIT).unwrap().is_released());
    // The only worker survived its panic and serves the next identifier.
    let repo2 = bare(dir.path(), "r2.git");
    engine
        .submit(event(
            "e2",
            "id2",
            &repo2,
            &[&b],
            &["git://panics/r", "git://good/r"],
        ))
        .unwrap();
    assert!(engine.outcomes().recv_timeout(WAIT).unwrap().is_released());
    let s = engine.stats();
    assert_eq!(s.failures.get(&FailureKind::Panicked), Some(&2));
    assert_eq!((s.fetches_started, s.released), (4, 2));
    engine.shutdown().unwrap();
}

/// Blocks like a stalled server until the engine cancels it.
struct Stall {
    started: crossbeam_channel::Sender<()>,
    stopped: crossbeam_channel::Sender<Option<StopReason>>,
}

impl Fetcher for Stall {
    fn fetch(&self, _: &FetchRequest, c: &FetchControl) -> FetchReport {
        let _ = self.started.send(());
        let give_up = Instant::now() + Duration::from_secs(30);
        while c.should_stop().is_none() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.stopped.send(c.should_stop());
        FetchReport::failed(FetchError::new(FailureKind::Cancelled, "stopped"))
    }
}

#[test]
fn shutdown_cancels_fetches_in_flight_and_joins_every_thread() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let (stopped_tx, stopped) = crossbeam_channel::unbounded();
    let engine = builder("shut1", &clock)
        .workers(3)
        .sync_delay(Duration::ZERO)
        .fetcher(Stall {
            started: started_tx,
            stopped: stopped_tx,
        })
        .build()
        .unwrap();
    assert_eq!(wait_threads_named("shut1", 4), 4, "{:?}", live_threads());
    for i in 0..3 {
        let repo = bare(dir.path(), &format!("r{i}.git"));
        let (a, _) = blob(&format!("x{i}"));
        engine
            .submit(event(
                &format!("e{i}"),
                &format!("id{i}"),
                &repo,
                &[&a],
                &["git://m/r"],
            ))
            .unwrap();
    }
    for _ in 0..3 {
        started.recv_timeout(WAIT).expect("fetch started");
    }
    assert_eq!(engine.stats().in_flight, 3);
    let t = Instant::now();
    engine.shutdown().expect("clean shutdown");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for _ in 0..3 {
        assert_eq!(stopped.try_recv().unwrap(), Some(StopReason::Cancelled));
    }
    assert_eq!(wait_threads_named("shut1", 0), 0, "{:?}", live_threads());
}

#[test]
fn dropping_the_engine_joins_its_threads_too() {
    let clock = FakeClock::new();
    let engine = builder("drop1", &clock)
        .fetcher(FakeServers::default())
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    assert_eq!(wait_threads_named("drop1", 3), 3);
    drop(engine);
    assert_eq!(wait_threads_named("drop1", 0), 0, "{:?}", live_threads());
    assert!(
        matches!(
            outcomes.recv_timeout(WAIT),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        ),
        "the outcome channel closes after the last outcome"
    );
}

#[test]
fn a_fetch_that_ignores_cancellation_is_reported_not_waited_for_forever() {
    for workers in [1, 8] {
        a_fetch_that_ignores_cancellation_with(workers);
    }
}

/// One stuck fetch among `workers`: shutdown reports exactly one thread still running.
fn a_fetch_that_ignores_cancellation_with(workers: usize) {
    struct Deaf(
        crossbeam_channel::Receiver<()>,
        crossbeam_channel::Sender<()>,
    );
    impl Fetcher for Deaf {
        fn fetch(&self, _: &FetchRequest, _: &FetchControl) -> FetchReport {
            let _ = self.1.send(());
            let _ = self.0.recv_timeout(Duration::from_secs(30));
            FetchReport::default()
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("a");
    let clock = FakeClock::new();
    let (release_tx, release_rx) = crossbeam_channel::unbounded();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let engine = builder("deaf", &clock)
        .workers(workers)
        .sync_delay(Duration::ZERO)
        .shutdown_timeout(Duration::from_millis(200))
        .fetcher(Deaf(release_rx, started_tx))
        .build()
        .unwrap();
    engine
        .submit(event("e", "id", &repo, &[&a], &["git://m/r"]))
        .unwrap();
    started.recv_timeout(WAIT).unwrap();
    let t = Instant::now();
    let err = engine.shutdown().unwrap_err();
    assert!(
        matches!(err, ShutdownError::WorkersStillRunning { count: 1 }),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Let the stuck worker go, so that the test leaves no thread behind.
    release_tx.send(()).unwrap();
}

#[test]
fn objects_already_present_need_no_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("here");
    write_blob(&repo, &a_text);
    let clock = FakeClock::new();
    let engine = builder("sat", &clock)
        .fetcher(FakeServers::default())
        .build()
        .unwrap();
    let upper = a.to_ascii_uppercase();
    assert_eq!(
        engine
            .submit(event("e", "id", &repo, &[&upper], &[]))
            .unwrap(),
        Admission::AlreadySatisfied
    );
    let s = engine.stats();
    assert_eq!(
        (s.already_satisfied, s.waiting_events, s.submitted),
        (1, 0, 0)
    );
    assert!(engine.outcomes().try_recv().is_err(), "no outcome follows");
    engine.shutdown().unwrap();
}

/// A repository that is missing, not a repository or not bare is refused with
/// `InvalidRepository`, whether the fetcher is the built-in one (whose presence check opens the
/// repository as a bare one, so the engine does not open it first) or a custom fetcher that
/// never looks at the repository (so the engine must check it itself).
#[test]
fn a_repository_that_is_missing_not_a_repository_or_not_bare_is_refused_with_any_fetcher() {
    /// Reports every object absent without opening anything.
    struct Blind;
    impl Fetcher for Blind {
        fn fetch(&self, _: &FetchRequest, _: &FetchControl) -> FetchReport {
            FetchReport::default()
        }
        fn present(
            &self,
            _: &Path,
            _: &[purgatory_sync::ObjectId],
        ) -> Result<Vec<purgatory_sync::ObjectId>, FetchError> {
            Ok(Vec::new())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let worktree = dir.path().join("work");
    git2::Repository::init(&worktree).unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let (a, _) = blob("a");
    let clock = FakeClock::new();
    for (name, custom) in [("built-in", false), ("blind", true)] {
        let mut b = builder(name, &clock);
        if custom {
            b = b.fetcher(Blind);
        }
        let engine = b.build().unwrap();
        let cases = [
            (dir.path().join("missing.git"), "No such file"),
            (plain.clone(), "repository"),
            (worktree.clone(), "bare"),
            (PathBuf::new(), "empty path"),
        ];
        for (k, (path, says)) in cases.iter().enumerate() {
            let err = engine
                .submit(event(&format!("e{k}"), "id", path, &[&a], &["git://m/r"]))
                .expect_err(&format!("{name}: {path:?} must be refused"));
            assert!(
                matches!(&err, SubmitError::InvalidRepository { path: p, reason } if p == path && reason.contains(says)),
                "{name}: {path:?}: {err:?}"
            );
        }
        let admission = engine
            .submit(event("good", "id", &repo, &[&a], &["git://m/r"]))
            .unwrap();
        assert!(admission.is_pending(), "{name}: {admission:?}");
        // `submitted` counts when the scheduler takes the command.
        let s = purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.submitted > 0);
        assert_eq!((s.refused, s.submitted), (cases.len() as u64, 1), "{name}");
        engine.shutdown().unwrap();
    }
}

#[test]
fn every_bad_field_gets_its_own_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let worktree = dir.path().join("work");
    git2::Repository::init(&worktree).unwrap();
    let (a, _) = blob("a");
    let clock = FakeClock::new();
    let engine = builder("bad", &clock)
        .fetcher(FakeServers::default())
        .max_oids_per_event(3)
        .max_urls_per_event(2)
        .build()
        .unwrap();
    engine
        .submit(event("good", "id", &repo, &[&a], &["git://m/r"]))
        .unwrap();
    let ok = || event("e", "id", &repo, &[&a], &["git://m/r"]);
    let long = "x".repeat(300);
    type Expect = Box<dyn Fn(&SubmitError) -> bool>;
    let cases: Vec<(PendingEvent, Expect)> = vec![
        (
            PendingEvent {
                id: "".into(),
                ..ok()
            },
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::InvalidEventId {
                        reason: "empty",
                        ..
                    }
                )
            }),
        ),
        (
            PendingEvent {
                id: long.clone(),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidEventId { .. })),
        ),
        (
            PendingEvent {
                id: "a\nb".into(),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidEventId { .. })),
        ),
        (
            // A right-to-left override would make the printed id read backwards.
            PendingEvent {
                id: "abc\u{202e}fed".into(),
                ..ok()
            },
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::InvalidEventId {
                        reason: "contains Unicode bidirectional formatting characters",
                        ..
                    }
                )
            }),
        ),
        (
            PendingEvent {
                identifier: "".into(),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidIdentifier { .. })),
        ),
        (
            PendingEvent {
                identifier: "alice/\u{2067}project\u{2069}".into(),
                ..ok()
            },
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::InvalidIdentifier {
                        reason: "contains Unicode bidirectional formatting characters",
                        ..
                    }
                )
            }),
        ),
        (
            PendingEvent {
                identifier: long.clone(),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidIdentifier { .. })),
        ),
        (
            PendingEvent {
                oids: vec![],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::NoObjectIds)),
        ),
        (
            PendingEvent {
                oids: vec![a.clone(); 4],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::TooManyObjectIds { count: 4, max: 3 })),
        ),
        (
            PendingEvent {
                oids: vec![a.clone(), a[..7].to_string()],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidObjectId { index: 1, .. })),
        ),
        (
            PendingEvent {
                oids: vec![format!("{}g", &a[..39])],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidObjectId { index: 0, .. })),
        ),
        (
            PendingEvent {
                oids: vec![String::new()],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidObjectId { index: 0, .. })),
        ),
        (
            PendingEvent {
                clone_urls: vec!["a".into(), "b".into(), "c".into()],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::TooManyCloneUrls { count: 3, max: 2 })),
        ),
        (
            PendingEvent {
                clone_urls: vec!["".into()],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidCloneUrl { index: 0, .. })),
        ),
        (
            PendingEvent {
                clone_urls: vec!["git://m/r".into(), "git://m/ r".into()],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidCloneUrl { index: 1, .. })),
        ),
        (
            PendingEvent {
                clone_urls: vec![format!("https://{}", "h".repeat(3000))],
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidCloneUrl { index: 0, .. })),
        ),
        (
            PendingEvent {
                clone_urls: vec!["git://m/r".into(), "https://m/\u{200f}r.git".into()],
                ..ok()
            },
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::InvalidCloneUrl {
                        index: 1,
                        reason: "contains Unicode bidirectional formatting characters",
                        ..
                    }
                )
            }),
        ),
        (
            PendingEvent {
                repo: dir.path().join("missing.git"),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidRepository { .. })),
        ),
        (
            PendingEvent {
                repo: worktree.clone(),
                ..ok()
            },
            Box::new(
                |e| matches!(e, SubmitError::InvalidRepository { reason, .. } if reason.contains("bare")),
            ),
        ),
        (
            PendingEvent {
                repo: dir.path().to_path_buf(),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidRepository { .. })),
        ),
        (
            PendingEvent {
                repo: PathBuf::new(),
                ..ok()
            },
            Box::new(|e| matches!(e, SubmitError::InvalidRepository { .. })),
        ),
    ];
    let n = cases.len() as u64;
    for (i, (ev, expect)) in cases.into_iter().enumerate() {
        let err = engine
            .submit(ev)
            .expect_err(&format!("case {i} must be refused"));
        assert!(expect(&err), "case {i}: unexpected {err:?}");
        assert!(!err.to_string().is_empty());
    }
    let start = Instant::now();
    while engine.stats().submitted < 1 && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
    let s = engine.stats();
    assert_eq!((s.waiting_events, s.submitted, s.refused), (1, 1, n));
    engine.shutdown().unwrap();
}

#[test]
fn a_full_queue_refuses_and_frees_up_when_events_leave() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let clock = FakeClock::new();
    let engine = builder("full", &clock)
        .fetcher(FakeServers::default())
        .max_events(2)
        .build()
        .unwrap();
    let ids: Vec<String> = (0..3).map(|i| blob(&format!("q{i}")).0).collect();
    engine
        .submit(event("e0", "id", &repo, &[&ids[0]], &[]))
        .unwrap();
    engine
        .submit(event("e1", "id", &repo, &[&ids[1]], &[]))
        .unwrap();
    let err = engine
        .submit(event("e2", "id", &repo, &[&ids[2]], &[]))
        .unwrap_err();
    assert_eq!(err, SubmitError::QueueFull { max_events: 2 });
    engine.cancel("e0");
    let start = Instant::now();
    let result = loop {
        match engine.submit(event("e2", "id", &repo, &[&ids[2]], &[])) {
            Err(SubmitError::QueueFull { .. }) if start.elapsed() < WAIT => {
                std::thread::yield_now()
            }
            other => break other,
        }
    };
    assert_eq!(result, Ok(Admission::pending()));
    let start = Instant::now();
    while engine.stats().waiting_events != 2 && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
    assert_eq!(engine.stats().waiting_events, 2);
    engine.shutdown().unwrap();
}

#[test]
fn two_spellings_of_one_repository_share_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("a");
    let clock = FakeClock::new();
    let engine = builder("canon", &clock)
        .fetcher(FakeServers::default())
        .build()
        .unwrap();
    engine.submit(event("e1", "id", &repo, &[&a], &[])).unwrap();
    let other = dir.path().join(".").join("r.git/");
    engine
        .submit(event("e2", "id", &other, &[&a], &[]))
        .unwrap();
    let start = Instant::now();
    while engine.stats().waiting_events < 2 && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
    let s = engine.stats();
    assert_eq!((s.waiting_events, s.queued_identifiers), (2, 1));
    engine.shutdown().unwrap();
}

#[test]
fn many_events_from_many_threads_are_all_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<String> = (0..100).map(|i| format!("obj{i}")).collect();
    let refs: Vec<&str> = contents.iter().map(String::as_str).collect();
    let clock = FakeClock::new();
    let engine = Arc::new(
        builder("many", &clock)
            .workers(4)
            .sync_delay(Duration::ZERO)
            .fetcher(FakeServers::new(&[("git://m/r", &refs)]))
            .build()
            .unwrap(),
    );
    let repos: Vec<PathBuf> = (0..10)
        .map(|i| bare(dir.path(), &format!("r{i}.git")))
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let engine = engine.clone();
            let repos = repos.clone();
            let contents = contents.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let n = t * 25 + i;
                    let (oid, _) = blob(&contents[n]);
                    let r = n % 10;
                    let ev = event(
                        &format!("e{n}"),
                        &format!("id{r}"),
                        &repos[r],
                        &[&oid],
                        &["git://m/r"],
                    );
                    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let outcomes = engine.outcomes();
    let mut released = std::collections::HashSet::new();
    for _ in 0..100 {
        let o = outcomes
            .recv_timeout(WAIT)
            .expect("every event gets an outcome");
        assert!(o.is_released(), "{o:?}");
        assert!(
            released.insert(o.event_id().to_owned()),
            "one outcome per event"
        );
    }
    let s = engine.stats();
    assert_eq!((s.submitted, s.released, s.expired), (100, 100, 0));
    assert_eq!(
        (s.waiting_events, s.queued_identifiers, s.in_flight),
        (0, 0, 0)
    );
    assert_eq!(
        s.fetches_started,
        s.fetches_succeeded + s.fetches_partial + s.fetches_failed
    );
    Arc::try_unwrap(engine).unwrap().shutdown().unwrap();
}

// Ref updates.

#[test]
fn every_bad_ref_update_gets_its_own_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("a");
    let (b, _) = blob("b");
    let clock = FakeClock::new();
    let engine = builder("badref", &clock)
        .fetcher(FakeServers::default())
        .max_ref_updates_per_event(3)
        .build()
        .unwrap();
    let main = |target: &str| RefUpdate::oid("refs/heads/main", target);
    let good = event("good", "id", &repo, &[&a], &["git://m/r"])
        .ref_update(main(&a))
        .ref_update(RefUpdate::symbolic("HEAD", "refs/heads/main"));
    assert_eq!(engine.submit(good).unwrap(), Admission::pending());
    let with = |refs: Vec<RefUpdate>| PendingEvent {
        ref_updates: refs,
        ..event("e", "id", &repo, &[&a], &["git://m/r"])
    };
    let long = format!("refs/heads/{}", "x".repeat(1100));
    // (updates, index, reason) of each refused submit.
    let cases: Vec<(Vec<RefUpdate>, usize, &str)> = vec![
        (vec![RefUpdate::oid("", &a)], 0, "empty"),
        (
            vec![RefUpdate::oid("main", &a)],
            0,
            "not HEAD or a full ref name under refs/",
        ),
        (
            vec![main(&a), RefUpdate::oid("refs/heads/a..b", &a)],
            1,
            "not a valid git ref name",
        ),
        (
            vec![RefUpdate::oid("refs/heads/x.lock", &a)],
            0,
            "not a valid git ref name",
        ),
        (
            vec![RefUpdate::oid("refs/heads/a\nb", &a)],
            0,
            "contains control characters",
        ),
        (
            vec![main(&a), RefUpdate::oid("refs/heads/a\u{202d}b", &a)],
            1,
            "contains Unicode bidirectional formatting characters",
        ),
        (
            vec![RefUpdate::oid(long.clone(), &a)],
            0,
            "longer than 1024 bytes",
        ),
        (
            vec![RefUpdate::oid(format!("refs/purgatory-sync/{a}"), &a)],
            0,
            "under refs/purgatory-sync/, the engine's own namespace",
        ),
        (
            vec![RefUpdate::oid("refs/purgatory-sync", &a)],
            0,
            "under refs/purgatory-sync/, the engine's own namespace",
        ),
        (vec![main(&a), main(&a)], 1, "given twice"),
        (
            vec![
                RefUpdate::symbolic("HEAD", "refs/heads/main"),
                main(&a),
                RefUpdate::symbolic("HEAD", "refs/heads/dev"),
            ],
            2,
            "given twice",
        ),
        (
            vec![main(&a), RefUpdate::oid("refs/heads/main/topic", &a)],
            1,
            "clashes with another ref update: one name is a directory of the other",
        ),
        (
            vec![
                RefUpdate::oid("refs/heads/topic/x", &a),
                RefUpdate::oid("refs/heads/topic", &a),
            ],
            1,
            "clashes with another ref update: one name is a directory of the other",
        ),
        (
            vec![main(&a[..7])],
            0,
            "target is not a full object id of 40 hex digits",
        ),
        (
            vec![main(&format!("{}g", &a[..39]))],
            0,
            "target is not a full object id of 40 hex digits",
        ),
        (vec![main(&b)], 0, "target is not among the event's oids"),
        (
            vec![RefUpdate::symbolic("refs/heads/dev", "refs/heads/main")],
            0,
            "a symbolic target is only allowed for HEAD",
        ),
        (
            vec![RefUpdate::symbolic("HEAD", "main")],
            0,
            "symbolic target is not a valid refs/... name",
        ),
        (
            vec![RefUpdate::symbolic("HEAD", "refs/purgatory-sync/x")],
            0,
            "symbolic target is not a valid refs/... name",
        ),
    ];
    let n = cases.len() as u64 + 1;
    for (i, (refs, index, reason)) in cases.into_iter().enumerate() {
        let name = refs[index].name.clone();
        let err = engine
            .submit(with(refs))
            .expect_err(&format!("case {i} must be refused"));
        assert_eq!(
            err,
            SubmitError::InvalidRefUpdate {
                index,
                name,
                reason
            },
            "case {i}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("invalid ref_updates[{index}] ")),
            "{err}"
        );
    }
    let too_many = with(vec![
        main(&a),
        RefUpdate::oid("refs/tags/v1", &a),
        RefUpdate::oid("refs/tags/v2", &a),
        RefUpdate::oid("refs/tags/v3", &a),
    ]);
    assert_eq!(
        engine.submit(too_many).unwrap_err(),
        SubmitError::TooManyRefUpdates { count: 4, max: 3 }
    );
    let start = Instant::now();
    while engine.stats().submitted < 1 && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
    let s = engine.stats();
    assert_eq!((s.waiting_events, s.submitted, s.refused), (1, 1, n));
    assert!(engine.outcomes().try_recv().is_err());
    engine.shutdown().unwrap();
}

/// What a [`RefWriter`] does on its next `apply_refs` call.
#[derive(Clone, Copy, Debug)]
enum Write {
    Ok,
    Fail,
    Panic,
}

/// Records ref updates instead of writing them, and answers from a script (then `Ok`).
#[derive(Clone)]
struct RefWriter {
    script: Arc<parking_lot::Mutex<std::collections::VecDeque<Write>>>,
    calls: crossbeam_channel::Sender<Vec<RefUpdate>>,
}

impl RefWriter {
    fn new(script: &[Write]) -> (Self, crossbeam_channel::Receiver<Vec<RefUpdate>>) {
        let (calls, rx) = crossbeam_channel::unbounded();
        let w = RefWriter {
            script: Arc::new(parking_lot::Mutex::new(script.iter().copied().collect())),
            calls,
        };
        (w, rx)
    }
}

impl Fetcher for RefWriter {
    fn fetch(&self, _: &FetchRequest, _: &FetchControl) -> FetchReport {
        FetchReport::failed(FetchError::new(FailureKind::Protocol, "no server"))
    }

    fn apply_refs(&self, _: &Path, updates: &[RefUpdate], _: bool) -> Result<(), FetchError> {
        let _ = self.calls.send(updates.to_vec());
        match self.script.lock().pop_front().unwrap_or(Write::Ok) {
            Write::Ok => Ok(()),
            Write::Fail => Err(FetchError::new(
                FailureKind::LocalRepository,
                "refs/heads/main is locked",
            )),
            Write::Panic => panic!("injected panic in apply_refs"),
        }
    }
}

/// Waits (bounded) until the engine has counted `n` failed ref writes.
fn wait_ref_failures(engine: &Engine, n: u64) -> u64 {
    let start = Instant::now();
    loop {
        let f = engine.stats().ref_update_failures;
        if f >= n || start.elapsed() > WAIT {
            return f;
        }
        std::thread::yield_now();
    }
}

#[test]
fn an_event_with_refs_and_every_object_present_is_pending_until_its_refs_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("here");
    write_blob(&repo, &a_text);
    let clock = FakeClock::new();
    let (writer, calls) = RefWriter::new(&[]);
    let engine = builder("satref", &clock).fetcher(writer).build().unwrap();
    let ev = event("e", "id", &repo, &[&a], &[])
        .ref_update(RefUpdate::oid("refs/heads/main", a.to_uppercase()))
        .ref_update(RefUpdate::symbolic("HEAD", "refs/heads/main"));
    // Not `AlreadySatisfied`: the refs are written by the scheduler, and `Released` follows.
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    let o = engine.outcomes().recv_timeout(WAIT).expect("released");
    assert!(o.is_released(), "{o:?}");
    // Written before the outcome was sent, with the target in lower case.
    assert_eq!(
        calls.try_recv().expect("refs written before Released"),
        vec![
            RefUpdate::oid("refs/heads/main", a.clone()),
            RefUpdate::symbolic("HEAD", "refs/heads/main")
        ]
    );
    let s = engine.stats();
    assert_eq!(
        (
            s.already_satisfied,
            s.submitted,
            s.released,
            s.ref_updates_applied,
            s.fetches_started
        ),
        (0, 1, 1, 1, 0)
    );
    assert_eq!((s.waiting_events, s.awaiting_refs), (0, 0));
    // Without ref updates the same event is already satisfied, as before.
    assert_eq!(
        engine.submit(event("e2", "id", &repo, &[&a], &[])).unwrap(),
        Admission::AlreadySatisfied
    );
    engine.shutdown().unwrap();
    assert!(calls.try_recv().is_err(), "written once");
}

#[test]
fn a_failed_or_panicking_ref_write_is_retried_a_tick_later() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("here");
    write_blob(&repo, &a_text);
    let clock = FakeClock::new();
    let (writer, calls) = RefWriter::new(&[Write::Fail, Write::Panic]);
    let tick = Duration::from_secs(1);
    let engine = builder("retry", &clock)
        .tick(tick)
        .fetcher(writer)
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    let ev = event("e", "id", &repo, &[&a], &[])
        .ref_update(RefUpdate::oid("refs/heads/main", a.clone()));
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    assert_eq!(wait_ref_failures(&engine, 1), 1);
    assert!(outcomes.try_recv().is_err(), "not released");
    let s = engine.stats();
    assert_eq!((s.waiting_events, s.awaiting_refs), (1, 1), "{s:?}");
    clock.advance(tick);
    assert_eq!(
        wait_ref_failures(&engine, 2),
        2,
        "the panic counts as a failure"
    );
    assert!(outcomes.try_recv().is_err(), "not released");
    clock.advance(tick);
    let o = outcomes.recv_timeout(WAIT).expect("released");
    assert!(o.is_released(), "{o:?}");
    assert_eq!(calls.try_iter().count(), 3);
    let s = engine.stats();
    assert_eq!(
        (s.released, s.ref_updates_applied, s.ref_update_failures),
        (1, 1, 2)
    );
    engine.shutdown().unwrap();
}

#[test]
fn an_event_whose_refs_cannot_be_written_expires_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("here");
    write_blob(&repo, &a_text);
    let clock = FakeClock::new();
    let (writer, _calls) = RefWriter::new(&[Write::Fail; 100]);
    let engine = builder("refexp", &clock)
        .tick(Duration::from_secs(1))
        .event_lifetime(Duration::from_secs(5))
        .fetcher(writer)
        .build()
        .unwrap();
    let ev = event("e", "id", &repo, &[&a], &[])
        .ref_update(RefUpdate::oid("refs/heads/main", a.clone()));
    engine.submit(ev).unwrap();
    assert_eq!(wait_ref_failures(&engine, 1), 1);
    clock.advance(Duration::from_secs(5));
    match engine.outcomes().recv_timeout(WAIT).expect("expired") {
        Outcome::Expired {
            event_id,
            missing,
            reason: ExpiryReason::RefUpdateFailed { message, .. },
            ..
        } => {
            assert_eq!(event_id, "e");
            assert!(missing.is_empty());
            assert_eq!(message, "refs/heads/main is locked");
        }
        o => panic!("{o:?}"),
    }
    let s = engine.stats();
    assert_eq!((s.expired, s.waiting_events, s.awaiting_refs), (1, 0, 0));
    engine.shutdown().unwrap();
}

/// The distinct clone URLs of one identifier's waiting events are capped: a submit that would
/// pass the cap is refused with an error naming the identifier and the counts, and changes
/// nothing; URLs already listed cost nothing new; URLs of events that left no longer count.
#[test]
fn the_distinct_clone_urls_of_an_identifier_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("a");
    let clock = FakeClock::new();
    let engine = builder("urlcap", &clock)
        .fetcher(FakeServers::default())
        .user_delay(NEVER_TICK)
        .sync_delay(NEVER_TICK)
        .max_urls_per_identifier(4)
        .build()
        .unwrap();
    let urls = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| format!("https://m{i}.example.com/r.git"))
            .collect()
    };
    let submit = |id: &str, ident: &str, list: &[String]| {
        let list: Vec<&str> = list.iter().map(String::as_str).collect();
        engine.submit(event(id, ident, &repo, &[&a], &list))
    };
    submit("e1", "popular", &urls(0, 3)).unwrap();
    // Two known URLs and one new: 4 distinct, within the cap. The same URL written otherwise
    // (case, default port) is the same URL.
    let mut mixed = urls(1, 2);
    mixed.push("HTTPS://M0.Example.COM:443/r.git".to_owned());
    mixed.extend(urls(3, 1));
    submit("e2", "popular", &mixed).unwrap();
    match submit("e3", "popular", &urls(3, 2)) {
        Err(SubmitError::TooManyIdentifierUrls {
            identifier,
            distinct,
            new,
            max,
        }) => {
            assert_eq!(
                (identifier.as_str(), distinct, new, max),
                ("popular", 4, 1, 4)
            );
        }
        other => panic!("{other:?}"),
    }
    // Another identifier has its own allowance.
    submit("other", "quiet", &urls(10, 4)).unwrap();
    let s = purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.submitted == 3);
    assert_eq!((s.waiting_events, s.refused), (3, 1));
    // When e1 and e2 leave, their URLs no longer count.
    engine.cancel("e1");
    engine.cancel("e2");
    purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.cancelled == 2);
    submit("e3", "popular", &urls(4, 4)).unwrap();
    let message = submit("e4", "popular", &urls(8, 1))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("\"popular\" has 4 distinct clone URLs waiting and the event adds 1"),
        "{message}"
    );
    engine.shutdown().unwrap();
}

/// Host threads each call `cancel(id)` and at once `submit(id)` on their own ids, and
/// variants (`submit; cancel; submit`, a lone `cancel`, a lone `submit` of an id that may be
/// waiting), with either origin, as fast as they can. The engine must behave as if it had
/// applied each thread's calls in the order made: an id whose last call was a `submit`
/// answered `Pending` waits, and gets exactly one outcome when its object arrives; an id whose
/// last call was a `cancel` gets none. Afterwards every admission is given back: the queue
/// holds `max_events` new events again, and not one more.
#[test]
fn calls_from_one_thread_take_effect_in_the_order_they_were_made() {
    const THREADS: usize = 4;
    const IDS: usize = 16;
    const ROUNDS: usize = 40;
    const MAX: usize = 2 * THREADS * IDS;
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("the hammered events' object");
    let clock = FakeClock::new();
    // The clock never moves: no fetch starts and nothing expires while the threads hammer.
    let engine = builder("order", &clock)
        .fetcher(FakeServers::default())
        .max_events(MAX)
        .build()
        .unwrap();
    let waiting: Vec<Vec<String>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (engine, repo, a) = (&engine, &repo, &a);
                s.spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    // Whether each id's last call was a submit answered `Pending`.
                    let mut pending = [false; IDS];
                    let submit = |k: usize, r: u64, pending: &mut [bool; IDS]| {
                        let origin = if r & 1 == 0 {
                            Origin::Sync
                        } else {
                            Origin::User
                        };
                        let ev = event(
                            &format!("t{t}-e{k}"),
                            &format!("ident{t}"),
                            repo,
                            &[a],
                            &["git://m/r"],
                        )
                        .origin(origin);
                        match engine.submit(ev) {
                            Ok(Admission::Pending { .. }) => pending[k] = true,
                            // A refused submit changes nothing.
                            Err(SubmitError::QueueFull { .. }) => {}
                            other => panic!("t{t}-e{k}: {other:?}"),
                        }
                    };
                    for _ in 0..ROUNDS {
                        for k in 0..IDS {
                            let r = next();
                            let id = format!("t{t}-e{k}");
                            match (r >> 8) % 8 {
                                0..=3 => {
                                    engine.cancel(&id);
                                    pending[k] = false;
                                    submit(k, r, &mut pending);
                                }
                                4 | 5 => {
                                    submit(k, r, &mut pending);
                                    engine.cancel(&id);
                                    pending[k] = false;
                                    submit(k, r >> 1, &mut pending);
                                }
                                6 => {
                                    engine.cancel(&id);
                                    pending[k] = false;
                                }
                                _ => submit(k, r, &mut pending),
                            }
                        }
                    }
                    (0..IDS)
                        .filter(|k| pending[*k])
                        .map(|k| format!("t{t}-e{k}"))
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let waiting: std::collections::BTreeSet<String> = waiting.into_iter().flatten().collect();
    assert!(
        waiting.len() > THREADS * IDS / 4,
        "too few events left waiting to tell anything: {}",
        waiting.len()
    );
    let s = purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.commands_pending == 0);
    assert_eq!(
        s.waiting_events,
        waiting.len(),
        "events waiting in the engine against ids whose last call was a pending submit"
    );
    write_blob(&repo, &a_text);
    for t in 0..THREADS {
        engine.git_data_arrived(&format!("ident{t}"));
    }
    let outcomes = engine.outcomes();
    let mut released = std::collections::BTreeSet::new();
    while released.len() < waiting.len() {
        let Ok(o) = outcomes.recv_timeout(WAIT) else {
            break;
        };
        assert!(o.is_released(), "{o:?}");
        assert!(
            released.insert(o.event_id().to_owned()),
            "a second outcome for {}",
            o.event_id()
        );
    }
    assert_eq!(released, waiting, "released against pending");
    let s = purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| {
        s.commands_pending == 0 && s.waiting_events == 0
    });
    assert_eq!(s.released, waiting.len() as u64);
    assert!(outcomes.try_recv().is_err(), "an outcome too many");
    // Every admission counted by the hammered submits was given back.
    let (b, _) = blob("not here");
    for k in 0..MAX {
        let ev = event(&format!("after{k}"), "after", &repo, &[&b], &[]);
        assert!(engine.submit(ev).unwrap().is_pending(), "after{k}");
    }
    let ev = event("one-more", "after", &repo, &[&b], &[]);
    assert_eq!(
        engine.submit(ev),
        Err(SubmitError::QueueFull { max_events: MAX })
    );
    engine.shutdown().unwrap();
}

/// After an event expires, only a synced re-submission whose data is still missing is
/// refused, for the default 7 days: a user's re-submission waits again (and is released when
/// its data comes), one whose data has arrived meanwhile is `AlreadySatisfied`. Ids that
/// waited again are no longer remembered as expired.
#[test]
fn an_expired_id_is_refused_only_as_a_synced_event_still_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("never comes");
    let (b, b_text) = blob("pushed after the expiry");
    let (c, c_text) = blob("pushed later by the user");
    let clock = FakeClock::new();
    let engine = builder("expiry", &clock)
        .fetcher(FakeServers::default())
        .user_delay(NEVER_TICK)
        .sync_delay(NEVER_TICK)
        .event_lifetime(Duration::from_secs(60))
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    let ev = |id: &str, oid: &str, origin: Origin| {
        event(id, "id", &repo, &[oid], &["git://m/r"]).origin(origin)
    };
    for (id, oid) in [("missing", &a), ("arrived", &b), ("user", &c)] {
        assert!(engine
            .submit(ev(id, oid, Origin::Sync))
            .unwrap()
            .is_pending());
    }
    clock.advance(Duration::from_secs(60));
    let mut expired: Vec<String> = (0..3)
        .map(|_| outcomes.recv_timeout(WAIT).expect("expired"))
        .inspect(|o| assert!(!o.is_released(), "{o:?}"))
        .map(|o| o.event_id().to_owned())
        .collect();
    expired.sort();
    assert_eq!(expired, ["arrived", "missing", "user"]);
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(
        engine.submit(ev("missing", &a, Origin::Sync)),
        Err(SubmitError::PreviouslyExpired {
            event_id: "missing".into(),
            refused_for: week
        })
    );
    write_blob(&repo, &b_text);
    assert_eq!(
        engine.submit(ev("arrived", &b, Origin::Sync)),
        Ok(Admission::AlreadySatisfied)
    );
    assert!(engine
        .submit(ev("user", &c, Origin::User))
        .unwrap()
        .is_pending());
    let s = purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.commands_pending == 0);
    assert_eq!(
        (s.submitted, s.waiting_events, s.expired_ids_remembered),
        (4, 1, 2),
        "the user's event waits again and its id is no longer remembered as expired"
    );
    write_blob(&repo, &c_text);
    engine.git_data_arrived("id");
    let o = outcomes.recv_timeout(WAIT).expect("released");
    assert!(o.is_released() && o.event_id() == "user", "{o:?}");
    // Still refused until the week is over, then forgotten.
    clock.advance(week - Duration::from_secs(1));
    assert!(matches!(
        engine.submit(ev("missing", &a, Origin::Sync)),
        Err(SubmitError::PreviouslyExpired { refused_for, .. }) if refused_for == Duration::from_secs(1)
    ));
    clock.advance(Duration::from_secs(1));
    purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.expired_ids_remembered == 0);
    assert!(engine
        .submit(ev("missing", &a, Origin::Sync))
        .unwrap()
        .is_pending());
    engine.shutdown().unwrap();
}

/// Through the public API: a user re-publishing a waiting synced event restarts its
/// lifetime, counted from the re-submission; a synced re-broadcast does not extend it.
#[test]
fn a_user_republishing_a_waiting_synced_event_restarts_its_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, _) = blob("never comes");
    let clock = FakeClock::new();
    let engine = builder("upgrade", &clock)
        .fetcher(FakeServers::default())
        .user_delay(NEVER_TICK)
        .sync_delay(NEVER_TICK)
        .event_lifetime(Duration::from_secs(60))
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    let ev =
        |id: &str, origin: Origin| event(id, "id", &repo, &[&a], &["git://m/r"]).origin(origin);
    for id in ["upgraded", "rebroadcast"] {
        assert!(engine.submit(ev(id, Origin::Sync)).unwrap().is_pending());
    }
    purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.submitted == 2);
    clock.advance(Duration::from_secs(40));
    assert!(engine
        .submit(ev("upgraded", Origin::User))
        .unwrap()
        .is_pending());
    assert!(engine
        .submit(ev("rebroadcast", Origin::Sync))
        .unwrap()
        .is_pending());
    let s = purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.commands_pending == 0);
    assert_eq!((s.submitted, s.waiting_events), (2, 2), "re-submissions");
    // Both would expire in the same pass at 60 s: the first outcome there must be the only one.
    clock.advance(Duration::from_secs(20));
    let o = outcomes
        .recv_timeout(WAIT)
        .expect("the re-broadcast one expires");
    assert_eq!((o.event_id(), o.is_released()), ("rebroadcast", false));
    assert!(
        outcomes.recv_timeout(Duration::from_millis(200)).is_err(),
        "the upgraded event expired with its first lifetime"
    );
    // 60 s after the re-submission at 40 s.
    clock.advance(Duration::from_secs(40) - Duration::from_millis(1));
    assert!(outcomes.recv_timeout(Duration::from_millis(200)).is_err());
    clock.advance(Duration::from_millis(1));
    let o = outcomes
        .recv_timeout(WAIT)
        .expect("the upgraded one expires");
    assert_eq!((o.event_id(), o.is_released()), ("upgraded", false));
    engine.shutdown().unwrap();
}

/// A waiting event re-submitted after its data arrived is answered `AlreadySatisfied`, and the
/// waiting copy is released at once (not at its next attempt, here three minutes away).
#[test]
fn a_waiting_event_submitted_again_with_its_data_present_is_released_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = bare(dir.path(), "r.git");
    let (a, a_text) = blob("pushed later");
    let clock = FakeClock::new();
    let engine = builder("again", &clock)
        .fetcher(FakeServers::default())
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    let mut ev = event("e", "id", &repo, &[&a], &["git://m/r"]);
    ev.origin = Origin::User;
    assert_eq!(engine.submit(ev.clone()).unwrap(), Admission::pending());
    purgatory_sync_testkit::wait_for_stats(&engine, WAIT, |s| s.waiting_events == 1);
    write_blob(&repo, &a_text);
    assert_eq!(engine.submit(ev).unwrap(), Admission::AlreadySatisfied);
    match outcomes.recv_timeout(WAIT) {
        Ok(Outcome::Released { event_id, .. }) => assert_eq!(event_id, "e"),
        other => panic!("{other:?}"),
    }
    assert!(outcomes.try_recv().is_err(), "one outcome");
    engine.shutdown().unwrap();
}

/// Removing a released event's temporary refs runs on a worker, not on the scheduler thread:
/// while it is blocked, another repository's event is fetched and released, and no fetch
/// starts in the repository whose refs are being removed until the removal reports.
#[test]
fn temporary_refs_are_removed_by_a_worker_while_their_repository_waits() {
    struct SlowDrop {
        inner: FakeServers,
        held: PathBuf,
        /// The removal in `held` blocks while this is set.
        block: Arc<std::sync::atomic::AtomicBool>,
        dropping: Arc<std::sync::atomic::AtomicBool>,
        fetches_in_held_while_dropping: Arc<AtomicUsize>,
    }
    impl Fetcher for SlowDrop {
        fn fetch(&self, req: &FetchRequest, c: &FetchControl) -> FetchReport {
            if req.repo == self.held && self.dropping.load(Ordering::SeqCst) {
                self.fetches_in_held_while_dropping
                    .fetch_add(1, Ordering::SeqCst);
            }
            self.inner.fetch(req, c)
        }
        fn drop_temp_refs(
            &self,
            repo: &Path,
            oids: &[purgatory_sync::ObjectId],
        ) -> Result<(), FetchError> {
            if repo == self.held {
                self.dropping.store(true, Ordering::SeqCst);
                let start = Instant::now();
                // Bounded: the test lets it go long before.
                while self.block.load(Ordering::SeqCst) && start.elapsed() < WAIT {
                    std::thread::sleep(Duration::from_millis(2));
                }
                self.dropping.store(false, Ordering::SeqCst);
            }
            self.inner.drop_temp_refs(repo, oids)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let held = bare(dir.path(), "held.git");
    let other = bare(dir.path(), "other.git");
    let (x, x_text) = blob("x");
    let (y, y_text) = blob("y");
    let (z, z_text) = blob("z");
    let block = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dropping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let violations = Arc::new(AtomicUsize::new(0));
    let clock = FakeClock::new();
    let engine = builder("drops", &clock)
        .sync_delay(Duration::ZERO)
        .workers(3)
        .fetcher(SlowDrop {
            inner: FakeServers::new(&[("git://m/r", &[&x_text, &y_text, &z_text])]),
            held: held.clone(),
            block: block.clone(),
            dropping: dropping.clone(),
            fetches_in_held_while_dropping: violations.clone(),
        })
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    engine
        .submit(event("e1", "id1", &held, &[&x], &["git://m/r"]))
        .unwrap();
    assert_eq!(outcomes.recv_timeout(WAIT).unwrap().event_id(), "e1");
    let start = Instant::now();
    while !dropping.load(Ordering::SeqCst) && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        dropping.load(Ordering::SeqCst),
        "the refs of e1 are being removed"
    );
    // Another repository is served meanwhile; the held one waits.
    engine
        .submit(event("e3", "id3", &held, &[&z], &["git://m/r"]))
        .unwrap();
    engine
        .submit(event("e2", "id2", &other, &[&y], &["git://m/r"]))
        .unwrap();
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap().event_id(),
        "e2",
        "released while the removal in another repository blocks"
    );
    assert!(dropping.load(Ordering::SeqCst), "still blocked");
    assert!(outcomes.try_recv().is_err(), "e3 waits for its repository");
    block.store(false, Ordering::SeqCst);
    assert_eq!(outcomes.recv_timeout(WAIT).unwrap().event_id(), "e3");
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    engine.shutdown().unwrap();
}
