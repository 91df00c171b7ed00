//! The libgit2 fetcher against real `git daemon` servers on loopback: want selection for every
//! upload-pack policy, partial servers, and the report of what was found.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use purgatory_sync::{
    FailureKind, FetchControl, FetchReport, FetchRequest, Fetcher, GitFetcher, ObjectId,
};
use purgatory_sync_testkit::{self as testkit, GitDaemon, HttpGitServer};

const HOST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// Which `uploadpack.allow*SHA1InWant` settings a served repository has.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    None,
    Tip,
    Reachable,
    Any,
}

fn set_policy(repo: &Path, policy: Policy) {
    let r = git2::Repository::open_bare(repo).unwrap();
    let mut cfg = r
        .config()
        .unwrap()
        .open_level(git2::ConfigLevel::Local)
        .unwrap();
    let (tip, reachable, any) = match policy {
        Policy::None => (false, false, false),
        Policy::Tip => (true, false, false),
        Policy::Reachable => (false, true, false),
        Policy::Any => (false, false, true),
    };
    cfg.set_bool("uploadpack.allowTipSHA1InWant", tip).unwrap();
    cfg.set_bool("uploadpack.allowReachableSHA1InWant", reachable)
        .unwrap();
    cfg.set_bool("uploadpack.allowAnySHA1InWant", any).unwrap();
}

/// A served repository with `main` = c1 <- c2 (tip), and a dangling commit c3 that no ref
/// reaches.
struct Upstream {
    reachable: ObjectId,
    tip: ObjectId,
    dangling: ObjectId,
}

fn upstream(base: &Path, name: &str, policy: Policy) -> Upstream {
    let repo = testkit::served_repo(base, name);
    set_policy(&repo, policy);
    let reachable = testkit::commit(&repo, "main", &[("a", b"1")], "c1");
    let tip = testkit::commit(&repo, "main", &[("a", b"2")], "c2");
    let dangling = testkit::commit(&repo, "gone", &[("z", b"dangling")], "c3");
    git2::Repository::open_bare(&repo)
        .unwrap()
        .find_reference("refs/heads/gone")
        .unwrap()
        .delete()
        .unwrap();
    Upstream {
        reachable,
        tip,
        dangling,
    }
}

fn control(deadline: Duration) -> FetchControl {
    FetchControl::new(Instant::now() + deadline, Arc::new(AtomicBool::new(false)))
        // The test servers listen on 127.0.0.x.
        .with_url_policy(purgatory_sync::UrlPolicy::new().allow_private_addresses(true))
}

fn fetch(target: &Path, url: &str, wanted: &[ObjectId]) -> FetchReport {
    let mut wanted = wanted.to_vec();
    wanted.sort();
    GitFetcher::new().fetch(
        &FetchRequest::new("id", target, url, wanted),
        &control(Duration::from_secs(30)),
    )
}

fn sorted(mut v: Vec<ObjectId>) -> Vec<ObjectId> {
    v.sort();
    v
}

fn target(dir: &Path, name: &str) -> PathBuf {
    testkit::init_bare(&dir.join(name))
}

#[test]
fn every_upload_pack_policy_yields_every_id_it_can_over_git_daemon() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    std::fs::create_dir_all(&base).unwrap();
    let daemon = GitDaemon::start(HOST, &base).unwrap();
    every_policy(dir.path(), &base, &|name| daemon.url(name));
}

#[test]
fn every_upload_pack_policy_yields_every_id_it_can_over_http_backend() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    std::fs::create_dir_all(&base).unwrap();
    let server = HttpGitServer::start(HOST, &base).unwrap();
    every_policy(dir.path(), &base, &|name| server.url(name));
}

fn every_policy(dir: &Path, base: &Path, url: &dyn Fn(&str) -> String) {
    let cases = [
        // (policy, what a client can get from it)
        (Policy::Any, "all three: any id may be asked for"),
        (Policy::Reachable, "the two reachable commits"),
        (Policy::Tip, "the tip, whose pack brings its ancestor"),
        (
            Policy::None,
            "both reachable commits, through the advertised branches",
        ),
    ];
    let ups: Vec<(Policy, Upstream)> = cases
        .iter()
        .map(|(p, _)| (*p, upstream(base, &format!("{p:?}.git"), *p)))
        .collect();
    for ((policy, why), (_, up)) in cases.iter().zip(&ups) {
        let t = target(dir, &format!("t-{policy:?}.git"));
        let wanted = [up.reachable, up.tip, up.dangling];
        let report = fetch(&t, &url(&format!("{policy:?}.git")), &wanted);
        let expected = match policy {
            Policy::Any => vec![up.reachable, up.tip, up.dangling],
            Policy::Reachable | Policy::Tip | Policy::None => vec![up.reachable, up.tip],
        };
        assert_eq!(
            sorted(report.present.clone()),
            sorted(expected.clone()),
            "{policy:?}: {why}; {report:?}"
        );
        let missing: Vec<ObjectId> = wanted
            .iter()
            .copied()
            .filter(|o| !expected.contains(o))
            .collect();
        assert_eq!(
            sorted(report.missing.clone()),
            sorted(missing.clone()),
            "{policy:?}"
        );
        for o in &expected {
            assert!(
                testkit::has_object(&t, *o),
                "{policy:?}: {o} not in the target"
            );
        }
        if missing.is_empty() {
            assert_eq!(report.error, None, "{policy:?}");
        } else {
            assert_eq!(
                report.error.as_ref().map(|e| e.kind),
                Some(FailureKind::NotFound),
                "{policy:?}: {report:?}"
            );
        }
        // What arrived is pinned; the scratch namespace of the broad fallback is gone.
        let pins = testkit::refs_with_prefix(&t, "refs/purgatory-sync/");
        let mut expected_pins: Vec<String> = expected
            .iter()
            .map(|o| format!("refs/purgatory-sync/{o}"))
            .collect();
        expected_pins.sort();
        assert_eq!(sorted_strings(pins), expected_pins, "{policy:?}");
        assert!(report.bytes_received > 0);
    }
}

fn sorted_strings(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn a_server_with_three_of_five_wanted_ids_yields_those_three_in_one_attempt() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let partial = testkit::served_repo(&base, "partial.git");
    let full = testkit::init_bare(&dir.path().join("elsewhere.git"));
    let mut have = Vec::new();
    let mut lack = Vec::new();
    for i in 0..5u8 {
        let branch = format!("b{i}");
        let files: &[(&str, &[u8])] = &[("f", &[i])];
        if i % 2 == 0 {
            have.push(testkit::commit(&partial, &branch, files, "kept"));
        } else {
            lack.push(testkit::commit(&full, &branch, files, "elsewhere"));
        }
    }
    // Only 3 of the 5 wanted exist on the server (0, 2 and 4), the other two nowhere near it.
    assert_eq!((have.len(), lack.len()), (3, 2));
    let daemon = GitDaemon::start(HOST, &base).unwrap();
    let t = target(dir.path(), "t.git");
    let wanted: Vec<ObjectId> = have.iter().chain(&lack).copied().collect();
    let report = fetch(&t, &daemon.url("partial.git"), &wanted);
    assert_eq!(
        sorted(report.present.clone()),
        sorted(have.clone()),
        "{report:?}"
    );
    assert_eq!(sorted(report.missing.clone()), sorted(lack.clone()));
    assert_eq!(
        report.error.as_ref().map(|e| e.kind),
        Some(FailureKind::NotFound)
    );
    for o in &have {
        assert!(testkit::has_object(&t, *o));
    }
}

#[test]
fn a_refused_connection_and_an_unknown_repository_are_classified() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let t = target(dir.path(), "t.git");
    let some = ObjectId::from_bytes([7; 20]);
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind((HOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let report = fetch(&t, &format!("git://{HOST}:{port}/r.git"), &[some]);
    assert_eq!(
        report.error.as_ref().map(|e| e.kind),
        Some(FailureKind::ConnectionRefused),
        "{report:?}"
    );
    assert_eq!(report.missing, vec![some]);

    let base = dir.path().join("served");
    std::fs::create_dir_all(&base).unwrap();
    let daemon = GitDaemon::start(HOST, &base).unwrap();
    let report = fetch(&t, &daemon.url("no-such-repo.git"), &[some]);
    let kind = report.error.as_ref().map(|e| e.kind);
    assert!(
        matches!(kind, Some(FailureKind::NotFound | FailureKind::Protocol)),
        "{report:?}"
    );
    assert!(
        !report.error.unwrap().message.contains("git://"),
        "URLs are stripped from messages"
    );
}

#[test]
fn a_shallow_fetch_brings_only_the_asked_depth() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let up = upstream(&base, "deep.git", Policy::Reachable);
    let daemon = GitDaemon::start(HOST, &base).unwrap();
    let t = target(dir.path(), "t.git");
    let report = GitFetcher::new().fetch(
        &FetchRequest::new("id", &t, daemon.url("deep.git"), vec![up.tip]),
        &control(Duration::from_secs(30)).with_depth(Some(1)),
    );
    assert_eq!(report.present, vec![up.tip], "{report:?}");
    assert!(
        !testkit::has_object(&t, up.reachable),
        "the parent is beyond depth 1"
    );
    assert!(
        t.join("shallow").exists(),
        "libgit2 records the shallow boundary"
    );
}

#[test]
fn a_ref_update_clashing_with_an_existing_ref_writes_none_of_the_refs() {
    let dir = tempfile::tempdir().unwrap();
    let t = target(dir.path(), "t.git");
    let c = testkit::commit(&t, "main", &[("f", b"1")], "one");
    // `refs/heads/a/b` exists, so `refs/heads/a` cannot be written.
    let c2 = testkit::commit(&t, "a/b", &[("f", b"2")], "two");
    let updates = [
        purgatory_sync::RefUpdate::oid("refs/heads/first", c.to_string()),
        purgatory_sync::RefUpdate::oid("refs/heads/a", c.to_string()),
        purgatory_sync::RefUpdate::oid("refs/heads/main", c2.to_string()),
        purgatory_sync::RefUpdate::oid("refs/tags/zz-last", c.to_string()),
    ];
    let err = GitFetcher::new()
        .apply_refs(&t, &updates, false)
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::LocalRepository, "{err}");
    let repo = git2::Repository::open_bare(&t).unwrap();
    for name in ["refs/heads/first", "refs/tags/zz-last"] {
        assert!(repo.find_reference(name).is_err(), "{name} was written");
    }
    assert_eq!(
        repo.find_reference("refs/heads/main")
            .unwrap()
            .target()
            .unwrap()
            .to_string(),
        c.to_string(),
        "main keeps its old target"
    );
}

/// A complete ref set that cannot be written deletes nothing: the branches and tags it leaves
/// out are all still there, with their targets.
#[test]
fn a_complete_ref_set_that_fails_to_write_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = target(dir.path(), "t.git");
    let c = testkit::commit(&t, "main", &[("f", b"1")], "one");
    let c2 = testkit::commit(&t, "a/b", &[("f", b"2")], "two");
    let repo = git2::Repository::open_bare(&t).unwrap();
    for name in ["refs/heads/dev", "refs/tags/v1", "refs/tags/zz"] {
        repo.reference(name, oid_of(c), false, "test").unwrap();
    }
    let before = testkit::refs_with_prefix(&t, "refs/");
    // `refs/heads/a/b` is named, so it stays, and `refs/heads/a` cannot be written.
    let updates = [
        purgatory_sync::RefUpdate::oid("refs/heads/a", c.to_string()),
        purgatory_sync::RefUpdate::oid("refs/heads/a/b", c2.to_string()),
        purgatory_sync::RefUpdate::oid("refs/heads/main", c2.to_string()),
    ];
    let err = GitFetcher::new()
        .apply_refs(&t, &updates, true)
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::LocalRepository, "{err}");
    assert_eq!(testkit::refs_with_prefix(&t, "refs/"), before);
    for name in [
        "refs/heads/dev",
        "refs/tags/v1",
        "refs/tags/zz",
        "refs/heads/main",
    ] {
        let target = repo.find_reference(name).unwrap().target().unwrap();
        assert_eq!(target, oid_of(c), "{name}");
    }

    // The same set without the clash is written whole.
    let err = GitFetcher::new().apply_refs(&t, &updates[1..], true);
    assert_eq!(err, Ok(()));
    assert_eq!(
        testkit::refs_with_prefix(&t, "refs/"),
        ["refs/heads/a/b", "refs/heads/main"]
    );
}

fn oid_of(o: purgatory_sync::ObjectId) -> git2::Oid {
    git2::Oid::from_bytes(o.as_bytes()).unwrap()
}
