//! End to end: the engine against the `git fetch` method it replaces and against libgit2 told
//! where every commit is, over `git://` and smart HTTP, on loopback and through a delay.
//!
//! Workload: `E2E_IDENTIFIERS` identifiers (default 300), each its own repository on three
//! mirrors, 127.0.0.71, .72 and .73 (three domains). Every repository has the same base commit
//! on every mirror; identifier `i` then waits for two commits, `A` on mirror `i % 3` only and
//! `B` on mirror `(i + 1) % 3` only, so the third mirror has neither. Its one event lists the
//! three mirrors' URLs in cyclic order starting at mirror `2i % 3`, so the first URL is in turn
//! the holder of `A`, the holder of `B` and the mirror with neither: it always lacks at least
//! one of the two.
//!
//! Setups: every transport of `E2E_TRANSPORTS` (`git`: `git daemon`; `http`: `git
//! http-backend` behind the test kit's `HttpGitServer`; default both) at every round trip of
//! `E2E_RTT_MS` (default `0,100`). Each mirror runs one server per transport on its address;
//! for a round trip above 0 a `testkit::DelayProxy` on the same address, delaying each
//! direction by half the round trip, stands in front of each server, and the events' URLs
//! name the proxies. The proxies charge each new connection one round trip for its TCP
//! handshake (`E2E_HANDSHAKE=0` turns that off). The servers and proxies run in a child
//! process (this bench binary with `--e2e-mirrors`), so that their threads, the CGI processes
//! of the HTTP servers and the daemons are never counted as the client's CPU.
//!
//! Methods, each from fresh, empty local bare repositories (created before the clock starts):
//!
//! - `engine`: an `Engine` with the default settings (32 workers, 1 s tick, 500 ms sync
//!   delay, `Origin::Sync`) but per-domain limits that do not bind
//!   (`testkit::loopback_engine`); submit every event, wait until every one is released.
//! - `floor-libgit2`: libgit2 in this process, knowing where each commit is: one
//!   `Remote::fetch` of one id per (identifier, mirror holding something) from that mirror,
//!   `E2E_PARALLEL` threads (default 8) taking identifiers from one list, one `Repository` per
//!   identifier. No failed fetch, nothing asked twice: the fewest requests any method can make.
//! - `floor-cli` (once called `floor`): the same with `git fetch <mirror> <id>` subprocesses.
//! - `cli`: what relays do today, one identifier after another: for each URL in order, one
//!   `git fetch <url> <missing ids...>` subprocess into the target repository, until every id
//!   is present (checked in-process with libgit2 after each fetch). A server that lacks one of
//!   the ids fails the whole fetch ("not our ref"); then each missing id is fetched on its own
//!   from that URL.
//! - `cli-par`: the same, `E2E_PARALLEL` identifiers at a time.
//!
//! Each round runs every method once in every setup, the setups and the methods in an order
//! rotated from round to round; `E2E_RUNS` rounds (default 5). Wall time runs from the first
//! submit (or fetch) until the last event is released (or the last fetch returns); for the
//! engine the report also gives it less the 500 ms sync delay, which no other method waits.
//! Client CPU is this process's user + system time (all its threads: the engine's scheduler
//! and workers, the floor's threads) plus that of the children it waited for (`git fetch` and
//! the `git index-pack`, `git-remote-http` and `git maintenance` it runs), from
//! `/proc/self/stat`. Server CPU (the mirrors' process and its descendants: daemons, the
//! `upload-pack` and `http-backend` processes they reaped, the proxies) is shown apart and
//! counted for no method. Requests are counted on the server side: for `git://` the
//! "Request upload-pack" lines of the daemons' logs (`git daemon --verbose`), for HTTP the
//! HTTP servers' request logs (`GET …/info/refs` and `POST …/git-upload-pack`, apart and
//! together). After every run of every method every wanted object must be in the targets, or
//! the bench panics instead of reporting a time. Every wait is bounded.
//!
//! For each setup the report gives the goals of issue 16 as ratios of medians: engine
//! requests ÷ `floor-libgit2` requests (at most 1.35), engine wall less the sync delay ÷
//! `floor-libgit2` wall (at most 1.3), `cli-par` wall ÷ engine wall (at least 3 at a 100 ms
//! round trip).
//!
//! Run with `cargo bench --bench e2e`. Without `--bench` (`cargo test --benches`) it runs a
//! smoke version: 3 identifiers, 1 round, round trips 0 and 20 ms. Environment (both ways):
//! `E2E_IDENTIFIERS`, `E2E_RUNS`, `E2E_METHODS` (comma-separated, from
//! `engine,floor-libgit2,floor-cli,cli-par,cli`; `floor` is `floor-cli`), `E2E_TRANSPORTS`
//! (from `git,http`), `E2E_RTT_MS` (comma-separated milliseconds), `E2E_HANDSHAKE` (`1` or
//! `0`), `E2E_PARALLEL`, `E2E_ENGINE_WORKERS` (the engine's `workers`, default its own), `E2E_RUN_TIMEOUT_SECS` (bound on one run, default 3600),
//! `RUST_LOG` (the engine's, the servers' and the proxies' logs on stderr). The report
//! (Markdown) goes to stdout, progress to stderr.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use purgatory_sync::{ObjectId, Origin, Outcome, PendingEvent};
use purgatory_sync_testkit::{self as testkit, DelayProxy, GitDaemon, HttpGitServer};

/// The mirrors' loopback addresses: three domains, away from the tests' 127.0.0.2-60.
const MIRROR_HOSTS: [u8; 3] = [71, 72, 73];
/// Longest one `git fetch` may run before the watchdog kills it (and the bench panics).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The engine's default sync delay (`EngineBuilder::sync_delay`): its first attempt at a
/// sync-received event waits this long, which no other method does.
const SYNC_DELAY: Duration = Duration::from_millis(500);
/// The argument that makes this binary the mirrors' process.
const MIRRORS_FLAG: &str = "--e2e-mirrors";
/// How long the bench waits for the mirrors' process to start or to answer.
const MIRRORS_TIMEOUT: Duration = Duration::from_secs(60);
/// The test kit's `log` target, which carries the daemons' `--verbose` logs.
const TESTKIT_TARGET: &str = "purgatory_sync_testkit";
/// The goals of issue 16: engine requests ÷ floor's, at most; engine wall less the sync delay
/// ÷ floor's wall, at most; `cli-par` wall ÷ engine wall, at least (at a 100 ms round trip).
const GOAL_REQUESTS: f64 = 1.35;
const GOAL_WALL: f64 = 1.3;
const GOAL_CLI: f64 = 3.0;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == MIRRORS_FLAG) {
        mirrors::serve(&args[at + 1..]);
        return;
    }
    // The process's first libgit2 call, before any other thread exists (see the crate docs).
    testkit::loopback_engine()
        .build()
        .expect("a first engine initialises libgit2")
        .shutdown()
        .expect("the first engine shuts down");
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .try_init();
    let full = args.iter().any(|a| a == "--bench");
    let params = Params::from_env(full);
    let clk_tck = clock_ticks();

    eprintln!(
        "e2e: building {} repositories on 3 mirrors",
        params.identifiers
    );
    let root = tempfile::tempdir().expect("a temporary directory");
    let workload = Workload::build(root.path(), params.identifiers);
    let mut mirrors = Mirrors::start(root.path(), &params);
    let watchdog = Watchdog::start();
    let git = Git {
        watchdog: watchdog.clone(),
        processes: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };

    let load_before = common::loadavg();
    let mut samples: BTreeMap<(Setup, Method), Vec<Sample>> = BTreeMap::new();
    let setups = params.setups();
    for round in 0..params.runs {
        let mut setups = setups.clone();
        let n = setups.len();
        setups.rotate_left(round % n);
        for setup in setups {
            let mut methods = params.methods.clone();
            let n = methods.len();
            methods.rotate_left(round % n);
            for method in methods {
                let run = Run {
                    params: &params,
                    workload: &workload,
                    setup,
                    roots: mirrors.roots(setup).to_vec(),
                    git: &git,
                    scratch: root.path(),
                };
                let sample = run.measure(method, &mut mirrors, clk_tck);
                eprintln!(
                    "round {}/{} {:<13} {:<11} wall {:>7.2} s  cpu {:>6.2} s (children {:>6.2} s)  \
                     server {:>6.2} s  others {:>5.2} s  steal {:>5.2} s  requests {:>11}  \
                     calls {:>5} ({} failed)  load {}",
                    round + 1,
                    params.runs,
                    setup.name(),
                    method.name(),
                    secs(sample.wall),
                    secs(sample.cpu()),
                    secs(sample.children),
                    secs(sample.server),
                    secs(sample.others),
                    secs(sample.steal),
                    sample.requests.show(setup.transport),
                    sample.calls,
                    sample.failed,
                    common::loadavg(),
                );
                samples.entry((setup, method)).or_default().push(sample);
            }
        }
    }
    let load_after = common::loadavg();
    watchdog.stop();
    drop(mirrors);
    drop(workload);

    print!(
        "{}",
        report(&params, clk_tck, &samples, &load_before, &load_after)
    );
}

/// The methods, in the report's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Engine,
    FloorLibgit2,
    FloorCli,
    CliParallel,
    Cli,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Engine,
        Method::FloorLibgit2,
        Method::FloorCli,
        Method::CliParallel,
        Method::Cli,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Engine => "engine",
            Method::FloorLibgit2 => "floor-libgit2",
            Method::FloorCli => "floor-cli",
            Method::CliParallel => "cli-par",
            Method::Cli => "cli",
        }
    }

    fn parse(name: &str) -> Option<Method> {
        if name == "floor" {
            return Some(Method::FloorCli);
        }
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    fn label(self, parallel: usize) -> String {
        match self {
            Method::Engine => "engine (defaults)".to_owned(),
            Method::FloorLibgit2 => {
                format!("floor: libgit2, known locations, {parallel} threads")
            }
            Method::FloorCli => format!("floor: git CLI, known locations, {parallel} at a time"),
            Method::CliParallel => format!("git CLI, {parallel} identifiers at a time"),
            Method::Cli => "git CLI, one identifier at a time".to_owned(),
        }
    }
}

/// How the mirrors are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Transport {
    /// `git daemon`.
    Git,
    /// `git http-backend` behind `HttpGitServer`.
    Http,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Git => "git",
            Transport::Http => "http",
        }
    }

    fn parse(name: &str) -> Option<Transport> {
        [Transport::Git, Transport::Http]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

/// One transport at one round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Setup {
    transport: Transport,
    rtt_ms: u64,
}

impl Setup {
    fn name(self) -> String {
        format!("{}/{}ms", self.transport.name(), self.rtt_ms)
    }

    fn title(self) -> String {
        let scheme = match self.transport {
            Transport::Git => "`git://` (git daemon)",
            Transport::Http => "smart HTTP (git http-backend)",
        };
        if self.rtt_ms == 0 {
            format!("{scheme}, loopback (0 ms round trip)")
        } else {
            format!(
                "{scheme}, {} ms round trip (DelayProxy, {} ms each way)",
                self.rtt_ms,
                self.rtt_ms as f64 / 2.0
            )
        }
    }
}

struct Params {
    identifiers: usize,
    runs: usize,
    methods: Vec<Method>,
    transports: Vec<Transport>,
    rtts_ms: Vec<u64>,
    handshake: bool,
    parallel: usize,
    run_timeout: Duration,
}

impl Params {
    /// The environment's settings; defaults of the full bench, or of the smoke version.
    fn from_env(full: bool) -> Params {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let number = |name: &str, default: u64| -> u64 {
            match var(name) {
                Some(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                None => default,
            }
        };
        let list = |name: &str, default: &str| -> Vec<String> {
            var(name)
                .unwrap_or_else(|| default.to_owned())
                .split(',')
                .map(|x| x.trim().to_owned())
                .filter(|x| !x.is_empty())
                .collect()
        };
        let methods = match var("E2E_METHODS") {
            Some(_) => list("E2E_METHODS", "")
                .iter()
                .map(|m| {
                    Method::parse(m).unwrap_or_else(|| panic!("E2E_METHODS: unknown method {m:?}"))
                })
                .collect(),
            None => Method::ALL.to_vec(),
        };
        let transports = list("E2E_TRANSPORTS", "git,http")
            .iter()
            .map(|t| {
                Transport::parse(t)
                    .unwrap_or_else(|| panic!("E2E_TRANSPORTS: unknown transport {t:?}"))
            })
            .collect();
        let rtts_ms = list("E2E_RTT_MS", if full { "0,100" } else { "0,20" })
            .iter()
            .map(|r| {
                r.parse()
                    .unwrap_or_else(|_| panic!("E2E_RTT_MS: {r:?} is not a number"))
            })
            .collect();
        let params = Params {
            identifiers: number("E2E_IDENTIFIERS", if full { 300 } else { 3 }) as usize,
            runs: number("E2E_RUNS", if full { 5 } else { 1 }) as usize,
            methods: dedup(methods),
            transports: dedup(transports),
            rtts_ms: dedup(rtts_ms),
            handshake: number("E2E_HANDSHAKE", 1) != 0,
            parallel: number("E2E_PARALLEL", 8) as usize,
            run_timeout: Duration::from_secs(number("E2E_RUN_TIMEOUT_SECS", 3600)),
        };
        assert!(params.identifiers > 0, "E2E_IDENTIFIERS must be at least 1");
        assert!(params.runs > 0, "E2E_RUNS must be at least 1");
        assert!(params.parallel > 0, "E2E_PARALLEL must be at least 1");
        assert!(!params.methods.is_empty(), "E2E_METHODS names no method");
        assert!(!params.transports.is_empty(), "E2E_TRANSPORTS names none");
        assert!(!params.rtts_ms.is_empty(), "E2E_RTT_MS names none");
        assert!(
            params.rtts_ms.iter().all(|r| *r <= 10_000),
            "E2E_RTT_MS: at most 10000 ms"
        );
        params
    }

    /// Every transport at every round trip, transports first.
    fn setups(&self) -> Vec<Setup> {
        self.transports
            .iter()
            .flat_map(|&transport| {
                self.rtts_ms
                    .iter()
                    .map(move |&rtt_ms| Setup { transport, rtt_ms })
            })
            .collect()
    }
}

/// `items` without repetitions, in their first order.
fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// One identifier of the workload.
struct Identifier {
    /// The event's identifier.
    name: String,
    /// The repository's path under each mirror's base directory and under a run's directory.
    path: String,
    /// The two commits it waits for: `A`, then `B`.
    ids: [ObjectId; 2],
    /// The mirror holding `A` and the one holding `B`.
    holders: [usize; 2],
    /// The mirror whose URL the event lists first; the others follow in cyclic order.
    first: usize,
}

impl Identifier {
    /// The event's URLs, given the mirrors' URL roots in one setup.
    fn urls(&self, roots: &[String]) -> Vec<String> {
        (0..roots.len())
            .map(|k| format!("{}{}", roots[(self.first + k) % roots.len()], self.path))
            .collect()
    }
}

/// The repositories the mirrors serve (built once, served for the whole bench) and the
/// identifiers.
struct Workload {
    identifiers: Vec<Identifier>,
}

impl Workload {
    /// Builds the mirrors' repositories under `root/mirror0` … `root/mirror2`.
    fn build(root: &Path, count: usize) -> Workload {
        let bases: Vec<PathBuf> = (0..MIRROR_HOSTS.len())
            .map(|m| mirror_base(root, m))
            .collect();
        let library = "pub fn answer() -> u32 {\n    42\n}\n".repeat(20);
        let mut identifiers = Vec::with_capacity(count);
        for i in 0..count {
            let path = format!("bench/ident-{i:05}.git");
            let holders = [i % 3, (i + 1) % 3];
            let readme = format!("# identifier {i}\n");
            let mut ids = [None, None];
            for (m, base) in bases.iter().enumerate() {
                let repo = testkit::served_repo(base, &path);
                // The same calls on every mirror: the same base commit id everywhere.
                testkit::commit(
                    &repo,
                    "main",
                    &[
                        ("README.md", readme.as_bytes()),
                        ("src/lib.rs", library.as_bytes()),
                    ],
                    "base",
                );
                // Commit A (k = 0) or B (k = 1) on top of it, on its holder only.
                for (k, name) in ["A", "B"].into_iter().enumerate() {
                    if m == holders[k] {
                        let file = format!("feature {name} of identifier {i}\n").repeat(10);
                        let path = format!("{}.txt", name.to_lowercase());
                        ids[k] = Some(testkit::commit(
                            &repo,
                            "main",
                            &[(&path, file.as_bytes())],
                            name,
                        ));
                    }
                }
            }
            identifiers.push(Identifier {
                name: format!("bench/ident-{i:05}"),
                path,
                ids: ids.map(|id| id.expect("each commit is on one mirror")),
                holders,
                first: (2 * i) % 3,
            });
        }
        Workload { identifiers }
    }

    /// New empty bare repositories under `dir`, one per identifier, in the identifiers' order.
    fn fresh_targets(&self, dir: &Path) -> Vec<PathBuf> {
        self.identifiers
            .iter()
            .map(|id| testkit::init_bare(&dir.join(&id.path)))
            .collect()
    }

    /// Panics unless every wanted object is in its target.
    fn verify(&self, setup: Setup, method: Method, targets: &[PathBuf]) {
        let missing: Vec<String> = self
            .identifiers
            .iter()
            .zip(targets)
            .flat_map(|(id, target)| {
                missing(target, &id.ids)
                    .into_iter()
                    .map(move |oid| format!("{} {oid}", id.name))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{} {}: {} of {} wanted objects are missing after the run, first: {:?}",
            setup.name(),
            method.name(),
            missing.len(),
            2 * targets.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

/// The directory of mirror `m`'s repositories.
fn mirror_base(root: &Path, m: usize) -> PathBuf {
    root.join(format!("mirror{m}"))
}

/// The ids of `ids` not in the repository at `target`.
fn missing(target: &Path, ids: &[ObjectId]) -> Vec<ObjectId> {
    ids.iter()
        .copied()
        .filter(|oid| !testkit::has_object(target, *oid))
        .collect()
}

/// Requests the mirrors' servers logged, since they started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// `git daemon`: "Request upload-pack" lines.
    upload_pack: u64,
    /// HTTP: `GET …/info/refs`.
    info_refs: u64,
    /// HTTP: `POST …/git-upload-pack`.
    http_upload_pack: u64,
    /// HTTP: anything else (nothing, when all is well).
    http_other: u64,
}

impl Counts {
    fn since(self, before: Counts) -> Counts {
        Counts {
            upload_pack: self.upload_pack - before.upload_pack,
            info_refs: self.info_refs - before.info_refs,
            http_upload_pack: self.http_upload_pack - before.http_upload_pack,
            http_other: self.http_other - before.http_other,
        }
    }

    /// The requests of `transport`: upload-pack requests, or every HTTP request.
    fn total(self, transport: Transport) -> u64 {
        match transport {
            Transport::Git => self.upload_pack,
            Transport::Http => self.info_refs + self.http_upload_pack + self.http_other,
        }
    }

    /// The protocol line of the mirrors' process.
    fn to_line(self) -> String {
        format!(
            "counts {} {} {} {}",
            self.upload_pack, self.info_refs, self.http_upload_pack, self.http_other
        )
    }

    fn from_line(line: &str) -> Option<Counts> {
        let mut fields = line.strip_prefix("counts ")?.split(' ');
        let mut next = || fields.next()?.parse().ok();
        Some(Counts {
            upload_pack: next()?,
            info_refs: next()?,
            http_upload_pack: next()?,
            http_other: next()?,
        })
    }
}

/// The mirrors' process, seen from the bench: started with the servers and proxies of every
/// setup, asked for request counts, stopped (its servers with it) when dropped.
struct Mirrors {
    child: Child,
    /// Closing it (end of file) stops the process.
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The URL root (`git://127.0.0.71:PORT/`) of each mirror, per setup.
    roots: HashMap<Setup, Vec<String>>,
}

impl Mirrors {
    /// Starts this binary as the mirrors' process over the repositories under `root` and
    /// waits until it serves.
    fn start(root: &Path, params: &Params) -> Mirrors {
        let join = |items: Vec<String>| items.join(",");
        let mut child = Command::new(std::env::current_exe().expect("this binary's path"))
            .arg(MIRRORS_FLAG)
            .arg(root)
            .arg(join(
                params
                    .transports
                    .iter()
                    .map(|t| t.name().to_owned())
                    .collect(),
            ))
            .arg(join(params.rtts_ms.iter().map(u64::to_string).collect()))
            .arg(if params.handshake { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the mirrors' process starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("e2e-mirrors-out".to_owned())
            .spawn(move || {
                // Ends when the process closes its stdout (it exits).
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .expect("a reader thread");
        let mut mirrors = Mirrors {
            stdin: child.stdin.take(),
            child,
            lines,
            reader: Some(reader),
            roots: HashMap::new(),
        };
        loop {
            let line = mirrors.next_line("starting");
            if line == "ready" {
                break;
            }
            let fields: Vec<&str> = line.split(' ').collect();
            let &["url", transport, rtt, mirror, url] = fields.as_slice() else {
                panic!("the mirrors' process said {line:?}");
            };
            let setup = Setup {
                transport: Transport::parse(transport).expect("a known transport"),
                rtt_ms: rtt.parse().expect("a round trip"),
            };
            let mirror: usize = mirror.parse().expect("a mirror");
            let roots = mirrors
                .roots
                .entry(setup)
                .or_insert_with(|| vec![String::new(); MIRROR_HOSTS.len()]);
            roots[mirror] = url.to_owned();
        }
        for setup in params.setups() {
            let roots = mirrors.roots.get(&setup);
            assert!(
                roots.is_some_and(|r| r.iter().all(|u| !u.is_empty())),
                "the mirrors' process serves no {}",
                setup.name()
            );
        }
        mirrors
    }

    fn next_line(&self, doing: &str) -> String {
        self.lines
            .recv_timeout(MIRRORS_TIMEOUT)
            .unwrap_or_else(|e| panic!("the mirrors' process, {doing}: {e}"))
    }

    /// The mirrors' URL roots in `setup`, mirror by mirror.
    fn roots(&self, setup: Setup) -> &[String] {
        &self.roots[&setup]
    }

    /// The requests logged so far, once the logs have settled.
    fn counts(&mut self) -> Counts {
        let stdin = self.stdin.as_mut().expect("the mirrors' process runs");
        writeln!(stdin, "counts")
            .and_then(|()| stdin.flush())
            .expect("asking the mirrors' process");
        let line = self.next_line("counting");
        Counts::from_line(&line).unwrap_or_else(|| panic!("the mirrors' process said {line:?}"))
    }

    /// CPU time (clock ticks) of the process and its descendants: the server side.
    fn cpu_ticks(&self) -> u64 {
        tree_ticks(self.child.id())
    }
}

impl Drop for Mirrors {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + MIRRORS_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("e2e: the mirrors' process did not stop; killing it");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The mirrors' process: every server and proxy the setups need on the mirrors' addresses,
/// and a line protocol with the bench. Told `<root> <transports> <round trips> <handshake>`,
/// it prints `url <transport> <rtt> <mirror> <url root>` for each setup and mirror, then
/// `ready`; then it answers each `counts` line on its stdin with a `counts` line (see
/// [`Counts`]), and stops at the end of its stdin (the bench closed it, or died).
mod mirrors {
    use super::*;

    pub(super) fn serve(args: &[String]) {
        let [root, transports, rtts, handshake] = args else {
            panic!("{MIRRORS_FLAG} <root> <transports> <round trips> <handshake>, not {args:?}");
        };
        let counter = RequestCounter::install();
        let root = Path::new(root);
        let transports: Vec<Transport> = transports
            .split(',')
            .map(|t| Transport::parse(t).expect("a transport"))
            .collect();
        let rtts: Vec<u64> = rtts
            .split(',')
            .map(|r| r.parse().expect("a round trip"))
            .collect();
        let mut daemons = Vec::new();
        let mut https = Vec::new();
        let mut proxies = Vec::new();
        let say = |line: String| {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .expect("writing to the bench");
        };
        for (m, host) in MIRROR_HOSTS.iter().enumerate() {
            let ip = Ipv4Addr::new(127, 0, 0, *host);
            let base = mirror_base(root, m);
            for &transport in &transports {
                let (addr, direct) = match transport {
                    Transport::Git => {
                        let daemon = GitDaemon::start(ip, &base).expect("git daemon");
                        let served = (daemon.addr(), daemon.url(""));
                        daemons.push(daemon);
                        served
                    }
                    Transport::Http => {
                        let http = HttpGitServer::start(ip, &base).expect("http server");
                        let served = (http.addr(), http.url(""));
                        https.push(http);
                        served
                    }
                };
                for &rtt in &rtts {
                    let url = if rtt == 0 {
                        direct.clone()
                    } else {
                        let one_way = Duration::from_micros(rtt * 500);
                        let proxy = DelayProxy::start(ip, addr, one_way).expect("delay proxy");
                        proxy.set_handshake(handshake == "1");
                        let url = match transport {
                            Transport::Git => proxy.url(""),
                            Transport::Http => proxy.http_url(""),
                        };
                        proxies.push(proxy);
                        url
                    };
                    say(format!("url {} {rtt} {m} {url}", transport.name()));
                }
            }
        }
        say("ready".to_owned());
        let mut http_counts = Counts::default();
        // One command a line until the bench closes the pipe.
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match line.trim() {
                "counts" => {
                    let upload_pack = counter.settled();
                    for http in &https {
                        let _ = http.wait_idle(Duration::from_secs(5));
                        for request in http.requests() {
                            let path = request.path.split('?').next().unwrap_or_default();
                            if path.ends_with("/info/refs") {
                                http_counts.info_refs += 1;
                            } else if path.ends_with("/git-upload-pack") {
                                http_counts.http_upload_pack += 1;
                            } else {
                                http_counts.http_other += 1;
                            }
                        }
                        // The bench asks between runs, when no request is in progress.
                        http.clear_requests();
                    }
                    say(Counts {
                        upload_pack,
                        ..http_counts
                    }
                    .to_line());
                }
                "" => {}
                other => panic!("the bench said {other:?}"),
            }
        }
        drop(proxies);
        drop(https);
        drop(daemons);
    }
}

/// Counts the `upload-pack` requests the daemons log (`git daemon --verbose`, forwarded by the
/// test kit to `log` at debug level) and passes every record `RUST_LOG` selects to env_logger.
struct RequestCounter {
    inner: env_logger::Logger,
    requests: AtomicU64,
}

impl RequestCounter {
    fn install() -> &'static RequestCounter {
        static COUNTER: OnceLock<RequestCounter> = OnceLock::new();
        let counter = COUNTER.get_or_init(|| RequestCounter {
            inner: env_logger::Builder::from_env(
                env_logger::Env::default().default_filter_or("warn"),
            )
            .format_timestamp_micros()
            .build(),
            requests: AtomicU64::new(0),
        });
        log::set_logger(counter).expect("no other logger");
        log::set_max_level(counter.inner.filter().max(log::LevelFilter::Debug));
        counter
    }

    /// The count once the daemons' log lines have stopped arriving (bounded: 5 s).
    fn settled(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.requests.load(Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.requests.load(Ordering::SeqCst);
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }
}

impl log::Log for RequestCounter {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == TESTKIT_TARGET || self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target() == TESTKIT_TARGET
            && record.args().to_string().contains("Request upload-pack")
        {
            self.requests.fetch_add(1, Ordering::SeqCst);
        }
        if self.inner.matches(record) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// One run of one method.
struct Sample {
    wall: Duration,
    /// This process's CPU time (every thread).
    own: Duration,
    /// CPU time of the children waited for during the run.
    children: Duration,
    /// Requests the servers logged.
    requests: Counts,
    /// The mirrors' process's CPU time and its descendants' (not charged to the method).
    server: Duration,
    /// CPU time of everything else on the machine meanwhile: other people's work.
    others: Duration,
    /// CPU time the hypervisor gave to other guests meanwhile.
    steal: Duration,
    /// `git fetch` processes, libgit2 fetches, or the engine's fetch jobs (one URL each).
    calls: u64,
    /// How many of those failed.
    failed: u64,
}

impl Sample {
    fn cpu(&self) -> Duration {
        self.own + self.children
    }
}

impl Counts {
    /// For the progress lines and the report: the total, and for HTTP its two parts.
    fn show(self, transport: Transport) -> String {
        match transport {
            Transport::Git => self.upload_pack.to_string(),
            Transport::Http => format!(
                "{} ({}+{})",
                self.total(transport),
                self.info_refs,
                self.http_upload_pack
            ),
        }
    }
}

/// What one run of one method works with.
struct Run<'a> {
    params: &'a Params,
    workload: &'a Workload,
    setup: Setup,
    /// The mirrors' URL roots in this setup.
    roots: Vec<String>,
    git: &'a Git,
    /// Where runs put their targets.
    scratch: &'a Path,
}

impl Run<'_> {
    /// Runs `method` once from fresh targets and measures it.
    fn measure(&self, method: Method, mirrors: &mut Mirrors, clk_tck: u64) -> Sample {
        let dir = tempfile::tempdir_in(self.scratch).expect("a run directory");
        let targets = self.workload.fresh_targets(dir.path());
        let requests_before = mirrors.counts();
        let server_before = mirrors.cpu_ticks();
        let machine_before = machine_ticks();
        let cpu_before = cpu_ticks();
        let started = Instant::now();
        let (calls, failed) = match method {
            Method::Engine => self.engine(&targets),
            Method::FloorLibgit2 => self.floor_libgit2(&targets),
            Method::FloorCli => self.floor_cli(&targets),
            Method::CliParallel => self.cli(&targets, self.params.parallel),
            Method::Cli => self.cli(&targets, 1),
        };
        let wall = started.elapsed();
        let cpu_after = cpu_ticks();
        let server = ticks(clk_tck, mirrors.cpu_ticks() - server_before);
        let machine_after = machine_ticks();
        let requests = mirrors.counts().since(requests_before);
        self.workload.verify(self.setup, method, &targets);
        let own = ticks(clk_tck, cpu_after.0 - cpu_before.0);
        let children = ticks(clk_tck, cpu_after.1 - cpu_before.1);
        let busy = ticks(clk_tck, machine_after.0 - machine_before.0);
        Sample {
            wall,
            own,
            children,
            requests,
            server,
            // The bench's own idle threads are noise.
            others: busy.saturating_sub(own + children + server),
            steal: ticks(clk_tck, machine_after.1 - machine_before.1),
            calls,
            failed,
        }
    }

    /// The URL of identifier `id`'s repository on mirror `m`.
    fn url(&self, id: &Identifier, m: usize) -> String {
        format!("{}{}", self.roots[m], id.path)
    }

    /// The engine: submit every event, wait until every one is released. Returns the fetch
    /// jobs started and failed.
    fn engine(&self, targets: &[PathBuf]) -> (u64, u64) {
        let mut builder = testkit::loopback_engine();
        if let Some(n) = std::env::var("E2E_ENGINE_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            builder = builder.workers(n);
        }
        let engine = builder.build().expect("the engine builds");
        let outcomes = engine.outcomes();
        let deadline = Instant::now() + self.params.run_timeout;
        let identifiers = &self.workload.identifiers;
        for (i, (id, target)) in identifiers.iter().zip(targets).enumerate() {
            let event = PendingEvent {
                id: format!("event-{i:05}"),
                identifier: id.name.clone(),
                repo: target.clone(),
                oids: id.ids.iter().map(ObjectId::to_string).collect(),
                clone_urls: id.urls(&self.roots),
                origin: Origin::Sync,
                ..Default::default()
            };
            let admission = engine.submit(event).expect("the event is valid");
            assert!(
                admission.is_pending() && admission.refused_urls().is_empty(),
                "{admission:?}"
            );
        }
        let mut released = HashSet::new();
        while released.len() < identifiers.len() {
            match outcomes.recv_deadline(deadline) {
                Ok(Outcome::Released { event_id, .. }) => {
                    assert!(released.insert(event_id.clone()), "{event_id} twice");
                }
                Ok(other) => panic!("engine: unexpected outcome {other:?}"),
                Err(e) => panic!(
                    "engine: {} of {} events released after {:?} ({e}); stats: {:#?}",
                    released.len(),
                    identifiers.len(),
                    self.params.run_timeout,
                    engine.stats()
                ),
            }
        }
        let stats = engine.stats();
        engine.shutdown().expect("the engine shuts down");
        (stats.fetches_started, stats.fetches_failed)
    }

    /// The libgit2 floor: each object fetched in-process from the mirror that has it, one
    /// `Repository` per identifier. Returns the fetches made (none fails, or the bench
    /// panics).
    fn floor_libgit2(&self, targets: &[PathBuf]) -> (u64, u64) {
        let fetches = AtomicU64::new(0);
        let deadline = Instant::now() + self.params.run_timeout;
        let identifiers = &self.workload.identifiers;
        in_parallel(self.params.parallel, identifiers.len(), deadline, |i| {
            let (id, target) = (&identifiers[i], &targets[i]);
            let repo = git2::Repository::open_bare(target).expect("the target opens");
            for (oid, holder) in id.ids.iter().zip(id.holders) {
                let url = self.url(id, holder);
                let mut remote = repo.remote_anonymous(&url).expect("an anonymous remote");
                let mut callbacks = git2::RemoteCallbacks::new();
                // The pack's progress: a stalled run ends at the deadline.
                callbacks.transfer_progress(|_| Instant::now() < deadline);
                let mut options = git2::FetchOptions::new();
                options
                    .remote_callbacks(callbacks)
                    .download_tags(git2::AutotagOption::None)
                    .update_fetchhead(false);
                fetches.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = remote.fetch(&[oid.to_string()], Some(&mut options), None) {
                    panic!("floor-libgit2: fetching {oid} from {url} failed: {e}");
                }
            }
        });
        (fetches.into_inner(), 0)
    }

    /// The git CLI floor: each object fetched by `git fetch` from the mirror that has it.
    fn floor_cli(&self, targets: &[PathBuf]) -> (u64, u64) {
        let counts = self.git.counts();
        let deadline = Instant::now() + self.params.run_timeout;
        let identifiers = &self.workload.identifiers;
        in_parallel(self.params.parallel, identifiers.len(), deadline, |i| {
            let (id, target) = (&identifiers[i], &targets[i]);
            for (oid, holder) in id.ids.iter().zip(id.holders) {
                let url = self.url(id, holder);
                assert!(
                    self.git.fetch(target, &url, &[*oid]),
                    "floor-cli: fetching {oid} from {url} failed"
                );
            }
        });
        self.git.since(counts)
    }

    /// The git command-line method, `threads` identifiers at a time. Returns the `git fetch`
    /// processes run and failed during the run.
    fn cli(&self, targets: &[PathBuf], threads: usize) -> (u64, u64) {
        let counts = self.git.counts();
        let deadline = Instant::now() + self.params.run_timeout;
        let identifiers = &self.workload.identifiers;
        in_parallel(threads, identifiers.len(), deadline, |i| {
            let (id, target) = (&identifiers[i], &targets[i]);
            for url in id.urls(&self.roots) {
                let wanted = missing(target, &id.ids);
                if wanted.is_empty() {
                    break;
                }
                // The server refuses the whole fetch if it lacks one id: ask for each on its own.
                if !self.git.fetch(target, &url, &wanted) && wanted.len() > 1 {
                    for oid in &wanted {
                        self.git.fetch(target, &url, &[*oid]);
                    }
                }
            }
        });
        self.git.since(counts)
    }
}

/// Runs `job(0..jobs)` on `threads` threads taking the next index from a shared counter.
/// Panics when `deadline` passes before the last job starts.
fn in_parallel(threads: usize, jobs: usize, deadline: Instant, job: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= jobs {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the run passed its time limit at job {i} of {jobs}"
        );
        job(i);
    };
    if threads == 1 {
        work();
        return;
    }
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(work);
        }
    });
}

fn ticks(clk_tck: u64, ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / clk_tck as f64)
}

/// (utime + stime, cutime + cstime) of this process, in clock ticks, from `/proc/self/stat`.
fn cpu_ticks() -> (u64, u64) {
    let stat = proc_stat(Path::new("/proc/self/stat")).expect("/proc/self/stat");
    (stat.own, stat.children)
}

/// What `/proc/<pid>/stat` says about a process's parent and CPU time (in clock ticks).
struct ProcStat {
    ppid: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: the children it has waited for.
    children: u64,
}

fn proc_stat(path: &Path) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ProcStat {
        ppid: u32::try_from(field(4)?).ok()?,
        own: field(14)? + field(15)?,
        children: field(16)? + field(17)?,
    })
}

/// The whole machine's busy and stolen CPU time (clock ticks), from `/proc/stat`: what ran
/// besides the bench is the busy time minus the client's and the server's.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    (get(0) + get(1) + get(2) + get(5) + get(6), get(7))
}

/// CPU time (clock ticks) of process `root` and its live descendants, each with the children
/// it has reaped: for the mirrors' process, the HTTP servers' threads and `http-backend`
/// processes, the proxies, the daemons (under their watchdog shells) and the connection
/// handlers and `upload-pack` processes they reaped.
fn tree_ticks(root: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let all: HashMap<u32, ProcStat> = dir
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((pid, proc_stat(&e.path().join("stat"))?))
        })
        .collect();
    let mut tree = HashSet::from([root]);
    // Each pass adds a generation; a process tree here is a few levels deep.
    loop {
        let before = tree.len();
        for (pid, stat) in &all {
            if tree.contains(&stat.ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    tree.iter()
        .filter_map(|pid| all.get(pid))
        .map(|s| s.own + s.children)
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails, as on every Linux).
fn clock_ticks() -> u64 {
    command_line("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// Runs `git fetch` subprocesses and counts them.
struct Git {
    watchdog: Arc<Watchdog>,
    processes: AtomicU64,
    failed: AtomicU64,
}

impl Git {
    /// `git --git-dir <target> fetch <url> <ids...>`: whether it succeeded. Panics when it had
    /// to be killed after [`FETCH_TIMEOUT`].
    fn fetch(&self, target: &Path, url: &str, ids: &[ObjectId]) -> bool {
        let child = testkit::git_command()
            .arg("--git-dir")
            .arg(target)
            .arg("fetch")
            .arg(url)
            .args(ids.iter().map(ObjectId::to_string))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("git runs");
        let pid = child.id();
        self.watchdog.watch(pid);
        let output = child.wait_with_output().expect("waiting for git");
        assert!(
            !self.watchdog.unwatch(pid),
            "git fetch {url} ran longer than {FETCH_TIMEOUT:?} and was killed"
        );
        self.processes.fetch_add(1, Ordering::Relaxed);
        if !output.status.success() {
            self.failed.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "git fetch {url} {ids:?}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        output.status.success()
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.processes.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn since(&self, before: (u64, u64)) -> (u64, u64) {
        let now = self.counts();
        (now.0 - before.0, now.1 - before.1)
    }
}

/// Kills `git fetch` processes that run longer than [`FETCH_TIMEOUT`]: a thread that looks
/// every 200 ms at the processes being waited for.
struct Watchdog {
    /// Process id -> when it must be done.
    running: Mutex<HashMap<u32, Instant>>,
    killed: Mutex<HashSet<u32>>,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Watchdog {
    fn start() -> Arc<Watchdog> {
        let watchdog = Arc::new(Watchdog {
            running: Mutex::new(HashMap::new()),
            killed: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let w = watchdog.clone();
        let thread = std::thread::Builder::new()
            .name("e2e-watchdog".to_owned())
            .spawn(move || {
                while !w.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = Instant::now();
                    let overdue: Vec<u32> = w
                        .running
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(_, deadline)| **deadline <= now)
                        .map(|(pid, _)| *pid)
                        .collect();
                    for pid in overdue {
                        w.killed.lock().unwrap().insert(pid);
                        // The process is still waited for, so its id is not reused yet.
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                }
            })
            .expect("the watchdog thread starts");
        *watchdog.thread.lock().unwrap() = Some(thread);
        watchdog
    }

    fn watch(&self, pid: u32) {
        self.running
            .lock()
            .unwrap()
            .insert(pid, Instant::now() + FETCH_TIMEOUT);
    }

    /// Stops watching `pid`; whether it was killed.
    fn unwatch(&self, pid: u32) -> bool {
        self.running.lock().unwrap().remove(&pid);
        self.killed.lock().unwrap().remove(&pid)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.lock().unwrap().take() {
            thread.join().expect("the watchdog thread");
        }
    }
}
fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// The output of a command, trimmed, if it ran and succeeded.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The Markdown report: machine, parameters, a table per setup, the goals.
fn report(
    params: &Params,
    clk_tck: u64,
    samples: &BTreeMap<(Setup, Method), Vec<Sample>>,
    load_before: &str,
    load_after: &str,
) -> String {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let unknown = || "?".to_owned();
    let git = command_line("git", &["--version"]).unwrap_or_else(unknown);
    let rustc = command_line("rustc", &["--version"]).unwrap_or_else(unknown);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| unknown());
    let (major, minor, rev) = git2::Version::get().libgit2_version();

    let mut out = String::new();
    let w = params.identifiers;
    let _ = writeln!(out, "\n## End to end (`cargo bench --bench e2e`)\n");
    let _ = writeln!(
        out,
        "Machine: {nproc} CPUs ({cpu_model}), Linux {kernel}, {git}, libgit2 \
         {major}.{minor}.{rev}, {rustc}; CLK_TCK {clk_tck}. Load average (1, 5, 15 min) \
         {load_before} before, {load_after} after.\n"
    );
    let _ = writeln!(
        out,
        "Workload: {w} identifiers, each its own repository on 3 mirrors (127.0.0.71-73), \
         waiting for {} commits ({w} events of 2 commits, one on mirror i%3, one on mirror \
         (i+1)%3, a common base everywhere); URLs rotated so the first is in turn the holder of \
         the first commit, of the second, and of neither. Fresh empty targets for every run. \
         Round trips above 0 through a `DelayProxy` per mirror{}. {} rounds, setups and \
         methods in rotated order; medians, with min-max.",
        2 * w,
        if params.handshake {
            ", which charges each new connection a round trip for its handshake"
        } else {
            ", no handshake charged"
        },
        params.runs
    );
    let mut goals = Vec::new();
    for setup in params.setups() {
        let _ = writeln!(out, "\n### {}\n", setup.title());
        let requests_head = match setup.transport {
            Transport::Git => "upload-pack requests",
            Transport::Http => "HTTP requests (GET info/refs + POST upload-pack)",
        };
        let _ = writeln!(
            out,
            "| method | wall | wall min-max | wall less sync delay | client CPU | CPU min-max | \
             of which children | {requests_head} | fetch calls (failed) | server CPU, not \
             counted | others' CPU meanwhile |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for method in Method::ALL {
            let Some(runs) = samples.get(&(setup, method)) else {
                continue;
            };
            let walls: Vec<f64> = runs.iter().map(|x| secs(x.wall)).collect();
            let cpus: Vec<f64> = runs.iter().map(|x| secs(x.cpu())).collect();
            let (wall, cpu) = (median(walls.clone()), median(cpus.clone()));
            let (wall_lo, wall_hi) = min_max(&walls);
            let (cpu_lo, cpu_hi) = min_max(&cpus);
            let less_sync = if method == Method::Engine {
                format!("{:.2} s", wall - secs(SYNC_DELAY))
            } else {
                "-".to_owned()
            };
            let children = median(runs.iter().map(|x| secs(x.children)).collect());
            let requests = median_counts(runs).show(setup.transport);
            let calls = median(runs.iter().map(|x| x.calls as f64).collect());
            let failed = median(runs.iter().map(|x| x.failed as f64).collect());
            let server = median(runs.iter().map(|x| secs(x.server)).collect());
            let others = median(runs.iter().map(|x| secs(x.others)).collect());
            let _ = writeln!(
                out,
                "| {} | {wall:.2} s | {wall_lo:.2}-{wall_hi:.2} s | {less_sync} | {cpu:.2} s \
                 | {cpu_lo:.2}-{cpu_hi:.2} s | {children:.2} s | {requests} | {calls} ({failed}) \
                 | {server:.2} s | {others:.2} s |",
                method.label(params.parallel)
            );
        }
        let other: u64 = samples
            .iter()
            .filter(|((s, _), _)| *s == setup)
            .flat_map(|(_, runs)| runs.iter().map(|x| x.requests.http_other))
            .sum();
        if other > 0 {
            let _ = writeln!(
                out,
                "\n{other} HTTP requests to other paths than info/refs and git-upload-pack, \
                 counted in the totals."
            );
        }
        let line = Goals::of(setup, samples);
        let _ = writeln!(out, "\n{}", line.sentence(setup));
        goals.push((setup, line));
    }

    let _ = writeln!(out, "\n### Goals of issue 16\n");
    let _ = writeln!(
        out,
        "| setup | engine ÷ floor-libgit2, requests (≤ {GOAL_REQUESTS}) | engine less sync \
         delay ÷ floor-libgit2, wall (≤ {GOAL_WALL}) | git CLI {} at a time ÷ engine, wall (≥ \
         {GOAL_CLI} at 100 ms) |",
        params.parallel
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for (setup, line) in &goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            setup.name(),
            show_ratio(line.requests, GOAL_REQUESTS, false),
            show_ratio(line.wall, GOAL_WALL, false),
            match line.cli {
                Some(r) if setup.rtt_ms != 100 => format!("{r:.2}"),
                cli => show_ratio(cli, GOAL_CLI, true),
            }
        );
    }
    let _ = writeln!(
        out,
        "\nClient CPU is this process (every thread) plus the children it waited for (`git \
         fetch` and its own children); the servers and proxies run in a process of their own, \
         whose CPU (with the daemons, `upload-pack` and `http-backend` processes) is shown \
         apart and counted for no method; they run on the same CPUs. Requests are counted by \
         the servers: the daemons' \"Request upload-pack\" log lines, the HTTP servers' \
         request logs. Fetch calls are `git fetch` processes, libgit2 fetches, or for the \
         engine its fetch jobs (one URL each, which may hold several requests when a server \
         lacks an id). Others' CPU is the machine's busy time (`/proc/stat`) minus client and \
         server: work of other processes during the run. Wall less sync delay is the engine's \
         wall time less its 500 ms sync delay, a wait no other method makes."
    );
    out
}

/// The goals' ratios in one setup, of medians; `None` where a method did not run.
struct Goals {
    /// Engine requests ÷ floor-libgit2 requests.
    requests: Option<f64>,
    /// Engine wall less the sync delay ÷ floor-libgit2 wall.
    wall: Option<f64>,
    /// cli-par wall ÷ engine wall.
    cli: Option<f64>,
}

impl Goals {
    fn of(setup: Setup, samples: &BTreeMap<(Setup, Method), Vec<Sample>>) -> Goals {
        let runs = |method| samples.get(&(setup, method)).filter(|r| !r.is_empty());
        let wall = |method| runs(method).map(|r| median(r.iter().map(|x| secs(x.wall)).collect()));
        let requests = |method| {
            runs(method).map(|r| {
                median(
                    r.iter()
                        .map(|x| x.requests.total(setup.transport) as f64)
                        .collect(),
                )
            })
        };
        let engine_wall = wall(Method::Engine);
        let floor_wall = wall(Method::FloorLibgit2);
        Goals {
            requests: requests(Method::Engine)
                .zip(requests(Method::FloorLibgit2))
                .map(|(e, f)| e / f),
            wall: engine_wall
                .zip(floor_wall)
                .map(|(e, f)| (e - secs(SYNC_DELAY)) / f),
            cli: wall(Method::CliParallel)
                .zip(engine_wall)
                .map(|(c, e)| c / e),
        }
    }

    fn sentence(&self, setup: Setup) -> String {
        let mut parts = Vec::new();
        if let Some(r) = self.requests {
            parts.push(format!(
                "engine ÷ floor-libgit2, requests: {}",
                show_ratio(Some(r), GOAL_REQUESTS, false)
            ));
        }
        if let Some(r) = self.wall {
            parts.push(format!(
                "engine less sync delay ÷ floor-libgit2, wall: {}",
                show_ratio(Some(r), GOAL_WALL, false)
            ));
        }
        if let Some(r) = self.cli {
            let goal = if setup.rtt_ms == 100 {
                show_ratio(Some(r), GOAL_CLI, true)
            } else {
                format!("{r:.2}")
            };
            parts.push(format!("git CLI in parallel ÷ engine, wall: {goal}"));
        }
        if parts.is_empty() {
            "Goals: not measured (they need the engine, floor-libgit2 and cli-par).".to_owned()
        } else {
            format!("Goals: {}.", parts.join("; "))
        }
    }
}

/// `ratio` to two places, with whether it meets `goal` (at least it when `at_least`, else at
/// most it).
fn show_ratio(ratio: Option<f64>, goal: f64, at_least: bool) -> String {
    match ratio {
        None => "-".to_owned(),
        Some(r) => {
            let met = if at_least { r >= goal } else { r <= goal };
            format!("{r:.2} ({})", if met { "met" } else { "**not met**" })
        }
    }
}

/// The median of each count over `runs`.
fn median_counts(runs: &[Sample]) -> Counts {
    let of = |f: fn(&Counts) -> u64| {
        median(runs.iter().map(|x| f(&x.requests) as f64).collect()).round() as u64
    };
    Counts {
        upload_pack: of(|c| c.upload_pack),
        info_refs: of(|c| c.info_refs),
        http_upload_pack: of(|c| c.http_upload_pack),
        http_other: of(|c| c.http_other),
    }
}
