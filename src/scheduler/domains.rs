//! Politeness toward remote hosts: per-domain concurrency caps, `governor` rate quotas, the
//! queues of identifiers waiting for a domain's capacity, and the naughty list.
//!
//! Only the scheduler thread touches this table, so taking a permit (a concurrency slot and a
//! rate cell) is one step with no check-then-act race. The limiters read a clock that the core
//! sets to the `now` of each call, so a fake clock drives them in tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use governor::{Quota, RateLimiter};

use crate::config::{Config, DomainLimits};
use crate::fetch::FailureKind;
use crate::stats::{DomainStats, NaughtyCategory, NaughtyEntry};

use super::queue::EntryId;
use crate::policy::CloneUrl;

use crate::persist::NaughtyRecord;

/// How often idle domains are looked for (`Domains::prune`).
const RETIRE_EVERY: Duration = Duration::from_secs(1);
use crate::state_file::millis as ms;

/// The time the core last gave, as governor's clock.
#[derive(Debug, Clone)]
pub(crate) struct CoreClock {
    origin: Instant,
    nanos: Arc<AtomicU64>,
}

/// Nanoseconds since the [`CoreClock`]'s origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tick(u64);

impl std::ops::Add<governor::nanos::Nanos> for Tick {
    type Output = Tick;

    fn add(self, other: governor::nanos::Nanos) -> Tick {
        Tick(self.0.saturating_add(other.as_u64()))
    }
}

impl governor::clock::Reference for Tick {
    fn duration_since(&self, earlier: Self) -> governor::nanos::Nanos {
        self.0.saturating_sub(earlier.0).into()
    }

    fn saturating_sub(&self, duration: governor::nanos::Nanos) -> Self {
        Tick(self.0.saturating_sub(duration.as_u64()))
    }
}

impl governor::clock::Clock for CoreClock {
    type Instant = Tick;

    fn now(&self) -> Tick {
        Tick(self.nanos.load(Ordering::Relaxed))
    }
}

impl CoreClock {
    fn new(origin: Instant) -> Self {
        CoreClock {
            origin,
            nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    fn set(&self, now: Instant) {
        let n = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        self.nanos.fetch_max(n, Ordering::Relaxed);
    }

    fn instant(&self, t: Tick) -> Instant {
        self.origin + Duration::from_nanos(t.0)
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    CoreClock,
    governor::middleware::NoOpMiddleware<Tick>,
>;

struct Domain {
    limits: DomainLimits,
    /// Shared with the gates of the domain's running fetches, which take a cell for each
    /// further request they make.
    limiter: Arc<Limiter>,
    /// Requests made to the domain: one per fetch started, and each further one its gate let
    /// through. Shared with the gates.
    requests: Arc<AtomicU64>,
    in_flight: usize,
    /// Entries waiting for capacity, oldest first, with the park generation that queued them
    /// (a stale generation means the entry moved on).
    queue: VecDeque<(EntryId, u64)>,
    /// Entries parked here and still waiting: the queue's live records (one per entry), kept by
    /// `park` and `leave` so that the statistics need not scan the queue.
    waiting: usize,
    /// The queue's length after its last compaction: stale records are dropped from the front
    /// at every pass, and from the middle only once the queue has doubled since (amortised
    /// O(1) per park, instead of a full rebuild at every pass).
    compacted_len: usize,
    /// When the quota allows the next start, after a refused one.
    blocked_until: Option<Instant>,
    started: u64,
    succeeded: u64,
    partial: u64,
    failed: BTreeMap<FailureKind, u64>,
    /// Bytes received from the domain by fetches that ended.
    bytes_received: u64,
    /// The last time the domain was used (a start, a refusal, a park, an end).
    last_active: Instant,
}

/// What a naughty-list entry skips: what failed, and nothing more, so that one stranger's URL
/// cannot take a host out for others. A name that did not resolve is skipped whatever the
/// scheme and port (nothing on it can be reached); a TLS failure or a hostile answer skips only
/// its scheme, host and port (`https://github.com:22/x` fails TLS because port 22 speaks SSH,
/// and says nothing of `git://github.com`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NaughtyKey {
    /// The canonical host: the name the connection resolved.
    host: Arc<str>,
    /// The scheme and port, for an endpoint; `None` for a whole name.
    endpoint: Option<(Arc<str>, u16)>,
}

impl NaughtyKey {
    fn name(url: &CloneUrl) -> Self {
        NaughtyKey {
            host: url.domain.clone(),
            endpoint: None,
        }
    }

    fn endpoint(url: &CloneUrl) -> Self {
        NaughtyKey {
            host: url.domain.clone(),
            endpoint: Some((url.scheme.clone(), url.port)),
        }
    }
}

struct Naughty {
    category: NaughtyCategory,
    reason: String,
    first: Instant,
    last: Instant,
    count: u64,
    until: Instant,
}

/// Lets a running fetch's requests through, each with a cell of its domain's quota: the quota
/// counts requests as the remote host sees them (each connection over `git://`, each GET and
/// POST over HTTP), not fetches. The first request's cell is taken with the fetch's slot
/// ([`Domains::try_acquire`]); each further one (HTTP's POST, a probe of ids the server does
/// not advertise) waits for its cell, or the fetch stops at its deadline. The fetch holds one of the domain's concurrency slots and
/// its requests are sequential, so the cap needs nothing more.
///
/// The limiter's clock is the core's: a gate moves it forward to the engine clock's `now` it is
/// given (never back), so a request waits for its cell, not for the scheduler's next tick.
#[derive(Debug)]
pub(crate) struct RequestGate {
    limiter: Arc<Limiter>,
    clock: CoreClock,
    requests: Arc<AtomicU64>,
    /// Whether the cell taken with the slot (and counted with it) is still unused.
    first: AtomicBool,
}

impl RequestGate {
    /// Takes a cell for one request at `now` (the engine's clock): `Ok` when the request may
    /// go, or how long to wait for the next cell.
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        if self.first.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        self.clock.set(now);
        match self.limiter.check() {
            Ok(()) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(not_until) => {
                Err(not_until.wait_time_from(governor::clock::Clock::now(&self.clock)))
            }
        }
    }
}

/// Why a permit could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// `max_concurrent` fetches are in flight.
    Full,
    /// The quota has no cell before this instant.
    Rate(Instant),
}

/// Every domain the engine has fetched from or queued for.
pub(crate) struct Domains {
    cfg: Arc<Config>,
    clock: Option<CoreClock>,
    /// The core's time, as of the last `set_now`.
    now: Option<Instant>,
    /// When idle domains were last retired.
    last_retire: Option<Instant>,
    /// Requests made to domains since retired: the engine's total never goes down.
    retired_requests: u64,
    table: HashMap<Arc<str>, Domain>,
    naughty: HashMap<NaughtyKey, Naughty>,
}

impl Domains {
    pub fn new(cfg: Arc<Config>) -> Self {
        Domains {
            cfg,
            clock: None,
            now: None,
            last_retire: None,
            retired_requests: 0,
            table: HashMap::new(),
            naughty: HashMap::new(),
        }
    }

    /// Sets the limiters' clock to `now`; called at every entry point of the core.
    pub fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
        self.clock
            .get_or_insert_with(|| CoreClock::new(now))
            .set(now);
    }

    fn clock(&self) -> &CoreClock {
        self.clock
            .as_ref()
            .expect("set_now is called before any use")
    }

    fn domain(&mut self, name: &Arc<str>) -> &mut Domain {
        let now = self.now.expect("set_now is called before any use");
        if !self.table.contains_key(name) {
            let limits = self.cfg.limits_for(name);
            let period = Duration::from_nanos(60_000_000_000 / u64::from(limits.per_minute));
            let quota = Quota::with_period(period)
                .expect("per_minute is validated to be positive")
                .allow_burst(NonZeroU32::new(limits.burst).expect("burst is validated"));
            let limiter = Arc::new(RateLimiter::direct_with_clock(quota, self.clock().clone()));
            self.table.insert(
                name.clone(),
                Domain {
                    limits,
                    limiter,
                    requests: Arc::new(AtomicU64::new(0)),
                    in_flight: 0,
                    queue: VecDeque::new(),
                    waiting: 0,
                    compacted_len: 0,
                    blocked_until: None,
                    started: 0,
                    succeeded: 0,
                    partial: 0,
                    failed: BTreeMap::new(),
                    bytes_received: 0,
                    last_active: now,
                },
            );
        }
        let d = self.table.get_mut(name).expect("inserted above");
        d.last_active = d.last_active.max(now);
        d
    }

    /// Whether `url` may be fetched at all now: not on the relay's own domain (its host, or
    /// its host and port when the own domain names a port, as the URL policy decides at
    /// submit), and neither its host name nor its endpoint on the naughty list.
    pub fn usable(&self, url: &CloneUrl, now: Instant) -> bool {
        if self
            .cfg
            .url_policy
            .own()
            .is_some_and(|d| d.covers(&url.domain, url.port))
        {
            return false;
        }
        if self.naughty.is_empty() {
            return true;
        }
        let skipped = |key: &NaughtyKey| self.naughty.get(key).is_some_and(|n| n.until > now);
        !skipped(&NaughtyKey::name(url)) && !skipped(&NaughtyKey::endpoint(url))
    }

    /// Takes a concurrency slot and a rate cell of `domain`, both or neither: the cell of the
    /// fetch's first request. Its further requests take theirs through its [`RequestGate`].
    pub fn try_acquire(&mut self, domain: &Arc<str>, now: Instant) -> Result<(), Blocked> {
        let clock = self.clock().clone();
        let d = self.domain(domain);
        if d.in_flight >= d.limits.max_concurrent {
            return Err(Blocked::Full);
        }
        match d.limiter.check() {
            Ok(()) => {
                d.in_flight += 1;
                d.started += 1;
                d.requests.fetch_add(1, Ordering::Relaxed);
                d.blocked_until = None;
                Ok(())
            }
            Err(not_until) => {
                let at = clock.instant(not_until.earliest_possible()).max(now);
                d.blocked_until = Some(at);
                Err(Blocked::Rate(at))
            }
        }
    }

    /// The gate of a fetch on `domain` that has just taken its slot and its first request's
    /// cell (`try_acquire`): it lets that request through, then each further one with a cell
    /// of the domain's quota.
    pub fn gate(&mut self, domain: &Arc<str>) -> Arc<RequestGate> {
        let clock = self.clock().clone();
        let d = self.domain(domain);
        Arc::new(RequestGate {
            limiter: d.limiter.clone(),
            clock,
            requests: d.requests.clone(),
            first: AtomicBool::new(true),
        })
    }

    /// Gives back the slot of a fetch of `url` that ended, counts it, and after a DNS failure
    /// puts the host name on the naughty list, after a TLS failure the URL's endpoint.
    pub fn release(
        &mut self,
        url: &CloneUrl,
        failure: Option<(FailureKind, &str)>,
        partial: bool,
        bytes_received: u64,
        now: Instant,
    ) {
        let d = self.domain(&url.domain);
        d.in_flight = d.in_flight.saturating_sub(1);
        d.bytes_received = d.bytes_received.saturating_add(bytes_received);
        match failure {
            None => d.succeeded += 1,
            Some(_) if partial => d.partial += 1,
            Some((kind, _)) => *d.failed.entry(kind).or_default() += 1,
        }
        let (key, category) = match failure {
            Some((FailureKind::Dns, _)) => (NaughtyKey::name(url), NaughtyCategory::Dns),
            Some((FailureKind::Tls, _)) => (NaughtyKey::endpoint(url), NaughtyCategory::Tls),
            _ => return,
        };
        let reason = failure.map(|f| f.1.to_owned()).unwrap_or_default();
        self.put_naughty(key, category, reason, now);
    }

    /// Puts `url`'s endpoint on the naughty list: what it sent made libgit2 lose memory.
    pub fn hostile(&mut self, url: &CloneUrl, reason: String, now: Instant) {
        self.put_naughty(
            NaughtyKey::endpoint(url),
            NaughtyCategory::Hostile,
            reason,
            now,
        );
    }

    fn put_naughty(
        &mut self,
        key: NaughtyKey,
        category: NaughtyCategory,
        reason: String,
        now: Instant,
    ) {
        let until = now + self.cfg.naughty_duration;
        match self.naughty.get_mut(&key) {
            Some(n) if n.until > now => {
                n.category = category;
                n.reason = reason;
                n.last = now;
                n.count += 1;
                n.until = until;
            }
            _ => {
                log::warn!(
                    "skipping {} for {:?}: {reason}",
                    key_display(&key),
                    self.cfg.naughty_duration
                );
                self.naughty.insert(
                    key,
                    Naughty {
                        category,
                        reason,
                        first: now,
                        last: now,
                        count: 1,
                        until,
                    },
                );
            }
        }
    }

    /// Queues `entry` for `domain`'s capacity. The caller parks an entry at most once per
    /// domain per generation, and calls `leave` when that parking ends.
    pub fn park(&mut self, domain: &Arc<str>, entry: EntryId, generation: u64) {
        let d = self.domain(domain);
        d.queue.push_back((entry, generation));
        d.waiting += 1;
    }

    /// An entry parked in `domain` stopped waiting there: its record is stale from now on
    /// (dropped from the queue later).
    pub fn leave(&mut self, domain: &str) {
        let now = self.now;
        let d = self.table.get_mut(domain);
        debug_assert!(
            d.as_ref().is_some_and(|d| d.waiting > 0),
            "{domain}: more leaves than parks"
        );
        if let Some(d) = d {
            d.waiting = d.waiting.saturating_sub(1);
            if let Some(now) = now {
                d.last_active = d.last_active.max(now);
            }
        }
    }

    /// Domains with entries waiting, in a stable order.
    pub fn with_queues(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self
            .table
            .iter()
            .filter(|(_, d)| !d.queue.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// The queue of `domain`.
    pub fn queue(&mut self, domain: &Arc<str>) -> &mut VecDeque<(EntryId, u64)> {
        &mut self.domain(domain).queue
    }

    /// `domain`'s queue, if the domain is known.
    pub fn queue_of(&self, domain: &str) -> Option<&VecDeque<(EntryId, u64)>> {
        self.table.get(domain).map(|d| &d.queue)
    }

    /// Drops stale records (`live` is false) from the front of `domain`'s queue, and from the
    /// whole queue once it has doubled since the last such sweep.
    pub fn tidy_queue(&mut self, domain: &Arc<str>, live: impl Fn(EntryId, u64) -> bool) {
        let d = self.domain(domain);
        while let Some(&(id, generation)) = d.queue.front() {
            if live(id, generation) {
                break;
            }
            d.queue.pop_front();
        }
        if d.queue.len() > 2 * d.compacted_len + 64 {
            d.queue.retain(|&(id, generation)| live(id, generation));
            d.compacted_len = d.queue.len();
        }
    }

    /// Whether `domain` has a free slot (the quota is only known by trying).
    pub fn has_slot(&mut self, domain: &Arc<str>) -> bool {
        let d = self.domain(domain);
        d.in_flight < d.limits.max_concurrent
    }

    /// The earliest instant after `now` at which a rate-limited domain with waiting entries
    /// gets a cell, so that the scheduler wakes then rather than at the next tick.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        self.table
            .values()
            .filter(|d| !d.queue.is_empty() && d.in_flight < d.limits.max_concurrent)
            .filter_map(|d| d.blocked_until)
            .filter(|t| *t > now)
            .min()
    }

    /// The naughty list for the state file (`crate::persist` writes it); `wall_ms` is `now` on
    /// the wall clock.
    pub fn save(&self, now: Instant, wall_ms: u64) -> Vec<NaughtyRecord> {
        let wall = |t: Instant| wall_ms.saturating_sub(ms(now.saturating_duration_since(t)));
        self.naughty
            .iter()
            .filter(|(_, n)| n.until > now)
            .map(|(key, n)| NaughtyRecord {
                host: Arc::clone(&key.host),
                endpoint: key.endpoint.clone(),
                category: n.category,
                reason: n.reason.clone(),
                first_seen_ms: wall(n.first),
                last_seen_ms: wall(n.last),
                count: n.count,
                remaining: n.until.saturating_duration_since(now),
            })
            .collect()
    }

    /// Puts saved naughty entries back (`crate::persist` read them), `downtime` shorter.
    pub fn restore(
        &mut self,
        saved: Vec<NaughtyRecord>,
        downtime: Duration,
        now: Instant,
        wall_ms: u64,
    ) {
        let instant = |t_ms: u64| {
            now.checked_sub(Duration::from_millis(wall_ms.saturating_sub(t_ms)))
                .unwrap_or(now)
        };
        for n in saved {
            if n.remaining <= downtime {
                continue;
            }
            self.naughty.insert(
                NaughtyKey {
                    host: n.host,
                    endpoint: n.endpoint,
                },
                Naughty {
                    category: n.category,
                    reason: n.reason,
                    first: instant(n.first_seen_ms),
                    last: instant(n.last_seen_ms),
                    count: n.count,
                    until: now + (n.remaining - downtime),
                },
            );
        }
    }

    /// Forgets naughty entries whose time is up, and retires idle domains (at most once a
    /// second): a domain with nothing in flight, queued or on the naughty list for
    /// `domain_retention` (and at least as long as its rate quota takes to refill, so that a
    /// new limiter is no more generous than the old one) leaves the table, its statistics and
    /// its metrics' series with it. Clone URLs come from strangers: without this, every domain
    /// ever named would stay for the life of the engine.
    pub fn prune(&mut self, now: Instant) {
        self.naughty.retain(|_, n| n.until > now);
        if self
            .last_retire
            .is_some_and(|t| now.saturating_duration_since(t) < RETIRE_EVERY)
        {
            return;
        }
        self.last_retire = Some(now);
        let retention = self.cfg.domain_retention;
        let naughty_hosts: std::collections::HashSet<&str> =
            self.naughty.keys().map(|k| &*k.host).collect();
        let retired = &mut self.retired_requests;
        self.table.retain(|name, d| {
            let refill = Duration::from_secs(60)
                .saturating_mul(d.limits.burst)
                .checked_div(d.limits.per_minute)
                .unwrap_or(Duration::ZERO);
            let keep = d.in_flight > 0
                || d.waiting > 0
                || naughty_hosts.contains(&**name)
                || now.saturating_duration_since(d.last_active) < retention.max(refill);
            if !keep {
                *retired = retired.saturating_add(d.requests.load(Ordering::Relaxed));
            }
            keep
        });
    }

    /// Requests made to every domain since the engine started, retired ones included.
    pub fn requests_total(&self) -> u64 {
        self.table
            .values()
            .map(|d| d.requests.load(Ordering::Relaxed))
            .fold(self.retired_requests, u64::saturating_add)
    }

    /// The number of distinct entries still waiting in each domain's queue, by a scan of the
    /// queue (`live` tells which records are); the tests check `waiting` against it.
    #[cfg(test)]
    pub fn waiting_by_scan(
        &self,
        live: impl Fn(EntryId, u64) -> bool,
    ) -> BTreeMap<String, (usize, usize)> {
        self.table
            .iter()
            .map(|(name, d)| {
                let mut queued: Vec<EntryId> = d
                    .queue
                    .iter()
                    .filter(|(e, g)| live(*e, *g))
                    .map(|(e, _)| *e)
                    .collect();
                queued.sort_unstable();
                queued.dedup();
                (name.to_string(), (d.waiting, queued.len()))
            })
            .collect()
    }

    /// Per-domain stats and the naughty list.
    pub fn stats(
        &self,
        now: Instant,
        wall: SystemTime,
    ) -> (BTreeMap<String, DomainStats>, Vec<NaughtyEntry>) {
        let to_wall = |t: Instant| {
            if t >= now {
                wall + (t - now)
            } else {
                wall.checked_sub(now - t).unwrap_or(SystemTime::UNIX_EPOCH)
            }
        };
        let domains = self
            .table
            .iter()
            .map(|(name, d)| {
                let stats = DomainStats {
                    in_flight: d.in_flight,
                    queued_identifiers: d.waiting,
                    requests_started: d.started,
                    requests: d.requests.load(Ordering::Relaxed),
                    succeeded: d.succeeded,
                    partial: d.partial,
                    failed: d.failed.clone(),
                    bytes_received: d.bytes_received,
                    next_cell_in: d
                        .blocked_until
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                };
                (name.to_string(), stats)
            })
            .collect();
        let mut naughty: Vec<NaughtyEntry> = self
            .naughty
            .iter()
            .filter(|(_, n)| n.until > now)
            .map(|(key, n)| NaughtyEntry {
                domain: key.host.to_string(),
                scheme: key.endpoint.as_ref().map(|(s, _)| s.to_string()),
                port: key.endpoint.as_ref().map(|(_, p)| *p),
                category: n.category,
                reason: n.reason.clone(),
                first_seen: to_wall(n.first),
                last_seen: to_wall(n.last),
                count: n.count,
                until: to_wall(n.until),
            })
            .collect();
        naughty.sort_by(|a, b| (&a.domain, &a.scheme, a.port).cmp(&(&b.domain, &b.scheme, b.port)));
        (domains, naughty)
    }
}

/// How a naughty-list key is shown in logs: the host, or `scheme://host:port`.
fn key_display(key: &NaughtyKey) -> String {
    match &key.endpoint {
        None => key.host.to_string(),
        Some((scheme, port)) if key.host.contains(':') => {
            format!("{scheme}://[{}]:{port}", key.host)
        }
        Some((scheme, port)) => format!("{scheme}://{}:{port}", key.host),
    }
}
