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
//! Exit status: 0 when every event was released (or already satisfied), 2 when some expired
//! and none was refused, 1 on errors (bad flags, unreadable manifest, an engine that cannot start, a
//! refused event, an interruption by SIGINT or SIGTERM: the engine then stops cleanly and,
//! with `--state-file`, saves the events still waiting for the next run).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use purgatory_sync::{Admission, Engine, Outcome, PendingEvent, SubmitError};
use serde_json::json;

use crate::knobs::EngineArgs;
use crate::manifest::{self, LoadOptions};
use crate::progress::{self, Progress};
use crate::serve::MetricsServer;

/// Options of `purgatory-sync run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The manifest: JSON Lines of `repository`, `event` and `nostr` objects (see docs/cli.md)
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics while running (port 0: any free port;
    /// the address is printed on stderr)
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Create missing target repositories (bare) named by `repository` lines
    #[arg(long)]
    create_repos: bool,
    /// Do not check that raw Nostr events' ids are the hash of their content
    #[arg(long)]
    no_verify_ids: bool,
    /// Plain lines on stderr instead of a progress bar
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs the command and maps its result to the exit status.
pub fn main(args: RunArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("purgatory-sync run: {e}");
            ExitCode::from(1)
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
        print_json(serde_json::to_value(outcome).expect("an outcome serialises"));
    }
}

fn print_json(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) is not worth a panic; the run goes on.
    let _ = writeln!(out, "{value}").and_then(|()| out.flush());
}

fn event_json(event: &PendingEvent, kind: &str) -> serde_json::Value {
    json!({
        "kind": kind, "event_id": event.id, "identifier": event.identifier,
        "repo": event.repo.to_string_lossy(),
    })
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
            return Ok(ExitCode::from(1));
        }
    };

    // Signals only set a flag; the loop below stops the engine cleanly.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }

    let engine = args.engine.apply(Engine::builder()).build()?;
    let outcomes = engine.outcomes();
    // Nothing is submitted yet: whatever the engine holds or has answered came from the state
    // file (events whose data arrived while the tool was not running are released at once).
    let at_start = engine.stats();
    let restored = at_start.waiting_events as u64 + at_start.released + at_start.expired;
    let progress = Progress::new(0, !args.no_progress);
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
                print_json(event_json(&entry.event, "already_satisfied"));
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
                let mut v = event_json(
                    &entry.event,
                    if previously_expired {
                        "expired"
                    } else {
                        "refused"
                    },
                );
                if previously_expired {
                    v["missing"] = json!(entry.event.oids);
                    v["reason"] = json!("previously_expired");
                    report.tally.expired += 1;
                } else {
                    v["error"] = json!(e.to_string());
                    v["line"] = json!(entry.line);
                    report.tally.refused += 1;
                }
                report.reported.insert(entry.event.id.clone());
                print_json(v);
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
            if interrupted.load(Ordering::Relaxed) {
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
    let was_interrupted = interrupted.load(Ordering::Relaxed);
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
    Ok(if was_interrupted || tally.refused > 0 {
        ExitCode::from(1)
    } else if tally.expired > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
