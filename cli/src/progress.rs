//! Live progress on stderr (an `indicatif` bar on a terminal, plain lines otherwise) and the
//! summary tables both commands print at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use purgatory_sync::{ExpiryReason, Outcome, Stats};

/// The progress display: a bar over the events, with released / waiting / expired counts and
/// the fetches in flight per domain as its message.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` events, drawn on stderr when it is a terminal and `enabled`.
    pub fn new(total: u64, enabled: bool) -> Progress {
        let target = if enabled {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        Progress { bar }
    }

    /// Changes the number of events the bar counts to.
    #[allow(dead_code)] // used by `run`
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// Redraws from the engine's statistics; `done` is how many events have an outcome.
    pub fn update(&self, stats: &Stats, done: u64, label: &dyn Fn(&str) -> String) {
        self.bar.set_message(status_line(stats, label));
        self.bar.set_position(done);
    }

    /// Prints a line above the bar (or to stderr when there is no bar).
    pub fn line(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    /// Runs `f` (which writes to stdout) with the bar cleared, then draws it again: a line
    /// written beside a live bar would leave its frame behind when stdout and stderr share a
    /// terminal.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `released 3 · waiting 5 · expired 0 · in flight: full mirror 2, small host 1`.
pub fn status_line(stats: &Stats, label: &dyn Fn(&str) -> String) -> String {
    let flights: Vec<String> = stats
        .domains
        .iter()
        .filter(|(_, d)| d.in_flight > 0 || d.queued_identifiers > 0)
        .map(|(domain, d)| {
            let mut s = format!("{} {}", label(domain), d.in_flight);
            if d.queued_identifiers > 0 {
                s.push_str(&format!(" (+{} queued)", d.queued_identifiers));
            }
            s
        })
        .collect();
    format!(
        "released {} · waiting {} · expired {} · in flight: {}",
        stats.released,
        stats.waiting_events,
        stats.expired,
        if flights.is_empty() {
            "none".to_owned()
        } else {
            flights.join(", ")
        }
    )
}

/// One line for an outcome: `released  3f1c9a…  alice/hello  after 1.2s`.
pub fn outcome_line(outcome: &Outcome, name: &str) -> String {
    match outcome {
        Outcome::Released {
            identifier, waited, ..
        } => format!(
            "released  {name:<28} {identifier:<24} after {}",
            seconds(*waited)
        ),
        Outcome::Expired {
            identifier,
            missing,
            reason,
            ..
        } => format!(
            "expired   {name:<28} {identifier:<24} {}; {} object(s) missing",
            reason_text(reason),
            missing.len()
        ),
        other => format!("{other:?}"),
    }
}

/// Why an event expired, in a few words.
pub fn reason_text(reason: &ExpiryReason) -> String {
    match reason {
        ExpiryReason::LifetimeEnded => "lifetime ended".to_owned(),
        ExpiryReason::RepositoryGone { message, .. } => format!("repository gone: {message}"),
        ExpiryReason::RefUpdateFailed { message, .. } => format!("ref update failed: {message}"),
        other => format!("{other:?}"),
    }
}

/// The first `chars` characters of an event id, for a line or a table: cut on a character
/// boundary, since ids come from hosts and manifests and need not be ASCII.
pub fn id_prefix(id: &str, chars: usize) -> &str {
    id.char_indices()
        .nth(chars)
        .map_or(id, |(end, _)| &id[..end])
}

/// `1.23s`.
pub fn seconds(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// A plain text table: a header row, a rule, then the rows, columns padded to fit.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| -> String {
        let line: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        line.join("  ").trim_end().to_owned()
    };
    let mut out = render(header.to_vec());
    out.push('\n');
    out.push_str(&render(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    out.push('\n');
    for row in rows {
        out.push_str(&render(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Per domain: requests started, successes, partial fetches (an error, but some of the wanted
/// objects arrived), failures (none arrived) by reason.
pub fn domain_table(stats: &Stats, label: &dyn Fn(&str) -> String) -> String {
    let rows: Vec<Vec<String>> = stats
        .domains
        .iter()
        .map(|(domain, d)| {
            let failures: BTreeMap<String, u64> = d
                .failed
                .iter()
                .map(|(kind, n)| (kind.as_str().to_owned(), *n))
                .collect();
            let failures = if failures.is_empty() {
                "-".to_owned()
            } else {
                failures
                    .iter()
                    .map(|(k, n)| format!("{k} ×{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                label(domain),
                d.requests_started.to_string(),
                d.requests.to_string(),
                d.succeeded.to_string(),
                d.partial.to_string(),
                failures,
            ]
        })
        .collect();
    table(
        &["domain", "fetches", "requests", "ok", "partial", "failures"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes_end_on_a_character_boundary() {
        let hex = "3f1c9a0b5e7d2468ace13579bdf02468ace13579bdf02468ace13579bdf02468";
        assert_eq!(id_prefix(hex, 12), &hex[..12]);
        assert_eq!(id_prefix(hex, 8), &hex[..8]);
        assert_eq!(id_prefix("short", 12), "short");
        assert_eq!(id_prefix("", 12), "");
        // Byte 12 falls inside the fourth `€`; twelve characters are 34 bytes.
        assert_eq!(id_prefix("a€€€€€€", 12), "a€€€€€€");
        assert_eq!(id_prefix("a€€€€€€", 4), "a€€€");
        assert_eq!(id_prefix(&"é".repeat(20), 12), "é".repeat(12));
        assert_eq!(id_prefix("\u{1F600}\u{1F600}x", 1), "\u{1F600}");
    }

    #[test]
    fn table_pads_columns_to_the_widest_cell() {
        let t = table(
            &["a", "bb"],
            &[
                vec!["long cell".into(), "x".into()],
                vec!["y".into(), "zz".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a          bb");
        assert_eq!(lines[1], "---------  --");
        assert_eq!(lines[2], "long cell  x");
        assert_eq!(lines[3], "y          zz");
    }
}
