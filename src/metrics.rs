//! Prometheus text exposition of [`Stats`].
//!
//! [`render`] turns a [`Stats`] snapshot into the Prometheus [text exposition format 0.0.4]
//! (`# HELP` and `# TYPE` lines, then the samples of each family), ready to be served on a
//! host's `/metrics` endpoint with the [`CONTENT_TYPE`] header. Every metric is named
//! `purgatory_sync_…`; counters end in `_total`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `purgatory_sync_build_info` | gauge (always 1) | `version`, `libgit2` |
//! | `purgatory_sync_queued_identifiers` | gauge | |
//! | `purgatory_sync_waiting_events` | gauge | |
//! | `purgatory_sync_awaiting_refs` | gauge | |
//! | `purgatory_sync_in_flight` | gauge | |
//! | `purgatory_sync_workers` | gauge | |
//! | `purgatory_sync_commands_pending` | gauge | |
//! | `purgatory_sync_submitted_total` | counter | |
//! | `purgatory_sync_already_satisfied_total` | counter | |
//! | `purgatory_sync_refused_total` | counter | |
//! | `purgatory_sync_released_total` | counter | |
//! | `purgatory_sync_expired_total` | counter | |
//! | `purgatory_sync_cancelled_total` | counter | |
//! | `purgatory_sync_rechecks_total` | counter | |
//! | `purgatory_sync_ref_updates_applied_total` | counter | |
//! | `purgatory_sync_ref_update_failures_total` | counter | |
//! | `purgatory_sync_fetches_started_total` | counter | |
//! | `purgatory_sync_requests_total` | counter | |
//! | `purgatory_sync_fetches_succeeded_total` | counter | |
//! | `purgatory_sync_fetches_partial_total` | counter | |
//! | `purgatory_sync_fetches_failed_total` | counter | |
//! | `purgatory_sync_bytes_received_total` | counter | |
//! | `purgatory_sync_memory_leaked_bytes` | gauge | |
//! | `purgatory_sync_naughty_domains` | gauge | |
//! | `purgatory_sync_expired_ids_remembered` | gauge | |
//! | `purgatory_sync_requests_per_release` | gauge (no sample before the first release) | |
//! | `purgatory_sync_fetch_failures_total` | counter | `reason` |
//! | `purgatory_sync_domain_fetches_started_total` | counter | `domain` |
//! | `purgatory_sync_domain_requests_total` | counter | `domain` |
//! | `purgatory_sync_domain_fetches_succeeded_total` | counter | `domain` |
//! | `purgatory_sync_domain_fetches_partial_total` | counter | `domain` |
//! | `purgatory_sync_domain_bytes_received_total` | counter | `domain` |
//! | `purgatory_sync_domain_in_flight` | gauge | `domain` |
//! | `purgatory_sync_domain_queued_identifiers` | gauge | `domain` |
//! | `purgatory_sync_domain_rate_wait_seconds` | gauge | `domain` |
//! | `purgatory_sync_domain_fetch_failures_total` | counter | `domain`, `reason` |
//! | `purgatory_sync_naughty_domain` | gauge (always 1) | `domain`, `endpoint`, `category` |
//! | `purgatory_sync_time_to_release_seconds` | histogram | `le` |
//! | `purgatory_sync_fetch_duration_seconds` | histogram | `le` |
//!
//! `reason` is [`FailureKind::as_str`] (`connection_refused`, `not_found`, `dns`, …) and
//! `category` is `dns`, `tls` or `hostile`. Labelled families list only the label values seen
//! so far (a domain appears once the engine has fetched from it, and goes once it has been idle
//! for [`domain_retention`](crate::EngineBuilder::domain_retention)); their `# HELP` and
//! `# TYPE` lines are always there. At most [`MAX_DOMAINS`] domains are exported one by one,
//! the rest summed under `domain="other"` ([`render_with_limit`] sets another limit). The
//! histograms' buckets are [`ReleaseHistogram::BOUNDS`], in seconds.
//!
//! ```
//! use purgatory_sync::{metrics, Engine, Stats};
//!
//! let engine = Engine::builder().build()?;
//! // On each scrape: the body, served with `Content-Type: text/plain; version=0.0.4; ...`.
//! let body = metrics::render(&engine.stats());
//! assert!(body.contains("# TYPE purgatory_sync_released_total counter\n"));
//! assert!(body.contains("purgatory_sync_released_total 0\n"));
//! assert!(body.contains("purgatory_sync_time_to_release_seconds_bucket{le=\"+Inf\"} 0\n"));
//! assert_eq!(metrics::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
//! engine.shutdown()?;
//!
//! // Any `Stats` renders, a default one too (all zeros, no labelled samples).
//! assert!(metrics::render(&Stats::default()).contains("purgatory_sync_workers 0\n"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [text exposition format 0.0.4]: https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
//! [`FailureKind::as_str`]: crate::FailureKind::as_str
//! [`ReleaseHistogram::BOUNDS`]: crate::ReleaseHistogram::BOUNDS

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::{DomainStats, Stats};

/// The `Content-Type` of [`render`]'s output: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric's name starts with this.
const PREFIX: &str = "purgatory_sync_";

/// Renders `stats` in the Prometheus text exposition format 0.0.4 (see the
/// [module documentation](self) for the metrics). The output ends with a newline; families
/// come in a fixed order and labelled samples in label order, so two renders of the same
/// stats are identical.
pub fn render(stats: &Stats) -> String {
    render_with_limit(stats, MAX_DOMAINS)
}

/// The most domains [`render`] exports one by one.
pub const MAX_DOMAINS: usize = 100;

/// The label value under which [`render_with_limit`] sums the domains beyond its limit.
pub const OTHER_DOMAIN: &str = "other";

/// Like [`render`], exporting at most `max_domains` domains one by one: the ones with the most
/// requests (then by name); the others are summed under `domain="other"` (gauges too, but
/// for `domain_rate_wait_seconds`, their longest wait), and at most `max_domains` naughty
/// entries are listed (the most recently seen; `naughty_domains` counts them all). Domain
/// labels come from clone URLs in strangers' events, so this bounds the number of series a
/// scrape can carry. A domain that moves between its own series and `other` makes `other`'s
/// counters go down, which Prometheus reads as a counter reset.
pub fn render_with_limit(stats: &Stats, max_domains: usize) -> String {
    use Type::{Counter, Gauge};
    let s = stats;
    let mut w = Writer::default();

    let name = "build_info";
    w.family(
        name,
        Gauge,
        "The engine's version and the libgit2 it runs on (value always 1).",
    );
    let (major, minor, rev) = git2::Version::get().libgit2_version();
    w.sample(
        name,
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("libgit2", &format!("{major}.{minor}.{rev}")),
        ],
        1u64,
    );

    let scalars: [(&str, Type, &str, Num); 24] = [
        (
            "queued_identifiers",
            Gauge,
            "Queue entries: distinct (identifier, repository) pairs with waiting events.",
            s.queued_identifiers.into(),
        ),
        (
            "waiting_events",
            Gauge,
            "Events waiting in purgatory, including those awaiting their refs.",
            s.waiting_events.into(),
        ),
        (
            "awaiting_refs",
            Gauge,
            "Waiting events whose objects are all present and whose ref updates are not written yet.",
            s.awaiting_refs.into(),
        ),
        (
            "in_flight",
            Gauge,
            "Fetches running on workers now.",
            s.in_flight.into(),
        ),
        (
            "workers",
            Gauge,
            "Worker threads, the most fetches that can run at once.",
            s.workers.into(),
        ),
        (
            "commands_pending",
            Gauge,
            "Commands sent by the host that the scheduler has not applied yet.",
            s.commands_pending.into(),
        ),
        (
            "submitted_total",
            Counter,
            "Events accepted to wait in purgatory.",
            s.submitted.into(),
        ),
        (
            "already_satisfied_total",
            Counter,
            "Submitted events whose objects were all present already.",
            s.already_satisfied.into(),
        ),
        (
            "refused_total",
            Counter,
            "Submitted events refused as invalid or unacceptable.",
            s.refused.into(),
        ),
        (
            "released_total",
            Counter,
            "Events released: every object arrived.",
            s.released.into(),
        ),
        (
            "expired_total",
            Counter,
            "Events that left purgatory without all their objects.",
            s.expired.into(),
        ),
        (
            "cancelled_total",
            Counter,
            "Waiting events cancelled by the host.",
            s.cancelled.into(),
        ),
        (
            "rechecks_total",
            Counter,
            "Repository re-checks done because the host received git data.",
            s.rechecks.into(),
        ),
        (
            "ref_updates_applied_total",
            Counter,
            "Events whose ref updates were written.",
            s.ref_updates_applied.into(),
        ),
        (
            "ref_update_failures_total",
            Counter,
            "Attempts to write an event's ref updates that failed.",
            s.ref_update_failures.into(),
        ),
        (
            "fetches_started_total",
            Counter,
            "Fetches started.",
            s.fetches_started.into(),
        ),
        (
            "requests_total",
            Counter,
            "Requests made to remote hosts: each connection, over HTTP each GET and POST.",
            s.requests.into(),
        ),
        (
            "fetches_succeeded_total",
            Counter,
            "Fetches that ended without an error.",
            s.fetches_succeeded.into(),
        ),
        (
            "fetches_partial_total",
            Counter,
            "Fetches that ended with an error but brought some of the wanted objects.",
            s.fetches_partial.into(),
        ),
        (
            "fetches_failed_total",
            Counter,
            "Fetches that ended with an error and brought none of the wanted objects.",
            s.fetches_failed.into(),
        ),
        (
            "bytes_received_total",
            Counter,
            "Bytes received from remote hosts by fetches that ended.",
            s.bytes_received.into(),
        ),
        (
            "memory_leaked_bytes",
            Gauge,
            "Memory libgit2 lost for good on what hostile servers sent; a restart gives it back.",
            s.memory_leaked.into(),
        ),
        (
            "naughty_domains",
            Gauge,
            "Host names and endpoints skipped for a while after DNS or TLS failures or a hostile answer.",
            s.naughty.len().into(),
        ),
        (
            "expired_ids_remembered",
            Gauge,
            "Expired event ids currently remembered (synced re-submissions still missing data are refused).",
            s.expired_ids_remembered.into(),
        ),
    ];
    for (name, kind, help, value) in scalars {
        w.family(name, kind, help);
        w.sample(name, &[], value);
    }

    let name = "requests_per_release";
    w.family(
        name,
        Gauge,
        "Requests made for each event released since the engine started.",
    );
    if let Some(r) = s.requests_per_release() {
        w.sample(name, &[], Num::Ratio(r));
    }

    let name = "fetch_failures_total";
    w.family(
        name,
        Counter,
        "Failed fetches (not partial ones) by kind of failure.",
    );
    for (kind, n) in &s.failures {
        w.sample(name, &[("reason", kind.as_str())], *n);
    }

    let domains = capped_domains(&s.domains, max_domains);
    let per_domain: [DomainFamily; 8] = [
        (
            "domain_fetches_started_total",
            Counter,
            "Fetches started, by remote domain.",
            |d| d.requests_started.into(),
        ),
        (
            "domain_requests_total",
            Counter,
            "Requests made, by remote domain: each connection, over HTTP each GET and POST.",
            |d| d.requests.into(),
        ),
        (
            "domain_fetches_succeeded_total",
            Counter,
            "Fetches that ended without an error, by remote domain.",
            |d| d.succeeded.into(),
        ),
        (
            "domain_fetches_partial_total",
            Counter,
            "Fetches that ended with an error but brought some of the wanted objects, by remote domain.",
            |d| d.partial.into(),
        ),
        (
            "domain_bytes_received_total",
            Counter,
            "Bytes received by fetches that ended, by remote domain.",
            |d| d.bytes_received.into(),
        ),
        (
            "domain_in_flight",
            Gauge,
            "Fetches running now, by remote domain.",
            |d| d.in_flight.into(),
        ),
        (
            "domain_queued_identifiers",
            Gauge,
            "Identifiers waiting for a remote domain's capacity.",
            |d| d.queued_identifiers.into(),
        ),
        (
            "domain_rate_wait_seconds",
            Gauge,
            "Seconds until a remote domain's rate quota allows the next fetch; 0 when it allows one now.",
            |d| d.next_cell_in.into(),
        ),
    ];
    for (name, kind, help, value) in per_domain {
        w.family(name, kind, help);
        for (domain, d) in &domains {
            w.sample(name, &[("domain", domain)], value(d));
        }
    }
    let name = "domain_fetch_failures_total";
    w.family(
        name,
        Counter,
        "Failed fetches (not partial ones) by remote domain and kind of failure.",
    );
    for (domain, d) in &domains {
        for (kind, n) in &d.failed {
            w.sample(name, &[("domain", domain), ("reason", kind.as_str())], *n);
        }
    }

    let name = "naughty_domain";
    w.family(
        name,
        Gauge,
        "Host names (endpoint \"\") and endpoints (scheme:port) skipped for a while (value always 1).",
    );
    let mut naughty: Vec<&crate::NaughtyEntry> = s.naughty.iter().collect();
    if naughty.len() > max_domains {
        naughty.sort_by_key(|n| std::cmp::Reverse(n.last_seen));
        naughty.truncate(max_domains);
        naughty.sort_by(|a, b| (&a.domain, &a.scheme, a.port).cmp(&(&b.domain, &b.scheme, b.port)));
    }
    for n in naughty {
        // A name is skipped as a whole, or one endpoint of it: each is its own series.
        let endpoint = match (&n.scheme, n.port) {
            (Some(scheme), Some(port)) => format!("{scheme}:{port}"),
            _ => String::new(),
        };
        w.sample(
            name,
            &[
                ("domain", &n.domain),
                ("endpoint", &endpoint),
                ("category", n.category.as_str()),
            ],
            1u64,
        );
    }

    w.histogram(
        "time_to_release_seconds",
        "How long released events waited in purgatory, from submission to release.",
        &s.release_times,
    );
    w.histogram(
        "fetch_duration_seconds",
        "How long each fetch ran, from its dispatch to its report.",
        &s.fetch_durations,
    );

    w.out
}

/// The domains to export one by one, at most `max`, and the rest summed under
/// [`OTHER_DOMAIN`], in label order. Only the sum is built; the others are borrowed.
fn capped_domains(
    all: &std::collections::BTreeMap<String, DomainStats>,
    max: usize,
) -> Vec<(&str, std::borrow::Cow<'_, DomainStats>)> {
    use std::borrow::Cow;
    if all.len() <= max {
        return all
            .iter()
            .map(|(k, v)| (k.as_str(), Cow::Borrowed(v)))
            .collect();
    }
    let mut by_activity: Vec<(&String, &DomainStats)> = all.iter().collect();
    by_activity.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
    let rest = by_activity.split_off(max);
    let mut other = DomainStats::default();
    for (_, d) in rest {
        other.in_flight += d.in_flight;
        other.queued_identifiers += d.queued_identifiers;
        other.requests_started += d.requests_started;
        other.requests += d.requests;
        other.succeeded += d.succeeded;
        other.partial += d.partial;
        other.bytes_received += d.bytes_received;
        other.next_cell_in = other.next_cell_in.max(d.next_cell_in);
        for (kind, n) in &d.failed {
            *other.failed.entry(*kind).or_default() += n;
        }
    }
    let mut out: Vec<(&str, Cow<'_, DomainStats>)> = by_activity
        .into_iter()
        .map(|(k, v)| (k.as_str(), Cow::Borrowed(v)))
        .collect();
    out.push((OTHER_DOMAIN, Cow::Owned(other)));
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

/// A family with one sample per domain: its name, type, help, and one domain's value.
type DomainFamily = (&'static str, Type, &'static str, fn(&DomainStats) -> Num);

/// A metric family's type, as written on its `# TYPE` line.
#[derive(Clone, Copy)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl Type {
    fn as_str(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        }
    }
}

/// A sample's value: a count, a duration written in seconds (the Prometheus base unit) or a
/// finite ratio, each as the shortest decimal that reads back as the same `f64` (`0.1`, `2.5`,
/// `1800`).
#[derive(Clone, Copy)]
enum Num {
    Count(u64),
    Seconds(Duration),
    Ratio(f64),
}

impl From<u64> for Num {
    fn from(n: u64) -> Self {
        Num::Count(n)
    }
}

impl From<usize> for Num {
    fn from(n: usize) -> Self {
        Num::Count(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

impl From<Duration> for Num {
    fn from(d: Duration) -> Self {
        Num::Seconds(d)
    }
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::Count(n) => write!(f, "{n}"),
            Num::Seconds(d) => write!(f, "{}", d.as_secs_f64()),
            Num::Ratio(r) => write!(f, "{r}"),
        }
    }
}

/// Builds the exposition text. Names are given without [`PREFIX`].
#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    /// A histogram family: its cumulative `_bucket` samples, `_sum` and `_count`.
    fn histogram(&mut self, name: &str, help: &str, h: &crate::ReleaseHistogram) {
        self.family(name, Type::Histogram, help);
        let bucket = format!("{name}_bucket");
        for (bound, n) in h.cumulative() {
            let le = bound.map_or_else(|| "+Inf".to_owned(), |b| Num::from(b).to_string());
            self.sample(&bucket, &[("le", &le)], n);
        }
        self.sample(&format!("{name}_sum"), &[], h.sum());
        self.sample(&format!("{name}_count"), &[], h.count());
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    fn family(&mut self, name: &str, kind: Type, help: &str) {
        let help = escape_help(help);
        let kind = kind.as_str();
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.out, "# TYPE {PREFIX}{name} {kind}");
    }

    /// One sample of the family last started.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Num>) {
        let value = value.into();
        let _ = write!(self.out, "{PREFIX}{name}");
        for (i, (label, v)) in labels.iter().enumerate() {
            let sep = if i == 0 { '{' } else { ',' };
            let _ = write!(self.out, "{sep}{label}=\"{}\"", escape_label_value(v));
        }
        if !labels.is_empty() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value escaped for the text format: backslash, double quote and line feed become
/// `\\`, `\"` and `\n`.
fn escape_label_value(value: &str) -> String {
    escape(value, true)
}

/// `# HELP` text escaped for the text format: backslash and line feed become `\\` and `\n`.
fn escape_help(text: &str) -> String {
    escape(text, false)
}

fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label_value("plain.example"), "plain.example");
        assert_eq!(escape_label_value(r"a\b"), r"a\\b");
        assert_eq!(escape_label_value(r#"say "hi""#), r#"say \"hi\""#);
        assert_eq!(escape_label_value("two\nlines"), r"two\nlines");
        assert_eq!(escape_label_value("\\\"\n"), r#"\\\"\n"#);
        // Other characters, UTF-8 and carriage returns included, pass as they are.
        assert_eq!(escape_label_value("ü\r\t}"), "ü\r\t}");
    }

    #[test]
    fn help_text_escapes_backslash_and_newline_but_not_quotes() {
        assert_eq!(escape_help("a \"b\" \\ c\nd"), "a \"b\" \\\\ c\\nd");
    }

    #[test]
    fn requests_are_counted_per_domain_and_per_release() {
        let mut stats = Stats {
            requests: 7,
            ..Stats::default()
        };
        stats.domains.insert(
            "m.example".into(),
            DomainStats {
                requests: 7,
                ..DomainStats::default()
            },
        );
        let text = render(&stats);
        assert!(text.contains("purgatory_sync_requests_total 7\n"), "{text}");
        assert!(text.contains("purgatory_sync_domain_requests_total{domain=\"m.example\"} 7\n"));
        // No release yet: the family is there, without a sample.
        assert!(text.contains("# TYPE purgatory_sync_requests_per_release gauge\n"));
        assert!(
            !text.contains("\npurgatory_sync_requests_per_release "),
            "{text}"
        );
        stats.released = 2;
        let text = render(&stats);
        assert!(
            text.contains("purgatory_sync_requests_per_release 3.5\n"),
            "{text}"
        );
    }

    #[test]
    fn partial_fetches_have_their_own_counters() {
        let mut stats = Stats {
            fetches_started: 6,
            fetches_succeeded: 1,
            fetches_partial: 3,
            fetches_failed: 2,
            ..Stats::default()
        };
        stats.domains.insert(
            "m.example".into(),
            DomainStats {
                requests_started: 6,
                succeeded: 1,
                partial: 3,
                failed: [(crate::FailureKind::NotFound, 2)].into_iter().collect(),
                ..DomainStats::default()
            },
        );
        let text = render(&stats);
        for line in [
            "purgatory_sync_fetches_partial_total 3\n",
            "purgatory_sync_fetches_failed_total 2\n",
            "purgatory_sync_domain_fetches_partial_total{domain=\"m.example\"} 3\n",
            "purgatory_sync_domain_fetch_failures_total{domain=\"m.example\",reason=\"not_found\"} 2\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn seconds_are_the_shortest_exact_decimal() {
        let s = |ms| Num::from(Duration::from_millis(ms)).to_string();
        assert_eq!(s(0), "0");
        assert_eq!(s(100), "0.1");
        assert_eq!(s(2_500), "2.5");
        assert_eq!(s(1_800_000), "1800");
        assert_eq!(s(3_661_201), "3661.201");
    }
}
