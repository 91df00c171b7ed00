//! End to end on loopback: the engine against the `git fetch` method it replaces.
//!
//! Workload: `E2E_IDENTIFIERS` identifiers (default 300), each its own repository on three
//! mirrors served by `git daemon` on 127.0.0.71, .72 and .73 (three domains). Every repository
//! has the same base commit on every mirror; identifier `i` then waits for two commits, `A` on
//! mirror `i % 3` only and `B` on mirror `(i + 1) % 3` only, so the third mirror has neither.
//! Its one event lists the three mirrors' URLs in cyclic order starting at mirror `2i % 3`,
//! so the first URL is in turn the holder of `A`, the holder of `B` and the mirror with
//! neither: it always lacks at least one of the two.
//!
//! Methods, each from fresh, empty local bare repositories (created before the clock starts):
//!
//! - `engine`: an `Engine` with the default settings (8 workers, 1 s tick, 500 ms sync
//!   delay, `Origin::Sync`) but per-domain limits that do not bind
//!   (`testkit::loopback_engine`); submit every event, wait until every one is released.
//! - `cli`: what relays do today, one identifier after another: for each URL in order, one
//!   `git fetch <url> <missing ids...>` subprocess into the target repository, until every id
//!   is present (checked in-process with libgit2 after each fetch). A server that lacks one of
//!   the ids fails the whole fetch ("not our ref"); then each missing id is fetched on its own
//!   from that URL.
//! - `cli-par`: the same, 8 identifiers at a time (8 threads taking identifiers from one list).
//! - `floor`: knowing where each object is: one `git fetch <mirror> <its id>` per (identifier,
//!   mirror holding something), no failed fetch, 8 identifiers at a time.
//!
//! Each round runs every method once, the order rotated from round to round; `E2E_RUNS`
//! rounds (default 5). Wall time runs from the first submit (or fetch) until the last event is
//! released (or the last fetch returns). CPU time is this process's user + system time (all
//! its threads: the engine's scheduler and workers) plus that of the children it waited for
//! (`git fetch` and the `git index-pack` / `git maintenance` it runs), from `/proc/self/stat`.
//! The servers' CPU is not counted for any method: `git daemon` and its `upload-pack`
//! processes are reaped by the daemon, which runs until the end. After every run of every
//! method every wanted object must be in the targets, or the bench panics instead of reporting
//! a time. Every wait is bounded.
//!
//! Run with `cargo bench --bench e2e`. Environment: `E2E_IDENTIFIERS`, `E2E_RUNS`,
//! `E2E_METHODS` (comma-separated, from `engine,cli,cli-par,floor`), `E2E_PARALLEL` (threads of
//! `cli-par` and `floor`, default 8), `E2E_RUN_TIMEOUT_SECS` (bound on one run, default 600),
//! `RUST_LOG` (the engine's and the daemons' logs on stderr). The report (Markdown) goes to
//! stdout, progress to stderr.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use purgatory_sync::testkit::{self, GitDaemon};
use purgatory_sync::{ObjectId, Origin, Outcome, PendingEvent};

/// The mirrors' loopback addresses: three domains, away from the tests' 127.0.0.2-60.
const MIRROR_HOSTS: [u8; 3] = [71, 72, 73];
/// Longest one `git fetch` may run before the watchdog kills it (and the bench panics).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The test kit's `log` target, which carries the daemons' `--verbose` logs.
const TESTKIT_TARGET: &str = "purgatory_sync::testkit";

fn main() {
    // The process's first libgit2 call, before any other thread exists (see the crate docs).
    testkit::loopback_engine()
        .build()
        .expect("a first engine initialises libgit2")
        .shutdown()
        .expect("the first engine shuts down");
    let counter = RequestCounter::install();
    let params = Params::from_env();
    let clk_tck = clock_ticks();

    eprintln!(
        "e2e: building {} repositories on 3 mirrors",
        params.identifiers
    );
    let root = tempfile::tempdir().expect("a temporary directory");
    let workload = Workload::build(root.path(), params.identifiers);
    let watchdog = Watchdog::start();
    let git = Git {
        watchdog: watchdog.clone(),
        processes: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };

    let load_before = common::loadavg();
    let mut samples: BTreeMap<Method, Vec<Sample>> = BTreeMap::new();
    for round in 0..params.runs {
        let mut order = params.methods.clone();
        let n = order.len();
        order.rotate_left(round % n);
        for method in order {
            let dir = tempfile::tempdir_in(root.path()).expect("a run directory");
            let targets = workload.fresh_targets(dir.path());
            let requests_before = counter.settled();
            let server_before = server_cpu_ticks();
            let machine_before = machine_ticks();
            let load = common::loadavg();
            let (wall, cpu, calls) = match method {
                Method::Engine => measure(clk_tck, || run_engine(&params, &workload, &targets)),
                Method::Cli => measure(clk_tck, || run_cli(&git, &params, &workload, &targets, 1)),
                Method::CliParallel => measure(clk_tck, || {
                    run_cli(&git, &params, &workload, &targets, params.parallel)
                }),
                Method::Floor => measure(clk_tck, || run_floor(&git, &params, &workload, &targets)),
            };
            let requests = counter.settled() - requests_before;
            let machine_after = machine_ticks();
            let server = ticks(clk_tck, server_cpu_ticks() - server_before);
            let busy = ticks(clk_tck, machine_after.0 - machine_before.0);
            let steal = ticks(clk_tck, machine_after.1 - machine_before.1);
            workload.verify(method, &targets);
            let sample = Sample {
                wall,
                own: cpu.0,
                children: cpu.1,
                requests,
                server,
                // Counted over the settling pauses too; the bench's own idle threads are noise.
                others: busy.saturating_sub(cpu.0 + cpu.1 + server),
                steal,
                calls: calls.0,
                failed: calls.1,
            };
            eprintln!(
                "round {}/{} {:<8} wall {:>7.2} s  cpu {:>7.2} s (children {:>6.2} s)  \
                 server {:>6.2} s  others {:>5.2} s  steal {:>5.2} s  upload-packs {:>5}  \
                 calls {:>5} ({} failed)  load {load}",
                round + 1,
                params.runs,
                method.name(),
                secs(sample.wall),
                secs(sample.cpu()),
                secs(sample.children),
                secs(sample.server),
                secs(sample.others),
                secs(sample.steal),
                sample.requests,
                sample.calls,
                sample.failed,
            );
            samples.entry(method).or_default().push(sample);
        }
    }
    let load_after = common::loadavg();
    watchdog.stop();
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
    Cli,
    CliParallel,
    Floor,
}

impl Method {
    const ALL: [Method; 4] = [
        Method::Engine,
        Method::Cli,
        Method::CliParallel,
        Method::Floor,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Engine => "engine",
            Method::Cli => "cli",
            Method::CliParallel => "cli-par",
            Method::Floor => "floor",
        }
    }

    fn label(self, parallel: usize) -> String {
        match self {
            Method::Engine => "engine (defaults, 8 workers)".to_owned(),
            Method::Cli => "git CLI, one identifier at a time".to_owned(),
            Method::CliParallel => format!("git CLI, {parallel} identifiers at a time"),
            Method::Floor => {
                format!("floor: git CLI, known locations, {parallel} at a time")
            }
        }
    }
}

struct Params {
    identifiers: usize,
    runs: usize,
    methods: Vec<Method>,
    parallel: usize,
    run_timeout: Duration,
}

impl Params {
    fn from_env() -> Params {
        let number = |name: &str, default: usize| -> usize {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                Err(_) => default,
            }
        };
        let methods = match std::env::var("E2E_METHODS") {
            Ok(list) => list
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| {
                    *Method::ALL
                        .iter()
                        .find(|x| x.name() == m)
                        .unwrap_or_else(|| panic!("E2E_METHODS: unknown method {m:?}"))
                })
                .collect(),
            Err(_) => Method::ALL.to_vec(),
        };
        let params = Params {
            identifiers: number("E2E_IDENTIFIERS", 300),
            runs: number("E2E_RUNS", 5),
            methods,
            parallel: number("E2E_PARALLEL", 8),
            run_timeout: Duration::from_secs(number("E2E_RUN_TIMEOUT_SECS", 600) as u64),
        };
        assert!(params.identifiers > 0, "E2E_IDENTIFIERS must be at least 1");
        assert!(params.runs > 0, "E2E_RUNS must be at least 1");
        assert!(params.parallel > 0, "E2E_PARALLEL must be at least 1");
        assert!(!params.methods.is_empty(), "E2E_METHODS names no method");
        params
    }
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
    /// The three mirrors' URLs, in the event's order.
    urls: Vec<String>,
}

/// The mirrors (kept running for the whole bench) and the identifiers.
struct Workload {
    daemons: Vec<GitDaemon>,
    identifiers: Vec<Identifier>,
}

impl Workload {
    fn build(root: &Path, count: usize) -> Workload {
        let bases: Vec<PathBuf> = (0..MIRROR_HOSTS.len())
            .map(|m| root.join(format!("mirror{m}")))
            .collect();
        let library = "pub fn answer() -> u32 {\n    42\n}\n".repeat(20);
        let mut built = Vec::with_capacity(count);
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
            let ids = ids.map(|id| id.expect("each commit is on one mirror"));
            built.push((path, holders, ids));
        }
        let daemons: Vec<GitDaemon> = MIRROR_HOSTS
            .iter()
            .zip(&bases)
            .map(|(host, base)| {
                GitDaemon::start(Ipv4Addr::new(127, 0, 0, *host), base).expect("git daemon")
            })
            .collect();
        let identifiers = built
            .into_iter()
            .enumerate()
            .map(|(i, (path, holders, ids))| {
                let start = (2 * i) % 3;
                let urls = (0..3)
                    .map(|k| daemons[(start + k) % 3].url(&path))
                    .collect();
                Identifier {
                    name: format!("bench/ident-{i:05}"),
                    path,
                    ids,
                    holders,
                    urls,
                }
            })
            .collect();
        Workload {
            daemons,
            identifiers,
        }
    }

    /// New empty bare repositories under `dir`, one per identifier, in the identifiers' order.
    fn fresh_targets(&self, dir: &Path) -> Vec<PathBuf> {
        self.identifiers
            .iter()
            .map(|id| testkit::init_bare(&dir.join(&id.path)))
            .collect()
    }

    /// Panics unless every wanted object is in its target.
    fn verify(&self, method: Method, targets: &[PathBuf]) {
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
            "{}: {} of {} wanted objects are missing after the run, first: {:?}",
            method.name(),
            missing.len(),
            2 * targets.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

/// The ids of `ids` not in the repository at `target`.
fn missing(target: &Path, ids: &[ObjectId]) -> Vec<ObjectId> {
    ids.iter()
        .copied()
        .filter(|oid| !testkit::has_object(target, *oid))
        .collect()
}

/// One run of one method.
struct Sample {
    wall: Duration,
    /// This process's CPU time (every thread).
    own: Duration,
    /// CPU time of the children waited for during the run.
    children: Duration,
    /// `upload-pack` requests the daemons logged.
    requests: u64,
    /// The daemons' CPU time (not charged to the method).
    server: Duration,
    /// CPU time of everything else on the machine meanwhile: other people's work.
    others: Duration,
    /// CPU time the hypervisor gave to other guests meanwhile.
    steal: Duration,
    /// `git fetch` processes, or the engine's fetch jobs (one URL each).
    calls: u64,
    /// How many of those failed.
    failed: u64,
}

impl Sample {
    fn cpu(&self) -> Duration {
        self.own + self.children
    }
}

/// Runs `f`, returning its wall time, the CPU time it cost this process and its waited-for
/// children, and its result.
fn measure<T>(clk_tck: u64, f: impl FnOnce() -> T) -> (Duration, (Duration, Duration), T) {
    let before = cpu_ticks();
    let started = Instant::now();
    let result = f();
    let wall = started.elapsed();
    let after = cpu_ticks();
    (
        wall,
        (
            ticks(clk_tck, after.0 - before.0),
            ticks(clk_tck, after.1 - before.1),
        ),
        result,
    )
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

/// CPU time (clock ticks) of the git daemons, with the connection handlers and `upload-pack`
/// processes they have reaped: the server side, which no method is charged for. The daemons
/// are the children of the test kit's watchdog shells, which are this process's children.
fn server_cpu_ticks() -> u64 {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let all: Vec<(u32, ProcStat)> = dir
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((pid, proc_stat(&e.path().join("stat"))?))
        })
        .collect();
    let shells: HashSet<u32> = all
        .iter()
        .filter(|(_, s)| s.ppid == me)
        .map(|(pid, _)| *pid)
        .collect();
    all.iter()
        .filter(|(_, s)| shells.contains(&s.ppid))
        .map(|(_, s)| s.own + s.children)
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails, as on every Linux).
fn clock_ticks() -> u64 {
    command_line("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// The engine: submit every event, wait until every one is released. Returns the fetch jobs
/// started and failed.
fn run_engine(params: &Params, workload: &Workload, targets: &[PathBuf]) -> (u64, u64) {
    let engine = testkit::loopback_engine()
        .build()
        .expect("the engine builds");
    let outcomes = engine.outcomes();
    let deadline = Instant::now() + params.run_timeout;
    for (i, (id, target)) in workload.identifiers.iter().zip(targets).enumerate() {
        let event = PendingEvent {
            id: format!("event-{i:05}"),
            identifier: id.name.clone(),
            repo: target.clone(),
            oids: id.ids.iter().map(ObjectId::to_string).collect(),
            clone_urls: id.urls.clone(),
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
    while released.len() < workload.identifiers.len() {
        match outcomes.recv_deadline(deadline) {
            Ok(Outcome::Released { event_id, .. }) => {
                assert!(released.insert(event_id.clone()), "{event_id} twice");
            }
            Ok(other) => panic!("engine: unexpected outcome {other:?}"),
            Err(e) => panic!(
                "engine: {} of {} events released after {:?} ({e}); stats: {:#?}",
                released.len(),
                workload.identifiers.len(),
                params.run_timeout,
                engine.stats()
            ),
        }
    }
    let stats = engine.stats();
    engine.shutdown().expect("the engine shuts down");
    (stats.fetches_started, stats.fetches_failed)
}

/// The git command-line method, `threads` identifiers at a time. Returns the `git fetch`
/// processes run and failed during the run.
fn run_cli(
    git: &Git,
    params: &Params,
    workload: &Workload,
    targets: &[PathBuf],
    threads: usize,
) -> (u64, u64) {
    let counts = git.counts();
    let deadline = Instant::now() + params.run_timeout;
    in_parallel(threads, workload.identifiers.len(), deadline, |i| {
        let (id, target) = (&workload.identifiers[i], &targets[i]);
        for url in &id.urls {
            let wanted = missing(target, &id.ids);
            if wanted.is_empty() {
                break;
            }
            // The server refuses the whole fetch if it lacks one id: ask for each on its own.
            if !git.fetch(target, url, &wanted) && wanted.len() > 1 {
                for oid in &wanted {
                    git.fetch(target, url, &[*oid]);
                }
            }
        }
    });
    git.since(counts)
}

/// The floor: each object fetched from the mirror that has it, nothing else.
fn run_floor(git: &Git, params: &Params, workload: &Workload, targets: &[PathBuf]) -> (u64, u64) {
    let counts = git.counts();
    let deadline = Instant::now() + params.run_timeout;
    in_parallel(params.parallel, workload.identifiers.len(), deadline, |i| {
        let (id, target) = (&workload.identifiers[i], &targets[i]);
        for (oid, holder) in id.ids.iter().zip(id.holders) {
            let url = workload.daemons[holder].url(&id.path);
            assert!(
                git.fetch(target, &url, &[*oid]),
                "floor: fetching {oid} from {url} failed"
            );
        }
    });
    git.since(counts)
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

/// The Markdown report: machine, parameters, the table.
fn report(
    params: &Params,
    clk_tck: u64,
    samples: &BTreeMap<Method, Vec<Sample>>,
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
    let _ = writeln!(
        out,
        "\n## End to end on loopback (`cargo bench --bench e2e`)\n"
    );
    let _ = writeln!(
        out,
        "Machine: {nproc} CPUs ({cpu_model}), Linux {kernel}, {git}, libgit2 \
         {major}.{minor}.{rev}, {rustc}; CLK_TCK {clk_tck}. Load average (1, 5, 15 min) \
         {load_before} before, {load_after} after.\n"
    );
    let _ = writeln!(
        out,
        "Workload: {w} identifiers, each its own repository on 3 mirrors (`git daemon` on \
         127.0.0.71-73), waiting for {} commits ({w} events of 2 commits, one on mirror i%3, \
         one on mirror (i+1)%3, a common base everywhere); URLs rotated so the first is in turn \
         the holder of the first commit, of the second, and of neither. Fresh empty targets \
         for every run. {} rounds, methods in rotated order; medians, with min-max.\n",
        2 * w,
        params.runs
    );
    let _ = writeln!(
        out,
        "| method | wall | wall min-max | CPU | CPU min-max | of which children | engine ÷ \
         method, wall | engine ÷ method, CPU | upload-pack requests | fetch calls (failed) | server \
         CPU, not counted | others' CPU meanwhile |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let medians = |s: &[Sample]| {
        (
            median(s.iter().map(|x| secs(x.wall)).collect()),
            median(s.iter().map(|x| secs(x.cpu())).collect()),
        )
    };
    let engine = samples.get(&Method::Engine).map(|s| medians(s));
    for (method, runs) in samples {
        let (wall, cpu) = medians(runs);
        let walls: Vec<f64> = runs.iter().map(|x| secs(x.wall)).collect();
        let cpus: Vec<f64> = runs.iter().map(|x| secs(x.cpu())).collect();
        let children = median(runs.iter().map(|x| secs(x.children)).collect());
        let (wall_lo, wall_hi) = min_max(&walls);
        let (cpu_lo, cpu_hi) = min_max(&cpus);
        let ratio = |engine: f64, this: f64| format!("{:.2}", engine / this);
        let (wall_ratio, cpu_ratio) = match engine {
            Some(_) if *method == Method::Engine => ("1".to_owned(), "1".to_owned()),
            Some((ew, ec)) => (ratio(ew, wall), ratio(ec, cpu)),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let requests = median(runs.iter().map(|x| x.requests as f64).collect());
        let calls = median(runs.iter().map(|x| x.calls as f64).collect());
        let failed = median(runs.iter().map(|x| x.failed as f64).collect());
        let server = median(runs.iter().map(|x| secs(x.server)).collect());
        let others = median(runs.iter().map(|x| secs(x.others)).collect());
        let _ = writeln!(
            out,
            "| {} | {wall:.2} s | {wall_lo:.2}-{wall_hi:.2} s | {cpu:.2} s | {cpu_lo:.2}-{cpu_hi:.2} s \
             | {children:.2} s | {wall_ratio} | {cpu_ratio} | {requests} | {calls} ({failed}) \
             | {server:.2} s | {others:.2} s |",
            method.label(params.parallel)
        );
    }
    let _ = writeln!(
        out,
        "\nCPU is the client side only: this process (every thread) plus the children it \
         waited for (`git fetch` and its own children); the git daemons' CPU is not counted for \
         any method (it is shown apart: the daemons with the connection handlers and \
         `upload-pack` processes they reaped; they run on the same CPUs). Upload-pack requests are counted from the daemons' logs. Fetch calls are \
         `git fetch` processes, or for the engine its fetch jobs (one URL each, which may \
         hold several requests when a server lacks an id). Others' CPU is the machine's busy time \
         (`/proc/stat`) minus client and server: work of other processes during the run."
    );
    out
}
