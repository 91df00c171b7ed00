//! Ref updates on release, with real repositories, the default libgit2 fetcher and `git daemon`
//! on loopback, in a fast configuration (50 ms tick).
//!
//! Nothing sleeps to wait for a decision: tests wait on the outcome channel, or poll `stats()`
//! in a bounded loop. Temporary refs are checked after `shutdown`, which returns once the
//! scheduler has carried out everything it decided.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use purgatory_sync::{
    Admission, Engine, EngineBuilder, ObjectId, Origin, Outcome, PendingEvent, RefUpdate,
    TEMP_REF_PREFIX,
};
use purgatory_sync_testkit::{self as testkit, GitDaemon};

/// Far longer than any outcome here should take, even on a loaded 2-core machine.
const GENEROUS: Duration = Duration::from_secs(30);

const HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn fast(thread_name: &str) -> EngineBuilder {
    let _ = env_logger::builder().is_test(true).try_init();
    purgatory_sync_testkit::loopback_engine()
        .thread_name(thread_name)
        .tick(Duration::from_millis(50))
        .sync_delay(Duration::from_millis(0))
        .backoff_base(Duration::from_millis(100))
        .backoff_cap(Duration::from_millis(400))
        .fetch_deadline(Duration::from_secs(30))
}

fn daemon(base: &Path) -> GitDaemon {
    testkit::require_git();
    GitDaemon::start(HOST, base).unwrap_or_else(|e| panic!("git daemon on {HOST}: {e}"))
}

fn event(id: &str, repo: &Path, oids: &[ObjectId], urls: &[String]) -> PendingEvent {
    PendingEvent {
        id: id.into(),
        identifier: "alice/project".into(),
        repo: repo.to_path_buf(),
        oids: oids.iter().map(ObjectId::to_string).collect(),
        clone_urls: urls.to_vec(),
        origin: Origin::Sync,
        ..Default::default()
    }
}

fn expect_released(engine: &Engine, event_id: &str) {
    match engine.outcomes().recv_timeout(GENEROUS) {
        Ok(Outcome::Released { event_id: e, .. }) => assert_eq!(e, event_id),
        other => panic!(
            "expected {event_id} released, got {other:?}; {:?}",
            engine.stats()
        ),
    }
}

/// An annotated tag `name` on `target` in the repository at `repo`; returns the tag object's id.
fn annotated_tag(repo: &Path, name: &str, target: ObjectId) -> ObjectId {
    let r = git2::Repository::open_bare(repo).unwrap();
    let commit = r.find_object(oid(target), None).unwrap();
    let sig = git2::Signature::new(
        testkit::AUTHOR_NAME,
        testkit::AUTHOR_EMAIL,
        &git2::Time::new(testkit::COMMIT_TIME, 0),
    )
    .unwrap();
    let tag = r.tag(name, &commit, &sig, "release", false).unwrap();
    tag.to_string().parse().unwrap()
}

fn oid(o: ObjectId) -> git2::Oid {
    git2::Oid::from_bytes(o.as_bytes()).unwrap()
}

/// Where the ref `name` of the repository at `repo` points: an object id, or `ref: <name>` for
/// a symbolic ref. `None` when it does not exist.
fn ref_target(repo: &Path, name: &str) -> Option<String> {
    let r = git2::Repository::open_bare(repo).unwrap();
    let reference = match r.find_reference(name) {
        Ok(reference) => reference,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return None,
        Err(e) => panic!("ref {name} of {}: {e}", repo.display()),
    };
    Some(match reference.symbolic_target().expect("a UTF-8 target") {
        Some(t) => format!("ref: {t}"),
        None => reference.target().expect("a direct ref").to_string(),
    })
}

/// Every ref under `refs/` outside the engine's temporary namespace, sorted.
fn own_refs(repo: &Path) -> Vec<String> {
    testkit::refs_with_prefix(repo, "refs/")
        .into_iter()
        .filter(|r| !r.starts_with(TEMP_REF_PREFIX))
        .collect()
}

fn temp_refs(repo: &Path) -> Vec<String> {
    testkit::refs_with_prefix(repo, TEMP_REF_PREFIX)
}

/// Polls `stats()` until `done` holds, for at most [`GENEROUS`].
/// (a) A repository-state-like event: a branch, an annotated tag and `HEAD`. Once released,
/// the target repository has exactly those refs, pointing at the right objects, and after
/// shutdown no temporary ref is left.
#[test]
fn a_repository_state_event_sets_branches_tags_and_head_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "alice/project.git");
    let c1 = testkit::commit(&served, "main", &[("README", b"one\n")], "one");
    let v1 = annotated_tag(&served, "v1", c1);
    let c2 = testkit::commit(&served, "main", &[("README", b"two\n")], "two");
    let mirror = daemon(&base);
    let target = testkit::init_bare(&dir.path().join("relay/project.git"));

    let engine = fast("ra").build().unwrap();
    let ev = event(
        "state",
        &target,
        &[c2, v1],
        &[mirror.url("alice/project.git")],
    )
    .ref_update(RefUpdate::oid("refs/heads/main", c2.to_string()))
    .ref_update(RefUpdate::oid("refs/tags/v1", v1.to_string()))
    .ref_update(RefUpdate::symbolic("HEAD", "refs/heads/main"));
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "state");

    // The host may rely on the refs as soon as it reads `Released`.
    assert_eq!(ref_target(&target, "refs/heads/main"), Some(c2.to_string()));
    assert_eq!(ref_target(&target, "refs/tags/v1"), Some(v1.to_string()));
    assert_eq!(
        ref_target(&target, "HEAD").as_deref(),
        Some("ref: refs/heads/main")
    );
    let r = git2::Repository::open_bare(&target).unwrap();
    assert_eq!(r.head().unwrap().peel_to_commit().unwrap().id(), oid(c2));
    let tagged = r
        .find_reference("refs/tags/v1")
        .unwrap()
        .peel_to_commit()
        .unwrap();
    assert_eq!(tagged.id(), oid(c1));
    let s = engine.stats();
    assert_eq!(
        (s.released, s.ref_updates_applied, s.ref_update_failures),
        (1, 1, 0),
        "{s:?}"
    );
    assert_eq!((s.waiting_events, s.awaiting_refs), (0, 0), "{s:?}");

    engine.shutdown().unwrap();
    assert_eq!(own_refs(&target), ["refs/heads/main", "refs/tags/v1"]);
    assert_eq!(temp_refs(&target), Vec::<String>::new(), "no pin left");
}

/// (b) A pull-request-like event asks for `refs/nostr/<event-id>` on its tip.
#[test]
fn a_pull_request_event_gets_its_nostr_ref() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "fork.git");
    testkit::commit(&served, "main", &[("f", b"base\n")], "base");
    let tip = testkit::commit(&served, "pr/topic", &[("f", b"change\n")], "change");
    let mirror = daemon(&base);
    let target = testkit::init_bare(&dir.path().join("relay/project.git"));

    let engine = fast("rb").build().unwrap();
    let id = "5c83da77af1dec6d7289834998ad7aafbd9e2191396d75ec3cc27f5a77226f36";
    let name = format!("refs/nostr/{id}");
    let ev = event(id, &target, &[tip], &[mirror.url("fork.git")])
        .ref_update(RefUpdate::oid(name.clone(), tip.to_string().to_uppercase()));
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, id);
    assert_eq!(ref_target(&target, &name), Some(tip.to_string()));

    engine.shutdown().unwrap();
    assert_eq!(own_refs(&target), [name]);
    assert_eq!(temp_refs(&target), Vec::<String>::new());
}

/// (c) All or none: while one ref is locked by another writer none of the event's refs is
/// written and the event is not released; once the lock goes, the next tick writes them all
/// and releases it.
#[test]
fn a_locked_ref_holds_back_every_ref_of_the_event_until_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "alice/project.git");
    let c1 = testkit::commit(&served, "main", &[("f", b"1\n")], "one");
    let mirror = daemon(&base);
    let target = testkit::init_bare(&dir.path().join("relay/project.git"));
    let head_before = ref_target(&target, "HEAD");
    // Another writer (a push) holds refs/heads/main.
    let lock = target.join("refs/heads/main.lock");
    std::fs::write(&lock, format!("{c1}\n")).unwrap();

    let engine = fast("rc").build().unwrap();
    let ev = event("locked", &target, &[c1], &[mirror.url("alice/project.git")])
        .ref_update(RefUpdate::oid("refs/tags/v1", c1.to_string()))
        .ref_update(RefUpdate::oid("refs/heads/main", c1.to_string()))
        .ref_update(RefUpdate::symbolic("HEAD", "refs/heads/main"));
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());

    // Fetched, then the write fails and is retried at each tick.
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| s.ref_update_failures >= 2);
    assert_eq!(
        (s.waiting_events, s.awaiting_refs, s.released),
        (1, 1, 0),
        "{s:?}"
    );
    assert!(testkit::has_object(&target, c1));
    assert!(
        engine.outcomes().try_recv().is_err(),
        "not released while its refs cannot be written"
    );
    assert_eq!(own_refs(&target), Vec::<String>::new(), "none written");
    assert_eq!(ref_target(&target, "HEAD"), head_before, "HEAD untouched");

    std::fs::remove_file(&lock).unwrap();
    expect_released(&engine, "locked");
    assert_eq!(ref_target(&target, "refs/heads/main"), Some(c1.to_string()));
    assert_eq!(ref_target(&target, "refs/tags/v1"), Some(c1.to_string()));
    assert_eq!(
        ref_target(&target, "HEAD").as_deref(),
        Some("ref: refs/heads/main")
    );
    let s = engine.stats();
    assert_eq!((s.released, s.ref_updates_applied), (1, 1), "{s:?}");

    engine.shutdown().unwrap();
    assert_eq!(own_refs(&target), ["refs/heads/main", "refs/tags/v1"]);
    assert_eq!(temp_refs(&target), Vec::<String>::new());
}

/// (d) Every object is already in the repository: with ref updates the event is `Pending`
/// (the scheduler writes the refs, not the submitting thread), then released; without, it is
/// `AlreadySatisfied` as before.
#[test]
fn an_event_with_refs_and_objects_already_present_is_released_once_written() {
    let dir = tempfile::tempdir().unwrap();
    let target = testkit::init_bare(&dir.path().join("t.git"));
    let c1 = testkit::commit(&target, "topic", &[("f", b"1")], "one");

    let engine = fast("rd").build().unwrap();
    let ev = event("here", &target, &[c1], &[])
        .ref_update(RefUpdate::oid("refs/heads/main", c1.to_string()));
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "here");
    assert_eq!(ref_target(&target, "refs/heads/main"), Some(c1.to_string()));
    let plain = event("plain", &target, &[c1], &[]);
    assert_eq!(engine.submit(plain).unwrap(), Admission::AlreadySatisfied);

    let s = engine.stats();
    assert_eq!(
        (
            s.submitted,
            s.already_satisfied,
            s.released,
            s.fetches_started
        ),
        (1, 1, 1, 0),
        "{s:?}"
    );
    engine.shutdown().unwrap();
    assert_eq!(own_refs(&target), ["refs/heads/main", "refs/heads/topic"]);
}

/// A relay repository as a previous state left it: `main`, `dev`, a lightweight tag `v1` (the
/// three packed, as `git gc` leaves them), a loose annotated tag `v0`, a pull request's
/// `refs/nostr/x` and `HEAD` on `main`. Returns the commit they are on.
fn previous_state(target: &Path) -> ObjectId {
    let c0 = testkit::commit(target, "main", &[("f", b"0\n")], "zero");
    let r = git2::Repository::open_bare(target).unwrap();
    r.reference("refs/heads/dev", oid(c0), false, "test")
        .unwrap();
    r.reference("refs/tags/v1", oid(c0), false, "test").unwrap();
    r.reference("refs/nostr/x", oid(c0), false, "test").unwrap();
    r.set_head("refs/heads/main").unwrap();
    testkit::require_git();
    let packed = testkit::git_command()
        .arg("--git-dir")
        .arg(target)
        .args(["pack-refs", "--all"])
        .status()
        .unwrap();
    assert!(packed.success());
    annotated_tag(target, "v0", c0);
    assert_eq!(
        own_refs(target),
        [
            "refs/heads/dev",
            "refs/heads/main",
            "refs/nostr/x",
            "refs/tags/v0",
            "refs/tags/v1"
        ]
    );
    c0
}

/// (e) A repository state is the complete set of branches and tags: released, it leaves
/// exactly the branches and tags it names. `dev`, `v0` and `v1` go (packed or loose); the pull
/// request's `refs/nostr/x` and `HEAD` stay.
#[test]
fn a_complete_ref_set_deletes_the_branches_and_tags_it_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mirror");
    let served = testkit::served_repo(&base, "alice/project.git");
    let c2 = testkit::commit(&served, "main", &[("f", b"2\n")], "two");
    let mirror = daemon(&base);
    let target = testkit::init_bare(&dir.path().join("relay/project.git"));
    let c0 = previous_state(&target);

    let engine = fast("re").build().unwrap();
    let ev = event("state", &target, &[c2], &[mirror.url("alice/project.git")])
        .ref_update(RefUpdate::oid("refs/heads/main", c2.to_string()))
        .replace_refs(true);
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "state");

    assert_eq!(own_refs(&target), ["refs/heads/main", "refs/nostr/x"]);
    assert_eq!(ref_target(&target, "refs/heads/main"), Some(c2.to_string()));
    assert_eq!(ref_target(&target, "refs/nostr/x"), Some(c0.to_string()));
    assert_eq!(
        ref_target(&target, "HEAD").as_deref(),
        Some("ref: refs/heads/main")
    );
    let s = engine.stats();
    assert_eq!(
        (s.ref_updates_applied, s.ref_update_failures),
        (1, 0),
        "{s:?}"
    );
    engine.shutdown().unwrap();
    assert_eq!(temp_refs(&target), Vec::<String>::new());
}

/// (f) An explicit deletion removes its ref, deleting a ref that does not exist is no error,
/// and without `replace_refs` the refs the event does not name stay.
#[test]
fn a_deletion_removes_its_ref_and_a_missing_one_is_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let target = testkit::init_bare(&dir.path().join("t.git"));
    let c0 = previous_state(&target);

    let engine = fast("rf").build().unwrap();
    let ev = event("del", &target, &[c0], &[])
        .ref_update(RefUpdate::delete("refs/heads/dev"))
        .ref_update(RefUpdate::delete("refs/tags/v0"))
        .ref_update(RefUpdate::delete("refs/heads/never-was"));
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    expect_released(&engine, "del");
    assert_eq!(
        own_refs(&target),
        ["refs/heads/main", "refs/nostr/x", "refs/tags/v1"]
    );
    engine.shutdown().unwrap();
}

/// (g) All or none with deletions: while a ref the complete set deletes is locked by another
/// writer, nothing changes (the new `main` is not written, no branch or tag is deleted) and
/// the event waits; once the lock goes, the next tick writes the whole set.
#[test]
fn a_locked_ref_holds_back_every_deletion_and_update_of_a_complete_set() {
    let dir = tempfile::tempdir().unwrap();
    let target = testkit::init_bare(&dir.path().join("t.git"));
    let c0 = previous_state(&target);
    let c1 = testkit::commit(&target, "topic", &[("f", b"1\n")], "one");
    let before = own_refs(&target);
    // Another writer holds the tag the state leaves out.
    let lock = target.join("refs/tags/v1.lock");
    std::fs::write(&lock, format!("{c0}\n")).unwrap();

    let engine = fast("rg").build().unwrap();
    let ev = event("state", &target, &[c1], &[])
        .ref_update(RefUpdate::oid("refs/heads/main", c1.to_string()))
        .ref_update(RefUpdate::symbolic("HEAD", "refs/heads/main"))
        .replace_refs(true);
    assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| s.ref_update_failures >= 2);
    assert_eq!((s.awaiting_refs, s.released), (1, 0), "{s:?}");
    assert!(engine.outcomes().try_recv().is_err(), "not released");
    assert_eq!(own_refs(&target), before, "nothing deleted");
    assert_eq!(ref_target(&target, "refs/heads/main"), Some(c0.to_string()));

    std::fs::remove_file(&lock).unwrap();
    expect_released(&engine, "state");
    assert_eq!(own_refs(&target), ["refs/heads/main", "refs/nostr/x"]);
    assert_eq!(ref_target(&target, "refs/heads/main"), Some(c1.to_string()));
    engine.shutdown().unwrap();
}

/// The refs `git ls-remote <url>` lists (through the test kit's isolated `git`).
fn ls_remote(url: &str) -> Vec<String> {
    let out = testkit::git_command()
        .args(["ls-remote", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git ls-remote {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split('\t').nth(1))
        .map(str::to_owned)
        .collect()
}

/// The refs a `git clone --mirror <url>` into `dest` gets.
fn mirrored_refs(url: &str, dest: &Path) -> Vec<String> {
    let out = testkit::git_command()
        .args(["clone", "--mirror", "--quiet", url])
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git clone --mirror {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    testkit::refs_with_prefix(dest, "refs/")
}

/// (h) While an event waits, the objects fetched for it are pinned under
/// `refs/purgatory-sync/` in the relay's repository. Cloners of that repository, through
/// `git daemon` and `git http-backend`, do not see those refs: the engine put
/// `transfer.hideRefs` in the repository's configuration before pinning. With
/// `hide_temp_refs(false)` nothing is written and the refs are advertised and mirrored.
#[test]
fn temporary_refs_are_hidden_from_clients_of_the_relay_unless_told_otherwise() {
    testkit::require_git();
    for hide in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("mirror");
        let served = testkit::served_repo(&base, "alice/project.git");
        let c1 = testkit::commit(&served, "main", &[("f", b"1\n")], "one");
        let mirror = daemon(&base);
        let relay = dir.path().join("relay");
        let target = testkit::init_bare(&relay.join("project.git"));
        testkit::commit(&target, "main", &[("g", b"relay\n")], "relay's own");

        let engine = fast(if hide { "rh1" } else { "rh0" })
            .hide_temp_refs(hide)
            .build()
            .unwrap();
        // One object the mirror has, one nobody has: the event keeps waiting, its object
        // pinned.
        let nobody: ObjectId = "1111111111111111111111111111111111111111".parse().unwrap();
        let ev = event(
            "waits",
            &target,
            &[c1, nobody],
            &[mirror.url("alice/project.git")],
        );
        assert_eq!(engine.submit(ev).unwrap(), Admission::pending());
        let pin = format!("{TEMP_REF_PREFIX}{c1}");
        testkit::wait_for_stats(&engine, GENEROUS, |s| {
            s.fetches_partial >= 1 && temp_refs(&target).contains(&pin)
        });

        let hidden_by_config = git2::Repository::open_bare(&target)
            .unwrap()
            .config()
            .unwrap()
            .multivar("transfer.hiderefs", None)
            .map(|mut values| {
                let mut all = Vec::new();
                while let Some(v) = values.next() {
                    all.push(v.unwrap().value().unwrap().to_owned());
                }
                all
            })
            .unwrap_or_default();
        let want: &[&str] = if hide { &[TEMP_REF_PREFIX] } else { &[] };
        assert_eq!(hidden_by_config, want, "hide {hide}");

        let git = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 3), &relay).unwrap();
        let http = testkit::HttpGitServer::start(Ipv4Addr::new(127, 0, 0, 4), &relay).unwrap();
        for (i, url) in [git.url("project.git"), http.url("project.git")]
            .iter()
            .enumerate()
        {
            let listed = ls_remote(url);
            assert!(
                listed.contains(&"refs/heads/main".to_owned()),
                "{url}: {listed:?}"
            );
            assert_eq!(
                listed.contains(&pin),
                !hide,
                "hide {hide}: {url} lists {listed:?}"
            );
            let mirrored = mirrored_refs(url, &dir.path().join(format!("clone-{i}.git")));
            assert!(
                mirrored.contains(&"refs/heads/main".to_owned()),
                "{url}: {mirrored:?}"
            );
            assert_eq!(
                mirrored.iter().any(|r| r.starts_with(TEMP_REF_PREFIX)),
                !hide,
                "hide {hide}: a mirror of {url} has {mirrored:?}"
            );
        }
        engine.cancel("waits");
        engine.shutdown().unwrap();
        assert_eq!(temp_refs(&target), Vec::<String>::new());
    }
}
