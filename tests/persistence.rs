//! Durable purgatory through the engine: what a restart keeps, and how downtime is accounted,
//! with fake clocks (the wall clock of the second engine is set to model the downtime).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use purgatory_sync::{
    check_state_file, Clock, Engine, EngineBuilder, ExpiryReason, FailureKind, FakeClock,
    FetchControl, FetchError, FetchReport, FetchRequest, Fetcher, Origin, Outcome, PendingEvent,
    RefUpdate, RefsOutcome, SubmitError,
};
use purgatory_sync_testkit as testkit;

const WAIT: Duration = Duration::from_secs(10);
const MIN: Duration = Duration::from_secs(60);

/// A fetcher that finds nothing; URLs on `dns.example` fail as DNS failures.
#[derive(Clone, Default)]
struct Nothing;

impl Fetcher for Nothing {
    fn fetch(&self, req: &FetchRequest, _: &FetchControl) -> FetchReport {
        let kind = if req.url.contains("dns.example") {
            FailureKind::Dns
        } else {
            FailureKind::NotFound
        };
        FetchReport::failed(FetchError::new(kind, "test"))
    }
}

fn blob(repo: &Path, content: &str) -> String {
    git2::Repository::open_bare(repo)
        .unwrap()
        .blob(content.as_bytes())
        .unwrap()
        .to_string()
}

fn absent(content: &str) -> String {
    git2::Oid::hash_object(git2::ObjectType::Blob, content.as_bytes())
        .unwrap()
        .to_string()
}

fn builder(name: &str, clock: &FakeClock, state: &Path) -> EngineBuilder {
    Engine::builder()
        .thread_name(name)
        .clock(clock.clone())
        .tick(Duration::from_secs(3600))
        .fetcher(Nothing)
        .state_file(state)
}

fn bare(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    git2::Repository::init_bare(&p).unwrap();
    p
}

fn event(id: &str, repo: &Path, oid: &str) -> PendingEvent {
    PendingEvent::new(id, "ident", repo)
        .oid(oid)
        .origin(Origin::User)
}

/// Waits (bounded) until the scheduler has taken every command.
fn settle(engine: &Engine) {
    let start = Instant::now();
    while engine.stats().commands_pending > 0 && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
}

fn outcome(engine: &Engine) -> Outcome {
    engine.outcomes().recv_timeout(WAIT).expect("an outcome")
}

#[test]
fn a_restart_keeps_waiting_events_expired_ids_and_the_naughty_list() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = FakeClock::with_wall(wall0);
    let engine = builder("per1", &clock, &state)
        .event_lifetime(30 * MIN)
        .sync_delay(Duration::ZERO)
        .build()
        .unwrap();
    let a = absent("a");
    let b = absent("b");
    let c = absent("c");
    // A repository-state event with refs, a plain one, one soon to expire, and one whose only
    // URL is on a domain that fails DNS.
    let with_refs = event("with-refs", &repo, &a)
        .ref_update(RefUpdate::oid("refs/heads/main", &a))
        .ref_update(RefUpdate::symbolic("HEAD", "refs/heads/main"));
    engine.submit(with_refs).unwrap();
    engine
        .submit(event("plain", &repo, &b).origin(Origin::Sync))
        .unwrap();
    let mut dns = event("dns", &repo, &c).origin(Origin::Sync);
    dns.clone_urls = vec!["https://dns.example/r.git".into()];
    dns.identifier = "other".into();
    engine.submit(dns).unwrap();
    settle(&engine);
    clock.advance(Duration::from_millis(1));
    let start = Instant::now();
    while engine.stats().naughty.is_empty() && start.elapsed() < WAIT {
        std::thread::yield_now();
    }
    assert_eq!(engine.stats().naughty.len(), 1);
    engine.cancel("dns");
    clock.advance(10 * MIN);
    engine
        .submit(event("short", &repo, &absent("short")))
        .unwrap();
    settle(&engine);
    // At t = 25 min: with-refs and plain have 5 min left, short 15 min.
    clock.advance(15 * MIN);
    engine.shutdown().unwrap();
    assert_eq!(check_state_file(&state).unwrap(), 3);

    // The next start, 10 minutes of downtime later on the wall clock.
    let clock2 = FakeClock::with_wall(clock.wall() + 10 * MIN);
    let engine = builder("per2", &clock2, &state)
        .event_lifetime(30 * MIN)
        .build()
        .unwrap();
    let mut expired: Vec<String> = (0..2)
        .map(|_| match outcome(&engine) {
            Outcome::Expired {
                event_id, reason, ..
            } => {
                assert_eq!(reason, ExpiryReason::LifetimeEnded);
                event_id
            }
            o => panic!("{o:?}"),
        })
        .collect();
    expired.sort();
    assert_eq!(
        expired,
        ["plain", "with-refs"],
        "their lifetime ended during the downtime"
    );
    let s = engine.stats();
    assert_eq!(s.waiting_events, 1, "short waits on");
    assert_eq!(s.naughty.len(), 1, "the naughty list survives");
    assert_eq!(s.naughty[0].domain, "dns.example");
    assert!(s.naughty[0].until > wall0 + 11 * 60 * MIN);
    assert_eq!(s.expired_ids_remembered, 2);
    // short had 15 min left, minus 10 min of downtime.
    clock2.advance(5 * MIN - Duration::from_secs(1));
    assert!(engine
        .outcomes()
        .recv_timeout(Duration::from_millis(200))
        .is_err());
    clock2.advance(Duration::from_secs(1));
    assert_eq!(outcome(&engine).event_id(), "short");
    engine.shutdown().unwrap();
}

#[test]
fn downtime_on_the_wall_clock_is_taken_off_the_remaining_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let clock = FakeClock::with_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let engine = builder("down1", &clock, &state).build().unwrap();
    engine.submit(event("e", &repo, &absent("x"))).unwrap();
    settle(&engine);
    clock.advance(10 * MIN); // 20 min left
    engine.shutdown().unwrap();

    // 15 minutes down: 5 minutes left.
    let clock2 = FakeClock::with_wall(clock.wall() + 15 * MIN);
    let engine = builder("down2", &clock2, &state).build().unwrap();
    assert_eq!(engine.stats().waiting_events, 1);
    clock2.advance(5 * MIN - Duration::from_secs(1));
    assert!(engine
        .outcomes()
        .recv_timeout(Duration::from_millis(200))
        .is_err());
    clock2.advance(Duration::from_secs(1));
    match outcome(&engine) {
        Outcome::Expired { event_id, .. } => assert_eq!(event_id, "e"),
        o => panic!("{o:?}"),
    }
    engine.shutdown().unwrap();
}

#[test]
fn a_wall_clock_that_went_backwards_never_extends_a_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let clock = FakeClock::with_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let engine = builder("back1", &clock, &state).build().unwrap();
    engine.submit(event("e", &repo, &absent("x"))).unwrap();
    settle(&engine);
    clock.advance(10 * MIN); // 20 min left
    engine.shutdown().unwrap();

    // The wall clock is an hour behind the time of the write.
    let clock2 = FakeClock::with_wall(clock.wall() - 60 * MIN);
    let engine = builder("back2", &clock2, &state).build().unwrap();
    // Neither longer (the clock going back is no negative downtime) nor shorter.
    clock2.advance(20 * MIN - Duration::from_secs(1));
    assert!(engine
        .outcomes()
        .recv_timeout(Duration::from_millis(200))
        .is_err());
    clock2.advance(Duration::from_secs(1));
    match outcome(&engine) {
        Outcome::Expired { event_id, .. } => assert_eq!(event_id, "e"),
        o => panic!("{o:?}"),
    }
    engine.shutdown().unwrap();
}

#[test]
fn events_expired_satisfied_or_orphaned_while_down_are_reported_right_after_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let kept = bare(dir.path(), "kept.git");
    let doomed = bare(dir.path(), "doomed.git");
    let clock = FakeClock::with_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let engine = builder("orph1", &clock, &state).build().unwrap();
    engine
        .submit(event("pushed", &kept, &absent("pushed")))
        .unwrap();
    engine
        .submit(event("orphan", &doomed, &absent("orphan")).origin(Origin::Sync))
        .unwrap();
    settle(&engine);
    engine.shutdown().unwrap();

    // While the engine is down: a push brings one event's object, the other's repository goes.
    blob(&kept, "pushed");
    std::fs::remove_dir_all(&doomed).unwrap();
    let clock2 = FakeClock::with_wall(clock.wall() + MIN);
    let engine = builder("orph2", &clock2, &state).build().unwrap();
    let mut seen = [outcome(&engine), outcome(&engine)];
    seen.sort_by(|a, b| a.event_id().cmp(b.event_id()));
    match &seen[0] {
        Outcome::Expired {
            event_id, reason, ..
        } => {
            assert_eq!(event_id, "orphan");
            assert!(
                matches!(reason, ExpiryReason::RepositoryGone { .. }),
                "{reason:?}"
            );
        }
        o => panic!("{o:?}"),
    }
    match &seen[1] {
        Outcome::Released {
            event_id, waited, ..
        } => {
            assert_eq!(event_id, "pushed");
            assert!(*waited >= MIN, "the downtime counts as waiting: {waited:?}");
        }
        o => panic!("{o:?}"),
    }
    let s = engine.stats();
    assert_eq!((s.waiting_events, s.queued_identifiers), (0, 0));
    // The expired id is remembered across the restart too: a synced re-submission whose data
    // is still missing is refused.
    let err = engine
        .submit(event("orphan", &kept, &absent("orphan")).origin(Origin::Sync))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::PreviouslyExpired { .. }),
        "{err:?}"
    );
    engine.shutdown().unwrap();
}

#[test]
fn checkpoints_are_written_while_the_engine_runs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let clock = FakeClock::new();
    let engine = builder("ckpt", &clock, &state)
        .checkpoint_interval(MIN)
        .build()
        .unwrap();
    engine.submit(event("e1", &repo, &absent("1"))).unwrap();
    settle(&engine);
    assert!(!state.exists(), "no checkpoint before the interval");
    let wait_for = |n: usize| {
        let start = Instant::now();
        loop {
            if let Ok(got) = check_state_file(&state) {
                if got == n || start.elapsed() > WAIT {
                    return got;
                }
            } else if start.elapsed() > WAIT {
                return usize::MAX;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    clock.advance(MIN);
    assert_eq!(wait_for(1), 1);
    engine.submit(event("e2", &repo, &absent("2"))).unwrap();
    settle(&engine);
    clock.advance(MIN);
    assert_eq!(wait_for(2), 2, "the next checkpoint has the new event");
    // A crash now (no shutdown) would lose nothing: the file already holds both events.
    engine.shutdown().unwrap();
}

/// A restart with a lower `max_events` than the events saved keeps every one of them (nothing
/// saved is lost) and refuses new submits until fewer than `max_events` wait.
#[test]
fn a_restart_with_a_lower_max_events_keeps_every_event_and_refuses_new_ones_until_below() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let clock = FakeClock::new();
    let engine = builder("max-1", &clock, &state).build().unwrap();
    for i in 0..3 {
        let ev = event(&format!("e{i}"), &repo, &absent(&format!("x{i}")));
        assert!(engine.submit(ev).unwrap().is_pending());
    }
    settle(&engine);
    engine.shutdown().unwrap();

    let engine = builder("max-2", &clock, &state)
        .max_events(2)
        .build()
        .unwrap();
    assert_eq!(engine.stats().waiting_events, 3);
    let new = || event("new", &repo, &absent("y"));
    assert_eq!(
        engine.submit(new()),
        Err(SubmitError::QueueFull { max_events: 2 })
    );
    engine.cancel("e0");
    testkit::wait_for_stats(&engine, WAIT, |s| s.waiting_events == 2);
    assert_eq!(
        engine.submit(new()),
        Err(SubmitError::QueueFull { max_events: 2 })
    );
    engine.cancel("e1");
    testkit::wait_for_stats(&engine, WAIT, |s| s.waiting_events == 1);
    assert!(engine.submit(new()).unwrap().is_pending());
    engine.shutdown().unwrap();
}

/// A state file edited by hand (or written with longer settings) cannot keep an event waiting,
/// an id refused or a domain skipped longer than the restoring engine's settings allow.
#[test]
fn remaining_times_in_a_state_file_are_capped_at_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let wall_ms: u64 = 1_800_000_000_000;
    let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(wall_ms);
    let file = serde_json::json!({
        "version": 1,
        "written_at_ms": wall_ms,
        "events": [{
            "id": "forever", "identifier": "ident", "repo": repo, "oids": [absent("forever")],
            "clone_urls": [], "origin": "user", "ref_updates": [],
            "remaining_ms": u64::MAX, "waited_ms": 0,
        }],
        "expired_ids": [{"id": "gone", "remaining_ms": u64::MAX}],
        "naughty": [{
            "domain": "dns.example", "category": "dns", "reason": "test",
            "first_seen_ms": wall_ms, "last_seen_ms": wall_ms, "count": 1,
            "remaining_ms": u64::MAX,
        }],
    });
    std::fs::write(&state, file.to_string()).unwrap();
    let clock = FakeClock::with_wall(wall);
    let engine = builder("cap", &clock, &state)
        .event_lifetime(30 * MIN)
        .expired_memory(60 * MIN)
        .naughty_duration(120 * MIN)
        .build()
        .unwrap();
    assert_eq!(engine.stats().waiting_events, 1);
    clock.advance(30 * MIN - Duration::from_secs(1));
    assert!(engine
        .outcomes()
        .recv_timeout(Duration::from_millis(200))
        .is_err());
    clock.advance(Duration::from_secs(1));
    match outcome(&engine) {
        Outcome::Expired {
            event_id, reason, ..
        } => {
            assert_eq!(event_id, "forever");
            assert_eq!(reason, ExpiryReason::LifetimeEnded);
        }
        o => panic!("{o:?}"),
    }
    // 30 minutes in: the id is refused for at most the other half of the expired-id memory.
    match engine.submit(event("gone", &repo, &absent("gone")).origin(Origin::Sync)) {
        Err(SubmitError::PreviouslyExpired { refused_for, .. }) => {
            assert!(refused_for <= 30 * MIN, "{refused_for:?}")
        }
        other => panic!("{other:?}"),
    }
    let naughty = engine.stats().naughty;
    assert_eq!(naughty.len(), 1);
    assert!(naughty[0].until <= wall + 120 * MIN, "{:?}", naughty[0]);
    engine.shutdown().unwrap();
}

/// A restart keeps what orders repository states: each waiting event's complete ref set (with
/// its deletions) and `created_at`, and the newest state written in each repository, so that
/// an older state released after the restart does not roll the refs back.
#[test]
fn a_restart_keeps_complete_ref_sets_and_the_newest_state_of_each_repository() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let repo = bare(dir.path(), "r.git");
    let older_tip = testkit::commit(&repo, "dev", &[("f", b"1\n")], "one").to_string();
    let newer_tip = testkit::commit(&repo, "topic", &[("f", b"2\n")], "two").to_string();
    let clock = FakeClock::with_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let engine = builder("per-ns1", &clock, &state).build().unwrap();
    let newer = event("newer", &repo, &newer_tip)
        .oid(&older_tip)
        .ref_update(RefUpdate::oid("refs/heads/main", &newer_tip))
        .ref_update(RefUpdate::oid("refs/heads/dev", &older_tip))
        .ref_update(RefUpdate::oid("refs/heads/topic", &newer_tip))
        .replace_refs(true)
        .created_at(200);
    engine.submit(newer).unwrap();
    match outcome(&engine) {
        Outcome::Released { event_id, refs, .. } => {
            assert_eq!((event_id.as_str(), refs), ("newer", RefsOutcome::Written))
        }
        o => panic!("{o:?}"),
    }
    let w = absent("w");
    let waiting = event("waiting", &repo, &w)
        .ref_update(RefUpdate::oid("refs/heads/main", &w))
        .ref_update(RefUpdate::delete("refs/heads/dev"))
        .replace_refs(true)
        .created_at(300);
    engine.submit(waiting).unwrap();
    settle(&engine);
    clock.advance(MIN);
    engine.shutdown().unwrap();

    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let saved = &file["events"][0];
    assert_eq!(saved["id"], "waiting");
    assert_eq!(saved["replace_refs"], true);
    assert_eq!(saved["created_at"], 300);
    assert_eq!(
        saved["ref_updates"][1],
        serde_json::json!({"name": "refs/heads/dev", "delete": true})
    );
    let newest = &file["newest_states"][0];
    assert_eq!(newest["created_at"], 200);
    assert_eq!(newest["remaining_ms"], (29 * MIN).as_millis() as u64);

    // Five minutes later, an older state whose data is all there: released, not written.
    let clock2 = FakeClock::with_wall(clock.wall() + 5 * MIN);
    let engine = builder("per-ns2", &clock2, &state).build().unwrap();
    let older = event("older", &repo, &older_tip)
        .ref_update(RefUpdate::oid("refs/heads/main", &older_tip))
        .replace_refs(true)
        .created_at(100);
    engine.submit(older).unwrap();
    match outcome(&engine) {
        Outcome::Released { event_id, refs, .. } => assert_eq!(
            (event_id.as_str(), refs),
            ("older", RefsOutcome::skipped_older_state(200))
        ),
        o => panic!("{o:?}"),
    }
    let heads = || testkit::refs_with_prefix(&repo, "refs/heads/");
    assert_eq!(
        heads(),
        ["refs/heads/dev", "refs/heads/main", "refs/heads/topic"]
    );
    let main = || {
        git2::Repository::open_bare(&repo)
            .unwrap()
            .refname_to_id("refs/heads/main")
            .unwrap()
            .to_string()
    };
    assert_eq!(main(), newer_tip, "not rolled back");

    // The restored state, newer than both, is written whole once its data is pushed.
    assert_eq!(blob(&repo, "w"), w);
    engine.git_data_arrived("ident");
    match outcome(&engine) {
        Outcome::Released { event_id, refs, .. } => {
            assert_eq!((event_id.as_str(), refs), ("waiting", RefsOutcome::Written))
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(heads(), ["refs/heads/main"]);
    assert_eq!(main(), w);
    engine.shutdown().unwrap();
}
