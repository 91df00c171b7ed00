//! Concurrency stress: 8 host threads submit, cancel and announce pushes for 10 000 events over
//! 500 identifiers while the engine fetches from loopback mirrors that are slow, flaky or
//! incomplete; then the engine is shut down with fetches hanging.
//!
//! The mirrors (one domain each, 127.0.0.91-96, each with its own `domain_override` cap; the
//! daemons behind the `git://` proxies listen on 127.0.0.90 and 127.0.0.97):
//!
//! | site | server | behaviour | cap |
//! |---|---|---|---|
//! | slow | `FaultyTcpServer` → full daemon | `TcpFault::Drip` at 2500 B/s: fetches take ~0.5 s and finish | 2 |
//! | flaky-http | `HttpGitServer` | cycles healthy / `CloseMidPack` / healthy / `Hang` | 3 |
//! | flaky-git | `FaultyTcpServer` → full daemon | cycles healthy / `CloseMidPack` / healthy / `Hang` | 2 |
//! | lacking | `FaultyTcpServer` → partial daemon | lacks every tip, and a third of the chains | 2 |
//! | http | `HttpGitServer` | healthy | 3 |
//! | git | `FaultyTcpServer` → full daemon | healthy | 3 |
//!
//! One identifier in ten is *mirrored*: its events wait for commits of its chain on the
//! mirrors, and one in ten of those also has events waiting for an object that exists nowhere
//! or for a push that never comes (they expire). The other identifiers' events are
//! `Origin::User` events whose object the test writes into the local repository itself (a
//! user's push) before calling `git_data_arrived`; later events of the same identifier may wait
//! for an object already pushed (`AlreadySatisfied`) or about to be, or for one that a later
//! event's push brings seconds after (so the engine holds thousands of events at once). Each local repository is
//! shared by one mirrored identifier and nine pushing ones, and half of the mirrored
//! identifiers send half of their events to a second repository, another mirrored
//! identifier's, so that both "one fetch per identifier" and "one fetch per repository" have
//! something to hold back. The host threads also cancel events (at once, or later from another
//! thread), re-submit waiting ones, cancel unknown ids, announce pushes that brought nothing,
//! and submit invalid events.
//!
//! Checked at the end, each from its own evidence:
//! - every `Pending` event got exactly one outcome, a cancelled one at most one, and the engine's
//!   `Stats` agree with what the host saw (submitted, released, expired, cancelled, already
//!   satisfied, refused, fetches started, succeeded and failed, per domain too);
//! - every released event's objects are in its repository;
//! - events whose objects exist ended released, events waiting for an object nowhere expired
//!   (unless cancelled);
//! - a fetcher wrapped around `GitFetcher` never saw two fetches at once for one identifier or
//!   into one repository, nor a temporary-ref clean-up in a repository during a fetch there;
//! - the servers' own request logs never show more fetches in progress on a domain than its
//!   cap;
//! - shutdown with fetches hanging returns `Ok` within `shutdown_timeout` plus a margin, with no
//!   fetch left running.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use purgatory_sync::{
    domain_of, Admission, DomainLimits, Engine, FetchControl, FetchError, FetchReport,
    FetchRequest, Fetcher, GitFetcher, ObjectId, Origin, Outcome, PendingEvent, RefUpdate,
};
use purgatory_sync_testkit::{
    self as testkit, Fault, FaultTarget, FaultyTcpServer, GitDaemon, HttpGitServer, RequestRecord,
    TcpFault,
};

const EVENTS: usize = 10_000;
const IDENTIFIERS: usize = 500;
const HOST_THREADS: usize = 8;
/// Local repositories, shared by the identifiers (`home_repo`).
const LOCAL_REPOS: usize = 50;
/// Mirrored identifiers' chains live on branches of this many served repositories.
const SERVED_REPOS: usize = 10;
/// Commits per chain on the full mirrors; the lacking mirror has all but the last.
const CHAIN: usize = 2;
/// Event `e` is not submitted before `e * PACE` after the start: 10 s of submissions at best.
const PACE: Duration = Duration::from_millis(1);
/// Events whose objects exist are released within 5 s here, 13 s under AddressSanitizer.
const LIFETIME: Duration = Duration::from_secs(25);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack on top of `SHUTDOWN_TIMEOUT` for a loaded 2-core machine. Their sum is below the
/// fetch deadline, so a shutdown that waited for fetches instead of cancelling them fails.
const SHUTDOWN_MARGIN: Duration = Duration::from_millis(1500);
/// Bounds the wait after the submissions: every event expires `LIFETIME` after the last one.
const DRAIN_LIMIT: Duration = Duration::from_secs(50);
/// Events submitted after the main phase, aimed at hanging servers, to be in flight at shutdown.
const LATE: usize = 12;
const SEED: u64 = 0x5eed_0f57_2e55;

const FULL_DAEMON: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 90);
const PARTIAL_DAEMON: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 97);

/// The sites, in the order of `Mirrors::sites`.
const SLOW: usize = 0;
const FLAKY_HTTP: usize = 1;
const FLAKY_GIT: usize = 2;
const LACKING: usize = 3;
const HTTP: usize = 4;
const GIT: usize = 5;
/// (name, address, cap) of each site.
const SITES: [(&str, Ipv4Addr, usize); 6] = [
    ("slow", Ipv4Addr::new(127, 0, 0, 91), 2),
    ("flaky-http", Ipv4Addr::new(127, 0, 0, 92), 3),
    ("flaky-git", Ipv4Addr::new(127, 0, 0, 93), 2),
    ("lacking", Ipv4Addr::new(127, 0, 0, 94), 2),
    ("http", Ipv4Addr::new(127, 0, 0, 95), 3),
    ("git", Ipv4Addr::new(127, 0, 0, 96), 3),
];
/// The clone URLs of identifier `i` are the sites of `URL_PATTERNS[(i / 10 + i) % 6]`, in
/// order (only the first and the last for identifiers that keep retrying). The first and the
/// last site of each pattern include a full mirror, so every chain commit can be had.
const URL_PATTERNS: [&[usize]; 6] = [
    &[LACKING, SLOW, HTTP],
    &[FLAKY_HTTP, GIT],
    &[SLOW, FLAKY_GIT, HTTP],
    &[FLAKY_GIT, LACKING, GIT],
    &[HTTP, FLAKY_HTTP],
    &[LACKING, FLAKY_HTTP, SLOW, GIT],
];

/// splitmix64 of `seed` and `n`: the test's only source of randomness, so a run is repeatable
/// up to thread timing.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn identifier_name(i: usize) -> String {
    format!("id{i:03}")
}

/// Mirrored identifiers have their objects on the mirrors.
fn mirrored(i: usize) -> bool {
    i % 10 == 0
}

/// Mirrored identifiers that also wait for objects nowhere.
fn ghostly(i: usize) -> bool {
    i % 100 == 0
}

/// The local repository of identifier `i`: each is shared by one mirrored identifier and nine
/// others.
fn home_repo(i: usize) -> usize {
    (i / 10 + (i % 10) * 5) % LOCAL_REPOS
}

/// The path of identifier `i`'s repository on every mirror: for a mirrored identifier a link
/// to the served repository that holds its chain, otherwise a repository no mirror has. One
/// path per identifier lets the servers' logs be matched to the fetches.
fn served_name(i: usize) -> String {
    format!("r{i}.git")
}

/// Creates the served repository `k` under `base` with the first `len(i)` commits of the chain
/// of every mirrored identifier `i` it holds (on branch `b<i>`), and the links to it. Returns
/// (identifier, chain) for each; the same calls give the same ids on every mirror.
fn serve_chains(
    base: &Path,
    k: usize,
    len: impl Fn(usize) -> usize,
) -> Vec<(usize, Vec<ObjectId>)> {
    let repo = testkit::served_repo(base, &format!("s{k}.git"));
    (0..IDENTIFIERS)
        .filter(|i| mirrored(*i) && (i / 10) % SERVED_REPOS == k)
        .map(|i| {
            std::os::unix::fs::symlink(format!("s{k}.git"), base.join(served_name(i)))
                .expect("link to the served repository");
            let chain = (0..len(i))
                .map(|c| {
                    let data = format!("{i}-{c}");
                    let msg = format!("c{c}");
                    testkit::commit(&repo, &format!("b{i}"), &[("f", data.as_bytes())], &msg)
                })
                .collect();
            (i, chain)
        })
        .collect()
}

/// The blob a user's push of event `id` brings.
fn push_data(id: &str) -> Vec<u8> {
    format!("pushed for {id}\n").into_bytes()
}

/// Runs `f(i)` for every `i` in `0..n` on `threads` threads; results in index order.
fn par_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<(usize, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| (i, f(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("fixture thread"))
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

// ---------------------------------------------------------------------------------------------
// The watching fetcher.

/// One fetch as the wrapped fetcher saw it.
#[derive(Debug, Clone)]
struct Span {
    site_domain: String,
    served: String,
    start: Instant,
    end: Option<Instant>,
    /// How the fetch ended, from its report: the class the engine's counters must give it.
    ended: Option<Ended>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Ok,
    /// An error, but some of the wanted objects are present.
    Partial,
    Failed,
}

#[derive(Default)]
struct WatchState {
    identifiers: HashMap<String, usize>,
    repos: HashMap<PathBuf, usize>,
    domains: HashMap<String, usize>,
    most_per_domain: HashMap<String, usize>,
    spans: Vec<Span>,
    violations: Vec<String>,
}

/// Delegates every call to `GitFetcher` and records what the engine promises not to do:
/// two fetches at once for one identifier or into one repository, and touching a repository's
/// refs while a fetch runs in it.
#[derive(Default)]
struct Watch {
    inner: GitFetcher,
    state: Mutex<WatchState>,
}

impl Watch {
    fn state(&self) -> MutexGuard<'_, WatchState> {
        lock(&self.state)
    }

    fn refs_touched(&self, what: &str, repo: &Path) {
        let mut st = self.state();
        if st.repos.get(repo).copied().unwrap_or(0) > 0 {
            let msg = format!("{what} in {} during a fetch there", repo.display());
            st.violations.push(msg);
        }
    }
}

/// Ends a fetch in the watch when dropped; a fetch that panicked is a violation too.
struct FetchEnd<'a> {
    watch: &'a Watch,
    request: &'a FetchRequest,
    span: usize,
}

impl Drop for FetchEnd<'_> {
    fn drop(&mut self) {
        let mut guard = self.watch.state();
        let st = &mut *guard;
        st.spans[self.span].end = Some(Instant::now());
        let r = self.request;
        *st.identifiers.get_mut(&r.identifier).expect("counted") -= 1;
        *st.repos.get_mut(&r.repo).expect("counted") -= 1;
        let domain = &st.spans[self.span].site_domain;
        *st.domains.get_mut(domain).expect("counted") -= 1;
        if std::thread::panicking() {
            let msg = format!("the fetch of {} from {} panicked", r.identifier, r.url);
            st.violations.push(msg);
        }
    }
}

/// The engine owns its fetcher; the test keeps the other `Arc`.
struct Watched(Arc<Watch>);

impl Fetcher for Watched {
    fn fetch(&self, request: &FetchRequest, control: &FetchControl) -> FetchReport {
        let domain = domain_of(&request.url).unwrap_or_default();
        let served = request
            .url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let span = {
            let mut st = self.0.state();
            let n = st
                .identifiers
                .entry(request.identifier.clone())
                .or_default();
            *n += 1;
            if *n > 1 {
                let msg = format!("{n} fetches at once for identifier {}", request.identifier);
                st.violations.push(msg);
            }
            let n = st.repos.entry(request.repo.clone()).or_default();
            *n += 1;
            if *n > 1 {
                let msg = format!("{n} fetches at once into {}", request.repo.display());
                st.violations.push(msg);
            }
            let n = st.domains.entry(domain.clone()).or_default();
            *n += 1;
            let n = *n;
            let most = st.most_per_domain.entry(domain.clone()).or_default();
            *most = (*most).max(n);
            st.spans.push(Span {
                site_domain: domain,
                served,
                start: Instant::now(),
                end: None,
                ended: None,
            });
            st.spans.len() - 1
        };
        // Counted out even if the fetch panics (the engine turns a panic into a failure).
        let _out = FetchEnd {
            watch: &self.0,
            request,
            span,
        };
        let report = self.0.inner.fetch(request, control);
        self.0.state().spans[span].ended = Some(match &report.error {
            None => Ended::Ok,
            Some(_) if !report.present.is_empty() => Ended::Partial,
            Some(_) => Ended::Failed,
        });
        report
    }

    fn present(&self, repo: &Path, oids: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
        self.0.inner.present(repo, oids)
    }

    fn drop_temp_refs(&self, repo: &Path, oids: &[ObjectId]) -> Result<(), FetchError> {
        self.0.refs_touched("temporary refs dropped", repo);
        self.0.inner.drop_temp_refs(repo, oids)
    }

    fn apply_refs(
        &self,
        repo: &Path,
        updates: &[RefUpdate],
        replace_refs: bool,
    ) -> Result<(), FetchError> {
        self.0.refs_touched("refs written", repo);
        self.0.inner.apply_refs(repo, updates, replace_refs)
    }
}

// ---------------------------------------------------------------------------------------------
// The mirrors.

/// A server with a request log.
trait Logged {
    fn repo_url(&self, repo: &str) -> String;
    fn log(&self) -> Vec<RequestRecord>;
    fn idle_within(&self, timeout: Duration) -> bool;
}

impl Logged for HttpGitServer {
    fn repo_url(&self, repo: &str) -> String {
        self.url(repo)
    }
    fn log(&self) -> Vec<RequestRecord> {
        self.requests()
    }
    fn idle_within(&self, timeout: Duration) -> bool {
        self.wait_idle(timeout)
    }
}

impl Logged for FaultyTcpServer {
    fn repo_url(&self, repo: &str) -> String {
        self.url(repo)
    }
    fn log(&self) -> Vec<RequestRecord> {
        self.requests()
    }
    fn idle_within(&self, timeout: Duration) -> bool {
        self.wait_idle(timeout)
    }
}

struct Mirrors {
    _full: GitDaemon,
    _partial: GitDaemon,
    slow: FaultyTcpServer,
    flaky_http: HttpGitServer,
    flaky_git: FaultyTcpServer,
    lacking: FaultyTcpServer,
    http: HttpGitServer,
    git: FaultyTcpServer,
}

impl Mirrors {
    fn start(full_base: &Path, partial_base: &Path) -> Mirrors {
        let full = GitDaemon::start(FULL_DAEMON, full_base).expect("full daemon");
        let partial = GitDaemon::start(PARTIAL_DAEMON, partial_base).expect("partial daemon");
        let proxy = |site: usize, upstream: &GitDaemon, fault| {
            FaultyTcpServer::start(SITES[site].1, upstream.addr(), fault).expect(SITES[site].0)
        };
        let http = |site: usize| HttpGitServer::start(SITES[site].1, full_base).expect("http");
        Mirrors {
            slow: proxy(
                SLOW,
                &full,
                TcpFault::Drip {
                    bytes_per_sec: 2500,
                },
            ),
            flaky_http: http(FLAKY_HTTP),
            flaky_git: proxy(FLAKY_GIT, &full, TcpFault::None),
            lacking: proxy(LACKING, &partial, TcpFault::None),
            http: http(HTTP),
            git: proxy(GIT, &full, TcpFault::None),
            _full: full,
            _partial: partial,
        }
    }

    fn sites(&self) -> [&dyn Logged; 6] {
        [
            &self.slow,
            &self.flaky_http,
            &self.flaky_git,
            &self.lacking,
            &self.http,
            &self.git,
        ]
    }

    /// One step of the flaky sites' cycle: healthy, cut mid-pack, healthy, hanging.
    fn set_flaky(&self, step: usize) {
        match step % 4 {
            1 => {
                let cut = Fault::CloseMidPack { after_bytes: 120 };
                self.flaky_http.set_fault_on(FaultTarget::UploadPack, cut);
                let cut = TcpFault::CloseMidPack { after_bytes: 60 };
                self.flaky_git.set_fault(cut);
            }
            3 => {
                self.flaky_http.set_fault(Fault::Hang);
                self.flaky_git.set_fault(TcpFault::Hang);
            }
            _ => {
                self.flaky_http.set_fault(Fault::None);
                self.flaky_git.set_fault(TcpFault::None);
            }
        }
    }
}

/// Toggles the flaky sites until `stop`, at most `limit` steps; returns the steps taken.
fn toggle_flaky(mirrors: &Mirrors, stop: &AtomicBool, limit: usize) -> usize {
    const STEP: [Duration; 4] = [
        Duration::from_millis(700),
        Duration::from_millis(400),
        Duration::from_millis(700),
        Duration::from_millis(250),
    ];
    let mut steps = 0;
    while steps < limit && !stop.load(Ordering::SeqCst) {
        mirrors.set_flaky(steps);
        let until = Instant::now() + STEP[steps % 4];
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        steps += 1;
    }
    mirrors.set_flaky(0);
    steps
}

// ---------------------------------------------------------------------------------------------
// The plan: what every event waits for and what the host does with it.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Commits of its identifier's chain: on the mirrors.
    Mirror,
    /// A chain commit and an object nowhere: expires.
    Ghost,
    /// `Origin::User`; the host writes the object (a push) and calls `git_data_arrived`.
    Pushed,
    /// `Origin::User`; waits for the object of an earlier `Pushed` event of its identifier and
    /// repository, pushed already or about to be.
    Repeat,
    /// `Origin::User`; waits for the object of a later `Pushed` event of its identifier and
    /// repository: the announcement came before the push, and waits seconds for it.
    Early,
    /// `Origin::User`; nobody ever writes the object: expires.
    Unpushed,
}

impl Kind {
    fn released(self) -> bool {
        matches!(
            self,
            Kind::Mirror | Kind::Pushed | Kind::Repeat | Kind::Early
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    No,
    /// By the submitting thread, right after the submit.
    AtOnce,
    /// By whichever host thread takes it from the shared pool, at least 20 ms later.
    Later,
}

struct Plan {
    id: String,
    identifier: usize,
    repo: usize,
    kind: Kind,
    oids: Vec<ObjectId>,
    cancel: Cancel,
    /// Submitted a second time right after the first (a re-broadcast while it waits).
    resubmit: bool,
}

impl Plan {
    fn event(&self, repos: &[PathBuf], urls: &[Vec<String>]) -> PendingEvent {
        PendingEvent {
            id: self.id.clone(),
            identifier: identifier_name(self.identifier),
            repo: repos[self.repo].clone(),
            oids: self.oids.iter().map(ObjectId::to_string).collect(),
            clone_urls: urls[self.identifier].clone(),
            origin: match self.kind {
                Kind::Mirror | Kind::Ghost => Origin::Sync,
                Kind::Pushed | Kind::Repeat | Kind::Early | Kind::Unpushed => Origin::User,
            },
            ..Default::default()
        }
    }
}

fn blob_id(data: &[u8]) -> ObjectId {
    let oid = git2::Oid::hash_object(git2::ObjectType::Blob, data).expect("hash");
    ObjectId::from_bytes(oid.as_bytes().try_into().expect("20 bytes"))
}

fn plan(chains: &HashMap<usize, Vec<ObjectId>>) -> Vec<Plan> {
    // The last `Pushed` event of each (identifier, repository).
    let mut last_push: HashMap<(usize, usize), ObjectId> = HashMap::new();
    let mut plans: Vec<Plan> = (0..EVENTS)
        .map(|e| {
            let r = mix(SEED, e as u64);
            let i = e % IDENTIFIERS;
            let id = format!("ev{e:05}");
            let repo = if mirrored(i) && i % 20 == 10 && r % 2 == 0 {
                (home_repo(i) + LOCAL_REPOS / 2) % LOCAL_REPOS
            } else {
                home_repo(i)
            };
            let roll = (r >> 8) % 100;
            let mut kind = match (ghostly(i), mirrored(i), roll) {
                (true, _, 0..=29) => Kind::Ghost,
                (true, _, 30..=39) => Kind::Unpushed,
                (true, _, 40..=84) | (false, true, 0..=87) => Kind::Mirror,
                (false, true, 88..=95) | (false, false, 0..=11) => Kind::Pushed,
                (false, _, _) => Kind::Repeat,
                (true, _, _) => Kind::Pushed,
            };
            if kind == Kind::Repeat && !last_push.contains_key(&(i, repo)) {
                kind = Kind::Pushed;
            }
            let oids = match kind {
                Kind::Mirror | Kind::Ghost => {
                    let chain = &chains[&i];
                    let commit = chain[(r >> 16) as usize % CHAIN];
                    let mut oids = vec![commit];
                    if kind == Kind::Ghost {
                        let nowhere: [u8; 20] = std::array::from_fn(|k| mix(r, k as u64) as u8);
                        oids.push(ObjectId::from_bytes(nowhere));
                    } else if (r >> 20) % 5 == 0 && commit != chain[0] {
                        oids.push(chain[0]);
                    }
                    oids
                }
                Kind::Pushed => {
                    let oid = blob_id(&push_data(&id));
                    last_push.insert((i, repo), oid);
                    vec![oid]
                }
                Kind::Repeat => vec![last_push[&(i, repo)]],
                Kind::Unpushed => vec![blob_id(format!("never pushed {id}").as_bytes())],
                Kind::Early => unreachable!("assigned below"),
            };
            let cancel = match (r >> 24) % 100 {
                0..=2 => Cancel::AtOnce,
                3..=5 => Cancel::Later,
                _ => Cancel::No,
            };
            Plan {
                id,
                identifier: i,
                repo,
                kind,
                oids,
                cancel,
                resubmit: kind == Kind::Ghost && (r >> 32) % 4 == 0,
            }
        })
        .collect();
    // Half of the `Repeat` events that have a later push of their identifier and repository
    // wait for that one instead: the engine holds thousands of events, released a few at a
    // time by pushes seconds later (a push follows its event within 0.8 s, the identifier's
    // next event comes 0.5 s after the last, its next push ~4 s later).
    let mut next_push: HashMap<(usize, usize), ObjectId> = HashMap::new();
    for (e, p) in plans.iter_mut().enumerate().rev() {
        let key = (p.identifier, p.repo);
        match p.kind {
            Kind::Pushed => {
                next_push.insert(key, p.oids[0]);
            }
            Kind::Repeat if mix(SEED ^ 0xea71, e as u64) % 2 == 0 => {
                if let Some(oid) = next_push.get(&key) {
                    p.kind = Kind::Early;
                    p.oids = vec![*oid];
                }
            }
            _ => {}
        }
    }
    plans
}

// ---------------------------------------------------------------------------------------------
// The host threads.

/// What one host thread did.
#[derive(Default)]
struct HostLog {
    /// Event index and what its (first) submit returned.
    admissions: Vec<(usize, Result<Admission, String>)>,
    /// Re-submissions of waiting events and what they returned.
    resubmits: Vec<Result<Admission, String>>,
    cancelled: Vec<usize>,
    /// Submits of invalid events (all must be refused).
    invalid: Vec<Result<Admission, String>>,
    pushes: usize,
    idle_rechecks: usize,
}

struct Host<'a> {
    engine: &'a Engine,
    plans: &'a [Plan],
    repos: &'a [PathBuf],
    urls: &'a [Vec<String>],
    next: &'a AtomicUsize,
    /// Pending events to be cancelled later by any host thread, with their submit time.
    cancel_pool: &'a Mutex<VecDeque<(usize, Instant)>>,
    start: Instant,
}

impl Host<'_> {
    fn run(&self, thread: usize) -> HostLog {
        let mut log = HostLog::default();
        let mut pushes: Vec<(Instant, usize)> = Vec::new();
        let mut k = 0u64;
        loop {
            let e = self.next.fetch_add(1, Ordering::SeqCst);
            if e >= EVENTS {
                break;
            }
            k += 1;
            let r = mix(SEED ^ 0xabcd, (thread as u64) << 32 | k);
            if let Some(wait) =
                (self.start + PACE * e as u32).checked_duration_since(Instant::now())
            {
                std::thread::sleep(wait);
            }
            let p = &self.plans[e];
            let admitted = self
                .engine
                .submit(p.event(self.repos, self.urls))
                .map_err(|err| err.to_string());
            let pending = matches!(admitted, Ok(Admission::Pending { .. }));
            log.admissions.push((e, admitted));
            if pending && p.resubmit {
                let again = self.engine.submit(p.event(self.repos, self.urls));
                log.resubmits.push(again.map_err(|err| err.to_string()));
            }
            if pending && p.kind == Kind::Pushed {
                // Most pushes follow at once, a quarter within the user delay, so that later
                // events wait for the same object and one announcement releases them all.
                let delay = if r % 4 == 0 { 200 + r % 600 } else { r % 40 };
                pushes.push((Instant::now() + Duration::from_millis(delay), e));
            }
            match p.cancel {
                Cancel::AtOnce => {
                    self.engine.cancel(&p.id);
                    log.cancelled.push(e);
                }
                Cancel::Later if pending => {
                    lock(self.cancel_pool).push_back((e, Instant::now()));
                }
                _ => {}
            }
            self.cancel_due(&mut log);
            let now = Instant::now();
            let due: Vec<(Instant, usize)>;
            (due, pushes) = pushes.into_iter().partition(|(at, _)| *at <= now);
            for (_, e) in due {
                self.push(e, &mut log);
            }
            // Noise that must change nothing: rechecks of identifiers with nothing new,
            // cancels of unknown ids, invalid events.
            if r % 32 == 0 {
                let i = (r >> 8) as usize % IDENTIFIERS;
                self.engine.git_data_arrived(&identifier_name(i));
                log.idle_rechecks += 1;
            }
            if r % 64 == 1 {
                self.engine.cancel(&format!("unknown-{thread}-{k}"));
            }
            if r % 1000 == 2 {
                let mut bad = p.event(self.repos, self.urls);
                bad.id = format!("bad-{thread}-{k}");
                bad.oids = vec!["not-an-object-id".to_owned()];
                log.invalid
                    .push(self.engine.submit(bad).map_err(|e| e.to_string()));
            }
        }
        pushes.sort();
        for (due, e) in pushes {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            self.push(e, &mut log);
        }
        log
    }

    /// The user's push of the event's object, then the host's announcement.
    fn push(&self, e: usize, log: &mut HostLog) {
        let p = &self.plans[e];
        let repo = git2::Repository::open_bare(&self.repos[p.repo]).expect("local repository");
        let oid = repo.blob(&push_data(&p.id)).expect("pushed object");
        assert_eq!(
            oid.to_string(),
            p.oids[0].to_string(),
            "the push of {}",
            p.id
        );
        self.engine.git_data_arrived(&identifier_name(p.identifier));
        log.pushes += 1;
    }

    fn cancel_due(&self, log: &mut HostLog) {
        let due = {
            let mut pool = lock(self.cancel_pool);
            match pool.front() {
                Some((_, at)) if at.elapsed() >= Duration::from_millis(20) => pool.pop_front(),
                _ => None,
            }
        };
        if let Some((e, _)) = due {
            self.engine.cancel(&self.plans[e].id);
            log.cancelled.push(e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// The most fetches a server was serving at once on one domain, from its own request log.
///
/// Each logged request is matched to the fetch it belongs to: the same repository path (one
/// per identifier), started while that fetch ran (at most one fetch per identifier runs at a
/// time, so the match is unique). A fetch's requests (an HTTP fetch makes two, a fetch that
/// splits its wants makes more) are one interval, from its first request's start to the
/// earlier of its last request's end and the fetch's end: the server logs a request's end only
/// after its thread has closed the connection (for `git://`, after the upstream `upload-pack`
/// exited), which under load comes after the client has moved on. Returns (most at once,
/// requests that belong to no fetch).
fn server_concurrency(records: &[RequestRecord], spans: &[&Span]) -> (usize, usize) {
    let mut by_served: HashMap<&str, Vec<(usize, &Span)>> = HashMap::new();
    for (k, s) in spans.iter().enumerate() {
        by_served.entry(s.served.as_str()).or_default().push((k, s));
    }
    let mut seen: BTreeMap<usize, RequestRecord> = BTreeMap::new();
    let mut unmatched = 0;
    for r in records {
        let served = r.path.trim_start_matches('/').split('/').next();
        let span = by_served.get(served.unwrap_or("")).and_then(|v| {
            v.iter()
                .find(|(_, s)| s.start <= r.started && s.end.is_none_or(|end| r.started <= end))
        });
        let Some((k, s)) = span else {
            unmatched += 1;
            continue;
        };
        let mut r = r.clone();
        r.ended = s.end.map_or(r.ended, |end| r.ended.min(end));
        let fetch = seen.entry(*k).or_insert_with(|| r.clone());
        fetch.started = fetch.started.min(r.started);
        fetch.ended = fetch.ended.max(r.ended);
    }
    let fetches: Vec<RequestRecord> = seen.into_values().collect();
    (testkit::max_concurrent(&fetches), unmatched)
}

/// A temporary directory, in memory where the system has `/dev/shm`: the test writes and
/// removes thousands of small files, which on a slow disk costs more than the rest of the test.
fn scratch_dir() -> tempfile::TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("psync-stress");
    builder
        .tempdir_in("/dev/shm")
        .or_else(|_| builder.tempdir())
        .expect("temporary directory")
}

/// Takes every outcome already sent, by event id.
fn drain(rx: &crossbeam_channel::Receiver<Outcome>, into: &mut HashMap<String, Vec<Outcome>>) {
    for o in rx.try_iter() {
        into.entry(o.event_id().to_owned()).or_default().push(o);
    }
}

fn count_released(outcomes: &HashMap<String, Vec<Outcome>>) -> (u64, u64) {
    let all = outcomes.values().flatten();
    let released = all.clone().filter(|o| o.is_released()).count() as u64;
    (released, all.count() as u64 - released)
}

/// Fails with the first few entries of `violations`.
fn assert_none(what: &str, violations: &[String]) {
    assert!(
        violations.is_empty(),
        "{what}: {} violation(s), first ones: {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}

#[test]
fn ten_thousand_events_from_eight_threads_against_slow_flaky_and_incomplete_mirrors() {
    let _ = env_logger::builder().is_test(true).try_init();
    testkit::require_git();
    let t0 = Instant::now();
    let dir = scratch_dir();
    let (full_base, partial_base) = (dir.path().join("full"), dir.path().join("partial"));

    // Fixtures: the chains on the full mirror; on the lacking one all but the tips, and
    // nothing at all for every third mirrored identifier; the local repositories.
    let chains: HashMap<usize, Vec<ObjectId>> = par_map(SERVED_REPOS, 4, |k| {
        let full = serve_chains(&full_base, k, |_| CHAIN);
        let partial = serve_chains(&partial_base, k, |i| if i % 3 == 0 { 0 } else { CHAIN - 1 });
        for ((i, all), (_, some)) in full.iter().zip(&partial) {
            assert_eq!(all[..some.len()], some[..], "chain of {i}");
        }
        full
    })
    .into_iter()
    .flatten()
    .collect();
    let repos = par_map(LOCAL_REPOS, 4, |j| {
        testkit::init_bare(&dir.path().join(format!("local/t{j}.git")))
    });
    let plans = plan(&chains);
    let mirrors = Mirrors::start(&full_base, &partial_base);
    let sites = mirrors.sites();
    let urls: Vec<Vec<String>> = (0..IDENTIFIERS)
        .map(|i| {
            let pattern = URL_PATTERNS[(i / 10 + i) % URL_PATTERNS.len()];
            // Identifiers that keep retrying try two sites only, to bound the fetches.
            let pattern = if ghostly(i) {
                vec![pattern[0], pattern[pattern.len() - 1]]
            } else {
                pattern.to_vec()
            };
            pattern
                .iter()
                .map(|s| sites[*s].repo_url(&served_name(i)))
                .collect()
        })
        .collect();
    let setup = t0.elapsed();

    let watch = Arc::new(Watch::default());
    let mut builder = testkit::loopback_engine()
        .thread_name("stress")
        .workers(8)
        .tick(Duration::from_millis(50))
        .sync_delay(Duration::ZERO)
        .user_delay(Duration::from_secs(1))
        .backoff_base(Duration::from_millis(250))
        .backoff_cap(Duration::from_secs(2))
        .event_lifetime(LIFETIME)
        .fetch_deadline(Duration::from_secs(4))
        .connect_timeout(Duration::from_secs(1))
        .io_timeout(Duration::from_secs(1))
        .shutdown_timeout(SHUTDOWN_TIMEOUT)
        .fetcher(Watched(watch.clone()));
    for (_, ip, cap) in SITES {
        let limits = DomainLimits::new(cap, 600_000).burst(1000);
        builder = builder.domain_override(&ip.to_string(), limits);
    }
    let engine = builder.build().expect("engine");
    let rx = engine.outcomes();

    // Phase 1: the host threads, with the flaky sites toggling meanwhile.
    let next = AtomicUsize::new(0);
    let cancel_pool = Mutex::new(VecDeque::new());
    let stop_toggling = AtomicBool::new(false);
    let started = Instant::now();
    let host = Host {
        engine: &engine,
        plans: &plans,
        repos: &repos,
        urls: &urls,
        next: &next,
        cancel_pool: &cancel_pool,
        start: started,
    };
    let mut outcomes: HashMap<String, Vec<Outcome>> = HashMap::new();
    let (logs, toggles, submitting, quiet) = std::thread::scope(|s| {
        let toggler = s.spawn(|| toggle_flaky(&mirrors, &stop_toggling, 1000));
        let hosts: Vec<_> = (0..HOST_THREADS)
            .map(|t| {
                let host = &host;
                s.spawn(move || host.run(t))
            })
            .collect();
        let mut logs: Vec<HostLog> = hosts
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect();
        // Cancels still in the pool are due now.
        for (e, _) in lock(&cancel_pool).drain(..) {
            engine.cancel(&plans[e].id);
            logs[0].cancelled.push(e);
        }
        let submitting = started.elapsed();
        // Every event leaves within its lifetime: wait until every command was applied and
        // every pending event taken, nothing waits or runs, and every outcome the engine counted has arrived (more would
        // be a duplicate, reported below).
        let admitted = logs
            .iter()
            .flat_map(|l| &l.admissions)
            .filter(|(_, a)| matches!(a, Ok(Admission::Pending { .. })))
            .count() as u64;
        let limit = Instant::now() + DRAIN_LIMIT;
        let quiet = loop {
            drain(&rx, &mut outcomes);
            let s = engine.stats();
            let (released, expired) = count_released(&outcomes);
            let done = s.commands_pending == 0
                && s.submitted == admitted
                && s.waiting_events == 0
                && s.in_flight == 0
                && released >= s.released
                && expired >= s.expired;
            if done {
                break s;
            }
            assert!(
                Instant::now() < limit,
                "not quiet {DRAIN_LIMIT:?} after the last submit: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        stop_toggling.store(true, Ordering::SeqCst);
        let toggles = toggler.join().expect("toggler");
        (logs, toggles, submitting, quiet)
    });
    let drained = started.elapsed();

    // Exactly one outcome per pending event, at most one per cancelled one, none for others.
    let mut admission: HashMap<usize, &Result<Admission, String>> = HashMap::new();
    for log in &logs {
        for (e, a) in &log.admissions {
            assert!(
                admission.insert(*e, a).is_none(),
                "event {e} submitted twice"
            );
        }
    }
    assert_eq!(admission.len(), EVENTS, "every event was submitted once");
    let cancelled: std::collections::HashSet<usize> = logs
        .iter()
        .flat_map(|l| l.cancelled.iter().copied())
        .collect();
    let pending: std::collections::BTreeSet<usize> = (0..EVENTS)
        .filter(|e| matches!(admission[e], Ok(Admission::Pending { .. })))
        .collect();
    let satisfied = admission
        .values()
        .filter(|a| matches!(a, Ok(Admission::AlreadySatisfied)))
        .count() as u64;
    let refused_main: Vec<String> = admission
        .iter()
        .filter_map(|(e, a)| {
            a.as_ref()
                .err()
                .map(|err| format!("{}: {err}", plans[*e].id))
        })
        .collect();
    assert_none("valid events refused", &refused_main);
    let mut violations = Vec::new();
    let mut cancelled_without_outcome = 0u64;
    for (e, p) in plans.iter().enumerate() {
        let got = outcomes.get(&p.id).map_or(0, Vec::len);
        let allowed = if !pending.contains(&e) {
            0..=0
        } else if cancelled.contains(&e) {
            0..=1
        } else {
            1..=1
        };
        if !allowed.contains(&got) {
            violations.push(format!(
                "{} ({:?}, {:?}, cancelled: {}): {got} outcomes {:?}",
                p.id,
                p.kind,
                admission[&e],
                cancelled.contains(&e),
                outcomes.get(&p.id)
            ));
        }
        if got == 0 && cancelled.contains(&e) && pending.contains(&e) {
            cancelled_without_outcome += 1;
        }
        for o in outcomes.get(&p.id).into_iter().flatten() {
            if o.identifier() != identifier_name(p.identifier) {
                violations.push(format!("{} reported for {}", p.id, o.identifier()));
            }
        }
    }
    let planned: std::collections::HashSet<&str> = plans.iter().map(|p| p.id.as_str()).collect();
    violations.extend(
        outcomes
            .keys()
            .filter(|id| !planned.contains(id.as_str()))
            .map(|id| format!("an outcome for {id}, never submitted")),
    );
    assert_none("outcomes per event", &violations);

    // Every released event's objects are in its repository (one look per repository).
    let mut wanted: BTreeMap<usize, Vec<(&str, ObjectId)>> = BTreeMap::new();
    for p in &plans {
        if outcomes.get(&p.id).is_some_and(|o| o[0].is_released()) {
            let oids = p.oids.iter().map(|o| (p.id.as_str(), *o));
            wanted.entry(p.repo).or_default().extend(oids);
        }
    }
    let missing: Vec<String> = wanted
        .iter()
        .flat_map(|(j, want)| {
            let oids: Vec<ObjectId> = want.iter().map(|(_, o)| *o).collect();
            let gone = testkit::missing_objects(&repos[*j], &oids);
            want.iter()
                .filter(move |(_, o)| gone.contains(o))
                .map(move |(id, o)| format!("{id} released, {o} not in t{j}"))
        })
        .collect();
    assert_none("objects of released events", &missing);

    // The engine's counters agree with what the host saw.
    let resubmits: Vec<&Result<Admission, String>> =
        logs.iter().flat_map(|l| l.resubmits.iter()).collect();
    let invalid: Vec<&Result<Admission, String>> =
        logs.iter().flat_map(|l| l.invalid.iter()).collect();
    assert!(invalid.iter().all(|r| r.is_err()), "{invalid:?}");
    let resubmit_refused = resubmits.iter().filter(|r| r.is_err()).count();
    let (released, expired) = count_released(&outcomes);
    let s = &quiet;
    // `s.submitted` equals the pending admissions: the wait for quiet ended on that.
    assert_eq!(s.already_satisfied, satisfied, "already satisfied");
    assert_eq!(
        s.refused,
        (invalid.len() + resubmit_refused) as u64,
        "refused"
    );
    assert_eq!((s.released, s.expired), (released, expired), "outcomes");
    assert_eq!(s.cancelled, cancelled_without_outcome, "cancelled");
    assert_eq!(
        s.submitted,
        s.released + s.expired + s.cancelled + s.waiting_events as u64,
        "{s:?}"
    );
    assert_eq!(
        s.fetches_started,
        s.fetches_succeeded + s.fetches_partial + s.fetches_failed,
        "{s:?}"
    );
    {
        let st = watch.state();
        let ended = |class: Ended| st.spans.iter().filter(|sp| sp.ended == Some(class)).count();
        assert_eq!(
            (s.fetches_succeeded, s.fetches_partial, s.fetches_failed),
            (
                ended(Ended::Ok) as u64,
                ended(Ended::Partial) as u64,
                ended(Ended::Failed) as u64
            ),
            "fetches ok, partial and failed: the engine's counters against the reports"
        );
        for (domain, d) in &s.domains {
            let failed: u64 = d.failed.values().sum();
            assert_eq!(
                d.requests_started,
                d.succeeded + d.partial + failed,
                "{domain}: {d:?}"
            );
        }
        assert_eq!(st.spans.len() as u64, s.fetches_started, "fetches seen");
        assert!(st.spans.iter().all(|sp| sp.end.is_some()), "a fetch runs");
        let per_domain: u64 = s.domains.values().map(|d| d.requests_started).sum();
        assert_eq!(per_domain, s.fetches_started, "{:?}", s.domains);
        for (domain, d) in &s.domains {
            let seen = st
                .spans
                .iter()
                .filter(|sp| &sp.site_domain == domain)
                .count();
            assert_eq!(d.requests_started, seen as u64, "fetches to {domain}");
        }
    }

    // Liveness: pushes announced, mirrored commits and objects nowhere end as they must (a
    // cancelled event's outcome, if any, came before its cancel).
    let mut wrong = Vec::new();
    for &e in &pending {
        let p = &plans[e];
        let Some([o]) = outcomes.get(&p.id).map(Vec::as_slice) else {
            continue;
        };
        if o.is_released() != p.kind.released() {
            wrong.push(format!("{} ({:?}): {o:?}", p.id, p.kind));
        }
    }
    let by_kind = |k: Kind| pending.iter().filter(|e| plans[**e].kind == k).count();
    assert_none("events ended wrongly", &wrong);

    // Phase 2: shutdown with fetches hanging. The flaky sites hang, the slow one drips.
    let quiet_fetches = s.fetches_started;
    mirrors.flaky_http.set_fault(Fault::Hang);
    mirrors.flaky_git.set_fault(TcpFault::Hang);
    mirrors.slow.set_fault(TcpFault::Drip { bytes_per_sec: 20 });
    let mut late_pending = Vec::new();
    for (k, repo) in repos.iter().enumerate().take(LATE) {
        let ev = PendingEvent {
            id: format!("late{k}"),
            identifier: format!("late{k}"),
            repo: repo.clone(),
            oids: vec![ObjectId::from_bytes([k as u8 + 1; 20]).to_string()],
            clone_urls: [FLAKY_HTTP, FLAKY_GIT, SLOW]
                .iter()
                .map(|site| sites[*site].repo_url(&served_name(k)))
                .collect(),
            ..Default::default()
        };
        let a = engine.submit(ev).expect("late event");
        assert!(a.is_pending());
        late_pending.push(format!("late{k}"));
    }
    let limit = Instant::now() + Duration::from_secs(10);
    // Seven fetches can run at once: three, two and two by the caps of the three sites.
    let before = loop {
        let st = engine.stats();
        let taken = st.submitted == s.submitted + LATE as u64;
        if (taken && st.in_flight >= 7) || Instant::now() >= limit {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(before.in_flight > 0, "fetches in flight at shutdown");
    let t = Instant::now();
    let stopped = engine.shutdown();
    let shutdown = t.elapsed();
    assert!(stopped.is_ok(), "shutdown: {stopped:?}");
    assert!(
        shutdown <= SHUTDOWN_TIMEOUT + SHUTDOWN_MARGIN,
        "shutdown took {shutdown:?}"
    );
    {
        let st = watch.state();
        let running: Vec<_> = st.spans.iter().filter(|sp| sp.end.is_none()).collect();
        assert!(running.is_empty(), "fetches still running: {running:?}");
        assert!(st.spans.len() as u64 >= before.fetches_started);
    }
    let mut after: HashMap<String, Vec<Outcome>> = HashMap::new();
    drain(&rx, &mut after);
    for (id, os) in &after {
        assert!(
            late_pending.contains(id) && os.len() <= 1,
            "outcome after the main phase: {id}: {os:?}"
        );
    }
    assert_eq!(
        before.submitted,
        before.released + before.expired + before.cancelled + before.waiting_events as u64,
        "{before:?}"
    );
    assert_eq!(
        (
            before.submitted,
            before.released,
            before.expired,
            before.cancelled
        ),
        (
            s.submitted + LATE as u64,
            s.released,
            s.expired,
            s.cancelled
        ),
        "the late events waited: {before:?}"
    );

    // No violation of one fetch per identifier and per repository, at any time.
    let st = watch.state();
    assert_none("the watching fetcher", &st.violations);

    // Per-domain caps, from the servers' own logs (and the fetcher's view).
    let mut caps = Vec::new();
    for (k, (name, ip, cap)) in SITES.iter().enumerate() {
        let domain = ip.to_string();
        assert!(sites[k].idle_within(Duration::from_secs(10)), "{name} idle");
        let records = sites[k].log();
        let spans: Vec<&Span> = st
            .spans
            .iter()
            .filter(|sp| sp.site_domain == domain)
            .collect();
        let (server_most, unmatched) = server_concurrency(&records, &spans);
        let client_most = st.most_per_domain.get(&domain).copied().unwrap_or(0);
        let raw = testkit::max_concurrent(&records);
        assert!(
            server_most <= *cap && client_most <= *cap,
            "{name} ({domain}): {server_most} requests at once in the server's log, {client_most} fetches at once, cap {cap}"
        );
        caps.push(format!(
            "{name} cap {cap}: server {server_most} (raw {raw}, {} requests, {unmatched} unmatched), fetcher {client_most}, {} fetches",
            records.len(),
            spans.len()
        ));
    }
    assert!(
        SITES
            .iter()
            .any(|(_, ip, cap)| st.most_per_domain.get(&ip.to_string()) == Some(cap)),
        "some cap was reached, or the check proves nothing: {:?}",
        st.most_per_domain
    );
    drop(st);

    // The longest wait of a released event, by kind: how far each kind is from `LIFETIME`.
    let mut waited_max: BTreeMap<Kind, Duration> = BTreeMap::new();
    for p in &plans {
        if let Some([Outcome::Released { waited, .. }]) = outcomes.get(&p.id).map(Vec::as_slice) {
            let w = waited_max.entry(p.kind).or_default();
            *w = (*w).max(*waited);
        }
    }
    eprintln!(
        "stress: {EVENTS} events on {IDENTIFIERS} identifiers from {HOST_THREADS} threads: \
         {} pending (mirror {}, ghost {}, pushed {}, repeat {}, early {}, unpushed {}), {satisfied} already satisfied, \
         {} re-submitted, {} invalid refused; outcomes: {released} released (longest wait \
         {waited_max:.1?}), {expired} expired, {} cancelled; {} pushes, {} idle rechecks",
        pending.len(),
        by_kind(Kind::Mirror),
        by_kind(Kind::Ghost),
        by_kind(Kind::Pushed),
        by_kind(Kind::Repeat),
        by_kind(Kind::Early),
        by_kind(Kind::Unpushed),
        resubmits.len(),
        invalid.len(),
        s.cancelled,
        logs.iter().map(|l| l.pushes).sum::<usize>(),
        logs.iter().map(|l| l.idle_rechecks).sum::<usize>(),
    );
    eprintln!(
        "stress: fetches {} ({} ok, {} partial, {} failed: {:?}); {} more during shutdown; {toggles} fault toggles",
        s.fetches_started,
        s.fetches_succeeded,
        s.fetches_partial,
        s.fetches_failed,
        s.failures,
        before.fetches_started - quiet_fetches,
    );
    for line in caps {
        eprintln!("stress:   {line}");
    }
    eprintln!(
        "stress: setup {setup:.1?}, submitting {submitting:.1?}, quiet after {drained:.1?}, \
         shutdown with {} in flight {shutdown:.2?}, total {:.1?}",
        before.in_flight,
        t0.elapsed()
    );
}
