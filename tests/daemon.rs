//! The engine against real `git daemon` servers on loopback addresses, with the default
//! libgit2 fetcher and the real clock, in a fast configuration.
//!
//! Different loopback addresses (127.0.0.2, 127.0.0.3, 127.0.0.4) stand for different domains.
//! Nothing here sleeps to wait for a decision: tests wait on the outcome channel with a generous
//! timeout. The fetcher pins objects before it reports, so a pin can be checked as soon as an
//! outcome shows the fetch is done; the removal of pins is checked after `shutdown`, which
//! returns once the scheduler has carried out everything it decided.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use purgatory_sync::{
    Admission, Engine, EngineBuilder, ObjectId, Origin, Outcome, PendingEvent, Stats, SubmitError,
    TEMP_REF_PREFIX,
};
use purgatory_sync_testkit::{self as testkit, GitDaemon};

/// Far longer than any outcome here should take, even on a loaded 2-core machine.
const GENEROUS: Duration = Duration::from_secs(30);

const HOST_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HOST_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const HOST_C: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

/// A fast engine: 50 ms tick, no first-attempt delay for sync events, 100..400 ms backoff.
fn fast(thread_name: &str) -> EngineBuilder {
    let _ = env_logger::builder().is_test(true).try_init();
    testkit::require_git();
    purgatory_sync_testkit::loopback_engine()
        .thread_name(thread_name)
        .tick(Duration::from_millis(50))
        .sync_delay(Duration::from_millis(0))
        .backoff_base(Duration::from_millis(100))
        .backoff_cap(Duration::from_millis(400))
        .fetch_deadline(Duration::from_secs(30))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn daemon(ip: Ipv4Addr, base: &Path) -> GitDaemon {
    GitDaemon::start(ip, base).unwrap_or_else(|e| panic!("git daemon on {ip}: {e}"))
}

fn event(
    id: &str,
    identifier: &str,
    repo: &Path,
    oids: &[ObjectId],
    urls: &[String],
) -> PendingEvent {
    PendingEvent {
        id: id.into(),
        identifier: identifier.into(),
        repo: repo.to_path_buf(),
        oids: oids.iter().map(ObjectId::to_string).collect(),
        clone_urls: urls.to_vec(),
        origin: Origin::Sync,
        ..Default::default()
    }
}

fn recv(engine: &Engine) -> Outcome {
    engine
        .outcomes()
        .recv_timeout(GENEROUS)
        .unwrap_or_else(|e| panic!("no outcome within {GENEROUS:?}: {e}; {:?}", engine.stats()))
}

fn expect_released(engine: &Engine, event_id: &str, identifier: &str, repo: &Path) {
    match recv(engine) {
        Outcome::Released {
            event_id: e,
            identifier: i,
            repo: r,
            ..
        } => {
            assert_eq!(e, event_id);
            assert_eq!(i, identifier);
            assert_eq!(r, canonical(repo), "the outcome names the repository");
        }
        other => panic!("expected {event_id} released, got {other:?}"),
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).expect("canonical path")
}

fn temp_refs(repo: &Path) -> Vec<String> {
    testkit::refs_with_prefix(repo, TEMP_REF_PREFIX)
}

/// The id of a commit nobody has.
fn nowhere() -> ObjectId {
    "0123456789abcdef0123456789abcdef01234567".parse().unwrap()
}

fn assert_quiet(s: &Stats) {
    assert_eq!(s.waiting_events, 0, "{s:?}");
    assert_eq!(s.queued_identifiers, 0, "{s:?}");
    assert_eq!(s.in_flight, 0, "{s:?}");
    assert_eq!(
        s.fetches_started,
        s.fetches_succeeded + s.fetches_partial + s.fetches_failed,
        "{s:?}"
    );
}

/// (a) One event, one mirror: released, the object is in the target repository, and the
/// temporary ref that pinned it is removed once the event has left purgatory.
#[test]
fn one_event_is_released_from_one_mirror() {
    let dir = tempdir();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "alice/hello.git");
    testkit::commit(&served, "main", &[("README", b"hello\n")], "first");
    let tip = testkit::commit(&served, "main", &[("README", b"hello again\n")], "second");
    let mirror = daemon(HOST_A, &base);
    let target = testkit::init_bare(&dir.path().join("relay/hello.git"));

    let engine = fast("da").build().unwrap();
    let ev = event(
        "a1",
        "alice/hello",
        &target,
        &[tip],
        &[mirror.url("alice/hello.git")],
    );
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "a1", "alice/hello", &target);

    assert!(testkit::has_object(&target, tip));
    let s = engine.stats();
    assert_eq!((s.submitted, s.released, s.expired), (1, 1, 0), "{s:?}");
    assert_eq!(
        (
            s.fetches_started,
            s.fetches_succeeded,
            s.fetches_partial,
            s.fetches_failed
        ),
        (1, 1, 0, 0),
        "{s:?}"
    );
    assert_quiet(&s);
    engine.shutdown().unwrap();
    assert_eq!(
        temp_refs(&target),
        Vec::<String>::new(),
        "temporary ref removed"
    );
    assert!(testkit::has_object(&target, tip));
}

/// Fetched objects stay pinned under the temporary namespace while another event of the
/// repository still needs them, and the pin goes when that event leaves (here: cancelled).
#[test]
fn fetched_objects_stay_pinned_while_an_event_still_needs_them() {
    let dir = tempdir();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "pin.git");
    let c1 = testkit::commit(&served, "main", &[("f", b"1")], "one");
    let mirror = daemon(HOST_A, &base);
    let target = testkit::init_bare(&dir.path().join("pin.git"));
    let urls = [mirror.url("pin.git")];

    let engine = fast("dpin")
        .event_lifetime(Duration::from_secs(600))
        .build()
        .unwrap();
    // `keep` also needs a commit nobody has, so it keeps waiting.
    let keep = event("keep", "pin", &target, &[c1, nowhere()], &urls);
    assert_eq!(engine.submit(keep).unwrap(), Admission::pending());
    let quick = event("quick", "pin", &target, &[c1], &urls);
    assert_eq!(engine.submit(quick).unwrap(), Admission::pending());
    expect_released(&engine, "quick", "pin", &target);

    assert!(testkit::has_object(&target, c1));
    // The fetcher pins before it reports, and `keep` still needs c1: the ref must be there.
    assert_eq!(temp_refs(&target), [format!("{TEMP_REF_PREFIX}{c1}")]);
    let s = engine.stats();
    assert_eq!((s.released, s.waiting_events), (1, 1), "{s:?}");

    engine.cancel("keep");
    engine.shutdown().unwrap();
    assert_eq!(
        temp_refs(&target),
        Vec::<String>::new(),
        "pins go with the last event"
    );
    assert!(testkit::has_object(&target, c1));
}

/// (b) An event needs two commits, each on only one of two mirrors on different addresses.
#[test]
fn objects_from_two_mirrors_on_two_domains_add_up() {
    let dir = tempdir();
    let (base_a, base_b) = (dir.path().join("a"), dir.path().join("b"));
    let served_a = testkit::served_repo(&base_a, "r.git");
    let served_b = testkit::served_repo(&base_b, "r.git");
    let only_a = testkit::commit(&served_a, "main", &[("a", b"on a")], "only on a");
    let only_b = testkit::commit(&served_b, "pr/1", &[("b", b"on b")], "only on b");
    assert!(!testkit::has_object(&served_b, only_a) && !testkit::has_object(&served_a, only_b));
    let (mirror_a, mirror_b) = (daemon(HOST_A, &base_a), daemon(HOST_B, &base_b));
    let target = testkit::init_bare(&dir.path().join("target.git"));

    let engine = fast("db").build().unwrap();
    let ev = event(
        "b1",
        "bob/r",
        &target,
        &[only_a, only_b],
        &[mirror_a.url("r.git"), mirror_b.url("r.git")],
    );
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "b1", "bob/r", &target);

    assert!(testkit::has_object(&target, only_a) && testkit::has_object(&target, only_b));
    let s = engine.stats();
    assert_eq!((s.submitted, s.released), (1, 1), "{s:?}");
    // One fetch per mirror. The first is asked for both and has one: it brings that one and
    // reports an error, a partial fetch; the second is asked only for the other and succeeds.
    assert_eq!(
        (
            s.fetches_started,
            s.fetches_succeeded,
            s.fetches_partial,
            s.fetches_failed
        ),
        (2, 1, 1, 0),
        "{s:?}"
    );
    assert!(
        s.failures.is_empty(),
        "a partial fetch is not a failure: {s:?}"
    );
    let first = &s.domains[&HOST_A.to_string()];
    assert_eq!((first.succeeded, first.partial), (0, 1), "{first:?}");
    assert_quiet(&s);
    engine.shutdown().unwrap();
    assert_eq!(temp_refs(&target), Vec::<String>::new());
}

/// (c) The first mirror lacks the commit, the second has it: one failed fetch, one good one.
#[test]
fn a_mirror_lacking_the_commit_costs_one_fetch() {
    let dir = tempdir();
    let (base_bad, base_good) = (dir.path().join("bad"), dir.path().join("good"));
    let served_bad = testkit::served_repo(&base_bad, "r.git");
    let served_good = testkit::served_repo(&base_good, "r.git");
    testkit::commit(&served_bad, "main", &[("x", b"something else")], "other");
    let wanted = testkit::commit(&served_good, "main", &[("x", b"wanted")], "wanted");
    let (bad, good) = (daemon(HOST_A, &base_bad), daemon(HOST_B, &base_good));
    let target = testkit::init_bare(&dir.path().join("target.git"));

    let engine = fast("dc").build().unwrap();
    let ev = event(
        "c1",
        "carol/r",
        &target,
        &[wanted],
        &[bad.url("r.git"), good.url("r.git")],
    );
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "c1", "carol/r", &target);

    assert!(testkit::has_object(&target, wanted));
    let s = engine.stats();
    // The first mirror brought nothing: a failed fetch, not a partial one.
    assert_eq!(
        (
            s.fetches_started,
            s.fetches_succeeded,
            s.fetches_partial,
            s.fetches_failed
        ),
        (2, 1, 0, 1),
        "{s:?}"
    );
    assert_eq!(s.failures.values().sum::<u64>(), 1, "{s:?}");
    assert_eq!(s.released, 1);
    assert_quiet(&s);
    engine.shutdown().unwrap();
}

/// (d) The commit is nowhere: the engine retries with backoff, then the event expires with the
/// missing id listed, and its id is refused afterwards.
#[test]
fn a_commit_found_nowhere_is_retried_then_expires() {
    let dir = tempdir();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "r.git");
    testkit::commit(&served, "main", &[("x", b"not it")], "other");
    let mirror = daemon(HOST_A, &base);
    let target = testkit::init_bare(&dir.path().join("target.git"));
    let lifetime = Duration::from_secs(2);

    let engine = fast("dd").event_lifetime(lifetime).build().unwrap();
    let ev = event(
        "d1",
        "dave/r",
        &target,
        &[nowhere()],
        &[mirror.url("r.git")],
    );
    let started = Instant::now();
    assert_eq!(engine.submit(ev.clone()).unwrap(), Admission::pending());
    match recv(&engine) {
        Outcome::Expired {
            event_id,
            identifier,
            missing,
            ..
        } => {
            assert_eq!(event_id, "d1");
            assert_eq!(identifier, "dave/r");
            assert_eq!(missing, [nowhere().to_string()]);
        }
        other => panic!("expected d1 expired, got {other:?}"),
    }
    assert!(started.elapsed() >= lifetime, "not before its lifetime");

    let s = engine.stats();
    assert_eq!(
        (s.expired, s.released, s.waiting_events),
        (1, 0, 0),
        "{s:?}"
    );
    // Backoff 100, 200, 400, 400 … ms within 2 s allows about 7 attempts; a missing backoff
    // would hammer the mirror far more often.
    assert!(
        (2..=12).contains(&s.fetches_started),
        "retried with backoff: {s:?}"
    );
    assert_eq!(s.fetches_succeeded, 0, "{s:?}");
    // A fetch may still run for the gone event; its entry leaves when it reports.
    assert_eq!(
        s.fetches_started,
        s.fetches_failed + s.in_flight as u64,
        "{s:?}"
    );
    assert_eq!(s.queued_identifiers, s.in_flight, "{s:?}");
    assert_eq!(s.expired_ids_remembered, 1);

    match engine.submit(ev) {
        Err(SubmitError::PreviouslyExpired { event_id, .. }) => assert_eq!(event_id, "d1"),
        other => panic!("expected PreviouslyExpired, got {other:?}"),
    }
    assert_eq!(engine.stats().refused, 1);
    engine.shutdown().unwrap();
    assert!(!testkit::has_object(&target, nowhere()));
    assert_eq!(temp_refs(&target), Vec::<String>::new());
}

/// (e) A user-published event waits for a push (180 s default first delay, so no fetch); the
/// push lands in the repository and `git_data_arrived` releases the event at once.
#[test]
fn a_push_and_git_data_arrived_release_a_user_event_without_a_fetch() {
    let dir = tempdir();
    let user = testkit::init_bare(&dir.path().join("user-clone.git"));
    let pushed = testkit::commit(&user, "main", &[("notes.md", b"# notes\n")], "pushed");
    let target = testkit::init_bare(&dir.path().join("relay/erin.git"));

    let engine = fast("de").build().unwrap();
    // Nothing listens on this URL: a fetch, if one were wrongly started, would fail.
    let mut ev = event(
        "e1",
        "erin/notes",
        &target,
        &[pushed],
        &["git://127.0.0.4:9/erin/notes.git".to_owned()],
    );
    ev.origin = Origin::User;
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    engine.git_data_arrived("somebody/else");

    testkit::push_all(&user, &target); // the user's `git push` reaches the relay
    let signalled = Instant::now();
    engine.git_data_arrived("erin/notes");
    expect_released(&engine, "e1", "erin/notes", &target);
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "released at once, not at a tick or a fetch: {:?}",
        signalled.elapsed()
    );

    let s = engine.stats();
    assert_eq!(s.fetches_started, 0, "{s:?}");
    assert_eq!((s.released, s.rechecks), (1, 1), "{s:?}");
    assert_quiet(&s);
    engine.shutdown().unwrap();
}

/// Objects already in the repository: `AlreadySatisfied`, nothing queued, no outcome.
#[test]
fn objects_already_present_are_already_satisfied() {
    let dir = tempdir();
    let target = testkit::init_bare(&dir.path().join("t.git"));
    let c1 = testkit::commit(&target, "main", &[("f", b"1")], "one");
    let c2 = testkit::commit(&target, "main", &[("f", b"2")], "two");

    let engine = fast("dsat").build().unwrap();
    let urls = ["git://127.0.0.4:9/t.git".to_owned()];
    let ev = event("s1", "sat", &target, &[c1, c2], &urls);
    assert_eq!(engine.submit(ev).unwrap(), Admission::AlreadySatisfied);
    // Upper-case ids are the same ids.
    let mut upper = event("s2", "sat", &target, &[], &urls);
    upper.oids = vec![c2.to_string().to_uppercase()];
    assert_eq!(engine.submit(upper).unwrap(), Admission::AlreadySatisfied);

    let s = engine.stats();
    assert_eq!((s.already_satisfied, s.refused), (2, 0), "{s:?}");

    // Partly present: the event waits only for the missing id (a user event, so no fetch),
    // which a push then brings. No outcome was sent for s1 and s2 before s3's.
    let user = testkit::init_bare(&dir.path().join("user.git"));
    let c3 = testkit::commit(&user, "topic", &[("g", b"3")], "three");
    let mut partly = event("s3", "sat", &target, &[c1, c3], &urls);
    partly.origin = Origin::User;
    assert_eq!(engine.submit(partly).unwrap(), Admission::pending());
    testkit::push_all(&user, &target);
    engine.git_data_arrived("sat");
    expect_released(&engine, "s3", "sat", &target);

    let s = engine.stats();
    assert_eq!(
        (
            s.already_satisfied,
            s.submitted,
            s.released,
            s.fetches_started
        ),
        (2, 1, 1, 0),
        "{s:?}"
    );
    assert_quiet(&s);
    let rx = engine.outcomes();
    engine.shutdown().unwrap();
    // Shutdown returns once everything decided has been sent: nothing else came or will.
    let outcomes: Vec<Outcome> = rx.try_iter().collect();
    assert!(outcomes.is_empty(), "no outcome follows: {outcomes:?}");
}

/// (f) 200 events over 50 identifiers (50 target repositories), three mirrors on three
/// addresses, commits spread so that each identifier needs all three mirrors and most events two
/// of them: everything is released and the counters add up exactly.
#[test]
fn two_hundred_events_over_fifty_identifiers_and_three_mirrors() {
    const IDENTIFIERS: usize = 50;
    const PER_IDENTIFIER: usize = 4;
    let dir = tempdir();
    let bases: Vec<PathBuf> = (0..3).map(|m| dir.path().join(format!("m{m}"))).collect();

    // Identifier i has four independent commits k0..k3; commit j lives only on mirror
    // (i + j) % 3. Event j of identifier i needs commits j and (j + 1) % 4, which sit on two
    // different mirrors for j < 3 (commits 3 and 0 share a mirror).
    let mut commits = Vec::new();
    for i in 0..IDENTIFIERS {
        let name = format!("p{i}.git");
        let served: Vec<PathBuf> = bases
            .iter()
            .map(|b| testkit::served_repo(b, &name))
            .collect();
        let ids: Vec<ObjectId> = (0..PER_IDENTIFIER)
            .map(|j| {
                let content = format!("identifier {i} commit {j}\n");
                testkit::commit(
                    &served[(i + j) % 3],
                    &format!("b{j}"),
                    &[("data.txt", content.as_bytes())],
                    &format!("p{i} k{j}"),
                )
            })
            .collect();
        commits.push(ids);
    }
    let mirrors = [
        daemon(HOST_A, &bases[0]),
        daemon(HOST_B, &bases[1]),
        daemon(HOST_C, &bases[2]),
    ];

    let engine = fast("df").workers(6).build().unwrap();
    let mut expected = BTreeSet::new();
    let mut targets = Vec::new();
    for (i, ids) in commits.iter().enumerate() {
        let target = testkit::init_bare(&dir.path().join(format!("relay/p{i}.git")));
        let name = format!("p{i}.git");
        for j in 0..PER_IDENTIFIER {
            // Rotate the URL order so that every mirror is listed first for some events.
            let urls: Vec<String> = (0..3)
                .map(|k| mirrors[(i + j + k) % 3].url(&name))
                .collect();
            let id = format!("f{i}-{j}");
            let ev = event(
                &id,
                &format!("owner/p{i}"),
                &target,
                &[ids[j], ids[(j + 1) % PER_IDENTIFIER]],
                &urls,
            );
            assert_eq!(engine.submit(ev).unwrap(), Admission::pending(), "{id}");
            expected.insert(id);
        }
        targets.push(target);
    }

    let rx = engine.outcomes();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut released = BTreeSet::new();
    for _ in 0..expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Outcome::Released { event_id, .. }) => {
                assert!(
                    released.insert(event_id.clone()),
                    "{event_id} released twice"
                );
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!(
                "{} of {} released: {e}; {:?}",
                released.len(),
                expected.len(),
                engine.stats()
            ),
        }
    }
    assert_eq!(released, expected);

    let s = engine.stats();
    assert_eq!(
        (s.submitted, s.released, s.expired, s.cancelled),
        (200, 200, 0, 0),
        "{s:?}"
    );
    assert_quiet(&s);
    // Each identifier's commits are spread over all three mirrors.
    assert!(s.fetches_started >= 3 * IDENTIFIERS as u64, "{s:?}");
    engine.shutdown().unwrap();
    assert!(rx.try_recv().is_err(), "exactly one outcome per event");

    for (ids, target) in commits.iter().zip(&targets) {
        for id in ids {
            assert!(
                testkit::has_object(target, *id),
                "{id} in {}",
                target.display()
            );
        }
        assert_eq!(
            temp_refs(target),
            Vec::<String>::new(),
            "{}",
            target.display()
        );
    }
}

/// An event released by `git_data_arrived` after part of its data was fetched (and pinned):
/// the pin is removed by the time `shutdown` returns, even when no tick came in between
/// (a re-check used to queue the ref drop for the next pass, which never came).
#[test]
fn pins_of_an_event_released_by_a_recheck_are_removed_by_shutdown() {
    let dir = tempdir();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "r.git");
    let c1 = testkit::commit(&served, "main", &[("f", b"1")], "one");
    let mirror = daemon(HOST_A, &base);
    let user = testkit::init_bare(&dir.path().join("user.git"));
    let c2 = testkit::commit(&user, "topic", &[("g", b"2")], "two");
    let target = testkit::init_bare(&dir.path().join("target.git"));
    let urls = [mirror.url("r.git")];

    // No tick and no retry during the test: only commands and results wake the scheduler.
    let engine = fast("drc")
        .tick(Duration::from_secs(3600))
        .backoff_base(Duration::from_secs(3600))
        .backoff_cap(Duration::from_secs(3600))
        .build()
        .unwrap();
    let slow = event("slow", "rc", &target, &[c1, c2], &urls);
    assert_eq!(engine.submit(slow).unwrap(), Admission::pending());
    let quick = event("quick", "rc", &target, &[c1], &urls);
    assert_eq!(engine.submit(quick).unwrap(), Admission::pending());
    expect_released(&engine, "quick", "rc", &target);
    assert_eq!(temp_refs(&target), [format!("{TEMP_REF_PREFIX}{c1}")]);

    testkit::push_all(&user, &target);
    engine.git_data_arrived("rc");
    expect_released(&engine, "slow", "rc", &target);
    engine.shutdown().unwrap();
    assert_eq!(
        temp_refs(&target),
        Vec::<String>::new(),
        "pins go with the last event"
    );
}
