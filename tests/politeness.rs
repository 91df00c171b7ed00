//! Politeness toward remote hosts, proven with the servers' own request logs rather than the
//! engine's counters: per-domain concurrency caps and rate quotas, round-robin service of one
//! busy domain, near-full use of a quota, and the naughty list.
//!
//! Every fetch starts with one `GET …/info/refs` (the ref advertisement); those requests are
//! the fetch starts the server saw. The quota counts every request the server sees: the
//! `POST …/git-upload-pack` that downloads what the advertisement offered, and each further
//! connection of a fetch, take a cell each.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use purgatory_sync::{Engine, EngineBuilder, ObjectId, Outcome, PendingEvent};
use purgatory_sync_testkit::{
    self as testkit, FaultyTcpServer, HttpGitServer, RequestRecord, TcpFault,
};

const HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const WAIT: Duration = Duration::from_secs(30);

fn builder(name: &str) -> EngineBuilder {
    Engine::builder()
        .allow_private_addresses(true) // the test servers listen on 127.0.0.x
        .thread_name(name)
        .workers(8)
        .tick(Duration::from_millis(100))
        .sync_delay(Duration::ZERO)
        .backoff_base(Duration::from_secs(600))
        .backoff_cap(Duration::from_secs(600))
        .fetch_deadline(Duration::from_secs(20))
}

/// The fetch starts a server saw, in order.
fn fetch_starts(server: &HttpGitServer) -> Vec<RequestRecord> {
    assert!(server.wait_idle(WAIT), "the server went idle");
    let mut v: Vec<RequestRecord> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/info/refs"))
        .collect();
    v.sort_by_key(|r| r.started);
    v
}

/// Every request a server saw (advertisements and downloads), in order.
fn all_requests(server: &HttpGitServer) -> Vec<RequestRecord> {
    assert!(server.wait_idle(WAIT), "the server went idle");
    let mut v = server.requests();
    v.sort_by_key(|r| r.started);
    v
}

/// Checks that `records` (sorted) fit a quota of `per_minute` with bursts of `burst`: within
/// any window, at most the burst plus what the window refills.
fn assert_within_quota(records: &[RequestRecord], burst: u32, per_minute: u32) {
    let rate = f64::from(per_minute) / 60.0;
    for window in [0.5f64, 1.0, 2.0, 4.0] {
        let allowed = f64::from(burst) + window * rate;
        for (i, first) in records.iter().enumerate() {
            let within = records[i..]
                .iter()
                .take_while(|r| (r.started - first.started).as_secs_f64() < window)
                .count();
            assert!(
                within as f64 <= allowed + 1e-9,
                "{within} requests within {window} s, the quota allows {allowed}"
            );
        }
    }
}

/// The most requests in progress at once. The server logs a request's end after its last
/// byte left, which the client may act on a moment earlier: ends are taken 5 ms early.
fn max_overlap(records: &[RequestRecord]) -> usize {
    let slack = Duration::from_millis(5);
    let mut points: Vec<(Instant, i32)> = Vec::new();
    for r in records {
        // A request shorter than the slack still lasts an instant: otherwise its end, sorted
        // before its start at the same instant, would make it count for nothing.
        let end = r
            .ended
            .checked_sub(slack)
            .unwrap_or(r.started)
            .max(r.started + Duration::from_nanos(1));
        points.push((r.started, 1));
        points.push((end, -1));
    }
    // Ends before starts at the same instant.
    points.sort_by_key(|(t, d)| (*t, *d));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in points {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// `n` served repositories `r0.git`, `r1.git`, … with one commit each.
fn served(base: &Path, n: usize) -> Vec<ObjectId> {
    (0..n)
        .map(|i| {
            let repo = testkit::served_repo(base, &format!("r{i}.git"));
            testkit::commit(&repo, "main", &[("f", format!("{i}").as_bytes())], "c")
        })
        .collect()
}

fn event(id: &str, repo: &Path, oid: ObjectId, urls: &[String]) -> PendingEvent {
    let mut ev = PendingEvent::new(id, id, repo).oid(oid.to_string());
    ev.clone_urls = urls.to_vec();
    ev
}

fn wait_released(engine: &Engine, n: usize) {
    let outcomes = engine.outcomes();
    for _ in 0..n {
        match outcomes.recv_timeout(WAIT) {
            Ok(Outcome::Released { .. }) => {}
            other => panic!("expected a release, got {other:?}"),
        }
    }
}

#[test]
fn concurrency_and_rate_per_host_hold_under_a_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let commits = served(&base, 24);
    let server = HttpGitServer::start(HOST, &base).unwrap();
    // Slow packs, so that fetches overlap and the cap binds too.
    server.set_fault_on(
        testkit::FaultTarget::UploadPack,
        testkit::Fault::Drip {
            bytes_per_sec: 2000,
        },
    );
    // 2 in flight, 480 a minute (one every 125 ms), bursts of 3.
    let (cap, per_minute, burst) = (2usize, 480u32, 3u32);
    let engine = builder("pol-lim")
        .domain_limits(cap, per_minute)
        .domain_burst(burst)
        .build()
        .unwrap();
    for (i, oid) in commits.iter().enumerate() {
        let repo = testkit::init_bare(&dir.path().join(format!("t{i}.git")));
        engine
            .submit(event(
                &format!("e{i}"),
                &repo,
                *oid,
                &[server.url(&format!("r{i}.git"))],
            ))
            .unwrap();
    }
    wait_released(&engine, commits.len());
    engine.shutdown().unwrap();

    let starts = fetch_starts(&server);
    assert_eq!(starts.len(), commits.len(), "one fetch per identifier");
    let at_once = max_overlap(&server.requests());
    assert!(at_once <= cap, "{at_once} requests at once on one host");
    assert_eq!(at_once, cap, "the backlog did use the cap");
    // GETs and POSTs alike: one cell each.
    let requests = all_requests(&server);
    assert_eq!(requests.len(), 2 * commits.len(), "a GET and a POST each");
    assert_within_quota(&requests, burst, per_minute);
}

/// A fetch that probes for ids the server does not advertise makes several requests, each
/// with its own cell: a request waits for the quota, it never runs ahead of it. (Before, a fetch
/// was one cell however many requests it made: here about a dozen on loopback within a few
/// milliseconds, against a quota of 2 + 4 a second.)
#[test]
fn a_fetch_that_probes_takes_a_cell_for_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let served = testkit::served_repo(&base, "r.git");
    // A chain: the first three are reachable but not advertised (the tip is).
    let chain: Vec<ObjectId> = (0..4)
        .map(|i| testkit::commit(&served, "main", &[("f", format!("{i}").as_bytes())], "c"))
        .collect();
    let server = HttpGitServer::start(HOST, &base).unwrap();
    let (per_minute, burst) = (240u32, 2u32);
    let engine = builder("pol-prb")
        .domain_limits(4, per_minute)
        .domain_burst(burst)
        .build()
        .unwrap();
    let repo = testkit::init_bare(&dir.path().join("t.git"));
    // The tip is advertised: the first round fetches it. Two ids the server lacks: the second
    // round's probe for the rest is refused as a whole and split.
    let absent = [ObjectId::from_bytes([7; 20]), ObjectId::from_bytes([8; 20])];
    let mut ev = PendingEvent::new("e", "e", &repo);
    for oid in [chain[3], chain[0], chain[1], absent[0], absent[1]] {
        ev = ev.oid(oid.to_string());
    }
    ev.clone_urls = vec![server.url("r.git")];
    engine.submit(ev).unwrap();
    let start = Instant::now();
    while !(testkit::has_object(&repo, chain[0]) && testkit::has_object(&repo, chain[1]))
        && start.elapsed() < WAIT
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        testkit::has_object(&repo, chain[1]),
        "the probe fetched the reachable ids"
    );
    // The absent ones end the attempt; the engine waits its backoff (600 s) after that.
    testkit::wait_for_stats(&engine, WAIT, |s| s.fetches_partial + s.fetches_failed >= 2);
    let requests = all_requests(&server);
    // The engine counts what the server saw.
    assert_eq!(engine.stats().requests, requests.len() as u64);
    engine.shutdown().unwrap();
    assert!(
        requests.len() >= 6,
        "the probe made several requests: {}",
        requests.len()
    );
    assert_within_quota(&requests, burst, per_minute);
}

#[test]
fn identifiers_on_one_host_with_a_cap_of_one_are_served_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    std::fs::create_dir_all(&base).unwrap();
    for name in ["A1", "A2", "B1", "B2", "C1", "C2"] {
        testkit::served_repo(&base, &format!("{name}.git"));
    }
    let server = HttpGitServer::start(HOST, &base).unwrap();
    // All three are ready at the same pass, in submission order.
    let engine = builder("pol-rr")
        .sync_delay(Duration::from_millis(300))
        .domain_limits(1, 600_000)
        .domain_burst(1000)
        .build()
        .unwrap();
    // Nobody has these objects: every fetch fails, and each identifier tries its 2 URLs.
    let events: Vec<PendingEvent> = ["A", "B", "C"]
        .iter()
        .map(|id| {
            let repo = testkit::init_bare(&dir.path().join(format!("{id}.git")));
            let missing = ObjectId::from_bytes([id.as_bytes()[0]; 20]);
            let urls = [
                server.url(&format!("{id}1.git")),
                server.url(&format!("{id}2.git")),
            ];
            event(id, &repo, missing, &urls)
        })
        .collect();
    // Submitted back to back, so that all three wait before the first fetch can end.
    for ev in events {
        engine.submit(ev).unwrap();
    }
    let start = Instant::now();
    while engine.stats().fetches_failed < 6 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.shutdown().unwrap();
    let order: Vec<String> = fetch_starts(&server)
        .iter()
        .map(|r| {
            r.path
                .trim_start_matches('/')
                .split('.')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(order, ["A1", "B1", "C1", "A2", "B2", "C2"]);
    assert_eq!(max_overlap(&server.requests()), 1);
}

#[test]
fn a_backlog_on_one_host_uses_at_least_95_percent_of_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    std::fs::create_dir_all(&base).unwrap();
    testkit::served_repo(&base, "r.git");
    let server = HttpGitServer::start(HOST, &base).unwrap();
    // 600 a minute: one request every 100 ms. A burst of 2 lets a request that a loaded
    // machine delayed by less than one interval keep its place (with a burst of 1 each delay is
    // lost for good and a few milliseconds a request add up to a failing rate), and still
    // bounds the rate: 48 requests take at least 4.6 s, 10.22 a second at most. The tick is
    // 1 s, ten intervals, so only an engine that wakes when the quota refills, and a fetch
    // whose second request waits for its cell and no longer, reach 95 %.
    let engine = builder("pol-eff")
        .tick(Duration::from_secs(1))
        .domain_limits(5, 600)
        .domain_burst(2)
        .build()
        .unwrap();
    let n = 24u8;
    for i in 0..n {
        let repo = testkit::init_bare(&dir.path().join(format!("t{i}.git")));
        // Missing on the server: each fetch is short and fails.
        let missing = ObjectId::from_bytes([i + 1; 20]);
        engine
            .submit(event(
                &format!("e{i}"),
                &repo,
                missing,
                &[server.url("r.git")],
            ))
            .unwrap();
    }
    let start = Instant::now();
    while engine.stats().fetches_failed < u64::from(n) && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.shutdown().unwrap();
    assert_eq!(fetch_starts(&server).len(), usize::from(n));
    // The server advertises none of the wanted ids and allows wants by id: the visit's one
    // connection asks for it by id (the POST), and that is all it costs.
    let requests = all_requests(&server);
    assert_eq!(requests.len(), 2 * usize::from(n), "a GET and a POST each");
    let span = (requests[requests.len() - 1].started - requests[0].started).as_secs_f64();
    let achieved = (requests.len() - 1) as f64 / span;
    assert!(
        achieved >= 0.95 * 10.0,
        "{achieved:.2} requests a second against a quota of 10 ({span:.2} s for {} requests)",
        requests.len()
    );
    assert!(
        achieved <= 10.0 * 1.05 + 1e-9,
        "over the quota: {achieved:.2}/s"
    );
}

#[test]
fn a_tls_failure_puts_the_host_on_the_naughty_list_and_its_urls_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let commits = served(&base, 1);
    // A server that answers a TLS handshake with garbage: the handshake fails. It logs every
    // connection, handshake or not.
    let upstream = std::net::SocketAddrV4::new(OTHER, 9);
    let plain = FaultyTcpServer::start(HOST, upstream, TcpFault::Garbage).unwrap();
    let tls_url = format!("https://{}/r0.git", plain.addr());
    let good = HttpGitServer::start(OTHER, &base).unwrap();
    let engine = builder("pol-tls")
        .domain_limits(5, 600_000)
        .domain_burst(1000)
        .build()
        .unwrap();
    let t1 = testkit::init_bare(&dir.path().join("t1.git"));
    engine
        .submit(event(
            "first",
            &t1,
            commits[0],
            std::slice::from_ref(&tls_url),
        ))
        .unwrap();
    let start = Instant::now();
    while engine.stats().naughty.is_empty() && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = engine.stats();
    assert_eq!(s.naughty.len(), 1, "{:?}", s.recent_failures);
    let entry = &s.naughty[0];
    assert_eq!(entry.domain, HOST.to_string());
    assert_eq!(entry.category, purgatory_sync::NaughtyCategory::Tls);
    // The endpoint that failed, not the whole host.
    assert_eq!(entry.scheme.as_deref(), Some("https"));
    assert_eq!(entry.port, Some(plain.addr().port()));
    assert!(entry.until > entry.last_seen + Duration::from_secs(11 * 3600));
    assert!(plain.wait_idle(WAIT));
    let seen = plain.requests().len();
    assert!(seen >= 1, "the TLS attempt reached the server");

    // A second identifier lists the naughty host first: it is skipped, the other one serves.
    let t2 = testkit::init_bare(&dir.path().join("t2.git"));
    engine
        .submit(event(
            "second",
            &t2,
            commits[0],
            &[tls_url, good.url("r0.git")],
        ))
        .unwrap();
    match engine.outcomes().recv_timeout(WAIT) {
        Ok(Outcome::Released { event_id, .. }) => assert_eq!(event_id, "second"),
        other => panic!("{other:?}"),
    }
    assert!(plain.wait_idle(WAIT));
    assert_eq!(
        plain.requests().len(),
        seen,
        "the naughty host got no further connection"
    );
    assert!(good.wait_idle(WAIT));
    assert!(
        !good.requests().is_empty(),
        "the other host served the event"
    );
    engine.shutdown().unwrap();
}

/// `https://HOST:<port of a git daemon>/x` fails TLS (the port speaks git, not TLS): that
/// endpoint is skipped, not the host. Another identifier's `git://HOST:<port>` URL, which
/// works, is still fetched (it used to be skipped for 12 hours, and its event expired).
#[test]
fn a_tls_failure_on_one_port_leaves_the_hosts_other_urls_alone() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let commits = served(&base, 1);
    let daemon = testkit::GitDaemon::start(HOST, &base).unwrap();
    let wrong_scheme = format!("https://{}/r0.git", daemon.addr());
    let engine = builder("pol-tlsp")
        .domain_limits(5, 600_000)
        .domain_burst(1000)
        .build()
        .unwrap();
    let t1 = testkit::init_bare(&dir.path().join("t1.git"));
    engine
        .submit(event("stranger", &t1, commits[0], &[wrong_scheme]))
        .unwrap();
    let s = testkit::wait_for_stats(&engine, WAIT, |s| !s.naughty.is_empty());
    assert_eq!(
        s.naughty[0].scheme.as_deref(),
        Some("https"),
        "{:?}",
        s.naughty
    );
    assert_eq!(s.naughty[0].port, Some(daemon.addr().port()));

    let t2 = testkit::init_bare(&dir.path().join("t2.git"));
    engine
        .submit(event("honest", &t2, commits[0], &[daemon.url("r0.git")]))
        .unwrap();
    match engine.outcomes().recv_timeout(WAIT) {
        Ok(Outcome::Released { event_id, .. }) => assert_eq!(event_id, "honest"),
        other => panic!("{other:?}; {:?}", engine.stats().naughty),
    }
    engine.shutdown().unwrap();
}

/// A host written with a character IDNA maps away (`local<SOFT HYPHEN>host`) is checked by the
/// policy as `localhost`, and fetched as `localhost`: the connection resolves the name the
/// policy checked, never the name as written (which would reach the system's resolver, fail,
/// and put the real `localhost` on the naughty list).
#[test]
fn a_host_the_policy_maps_is_fetched_under_the_name_it_checked() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let commits = served(&base, 1);
    let http = HttpGitServer::start(Ipv4Addr::LOCALHOST, &base).unwrap();
    let url = format!("http://local\u{AD}host:{}/r0.git", http.addr().port());
    let engine = builder("pol-idna").build().unwrap();
    let t = testkit::init_bare(&dir.path().join("t.git"));
    engine.submit(event("e", &t, commits[0], &[url])).unwrap();
    match engine.outcomes().recv_timeout(WAIT) {
        Ok(Outcome::Released { event_id, .. }) => assert_eq!(event_id, "e"),
        other => panic!("{other:?}; {:?}", engine.stats().recent_failures),
    }
    let s = engine.stats();
    assert!(s.naughty.is_empty(), "{:?}", s.naughty);
    assert!(
        s.domains.contains_key("localhost"),
        "{:?}",
        s.domains.keys()
    );
    engine.shutdown().unwrap();
}

/// An identifier waits for the only slot of a busy host (held by a fetch the host never
/// answers); a pull request for it lists a mirror on a free host that has the commit. The pull
/// request is released within seconds, while the busy host is still busy (it used to wait for
/// the busy host's slot, here for the whole fetch deadline).
#[test]
fn an_identifier_waiting_for_a_busy_host_is_fetched_from_a_free_one() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let commits = served(&base, 2);
    let free = testkit::GitDaemon::start(OTHER, &base).unwrap();
    let upstream = std::net::SocketAddrV4::new(HOST, 9);
    let busy = FaultyTcpServer::start(HOST, upstream, TcpFault::Hang).unwrap();
    let engine = builder("pol-park")
        .domain_limits(5, 600_000)
        .domain_burst(1000)
        .domain_override(
            &HOST.to_string(),
            purgatory_sync::DomainLimits::new(1, 600_000).burst(1000),
        )
        .build()
        .unwrap();
    // `hog` takes the busy host's only slot; `state` waits for it.
    let hog = testkit::init_bare(&dir.path().join("hog.git"));
    engine
        .submit(event("hog", &hog, commits[0], &[busy.url("r0.git")]))
        .unwrap();
    testkit::wait_for_stats(&engine, WAIT, |s| s.in_flight == 1);
    let t = testkit::init_bare(&dir.path().join("t.git"));
    let mut state = PendingEvent::new("state", "alice/r", &t).oid(commits[0].to_string());
    state.clone_urls = vec![busy.url("r0.git")];
    engine.submit(state).unwrap();
    let s = testkit::wait_for_stats(&engine, WAIT, |s| {
        s.domains
            .get(&HOST.to_string())
            .is_some_and(|d| d.queued_identifiers == 1)
    });
    assert_eq!(s.in_flight, 1);
    // The pull request, on the free host.
    let start = Instant::now();
    let mut pr = PendingEvent::new("pr", "alice/r", &t).oid(commits[1].to_string());
    pr.clone_urls = vec![free.url("r1.git")];
    engine.submit(pr).unwrap();
    match engine.outcomes().recv_timeout(WAIT) {
        Ok(Outcome::Released { event_id, .. }) => assert_eq!(event_id, "pr"),
        other => panic!("{other:?}; {:?}", engine.stats()),
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(engine.stats().in_flight, 1, "the busy host is still busy");
    engine.shutdown().ok();
}

#[test]
fn a_refused_connection_does_not_make_a_host_naughty() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind((HOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let engine = builder("pol-ref")
        .domain_limits(5, 600_000)
        .domain_burst(1000)
        .build()
        .unwrap();
    for i in 0..2u8 {
        let t = testkit::init_bare(&dir.path().join(format!("t{i}.git")));
        engine
            .submit(event(
                &format!("e{i}"),
                &t,
                ObjectId::from_bytes([i; 20]),
                &[format!("http://{HOST}:{port}/r.git")],
            ))
            .unwrap();
    }
    let start = Instant::now();
    while engine.stats().fetches_failed < 2 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = engine.stats();
    assert_eq!(s.fetches_failed, 2, "both identifiers tried the host");
    assert!(s.naughty.is_empty());
    let d = &s.domains[&HOST.to_string()];
    assert_eq!(d.requests_started, 2);
    assert_eq!(
        d.failed
            .get(&purgatory_sync::FailureKind::ConnectionRefused),
        Some(&2)
    );
    engine.shutdown().unwrap();
}
