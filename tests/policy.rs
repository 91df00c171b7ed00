//! The URL policy through the public API: at submit (refused URLs are returned to the host and
//! never fetched, the event still waits) and right before each fetch (the fetcher re-checks
//! the URL and every address it connects to, and git configuration cannot rewrite the URL).
//!
//! Servers listen on loopback addresses (127.0.0.2, 127.0.0.3); nothing sleeps to wait for a
//! decision: tests wait on channels or poll the engine's stats in bounded loops.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use purgatory_sync::{
    Admission, Engine, EngineBuilder, FailureKind, FakeClock, FetchControl, FetchError,
    FetchReport, FetchRequest, Fetcher, GitFetcher, ObjectId, Origin, Outcome, PendingEvent,
    RefusedUrl, UrlPolicy, UrlRefusal,
};
use purgatory_sync_testkit::{
    self as testkit, FaultyTcpServer, GitDaemon, HttpGitServer, TcpFault,
};

/// Far longer than anything here should take, even on a loaded 2-core machine.
const GENEROUS: Duration = Duration::from_secs(30);
/// A tick so long that anything that happens in a fake-clock test happened because of a
/// command or a clock advance.
const NEVER_TICK: Duration = Duration::from_secs(3600);

const HOST_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HOST_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn blob_id(content: &[u8]) -> ObjectId {
    git2::Oid::hash_object(git2::ObjectType::Blob, content)
        .unwrap()
        .to_string()
        .parse()
        .unwrap()
}

fn event(id: &str, identifier: &str, repo: &Path, oid: ObjectId, urls: &[&str]) -> PendingEvent {
    PendingEvent {
        id: id.into(),
        identifier: identifier.into(),
        repo: repo.to_path_buf(),
        oids: vec![oid.to_string()],
        clone_urls: urls.iter().map(|u| u.to_string()).collect(),
        origin: Origin::Sync,
        ..Default::default()
    }
}

/// Polls the engine's stats until `done` holds, for at most [`GENEROUS`].
fn recv_outcome(engine: &Engine) -> Outcome {
    engine
        .outcomes()
        .recv_timeout(GENEROUS)
        .unwrap_or_else(|e| panic!("no outcome within {GENEROUS:?}: {e}; {:?}", engine.stats()))
}

/// A fetcher that finds nothing and reports every URL and policy it was asked to fetch with.
#[derive(Clone)]
struct Recorder {
    seen: Sender<(String, UrlPolicy)>,
}

impl Fetcher for Recorder {
    fn fetch(&self, req: &FetchRequest, control: &FetchControl) -> FetchReport {
        let _ = self
            .seen
            .send((req.url.clone(), control.url_policy().clone()));
        let mut report =
            FetchReport::failed(FetchError::new(FailureKind::NotFound, "nothing here"));
        report.missing = req.wanted.clone();
        report
    }
}

fn recorder() -> (Recorder, Receiver<(String, UrlPolicy)>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (Recorder { seen: tx }, rx)
}

/// A fake-clock engine with the strict policy (no private addresses) and an own domain.
fn strict_engine(name: &str, clock: &FakeClock, fetcher: Recorder) -> Engine {
    Engine::builder()
        .domain_limits(1024, 600_000)
        .domain_burst(100_000)
        .our_domain("Relay.Example.COM.")
        .thread_name(name)
        .clock(clock.clone())
        .tick(NEVER_TICK)
        .workers(2)
        .fetcher(fetcher)
        .build()
        .unwrap()
}

/// A real-clock engine with the default fetcher, fast, for servers on 127.0.0.x.
fn fast(name: &str) -> EngineBuilder {
    let _ = env_logger::builder().is_test(true).try_init();
    testkit::require_git();
    purgatory_sync_testkit::loopback_engine()
        .thread_name(name)
        .tick(Duration::from_millis(50))
        .sync_delay(Duration::ZERO)
        .backoff_base(Duration::from_millis(100))
        .backoff_cap(Duration::from_millis(400))
        .fetch_deadline(Duration::from_secs(30))
}

/// A served repository `name` under `base` with one commit; returns the commit.
fn served(base: &Path, name: &str) -> ObjectId {
    let repo = testkit::served_repo(base, name);
    testkit::commit(&repo, "main", &[("README", b"policy\n")], "first")
}

fn control(policy: UrlPolicy) -> FetchControl {
    FetchControl::new(Instant::now() + GENEROUS, Arc::new(AtomicBool::new(false)))
        .with_url_policy(policy)
}

fn open() -> UrlPolicy {
    UrlPolicy::new().allow_private_addresses(true)
}

fn fetch(url: &str, target: &Path, oid: ObjectId, control: &FetchControl) -> FetchReport {
    GitFetcher::new().fetch(&FetchRequest::new("id", target, url, vec![oid]), control)
}

/// Every kind of refused URL comes back from `submit` with its index and reason; the others
/// are fetched, the refused ones never; the event waits.
#[test]
fn submit_returns_refused_urls_with_their_reasons() {
    let dir = tempdir();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let clock = FakeClock::new();
    let (fetcher, seen) = recorder();
    let engine = strict_engine("pol-a", &clock, fetcher);

    let refused = [
        ("file:///srv/git/x.git", UrlRefusal::Scheme("file".into())),
        ("/srv/git/x.git", UrlRefusal::Invalid("a local path".into())),
        (
            "ssh://git.example.com/x.git",
            UrlRefusal::Scheme("ssh".into()),
        ),
        ("ext::sh%20-c%20id", UrlRefusal::Scheme("ext::".into())),
        (
            "https://user:pass@git.example.com/x.git",
            UrlRefusal::Credentials,
        ),
        (
            "git://127.0.0.1/x.git",
            UrlRefusal::PrivateAddress("127.0.0.1".into()),
        ),
        (
            "http://localhost:8080/x.git",
            UrlRefusal::PrivateAddress("localhost".into()),
        ),
        ("https://relay.example.com/x.git", UrlRefusal::OwnDomain),
        ("HTTPS://RELAY.example.com./x.git", UrlRefusal::OwnDomain),
    ];
    let accepted = [
        "https://git.example.com/x.git",
        // A substring of the own domain is another domain.
        "https://notrelay.example.com.evil/x.git",
    ];
    let mut urls: Vec<&str> = Vec::new();
    let mut expected = Vec::new();
    for (i, (url, reason)) in refused.iter().enumerate() {
        // Interleaved: accepted URLs between refused ones keep the indices honest.
        if i == 3 {
            urls.push(accepted[0]);
        }
        expected.push(RefusedUrl::new(urls.len(), *url, reason.clone()));
        urls.push(url);
    }
    urls.push(accepted[1]);
    let oid = blob_id(b"a");
    let admission = engine
        .submit(event("e1", "alice/x", &repo, oid, &urls))
        .unwrap();
    assert!(admission.is_pending(), "{admission:?}");
    assert_eq!(admission.refused_urls(), expected.as_slice());
    assert_eq!(admission, Admission::pending_with(expected.clone()));
    for r in admission.refused_urls() {
        // Every reason reads as a sentence for the host's logs.
        assert!(!r.reason.to_string().is_empty());
    }

    // Submitting the same event again answers the same.
    let again = engine
        .submit(event("e1", "alice/x", &repo, oid, &urls))
        .unwrap();
    assert_eq!(again.refused_urls(), expected.as_slice());
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| {
        s.commands_pending == 0 && s.waiting_events == 1
    });
    assert_eq!(s.refused, 0, "refused URLs are not refused submits");

    // The attempt tries the accepted URLs, and only them.
    clock.advance(Duration::from_millis(500));
    let mut fetched: Vec<String> = (0..2)
        .map(|_| seen.recv_timeout(GENEROUS).expect("a fetch").0)
        .collect();
    fetched.sort();
    let mut want: Vec<String> = accepted.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(fetched, want);
    // Later attempts too.
    testkit::wait_for_stats(&engine, GENEROUS, |s| {
        s.in_flight == 0 && s.fetches_failed == 2
    });
    clock.advance(Duration::from_secs(20));
    for _ in 0..2 {
        let (url, _) = seen.recv_timeout(GENEROUS).expect("a second attempt");
        assert!(accepted.contains(&url.as_str()), "{url} was fetched");
    }
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| {
        s.in_flight == 0 && s.fetches_failed == 4
    });
    assert_eq!(s.waiting_events, 1, "{s:?}");
    assert!(seen.try_recv().is_err());
    engine.shutdown().unwrap();
}

/// An event whose every URL is refused still waits: no fetch, and a push releases it.
#[test]
fn an_event_with_every_url_refused_waits_for_a_push() {
    let dir = tempdir();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let clock = FakeClock::new();
    let (fetcher, seen) = recorder();
    let engine = strict_engine("pol-b", &clock, fetcher);
    let oid = blob_id(b"pushed");
    let urls = ["file:///srv/x.git", "git://10.0.0.7/x.git", "./x.git"];
    let admission = engine
        .submit(event("e1", "bob/x", &repo, oid, &urls))
        .unwrap();
    let indices: Vec<usize> = admission.refused_urls().iter().map(|r| r.index).collect();
    assert_eq!(indices, [0, 1, 2], "{admission:?}");
    // `submitted` counts when the scheduler has applied the submit; `commands_pending` is 0 as
    // soon as it has taken the command, before it applies it.
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| s.submitted == 1);
    assert_eq!((s.waiting_events, s.queued_identifiers), (1, 1), "{s:?}");

    clock.advance(Duration::from_secs(60));
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| s.commands_pending == 0);
    assert_eq!(s.waiting_events, 1, "{s:?}");
    assert_eq!(s.fetches_started, 0, "{s:?}");
    assert!(seen.try_recv().is_err(), "nothing was fetched");

    // The data arrives by a push.
    git2::Repository::open_bare(&repo)
        .unwrap()
        .blob(b"pushed")
        .unwrap();
    engine.git_data_arrived("bob/x");
    match recv_outcome(&engine) {
        Outcome::Released { event_id, .. } => assert_eq!(event_id, "e1"),
        other => panic!("expected e1 released, got {other:?}"),
    }
    engine.shutdown().unwrap();
}

/// Every fetch the engine starts carries the engine's policy, so the fetcher's own check and
/// its connect-time checks apply the builder's settings.
#[test]
fn every_fetch_carries_the_engines_policy() {
    let dir = tempdir();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let clock = FakeClock::new();
    let (fetcher, seen) = recorder();
    let engine = Engine::builder()
        .allow_private_addresses(true)
        .allowed_schemes(["https", "git"])
        .our_domain("relay.example.com")
        .thread_name("pol-c")
        .clock(clock.clone())
        .tick(NEVER_TICK)
        .fetcher(fetcher)
        .build()
        .unwrap();
    let oid = blob_id(b"c");
    let admission = engine
        .submit(event(
            "e1",
            "carol/x",
            &repo,
            oid,
            &["http://git.example.com/x.git", "git://10.0.0.7/x.git"],
        ))
        .unwrap();
    assert_eq!(
        admission.refused_urls(),
        [RefusedUrl::new(
            0,
            "http://git.example.com/x.git",
            UrlRefusal::Scheme("http".into())
        )]
    );
    // Applied before the clock moves, so that the first attempt is due after the advance.
    testkit::wait_for_stats(&engine, GENEROUS, |s| s.submitted == 1);
    clock.advance(Duration::from_millis(500));
    let (url, policy) = seen.recv_timeout(GENEROUS).expect("a fetch");
    assert_eq!(url, "git://10.0.0.7/x.git");
    assert_eq!(
        policy,
        UrlPolicy::new()
            .allowed_schemes(["https", "git"])
            .allow_private_addresses(true)
            .our_domain("relay.example.com")
    );
    engine.shutdown().unwrap();
}

/// Called directly with the strict policy, the fetcher refuses a loopback URL before any
/// traffic: the server in front of the daemon sees no connection. With private addresses
/// allowed, the same fetch works (so the server was reachable).
#[test]
fn the_fetcher_refuses_private_addresses_before_any_traffic() {
    testkit::require_git();
    let dir = tempdir();
    let base = dir.path().join("served");
    let tip = served(&base, "r.git");
    let daemon = GitDaemon::start(HOST_A, &base).unwrap();
    let front = FaultyTcpServer::start(HOST_A, daemon.addr(), TcpFault::None).unwrap();
    let http = HttpGitServer::start(HOST_A, &base).unwrap();
    let urls = [front.url("r.git"), http.url("r.git")];
    let targets: Vec<PathBuf> = (0..urls.len())
        .map(|i| testkit::init_bare(&dir.path().join(format!("t{i}.git"))))
        .collect();
    let strict = FetchControl::new(Instant::now() + GENEROUS, Arc::new(AtomicBool::new(false)));
    for (url, target) in urls.iter().zip(&targets) {
        let report = fetch(url, target, tip, &strict);
        let error = report.error.expect("refused");
        assert_eq!(error.kind, FailureKind::Refused, "{url}: {error}");
        assert!(error.message.contains("127.0.0.2"), "{error}");
        assert_eq!(report.missing, [tip]);
        assert_eq!(report.bytes_received, 0);
        assert!(!testkit::has_object(target, tip));
    }
    assert!(front.requests().is_empty(), "{:?}", front.requests());
    assert!(http.requests().is_empty(), "{:?}", http.requests());

    for (url, target) in urls.iter().zip(&targets) {
        let report = fetch(url, target, tip, &control(open()));
        assert_eq!(report.error, None, "{url}");
        assert!(testkit::has_object(target, tip));
    }
    assert!(!front.requests().is_empty() && !http.requests().is_empty());
}

/// `HTTPS://`-style scheme case is accepted and fetched like lower case.
#[test]
fn an_upper_case_scheme_fetches_normally() {
    testkit::require_git();
    let dir = tempdir();
    let base = dir.path().join("served");
    let tip = served(&base, "r.git");
    let http = HttpGitServer::start(HOST_A, &base).unwrap();
    let url = http.url("r.git").replacen("http://", "HTTP://", 1);
    let target = testkit::init_bare(&dir.path().join("t.git"));
    let report = fetch(&url, &target, tip, &control(open()));
    assert_eq!(report.error, None, "{url}");
    assert!(testkit::has_object(&target, tip));
}

/// The relay's own domain is never fetched from, while another server serves the event.
#[test]
fn our_own_domain_is_never_fetched_from() {
    own_domain_is_skipped_and_the_other_server_serves("pol-d", HOST_A, |_| "127.0.0.3".to_owned());
}

/// An own domain with a port is that authority only: a sibling git service on another port of
/// the same host serves the event, and the relay's own port is never asked.
#[test]
fn our_own_domain_with_a_port_leaves_other_ports_of_the_host_usable() {
    own_domain_is_skipped_and_the_other_server_serves("pol-p", HOST_B, |ours| {
        format!("127.0.0.3:{}", ours.addr().port())
    });
}

/// The relay's own server on `HOST_B` and another on `other_host` serve the same repository;
/// the engine's `our_domain` is `ours(relay's server)`. The own URL is refused at submit and
/// never asked; the other server serves the event.
fn own_domain_is_skipped_and_the_other_server_serves(
    name: &str,
    other_host: std::net::Ipv4Addr,
    ours: impl Fn(&HttpGitServer) -> String,
) {
    let dir = tempdir();
    let base = dir.path().join("served");
    let tip = served(&base, "alice/r.git");
    let own_server = HttpGitServer::start(HOST_B, &base).unwrap();
    let other = HttpGitServer::start(other_host, &base).unwrap();
    assert_ne!(own_server.addr(), other.addr());
    let target = testkit::init_bare(&dir.path().join("relay/r.git"));
    let engine = fast(name).our_domain(&ours(&own_server)).build().unwrap();
    let own_url = own_server.url("alice/r.git");
    let admission = engine
        .submit(event(
            "e1",
            "alice/r",
            &target,
            tip,
            &[&own_url, &other.url("alice/r.git")],
        ))
        .unwrap();
    assert_eq!(
        admission.refused_urls(),
        [RefusedUrl::new(0, own_url, UrlRefusal::OwnDomain)]
    );
    match recv_outcome(&engine) {
        Outcome::Released { event_id, .. } => assert_eq!(event_id, "e1"),
        other => panic!("expected e1 released, got {other:?}"),
    }
    assert!(testkit::has_object(&target, tip));
    assert!(!other.requests().is_empty());
    assert!(
        own_server.requests().is_empty(),
        "{:?}",
        own_server.requests()
    );
    engine.shutdown().unwrap();
}

/// `url.<base>.insteadOf` in the target repository's configuration would send the fetch to
/// another server: the fetch is refused, and neither server gets a request.
#[test]
fn git_configuration_cannot_rewrite_the_fetched_url() {
    testkit::require_git();
    let dir = tempdir();
    let base = dir.path().join("served");
    let tip = served(&base, "r.git");
    let asked = HttpGitServer::start(HOST_A, &base).unwrap();
    let rewritten = HttpGitServer::start(HOST_B, &base).unwrap();
    let target: PathBuf = testkit::init_bare(&dir.path().join("t.git"));
    let key = format!("url.{}.insteadOf", rewritten.url(""));
    git2::Repository::open_bare(&target)
        .unwrap()
        .config()
        .unwrap()
        .set_str(&key, &asked.url(""))
        .unwrap();

    let url = asked.url("r.git");
    let report = fetch(&url, &target, tip, &control(open()));
    let error = report.error.expect("refused");
    assert_eq!(error.kind, FailureKind::Refused, "{error}");
    assert!(error.message.contains("rewrites"), "{error}");
    assert!(!testkit::has_object(&target, tip));
    assert!(
        rewritten.requests().is_empty(),
        "{:?}",
        rewritten.requests()
    );
    assert!(asked.requests().is_empty(), "{:?}", asked.requests());

    // Without the rewrite the same fetch goes to the server asked, and only there.
    git2::Repository::open_bare(&target)
        .unwrap()
        .config()
        .unwrap()
        .remove(&key)
        .unwrap();
    let report = fetch(&url, &target, tip, &control(open()));
    assert_eq!(report.error, None);
    assert!(testkit::has_object(&target, tip));
    assert!(!asked.requests().is_empty());
    assert!(
        rewritten.requests().is_empty(),
        "{:?}",
        rewritten.requests()
    );
}

/// Submit-time refusals do not make the submit an error, but a malformed string still is.
#[test]
fn malformed_strings_are_still_submit_errors() {
    let dir = tempdir();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let clock = FakeClock::new();
    let (fetcher, _seen) = recorder();
    let engine = strict_engine("pol-e", &clock, fetcher);
    let oid = blob_id(b"e");
    for bad in ["", "https://git.example.com/a b.git", "ext::sh -c id"] {
        let err = engine
            .submit(event(
                "e1",
                "erin/x",
                &repo,
                oid,
                &["https://ok.example/x", bad],
            ))
            .unwrap_err();
        assert!(
            matches!(
                err,
                purgatory_sync::SubmitError::InvalidCloneUrl { index: 1, .. }
            ),
            "{bad:?}: {err:?}"
        );
    }
    let s = testkit::wait_for_stats(&engine, GENEROUS, |s| s.commands_pending == 0);
    assert_eq!((s.waiting_events, s.refused), (0, 3), "{s:?}");
    engine.shutdown().unwrap();
}
