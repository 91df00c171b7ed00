//! `purgatory-sync run --manifest FILE`: syncs the waiting events a manifest lists.
//!
//! Progress goes to stderr; stdout gets one JSON object per line for every event:
//!
//! ```text
//! {"kind":"released","event_id":"…","identifier":"hello","repo":"/srv/hello.git","waited_ms":1234,"refs":"written"}
//! {"kind":"released",…,"refs":"skipped_older_state","newer_created_at":1700000100}
//! {"kind":"expired","event_id":"…","identifier":"hello","repo":"/srv/hello.git","missing":["…"],"reason":"lifetime_ended"}
//! {"kind":"already_satisfied","event_id":"…","identifier":"hello","repo":"/srv/hello.git"}
//! {"kind":"refused","event_id":"…","identifier":"hello","repo":"/srv/hello.git","error":"invalid oids[0] …","line":7}
//! ```
//!
//! An event that expired in an earlier run (remembered through `--state-file`) is reported as
//! `expired` with reason `previously_expired`. `refs` is `none` (no ref updates), `written`,
//! or `skipped_older_state` for a repository state older than one written before it.
//!
//! An event none of whose clone URLs may be fetched is reported when it is submitted, on stderr
//! and as `{"kind":"no_usable_url",…,"refused_urls":[…]}` on stdout; `--fail-fast` stops the run
//! there.
//!
//! Exit status ([`EXIT_CODES`], also in `--help`): 0 every event released (or already
//! satisfied); 1 an error (an engine that cannot start, an I/O error); 2 a usage error
//! (clap's); 3 the manifest has problems (nothing was started); 4 some events were refused
//! (or, with `--fail-fast`, had no usable URL); 5 some events expired, none refused; 130 after
//! SIGINT and 143 after SIGTERM (the engine stops cleanly and, with `--state-file`, saves the
//! events still waiting for the next run).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use purgatory_sync::{Admission, Engine, Outcome, PendingEvent, RefusedUrl, SubmitError};
use serde::Serialize;

use crate::knobs::EngineArgs;
use crate::manifest::{self, LoadOptions};
use crate::progress::{self, Progress};
use crate::serve::MetricsServer;

/// The exit statuses of `run`, as `--help` lists them.
pub const EXIT_CODES: &str = "Exit status:
  0    every event was released (or already satisfied)
  1    an error: the engine could not start, an I/O error
  2    a usage error (bad flags)
  3    the manifest has problems; nothing was started
  4    some events were refused (with --fail-fast: an event had no usable clone URL)
  5    some events expired, none was refused
  130  interrupted by SIGINT (143: SIGTERM); with --state-file the waiting events are saved

Logging goes to stderr; RUST_LOG sets it (default warn; RUST_LOG=debug shows every decision).
Every flag can also be set from the environment variable shown with it.";

const EXIT_ERROR: u8 = 1;
const EXIT_BAD_MANIFEST: u8 = 3;
const EXIT_REFUSED: u8 = 4;
const EXIT_EXPIRED: u8 = 5;
const EXIT_SIGINT: u8 = 130;
const EXIT_SIGTERM: u8 = 143;

/// Options of `purgatory-sync run`.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct RunArgs {
    /// The manifest: JSON Lines of `repository`, `event` and `nostr` objects (see docs/cli.md);
    /// `-` reads it from standard input (relative paths then resolve against the working
    /// directory)
    #[arg(long, value_name = "FILE", env = "PURGATORY_SYNC_MANIFEST")]
    manifest: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics while running: HOST:PORT, :PORT (every
    /// interface) or localhost:PORT; port 0 picks a free port (the address is printed on stderr)
    #[arg(long, value_name = "ADDR", value_parser = listen_addr, env = "PURGATORY_SYNC_METRICS")]
    metrics: Option<SocketAddr>,
    /// Create missing target repositories (bare) named by `repository` lines
    #[arg(long, env = "PURGATORY_SYNC_CREATE_REPOS")]
    create_repos: bool,
    /// Do not check that raw Nostr events' ids are the hash of their content
    #[arg(long, env = "PURGATORY_SYNC_NO_VERIFY_IDS")]
    no_verify_ids: bool,
    /// Plain lines on stderr instead of a progress bar
    #[arg(long, env = "PURGATORY_SYNC_NO_PROGRESS")]
    no_progress: bool,
    /// Stop before anything is fetched when an event has no clone URL that may be fetched
    /// (exit status 4), instead of reporting it and letting it wait
    #[arg(long, env = "PURGATORY_SYNC_FAIL_FAST")]
    fail_fast: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// `--metrics`: `HOST:PORT`, `:PORT` (every interface, as Prometheus exporters have it) or a
/// name with a port (`localhost:9464`, its first address).
fn listen_addr(value: &str) -> Result<SocketAddr, String> {
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|e| format!("{port:?} is not a port: {e}"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    value
        .to_socket_addrs()
        .map_err(|e| format!("{value:?} is not HOST:PORT, :PORT or an address: {e}"))?
        .next()
        .ok_or_else(|| format!("{value:?} has no address"))
}

/// Runs the command and maps its result to the exit status.
pub fn main(args: RunArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("purgatory-sync run: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `1 event`, `2 events`.
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// How the run ended, for the exit status.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    released: u64,
    already: u64,
    expired: u64,
    refused: u64,
}

/// Prints outcomes, once per event.
#[derive(Debug, Default)]
struct Report {
    tally: Tally,
    reported: HashSet<String>,
    done: u64,
}

impl Report {
    /// Prints an outcome's JSON line and counts it, unless the event was reported already (a
    /// restored event the manifest lists again can be answered at submit and by the engine).
    fn outcome(&mut self, outcome: &Outcome, progress: &Progress) {
        if !self.reported.insert(outcome.event_id().to_owned()) {
            log::debug!("{} was reported already", outcome.event_id());
            return;
        }
        self.done += 1;
        let id = outcome.event_id();
        let name = format!("{}…", progress::id_prefix(id, 12));
        progress.line(progress::outcome_line(outcome, &name));
        match outcome {
            Outcome::Released { .. } => self.tally.released += 1,
            _ => self.tally.expired += 1,
        }
        print_json(progress, outcome);
    }
}

/// Prints one JSON line on stdout, its keys in the documented order (`kind` first), with the
/// progress bar cleared meanwhile so that no stale frame stays behind the line.
fn print_json(progress: &Progress, value: &impl Serialize) {
    progress.suspend(|| write_json(value));
}

/// Writes one JSON line on stdout (before the progress bar exists, or through it).
fn write_json(value: &impl Serialize) {
    let text = serde_json::to_string(value).expect("a line serialises");
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) is not worth a panic; the run goes on.
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// A JSON line about an event that has no outcome from the engine.
#[derive(Serialize)]
struct EventLine<'a> {
    kind: &'a str,
    event_id: &'a str,
    identifier: &'a str,
    repo: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    missing: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_urls: Option<Vec<RefusedLine<'a>>>,
}

#[derive(Serialize)]
struct RefusedLine<'a> {
    index: usize,
    url: &'a str,
    reason: String,
}

fn event_line<'a>(event: &'a PendingEvent, kind: &'a str) -> EventLine<'a> {
    EventLine {
        kind,
        event_id: &event.id,
        identifier: &event.identifier,
        repo: event.repo.to_string_lossy(),
        missing: None,
        reason: None,
        error: None,
        line: None,
        refused_urls: None,
    }
}

/// Whether `event` lists clone URLs and the policy refuses every one. (An event that lists
/// none waits for a push on purpose.)
fn no_usable_url(event: &PendingEvent, refused: &[RefusedUrl]) -> bool {
    !event.clone_urls.is_empty() && refused.len() >= event.clone_urls.len()
}

fn run(args: &RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let manifest = match manifest::load(
        &args.manifest,
        LoadOptions {
            verify_ids: !args.no_verify_ids,
            create_repos: args.create_repos,
        },
    ) {
        Ok(m) => m,
        Err(errors) => {
            for e in errors.iter().take(50) {
                eprintln!("error: {e}");
            }
            if errors.len() > 50 {
                eprintln!("… and {} more", errors.len() - 50);
            }
            eprintln!(
                "purgatory-sync run: the manifest has {} problem(s); nothing was started",
                errors.len()
            );
            return Ok(ExitCode::from(EXIT_BAD_MANIFEST));
        }
    };

    // Every event is checked as the engine would check it, before anything starts: a bad
    // object id or URL in any line stops the run here, as a bad `nostr` line does.
    let builder = args.engine.apply(Engine::builder());
    let mut problems = Vec::new();
    let mut unusable = Vec::new();
    for entry in &manifest.entries {
        match builder.check_event(&entry.event) {
            Ok(refused) if no_usable_url(&entry.event, &refused) => {
                unusable.push((entry, refused));
            }
            Ok(_) => {}
            Err(e) => problems.push(format!(
                "{}:{}: event {}: {e}",
                args.manifest.display(),
                entry.line,
                entry.event.id
            )),
        }
    }
    if !problems.is_empty() {
        for p in problems.iter().take(50) {
            eprintln!("error: {p}");
        }
        eprintln!(
            "purgatory-sync run: the manifest has {} problem(s); nothing was started",
            problems.len()
        );
        return Ok(ExitCode::from(EXIT_BAD_MANIFEST));
    }
    // Events none of whose URLs may be fetched: said at once, not after their lifetime.
    for (entry, refused) in &unusable {
        let reasons: Vec<String> = refused
            .iter()
            .map(|r| format!("{}: {}", r.url, r.reason))
            .collect();
        let private = refused
            .iter()
            .any(|r| matches!(r.reason, purgatory_sync::UrlRefusal::PrivateAddress(_)));
        eprintln!(
            "warning: {}:{}: event {} has no clone URL that may be fetched{}{}",
            args.manifest.display(),
            entry.line,
            entry.event.id,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", reasons.join("; "))
            },
            if private {
                "; --allow-private-addresses allows loopback and private addresses"
            } else {
                ""
            }
        );
        let mut line = event_line(&entry.event, "no_usable_url");
        line.line = Some(entry.line);
        line.refused_urls = Some(
            refused
                .iter()
                .map(|r| RefusedLine {
                    index: r.index,
                    url: &r.url,
                    reason: r.reason.to_string(),
                })
                .collect(),
        );
        write_json(&line);
    }
    if args.fail_fast && !unusable.is_empty() {
        eprintln!(
            "purgatory-sync run: {} without a usable clone URL (--fail-fast); nothing was started",
            plural(unusable.len() as u64, "event")
        );
        return Ok(ExitCode::from(EXIT_REFUSED));
    }

    // Signals only set a flag; the loop below stops the engine cleanly.
    let sigint = Arc::new(AtomicBool::new(false));
    let sigterm = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&sigint))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&sigterm))?;
    let interrupted = || sigint.load(Ordering::Relaxed) || sigterm.load(Ordering::Relaxed);

    let engine = builder.build()?;
    let outcomes = engine.outcomes();
    // Nothing is submitted yet: whatever the engine holds or has answered came from the state
    // file (events whose data arrived while the tool was not running are released at once).
    let at_start = engine.stats();
    let restored = at_start.waiting_events as u64 + at_start.released + at_start.expired;
    // The bar's total is known before its first frame.
    let progress = Progress::new(manifest.entries.len() as u64 + restored, !args.no_progress);
    progress.line(format!(
        "{}: {} ({} read){}",
        args.manifest.display(),
        plural(manifest.entries.len() as u64, "event"),
        plural(manifest.announcements as u64, "announcement"),
        if restored > 0 {
            format!(
                "; {} restored from the state file",
                plural(restored, "event")
            )
        } else {
            String::new()
        }
    ));

    let mut report = Report::default();
    // Events with no outcome yet: the manifest's queued ones.
    let mut waiting: HashMap<String, usize> = HashMap::new();
    for entry in &manifest.entries {
        match engine.submit(entry.event.clone()) {
            Ok(Admission::Pending { refused_urls, .. }) => {
                for r in &refused_urls {
                    progress.line(format!(
                        "warning: {}:{}: clone_urls[{}] skipped: {}",
                        args.manifest.display(),
                        entry.line,
                        r.index,
                        r.reason
                    ));
                }
                waiting.insert(entry.event.id.clone(), entry.line);
            }
            Ok(Admission::AlreadySatisfied) => {
                report.tally.already += 1;
                report.reported.insert(entry.event.id.clone());
                print_json(&progress, &event_line(&entry.event, "already_satisfied"));
            }
            Ok(other) => {
                return Err(format!("unexpected admission {other:?}").into());
            }
            Err(e) => {
                let previously_expired = matches!(e, SubmitError::PreviouslyExpired { .. });
                progress.line(format!(
                    "{}: {}:{}: event {}: {e}",
                    if previously_expired {
                        "expired"
                    } else {
                        "error"
                    },
                    args.manifest.display(),
                    entry.line,
                    entry.event.id
                ));
                let mut line = event_line(
                    &entry.event,
                    if previously_expired {
                        "expired"
                    } else {
                        "refused"
                    },
                );
                if previously_expired {
                    line.missing = Some(&entry.event.oids);
                    line.reason = Some("previously_expired");
                    report.tally.expired += 1;
                } else {
                    line.error = Some(e.to_string());
                    line.line = Some(entry.line);
                    report.tally.refused += 1;
                }
                report.reported.insert(entry.event.id.clone());
                print_json(&progress, &line);
            }
        }
    }

    let metrics = match args.metrics {
        Some(addr) => {
            let server = MetricsServer::bind(addr)
                .map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))?;
            progress.line(format!(
                "metrics at http://{}/metrics",
                server.local_addr()?
            ));
            Some(server)
        }
        None => None,
    };
    let stop_metrics = AtomicBool::new(false);
    let label = |d: &str| d.to_owned();

    std::thread::scope(|scope| {
        if let Some(server) = &metrics {
            let engine = &engine;
            let stop = &stop_metrics;
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn_scoped(scope, move || {
                    server.serve(stop, &|| purgatory_sync::metrics::render(&engine.stats()))
                })
                .expect("spawn the metrics thread");
        }
        let total = waiting.len() as u64 + restored;
        progress.set_total(total);
        loop {
            let stats = engine.stats();
            if waiting.is_empty() && stats.waiting_events == 0 && stats.commands_pending == 0 {
                break;
            }
            if interrupted() {
                progress.line(format!(
                    "interrupted: {} still waiting{}",
                    plural(stats.waiting_events as u64, "event"),
                    if args.engine.state_file.is_some() {
                        "; they are saved in the state file for the next run"
                    } else {
                        " (no --state-file: they are dropped)"
                    }
                ));
                break;
            }
            progress.update(&stats, report.done, &label);
            if let Ok(outcome) = outcomes.recv_timeout(Duration::from_millis(200)) {
                waiting.remove(outcome.event_id());
                report.outcome(&outcome, &progress);
            }
        }
        stop_metrics.store(true, Ordering::Relaxed);
    });
    progress.finish();
    let stats = engine.stats();
    let (by_sigint, by_sigterm) = (
        sigint.load(Ordering::Relaxed),
        sigterm.load(Ordering::Relaxed),
    );
    engine.shutdown()?;
    // Outcomes sent as the loop ended (the scheduler updates its counts before it sends).
    for outcome in outcomes.try_iter() {
        report.outcome(&outcome, &progress);
    }
    let tally = report.tally;
    eprintln!(
        "\n{}",
        progress::domain_table(&stats, &|d: &str| d.to_owned())
    );
    eprintln!(
        "{} released, {} already satisfied, {} expired, {} refused",
        tally.released, tally.already, tally.expired, tally.refused
    );
    Ok(if by_sigint {
        ExitCode::from(EXIT_SIGINT)
    } else if by_sigterm {
        ExitCode::from(EXIT_SIGTERM)
    } else if tally.refused > 0 {
        ExitCode::from(EXIT_REFUSED)
    } else if tally.expired > 0 {
        ExitCode::from(EXIT_EXPIRED)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::listen_addr;
    use std::net::SocketAddr;

    #[test]
    fn metrics_addresses_take_a_bare_port_a_name_or_an_address() {
        assert_eq!(
            listen_addr(":9464"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 9464)))
        );
        assert_eq!(
            listen_addr("127.0.0.1:0"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        );
        assert_eq!(listen_addr("[::1]:9464"), Ok("[::1]:9464".parse().unwrap()));
        let local = listen_addr("localhost:9464").expect("localhost resolves");
        assert!(local.ip().is_loopback() && local.port() == 9464, "{local}");
        assert!(listen_addr(":http").is_err());
        assert!(listen_addr("9464").is_err());
    }
}
