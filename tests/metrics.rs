//! The Prometheus exposition (`purgatory_sync::metrics`) of a real engine that fetched from a
//! real `git daemon` on a loopback address, read back with an independent parser
//! (`prometheus-parse`).
//!
//! Domains: 127.0.0.60 serves the repositories, nothing listens on port 1 of 127.0.0.61
//! (connection refused), and `unresolvable.example` fails name resolution (a wrapper around
//! the libgit2 fetcher answers for it, so that no DNS server is needed). Nothing here sleeps:
//! the test waits on the outcome channel with a generous timeout.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use purgatory_sync::{
    metrics, Admission, DomainStats, FailureKind, FetchControl, FetchError, FetchReport,
    FetchRequest, Fetcher, GitFetcher, ObjectId, Origin, Outcome, PendingEvent, ReleaseHistogram,
    Stats,
};
use purgatory_sync_testkit::{self as testkit, GitDaemon};

/// Far longer than any outcome here should take, even on a loaded 2-core machine.
const GENEROUS: Duration = Duration::from_secs(30);

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 60);
const NOBODY: &str = "127.0.0.61";
const UNRESOLVABLE: &str = "unresolvable.example";

/// The families, in the order `render` writes them, with their types.
const FAMILIES: [(&str, &str); 39] = [
    ("purgatory_sync_build_info", "gauge"),
    ("purgatory_sync_queued_identifiers", "gauge"),
    ("purgatory_sync_waiting_events", "gauge"),
    ("purgatory_sync_awaiting_refs", "gauge"),
    ("purgatory_sync_in_flight", "gauge"),
    ("purgatory_sync_workers", "gauge"),
    ("purgatory_sync_commands_pending", "gauge"),
    ("purgatory_sync_submitted_total", "counter"),
    ("purgatory_sync_already_satisfied_total", "counter"),
    ("purgatory_sync_refused_total", "counter"),
    ("purgatory_sync_released_total", "counter"),
    ("purgatory_sync_expired_total", "counter"),
    ("purgatory_sync_cancelled_total", "counter"),
    ("purgatory_sync_rechecks_total", "counter"),
    ("purgatory_sync_ref_updates_applied_total", "counter"),
    ("purgatory_sync_ref_update_failures_total", "counter"),
    ("purgatory_sync_fetches_started_total", "counter"),
    ("purgatory_sync_requests_total", "counter"),
    ("purgatory_sync_fetches_succeeded_total", "counter"),
    ("purgatory_sync_fetches_partial_total", "counter"),
    ("purgatory_sync_fetches_failed_total", "counter"),
    ("purgatory_sync_bytes_received_total", "counter"),
    ("purgatory_sync_memory_leaked_bytes", "gauge"),
    ("purgatory_sync_naughty_domains", "gauge"),
    ("purgatory_sync_expired_ids_remembered", "gauge"),
    ("purgatory_sync_requests_per_release", "gauge"),
    ("purgatory_sync_fetch_failures_total", "counter"),
    ("purgatory_sync_domain_fetches_started_total", "counter"),
    ("purgatory_sync_domain_requests_total", "counter"),
    ("purgatory_sync_domain_fetches_succeeded_total", "counter"),
    ("purgatory_sync_domain_fetches_partial_total", "counter"),
    ("purgatory_sync_domain_bytes_received_total", "counter"),
    ("purgatory_sync_domain_in_flight", "gauge"),
    ("purgatory_sync_domain_queued_identifiers", "gauge"),
    ("purgatory_sync_domain_rate_wait_seconds", "gauge"),
    ("purgatory_sync_domain_fetch_failures_total", "counter"),
    ("purgatory_sync_naughty_domain", "gauge"),
    ("purgatory_sync_time_to_release_seconds", "histogram"),
    ("purgatory_sync_fetch_duration_seconds", "histogram"),
];

/// The libgit2 fetcher, except that the host [`UNRESOLVABLE`] does not resolve.
struct UnresolvableHost(GitFetcher);

impl Fetcher for UnresolvableHost {
    fn fetch(&self, request: &FetchRequest, control: &FetchControl) -> FetchReport {
        if purgatory_sync::domain_of(&request.url).as_deref() == Some(UNRESOLVABLE) {
            let message = format!("failed to resolve address for {UNRESOLVABLE}");
            return FetchReport::failed(FetchError::new(FailureKind::Dns, message));
        }
        self.0.fetch(request, control)
    }

    fn present(&self, repo: &Path, oids: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
        self.0.present(repo, oids)
    }

    fn drop_temp_refs(&self, repo: &Path, oids: &[ObjectId]) -> Result<(), FetchError> {
        self.0.drop_temp_refs(repo, oids)
    }
}

fn event(id: &str, identifier: &str, repo: &Path, oid: ObjectId, urls: &[&str]) -> PendingEvent {
    urls.iter()
        .fold(PendingEvent::new(id, identifier, repo), |e, u| {
            e.clone_url(*u)
        })
        .oid(oid.to_string())
        .origin(Origin::Sync)
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the exposition parses")
}

/// The samples of `metric` with exactly these label values.
fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| {
            s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
        })
        .collect()
}

/// The value of the one counter, gauge or untyped sample `metric{labels}`.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(scrape, metric, labels).as_slice() {
        [s] => match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric}: not a scalar: {other:?}"),
        },
        other => panic!("{metric}{labels:?}: expected one sample, got {other:?}"),
    }
}

/// Checks the layout: every family has one `# HELP` line followed by one `# TYPE` line, no
/// family name repeats, and every sample belongs to the family declared last (a histogram's
/// samples are its `_bucket`, `_sum` and `_count`). Returns the families in order, with types.
fn families(text: &str) -> Vec<(String, String)> {
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut names = HashSet::new();
    let mut lines = text.lines().peekable();
    assert!(text.ends_with('\n'), "the exposition ends with a line feed");
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a name and a text");
            assert!(!help.trim().is_empty(), "{name} has help text");
            assert!(names.insert(name.to_owned()), "family {name} repeats");
            let next = lines.next().unwrap_or_default();
            let kind = next
                .strip_prefix(&format!("# TYPE {name} "))
                .unwrap_or_else(|| panic!("HELP of {name} is followed by {next:?}"));
            seen.push((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "a stray comment: {line}");
        let (family, kind) = seen.last().expect("a sample before any family");
        let sample = line.split(['{', ' ']).next().expect("a sample has a name");
        let ok = match kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| sample == format!("{family}{s}")),
            _ => sample == family,
        };
        assert!(ok, "sample {sample} is not of family {family} ({kind})");
    }
    seen
}

#[test]
fn a_real_engine_renders_releases_failures_and_naughty_domains() {
    let _ = env_logger::builder().is_test(true).try_init();
    testkit::require_git();
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().join("mirror");
    // Two repositories with unrelated commits: fetching one cannot bring the other's.
    let one = testkit::served_repo(&base, "alice/one.git");
    let c1 = testkit::commit(&one, "main", &[("one", b"1\n")], "one");
    let two = testkit::served_repo(&base, "alice/two.git");
    let c2 = testkit::commit(&two, "main", &[("two", b"2\n")], "two");
    let mirror = GitDaemon::start(SERVER, &base).expect("git daemon on 127.0.0.60");
    let target = testkit::init_bare(&dir.path().join("relay/r.git"));
    let refused_url = format!("git://{NOBODY}:1/alice/one.git");
    let unresolvable_url = format!("git://{UNRESOLVABLE}/alice/one.git");

    let engine = testkit::loopback_engine()
        .thread_name("metrics")
        .workers(2)
        .tick(Duration::from_millis(50))
        .sync_delay(Duration::ZERO)
        .fetch_deadline(Duration::from_secs(30))
        .fetcher(UnresolvableHost(GitFetcher::new()))
        .build()
        .expect("engine");
    let outcomes = engine.outcomes();

    // A user event cancelled before its first attempt (180 s away): never fetched.
    let cancelled =
        event("cancelled", "alice/cancelled", &target, c2, &[&refused_url]).origin(Origin::User);
    assert_eq!(engine.submit(cancelled).unwrap(), Admission::pending());
    engine.cancel("cancelled");
    // Refused on the caller's thread: counted at once.
    let bad = PendingEvent::new("bad", "alice/one", &target).oid("not an object id");
    assert!(engine.submit(bad).is_err());
    // Connection refused, then a DNS failure, then the mirror that has it.
    let urls = [
        refused_url.as_str(),
        unresolvable_url.as_str(),
        &mirror.url("alice/one.git"),
    ];
    let mixed = event("mixed", "alice/one", &target, c1, &urls);
    assert_eq!(engine.submit(mixed).unwrap(), Admission::pending());
    let direct = event(
        "direct",
        "alice/two",
        &target,
        c2,
        &[&mirror.url("alice/two.git")],
    );
    assert_eq!(engine.submit(direct).unwrap(), Admission::pending());

    let mut waits = Vec::new();
    for _ in 0..2 {
        match outcomes.recv_timeout(GENEROUS) {
            Ok(Outcome::Released { waited, .. }) => waits.push(waited),
            other => panic!("expected a release, got {other:?}; {:?}", engine.stats()),
        }
    }
    // Now in the relay's repository.
    let again = event("again", "alice/one", &target, c1, &[&refused_url]);
    assert_eq!(engine.submit(again).unwrap(), Admission::AlreadySatisfied);

    let stats = engine.stats();
    let text = metrics::render(&stats);
    assert_eq!(text, metrics::render(&stats), "rendering is deterministic");
    let layout = families(&text);
    let expected: Vec<(String, String)> = FAMILIES
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(layout, expected, "{text}");

    let m = parse(&text);
    for (name, _) in FAMILIES {
        assert!(m.docs.contains_key(name), "{name} has HELP");
    }
    let v = |metric: &str| value(&m, &format!("purgatory_sync_{metric}"), &[]);
    assert_eq!(v("submitted_total"), 3.0, "{text}");
    assert_eq!(v("released_total"), 2.0);
    assert_eq!(v("cancelled_total"), 1.0);
    assert_eq!(v("already_satisfied_total"), 1.0);
    assert_eq!(v("refused_total"), 1.0);
    assert_eq!(v("expired_total"), 0.0);
    assert_eq!(v("fetches_started_total"), 4.0);
    assert_eq!(v("fetches_succeeded_total"), 2.0);
    assert_eq!(v("fetches_partial_total"), 0.0);
    assert_eq!(v("fetches_failed_total"), 2.0);
    assert_eq!(v("waiting_events"), 0.0);
    assert_eq!(v("queued_identifiers"), 0.0);
    assert_eq!(v("in_flight"), 0.0);
    assert_eq!(v("workers"), 2.0);
    assert_eq!(v("naughty_domains"), 1.0);
    assert_eq!(v("expired_ids_remembered"), 0.0);

    let failures = "purgatory_sync_fetch_failures_total";
    assert_eq!(
        value(&m, failures, &[("reason", "connection_refused")]),
        1.0
    );
    assert_eq!(value(&m, failures, &[("reason", "dns")]), 1.0);
    assert_eq!(find(&m, failures, &[]).len(), 0);

    // Per domain: attempts, successes, failures with their reason.
    let server = SERVER.to_string();
    let started = "purgatory_sync_domain_fetches_started_total";
    let succeeded = "purgatory_sync_domain_fetches_succeeded_total";
    let failed = "purgatory_sync_domain_fetch_failures_total";
    let per_domain = |metric: &str| -> BTreeMap<String, f64> {
        m.samples
            .iter()
            .filter(|s| s.metric == metric)
            .map(|s| {
                let domain = s.labels.get("domain").expect("a domain label").to_owned();
                match s.value {
                    Value::Counter(x) | Value::Gauge(x) => (domain, x),
                    ref other => panic!("{metric}: {other:?}"),
                }
            })
            .collect()
    };
    let expect = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
        pairs.iter().map(|(d, x)| (d.to_string(), *x)).collect()
    };
    let all = |x: f64| expect(&[(&server, x), (NOBODY, x), (UNRESOLVABLE, x)]);
    assert_eq!(
        per_domain(started),
        expect(&[(&server, 2.0), (NOBODY, 1.0), (UNRESOLVABLE, 1.0)])
    );
    assert_eq!(
        per_domain(succeeded),
        expect(&[(&server, 2.0), (NOBODY, 0.0), (UNRESOLVABLE, 0.0)])
    );
    assert_eq!(
        per_domain("purgatory_sync_domain_fetches_partial_total"),
        all(0.0)
    );
    assert_eq!(per_domain("purgatory_sync_domain_in_flight"), all(0.0));
    assert_eq!(
        per_domain("purgatory_sync_domain_queued_identifiers"),
        all(0.0)
    );
    let refused = [("domain", NOBODY), ("reason", "connection_refused")];
    assert_eq!(value(&m, failed, &refused), 1.0);
    let dns = [("domain", UNRESOLVABLE), ("reason", "dns")];
    assert_eq!(value(&m, failed, &dns), 1.0);
    assert_eq!(
        m.samples.iter().filter(|s| s.metric == failed).count(),
        2,
        "the mirror never failed"
    );
    // A name that does not resolve is skipped as a whole: no endpoint.
    let naughty = [
        ("domain", UNRESOLVABLE),
        ("endpoint", ""),
        ("category", "dns"),
    ];
    assert_eq!(value(&m, "purgatory_sync_naughty_domain", &naughty), 1.0);

    // The histogram holds exactly the waits the outcomes reported.
    let hist = "purgatory_sync_time_to_release_seconds";
    assert_eq!(value(&m, &format!("{hist}_count"), &[]), 2.0);
    let sum: Duration = waits.iter().sum();
    assert_eq!(value(&m, &format!("{hist}_sum"), &[]), sum.as_secs_f64());
    let buckets = match find(&m, hist, &[]).as_slice() {
        [s] => match &s.value {
            Value::Histogram(b) => b.clone(),
            other => panic!("{hist}: {other:?}"),
        },
        other => panic!("{hist}: {other:?}"),
    };
    let bounds: Vec<f64> = ReleaseHistogram::BOUNDS
        .iter()
        .map(Duration::as_secs_f64)
        .chain([f64::INFINITY])
        .collect();
    let les: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    assert_eq!(les, bounds);
    for b in &buckets {
        let at_or_below = waits
            .iter()
            .filter(|w| w.as_secs_f64() <= b.less_than)
            .count();
        assert_eq!(b.count, at_or_below as f64, "le={}", b.less_than);
    }
    assert_eq!(buckets.last().map(|b| b.count), Some(2.0));

    engine.shutdown().expect("clean shutdown");
}

#[test]
fn a_fresh_engine_renders_every_family_with_zero_values() {
    let engine = testkit::loopback_engine()
        .thread_name("metrics0")
        .build()
        .expect("engine");
    let text = metrics::render(&engine.stats());
    engine.shutdown().expect("clean shutdown");
    let layout = families(&text);
    assert_eq!(layout.len(), FAMILIES.len());
    let m = parse(&text);
    assert_eq!(
        value(&m, "purgatory_sync_time_to_release_seconds_count", &[]),
        0.0
    );
    for s in &m.samples {
        let zero = match &s.value {
            Value::Counter(x) | Value::Untyped(x) => *x == 0.0,
            Value::Gauge(x) => {
                *x == 0.0
                    || s.metric == "purgatory_sync_workers"
                    || s.metric == "purgatory_sync_build_info" && *x == 1.0
            }
            Value::Histogram(b) => b.iter().all(|b| b.count == 0.0),
            Value::Summary(_) => false,
        };
        assert!(zero, "{s:?}");
    }
}

#[test]
fn label_values_are_escaped_in_the_exposition() {
    // The engine's domains are URL host names and cannot hold these characters; a host may
    // still render stats of its own making.
    let mut stats = purgatory_sync::Stats::default();
    let weird = "a\"b\\c\nd";
    stats
        .domains
        .insert(weird.to_owned(), purgatory_sync::DomainStats::default());
    let text = metrics::render(&stats);
    assert!(
        text.contains(r#"purgatory_sync_domain_in_flight{domain="a\"b\\c\nd"} 0"#),
        "{text}"
    );
    // The line feed did not split a sample in two, and the layout holds.
    for line in text.lines() {
        assert!(
            line.starts_with("# ") || line.starts_with("purgatory_sync_"),
            "{line}"
        );
    }
    assert_eq!(families(&text).len(), FAMILIES.len());
}

/// Domains come from strangers' clone URLs: twenty domains that have nothing left in flight,
/// queued or naughty leave the scrape after `domain_retention`, while the engine-wide
/// counters keep what they did.
#[test]
fn idle_domains_leave_the_scrape_and_totals_stay() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let target = testkit::init_bare(&dir.path().join("relay/r.git"));
    let engine = testkit::loopback_engine()
        .thread_name("metricsr")
        .tick(Duration::from_millis(20))
        .sync_delay(Duration::ZERO)
        .event_lifetime(Duration::from_millis(500))
        .domain_retention(Duration::from_secs(1))
        .build()
        .expect("engine");
    // Twenty domains (loopback addresses), each refusing its connection: every event expires.
    for i in 0..20u8 {
        let url = format!("git://127.0.0.{}:1/x.git", 70 + i);
        let oid = ObjectId::from_bytes([i + 1; 20]);
        let ev = event(&format!("e{i}"), &format!("id{i}"), &target, oid, &[&url]);
        engine.submit(ev).expect("submitted");
    }
    let gone = testkit::wait_for_stats(&engine, GENEROUS, |s| s.expired == 20);
    assert!(gone.domains.len() >= 20, "{:?}", gone.domains.keys());
    let before = parse(&metrics::render(&gone));
    let series = |m: &Scrape, metric: &str| m.samples.iter().filter(|s| s.metric == metric).count();
    assert_eq!(series(&before, "purgatory_sync_domain_requests_total"), 20);
    let retired = testkit::wait_for_stats(&engine, GENEROUS, |s| s.domains.is_empty());
    engine.shutdown().expect("clean shutdown");
    let text = metrics::render(&retired);
    let after = parse(&text);
    let domain_series = after
        .samples
        .iter()
        .filter(|s| s.labels.get("domain").is_some())
        .count();
    assert_eq!(domain_series, 0, "{text}");
    assert_eq!(value(&after, "purgatory_sync_requests_total", &[]), 20.0);
    assert_eq!(
        value(&after, "purgatory_sync_fetches_failed_total", &[]),
        20.0
    );
    assert_eq!(
        value(&after, "purgatory_sync_fetch_duration_seconds_count", &[]),
        20.0
    );
}

/// At most the limit's domains are exported one by one, the busiest; the rest are summed
/// under `domain="other"`, and at most as many naughty entries are listed.
#[test]
fn domains_beyond_the_limit_are_summed_under_other() {
    let mut stats = Stats::default();
    for (name, requests, in_flight, wait) in [
        ("a.example", 50u64, 1usize, 0u64),
        ("b.example", 40, 0, 0),
        ("c.example", 3, 2, 7),
        ("d.example", 2, 1, 9),
    ] {
        let mut d = DomainStats::default();
        d.requests = requests;
        d.requests_started = requests;
        d.in_flight = in_flight;
        d.bytes_received = requests * 1000;
        d.next_cell_in = Duration::from_secs(wait);
        d.failed.insert(FailureKind::Timeout, 1);
        stats.domains.insert(name.to_owned(), d);
    }
    let text = metrics::render_with_limit(&stats, 2);
    let m = parse(&text);
    let exported: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.metric == "purgatory_sync_domain_requests_total")
        .filter_map(|s| s.labels.get("domain"))
        .collect();
    assert_eq!(
        exported,
        ["a.example", "b.example", "other"].into_iter().collect()
    );
    let other = [("domain", "other")];
    assert_eq!(
        value(&m, "purgatory_sync_domain_requests_total", &other),
        5.0
    );
    assert_eq!(value(&m, "purgatory_sync_domain_in_flight", &other), 3.0);
    assert_eq!(
        value(&m, "purgatory_sync_domain_bytes_received_total", &other),
        5000.0
    );
    assert_eq!(
        value(&m, "purgatory_sync_domain_rate_wait_seconds", &other),
        9.0
    );
    assert_eq!(
        value(
            &m,
            "purgatory_sync_domain_fetch_failures_total",
            &[("domain", "other"), ("reason", "timeout")]
        ),
        2.0
    );
    // Under the limit, nothing is summed.
    assert!(!metrics::render(&stats).contains("domain=\"other\""));
    assert_eq!(metrics::MAX_DOMAINS, 100);
}

/// `purgatory_sync_build_info` names the engine's version and the libgit2 it runs on.
#[test]
fn build_info_names_the_version_and_libgit2() {
    let m = parse(&metrics::render(&Stats::default()));
    let info: Vec<&Sample> = m
        .samples
        .iter()
        .filter(|s| s.metric == "purgatory_sync_build_info")
        .collect();
    assert_eq!(info.len(), 1);
    assert_eq!(
        info[0].labels.get("version"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let (major, minor, _) = git2::Version::get().libgit2_version();
    assert!(info[0]
        .labels
        .get("libgit2")
        .is_some_and(|v| v.starts_with(&format!("{major}.{minor}."))));
}

/// Prometheus's own checker accepts a scrape of a real engine (`promtool check metrics`;
/// `.ci/run` installs it from Debian's `prometheus` package).
#[test]
fn promtool_accepts_a_scrape() {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED promtool_accepts_a_scrape: promtool is not installed");
        return;
    };
    let engine = testkit::loopback_engine()
        .thread_name("metricsp")
        .build()
        .expect("engine");
    let mut stats = engine.stats();
    engine.shutdown().expect("clean shutdown");
    let mut d = DomainStats::default();
    d.requests = 3;
    stats.domains.insert("git.example.com".to_owned(), d);
    let text = metrics::render(&stats);
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write the scrape");
    }
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
