//! Hostile and broken servers cost one bounded attempt and nothing more.
//!
//! For every fault, over `http://` (`git http-backend` behind the test kit's server) and
//! `git://` (a faulty proxy in front of `git daemon`): the attempt ends within the fetch
//! deadline plus 2 s, the worker is free again, the target repository passes `git fsck` with no
//! lock file left behind, and other identifiers keep being released while the bad fetch runs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use purgatory_sync::{FailureKind, ObjectId, Outcome, PendingEvent};
use purgatory_sync_testkit::{
    self as testkit, Fault, FaultTarget, FaultyTcpServer, GitDaemon, HttpGitServer, TcpFault,
};

const GOOD_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const BAD_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const DEADLINE: Duration = Duration::from_secs(3);
const SLACK: Duration = Duration::from_secs(2);
/// Bounds every wait of the tests.
const WAIT: Duration = Duration::from_secs(20);

/// Healthy mirrors for the identifiers that must keep flowing.
struct Good {
    _daemon: GitDaemon,
    urls: Vec<String>,
    commits: Vec<ObjectId>,
}

fn good(dir: &Path) -> Good {
    let base = dir.join("good");
    let mut commits = Vec::new();
    for i in 0..4u8 {
        let repo = testkit::served_repo(&base, &format!("g{i}.git"));
        commits.push(testkit::commit(&repo, "main", &[("f", &[i])], "good"));
    }
    let daemon = GitDaemon::start(GOOD_HOST, &base).unwrap();
    let urls = (0..4).map(|i| daemon.url(&format!("g{i}.git"))).collect();
    Good {
        _daemon: daemon,
        urls,
        commits,
    }
}

fn event(id: &str, repo: &Path, oid: ObjectId, url: &str) -> PendingEvent {
    PendingEvent::new(id, id, repo)
        .oid(oid.to_string())
        .clone_url(url)
}

fn no_lock_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "lock")
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pack_git2_"))
            {
                found.push(p);
            }
        }
    }
    found
}

fn fsck(repo: &Path) -> (bool, String) {
    let out = testkit::git_command()
        .arg("--git-dir")
        .arg(repo)
        .args(["fsck", "--no-progress"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs one bad fetch among good ones and checks every promise of the module docs.
fn one_bad_attempt(
    name: &str,
    bad_url: &str,
    bad_oid: ObjectId,
    max_bytes: u64,
    expected: &[FailureKind],
) {
    let dir = tempfile::tempdir().unwrap();
    let good = good(dir.path());
    let engine = purgatory_sync_testkit::loopback_engine()
        .thread_name(name)
        .workers(2)
        .tick(Duration::from_millis(50))
        .sync_delay(Duration::ZERO)
        .backoff_base(Duration::from_secs(600))
        .backoff_cap(Duration::from_secs(600))
        .fetch_deadline(DEADLINE)
        .io_timeout(Duration::from_secs(30))
        .max_fetch_bytes(max_bytes)
        .build()
        .unwrap();
    let outcomes = engine.outcomes();
    let bad_repo = testkit::init_bare(&dir.path().join("bad.git"));
    let t0 = Instant::now();
    engine
        .submit(event("bad", &bad_repo, bad_oid, bad_url))
        .unwrap();

    // Good identifiers, one after another, on the other worker.
    let mut released_while_bad_ran = 0;
    for (i, (url, oid)) in good.urls.iter().zip(&good.commits).enumerate() {
        let repo = testkit::init_bare(&dir.path().join(format!("good{i}.git")));
        engine
            .submit(event(&format!("good{i}"), &repo, *oid, url))
            .unwrap();
        match outcomes.recv_timeout(WAIT) {
            Ok(Outcome::Released { event_id, .. }) => {
                assert_eq!(event_id, format!("good{i}"), "{name}")
            }
            other => panic!("{name}: good{i} not released: {other:?}"),
        }
        let s = engine.stats();
        if s.fetches_failed == 0 && s.in_flight == 1 {
            released_while_bad_ran += 1;
        }
    }

    // The bad attempt ends within the deadline plus the slack.
    let ended = loop {
        let s = engine.stats();
        if s.fetches_failed >= 1 || t0.elapsed() > DEADLINE + WAIT {
            break t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let s = engine.stats();
    assert_eq!(s.fetches_failed, 1, "{name}: {s:?}");
    assert!(
        ended <= DEADLINE + SLACK,
        "{name}: the attempt took {ended:?}"
    );
    let kind = *s.failures.keys().next().unwrap();
    assert!(
        expected.contains(&kind),
        "{name}: failure {kind:?}, expected one of {expected:?}"
    );
    match &s.recent_failures[..] {
        [f] => {
            assert_eq!(
                (f.kind, f.url.as_str(), f.identifier.as_str()),
                (kind, bad_url, "bad")
            );
            assert!(!f.message.contains("://"), "{name}: URL in {:?}", f.message);
        }
        other => panic!("{name}: {other:?}"),
    }
    assert_eq!(s.in_flight, 0, "{name}: the worker is free again");
    assert_eq!(s.released, 4, "{name}");
    assert_eq!(s.waiting_events, 1, "{name}: the bad event still waits");
    // A slow fault must not have held the good identifiers up.
    if ended >= DEADLINE {
        assert_eq!(
            released_while_bad_ran, 4,
            "{name}: good identifiers were released while the bad fetch hung"
        );
    }
    engine.shutdown().unwrap();
    let (ok, out) = fsck(&bad_repo);
    assert!(ok, "{name}: git fsck failed: {out}");
    assert_eq!(no_lock_files(&bad_repo), Vec::<PathBuf>::new(), "{name}");
}

/// A served repository behind a faulty HTTP server; returns its URL and wanted commit.
fn http_bad(dir: &Path, fault: Fault, target: FaultTarget) -> (HttpGitServer, String, ObjectId) {
    let base = dir.join("bad-served");
    let repo = testkit::served_repo(&base, "r.git");
    let oid = testkit::commit(&repo, "main", &[("x", b"payload")], "wanted");
    let server = HttpGitServer::start(BAD_HOST, &base).unwrap();
    server.set_fault_on(target, fault);
    let url = server.url("r.git");
    (server, url, oid)
}

fn tcp_bad(dir: &Path, fault: TcpFault) -> (GitDaemon, FaultyTcpServer, String, ObjectId) {
    let base = dir.join("bad-served");
    let repo = testkit::served_repo(&base, "r.git");
    let oid = testkit::commit(&repo, "main", &[("x", b"payload")], "wanted");
    let daemon = GitDaemon::start(OTHER_HOST, &base).unwrap();
    let proxy = FaultyTcpServer::start(BAD_HOST, daemon.addr(), fault).unwrap();
    let url = proxy.url("r.git");
    (daemon, proxy, url, oid)
}

const MIB: u64 = 1 << 20;

#[test]
fn http_server_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, url, oid) = http_bad(dir.path(), Fault::Hang, FaultTarget::All);
    one_bad_attempt("h-hang", &url, oid, 64 * MIB, &[FailureKind::Deadline]);
}

#[test]
fn http_server_that_drips_one_byte_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, url, oid) = http_bad(
        dir.path(),
        Fault::Drip { bytes_per_sec: 1 },
        FaultTarget::All,
    );
    one_bad_attempt("h-drip", &url, oid, 64 * MIB, &[FailureKind::Deadline]);
}

#[test]
fn http_server_that_sends_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, url, oid) = http_bad(dir.path(), Fault::Garbage, FaultTarget::All);
    one_bad_attempt("h-garb", &url, oid, 64 * MIB, &[FailureKind::Protocol]);
}

#[test]
fn http_server_that_closes_in_the_middle_of_the_pack() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, url, oid) = http_bad(
        dir.path(),
        Fault::CloseMidPack { after_bytes: 60 },
        FaultTarget::UploadPack,
    );
    one_bad_attempt(
        "h-cut",
        &url,
        oid,
        64 * MIB,
        &[FailureKind::Protocol, FailureKind::Network],
    );
}

#[test]
fn http_server_that_answers_500() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, url, oid) = http_bad(dir.path(), Fault::Status(500), FaultTarget::All);
    one_bad_attempt("h-500", &url, oid, 64 * MIB, &[FailureKind::Protocol]);
}

#[test]
fn http_server_that_answers_404() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, url, oid) = http_bad(dir.path(), Fault::Status(404), FaultTarget::All);
    one_bad_attempt("h-404", &url, oid, 64 * MIB, &[FailureKind::NotFound]);
}

#[test]
fn http_server_that_redirects_to_another_host_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere_base = dir.path().join("elsewhere");
    let elsewhere_repo = testkit::served_repo(&elsewhere_base, "r.git");
    testkit::commit(&elsewhere_repo, "main", &[("x", b"payload")], "wanted");
    let elsewhere = HttpGitServer::start(OTHER_HOST, &elsewhere_base).unwrap();
    let target = format!("http://{}", elsewhere.addr());
    let (_s, url, oid) = http_bad(dir.path(), Fault::RedirectTo(target), FaultTarget::All);
    one_bad_attempt("h-redir", &url, oid, 64 * MIB, &[FailureKind::Protocol]);
    assert!(
        elsewhere.requests().is_empty(),
        "the other host was contacted: {:?}",
        elsewhere.requests()
    );
}

#[test]
fn http_pack_larger_than_the_cap_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("bad-served");
    let repo = testkit::served_repo(&base, "r.git");
    let oid = testkit::commit_large(&repo, "main", 3 * MIB as usize, 7);
    let server = HttpGitServer::start(BAD_HOST, &base).unwrap();
    one_bad_attempt(
        "h-cap",
        &server.url("r.git"),
        oid,
        512 * 1024,
        &[FailureKind::SizeCap],
    );
    let sent: u64 = server.requests().iter().map(|r| r.bytes_sent).sum();
    assert!(
        sent > 512 * 1024,
        "the server did send more than the cap: {sent}"
    );
}

#[test]
fn git_server_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _p, url, oid) = tcp_bad(dir.path(), TcpFault::Hang);
    one_bad_attempt("g-hang", &url, oid, 64 * MIB, &[FailureKind::Deadline]);
}

#[test]
fn git_server_that_drips_one_byte_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _p, url, oid) = tcp_bad(dir.path(), TcpFault::Drip { bytes_per_sec: 1 });
    one_bad_attempt("g-drip", &url, oid, 64 * MIB, &[FailureKind::Deadline]);
}

#[test]
fn git_server_that_sends_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _p, url, oid) = tcp_bad(dir.path(), TcpFault::Garbage);
    one_bad_attempt("g-garb", &url, oid, 64 * MIB, &[FailureKind::Protocol]);
}

#[test]
fn git_server_that_closes_in_the_middle_of_the_pack() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _p, url, oid) = tcp_bad(dir.path(), TcpFault::CloseMidPack { after_bytes: 40 });
    one_bad_attempt(
        "g-cut",
        &url,
        oid,
        64 * MIB,
        &[
            FailureKind::Protocol,
            FailureKind::Network,
            FailureKind::NotFound,
        ],
    );
}
