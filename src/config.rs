//! Engine configuration: every number of the behaviour table, validated in one place.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::BuildError;
use crate::fetch::{Fetcher, GitFetcher};

/// The network and fetch defaults, in one place: the engine's settings ([`Config::default`]),
/// a [`FetchControl`](crate::FetchControl) made without an engine, and the plain sockets the
/// engine's stream gives libgit2 outside any fetch all start from these.
pub(crate) mod net_defaults {
    use std::time::Duration;

    /// [`EngineBuilder::connect_timeout`](super::EngineBuilder::connect_timeout).
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// [`EngineBuilder::io_timeout`](super::EngineBuilder::io_timeout).
    pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
    /// [`EngineBuilder::fetch_deadline`](super::EngineBuilder::fetch_deadline).
    pub const FETCH_DEADLINE: Duration = Duration::from_secs(120);
    /// [`EngineBuilder::max_fetch_bytes`](super::EngineBuilder::max_fetch_bytes).
    pub const MAX_FETCH_BYTES: u64 = 1 << 30;
    /// [`EngineBuilder::max_fetch_memory`](super::EngineBuilder::max_fetch_memory).
    pub const MAX_FETCH_MEMORY: u64 = 512 << 20;
    /// [`EngineBuilder::max_total_fetch_memory`](super::EngineBuilder::max_total_fetch_memory).
    pub const MAX_TOTAL_FETCH_MEMORY: u64 = 4 << 30;
    /// [`EngineBuilder::max_object_size`](super::EngineBuilder::max_object_size).
    pub const MAX_OBJECT_SIZE: u64 = 100 << 20;
    /// [`EngineBuilder::max_advertisement_bytes`](super::EngineBuilder::max_advertisement_bytes).
    pub const MAX_ADVERTISEMENT_BYTES: u64 = 32 << 20;
    /// [`EngineBuilder::workers`](super::EngineBuilder::workers): fetches in flight.
    pub const WORKERS: usize = 32;
}

/// Validated settings, shared read-only by the scheduler and the handle.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub tick: Duration,
    pub user_delay: Duration,
    pub sync_delay: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub event_lifetime: Duration,
    pub expired_memory: Duration,
    pub workers: usize,
    pub fetch_deadline: Duration,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub max_fetch_bytes: u64,
    pub max_fetch_memory: u64,
    pub max_total_fetch_memory: u64,
    pub max_object_size: u64,
    pub max_advertisement_bytes: u64,
    pub fetch_depth: Option<u32>,
    pub max_events: usize,
    pub max_oids_per_event: usize,
    pub max_urls_per_event: usize,
    pub max_urls_per_identifier: usize,
    pub max_ref_updates_per_event: usize,
    pub shutdown_timeout: Duration,
    pub thread_name: String,
    pub domain_limits: DomainLimits,
    pub domain_overrides: std::collections::HashMap<String, DomainLimits>,
    pub naughty_duration: Duration,
    /// How long a domain with nothing in flight, queued or naughty keeps its statistics.
    pub domain_retention: Duration,
    /// The allowed schemes, private addresses and own domain, as one policy: built by the
    /// builder's setters, checked at `build()` and shared read-only by submit and every fetch.
    pub url_policy: crate::policy::UrlPolicy,
    pub state_file: Option<std::path::PathBuf>,
    pub checkpoint_interval: Duration,
    pub move_unreadable_state_aside: bool,
    pub hide_temp_refs: bool,
}

/// How politely the engine treats one domain: at most `max_concurrent` fetches in flight,
/// and a GCRA quota of `per_minute` requests a minute (each connection; over HTTP each GET and POST) with bursts of up to `burst`.
///
/// ```
/// use purgatory_sync::DomainLimits;
///
/// let slow = DomainLimits::new(1, 6).burst(1); // one at a time, one every 10 s
/// assert_eq!((slow.max_concurrent, slow.per_minute, slow.burst), (1, 6, 1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DomainLimits {
    /// Most fetches in flight at once (default 5).
    pub max_concurrent: usize,
    /// Requests a minute, on average (default 30).
    pub per_minute: u32,
    /// Most requests at once after a quiet spell (default 5).
    pub burst: u32,
}

impl DomainLimits {
    /// Limits with a burst equal to `max_concurrent` (at least 1).
    pub fn new(max_concurrent: usize, per_minute: u32) -> Self {
        DomainLimits {
            max_concurrent,
            per_minute,
            burst: u32::try_from(max_concurrent.max(1)).unwrap_or(u32::MAX),
        }
    }

    /// Sets the burst.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    fn check(&self, setting: &'static str) -> Result<(), BuildError> {
        let bad = |reason: String| Err(BuildError::InvalidSetting { setting, reason });
        if self.max_concurrent == 0 || self.max_concurrent > 1024 {
            return bad(format!(
                "max_concurrent {} is outside 1 ..= 1024",
                self.max_concurrent
            ));
        }
        if self.per_minute == 0 || self.per_minute > 600_000 {
            return bad(format!(
                "per_minute {} is outside 1 ..= 600000",
                self.per_minute
            ));
        }
        if self.burst == 0 || self.burst > 100_000 {
            return bad(format!("burst {} is outside 1 ..= 100000", self.burst));
        }
        Ok(())
    }
}

impl Default for DomainLimits {
    fn default() -> Self {
        DomainLimits::new(5, 30)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tick: Duration::from_secs(1),
            user_delay: Duration::from_secs(180),
            sync_delay: Duration::from_millis(500),
            backoff_base: Duration::from_secs(20),
            backoff_cap: Duration::from_secs(120),
            event_lifetime: Duration::from_secs(30 * 60),
            expired_memory: Duration::from_secs(7 * 24 * 60 * 60),
            workers: net_defaults::WORKERS,
            fetch_deadline: net_defaults::FETCH_DEADLINE,
            connect_timeout: net_defaults::CONNECT_TIMEOUT,
            io_timeout: net_defaults::IO_TIMEOUT,
            max_fetch_bytes: net_defaults::MAX_FETCH_BYTES,
            max_fetch_memory: net_defaults::MAX_FETCH_MEMORY,
            max_total_fetch_memory: net_defaults::MAX_TOTAL_FETCH_MEMORY,
            max_object_size: net_defaults::MAX_OBJECT_SIZE,
            max_advertisement_bytes: net_defaults::MAX_ADVERTISEMENT_BYTES,
            fetch_depth: None,
            max_events: 1_000_000,
            max_oids_per_event: 1024,
            max_urls_per_event: 64,
            max_urls_per_identifier: 256,
            max_ref_updates_per_event: 256,
            shutdown_timeout: Duration::from_secs(10),
            thread_name: "psync".to_owned(),
            domain_limits: DomainLimits::default(),
            domain_overrides: std::collections::HashMap::new(),
            naughty_duration: Duration::from_secs(12 * 60 * 60),
            domain_retention: Duration::from_secs(60 * 60),
            url_policy: crate::policy::UrlPolicy::new(),
            state_file: None,
            checkpoint_interval: Duration::from_secs(60),
            move_unreadable_state_aside: false,
            hide_temp_refs: true,
        }
    }
}

impl Config {
    /// The limits of `domain`: its override, or the default.
    pub fn limits_for(&self, domain: &str) -> DomainLimits {
        self.domain_overrides
            .get(domain)
            .copied()
            .unwrap_or(self.domain_limits)
    }

    /// Delay before the first attempt for an event of this origin.
    pub fn first_delay(&self, origin: crate::Origin) -> Duration {
        match origin {
            crate::Origin::User => self.user_delay,
            crate::Origin::Sync => self.sync_delay,
        }
    }

    /// Wait after the `n`-th incomplete attempt in a row (`n >= 1`): base, 2×base, 4×base, …
    /// up to the cap.
    pub fn backoff(&self, n: u32) -> Duration {
        let cap = self.backoff_cap;
        // base × 2^(n−1), in steps of at most 2^31 (what `checked_mul` takes): from 1 ns, four
        // such steps overflow any `Duration`, and an overflow is past the cap.
        let mut wait = self.backoff_base;
        let mut shift = n.saturating_sub(1);
        while shift > 0 && wait < cap && !wait.is_zero() {
            let step = shift.min(31);
            wait = wait.checked_mul(1 << step).unwrap_or(cap);
            shift -= step;
        }
        wait.min(cap)
    }
}

/// Configures and starts an [`Engine`](crate::Engine). Every setting has the default of the
/// design's behaviour table; [`build`](EngineBuilder::build) checks them all.
///
/// ```no_run
/// use purgatory_sync::Engine;
/// use std::time::Duration;
///
/// let engine = Engine::builder()
///     .workers(8)
///     .fetch_deadline(Duration::from_secs(60))
///     .build()?;
/// # Ok::<(), purgatory_sync::BuildError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct EngineBuilder {
    cfg: Config,
    clock: Arc<dyn Clock>,
    fetcher: Option<Arc<dyn Fetcher>>,
    /// Why the value given to [`our_domain`](Self::our_domain) is not a host with an optional
    /// port: reported by `build`, which is where settings are refused.
    our_domain_error: Option<String>,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        EngineBuilder {
            cfg: Config::default(),
            clock: Arc::new(SystemClock),
            fetcher: None,
            our_domain_error: None,
        }
    }
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("config", &self.cfg)
            .field("clock", &self.clock)
            .field("custom_fetcher", &self.fetcher.is_some())
            .finish()
    }
}

macro_rules! duration_knob {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub fn $name(mut self, value: Duration) -> Self {
            self.cfg.$name = value;
            self
        }
    };
}

impl EngineBuilder {
    /// A builder with every default.
    pub fn new() -> Self {
        Self::default()
    }

    duration_knob!(
        /// How often the scheduler wakes without a command (default 1 s; 1 ms to 1 h).
        tick
    );
    duration_knob!(
        /// First-attempt delay for [`Origin::User`](crate::Origin::User) events
        /// (default 180 s, giving the user's `git push` time to arrive).
        user_delay
    );
    duration_knob!(
        /// First-attempt delay for [`Origin::Sync`](crate::Origin::Sync) events (default 500 ms).
        sync_delay
    );
    duration_knob!(
        /// Wait after the first incomplete attempt; it doubles after each further one up to
        /// [`backoff_cap`](Self::backoff_cap) (default 20 s; at least 1 ms).
        backoff_base
    );
    duration_knob!(
        /// Longest wait between attempts (default 120 s; at least `backoff_base`).
        backoff_cap
    );
    duration_knob!(
        /// How long an event may wait before it is [`Expired`](crate::Outcome::Expired)
        /// (default 30 min; at least 1 ms).
        event_lifetime
    );
    duration_knob!(
        /// How long an expired event's id is remembered (default 7 days; may be 0): a synced
        /// re-submission whose data is still missing is refused with
        /// [`PreviouslyExpired`](crate::SubmitError::PreviouslyExpired) meanwhile.
        expired_memory
    );
    duration_knob!(
        /// Hard wall-clock limit on one fetch from one URL (default 120 s; 1 ms to 1 h).
        fetch_deadline
    );
    duration_knob!(
        /// Socket connect timeout for fetches (default 10 s). libgit2 keeps this setting
        /// process-wide: the first engine built in a process sets it.
        connect_timeout
    );
    duration_knob!(
        /// Socket read/write timeout for fetches (default 30 s), so that a stalled server
        /// cannot hold a worker past its deadline. Process-wide, like `connect_timeout`.
        io_timeout
    );
    duration_knob!(
        /// How long [`shutdown`](crate::Engine::shutdown) waits for fetches in flight to
        /// cancel (default 10 s).
        shutdown_timeout
    );

    /// Most bytes one fetch may receive before it is cut off (default 1 GiB; at least 1 KiB).
    pub fn max_fetch_bytes(mut self, bytes: u64) -> Self {
        self.cfg.max_fetch_bytes = bytes;
        self
    }

    /// Most memory libgit2 may hold for one fetch at once (default 512 MiB; 16 MiB to 1 TiB):
    /// the advertisement, the objects it holds while it resolves deltas, the index of the pack.
    /// A fetch that needs more fails with [`FailureKind::MemoryCap`](crate::FailureKind::MemoryCap)
    /// and costs nothing else. The fetches together hold at most
    /// [`max_total_fetch_memory`](Self::max_total_fetch_memory) (4 GiB) whatever the servers
    /// send; see "Limits" in `docs/behaviour.md`.
    ///
    /// libgit2's allocations are counted through an allocator the engine installs for the
    /// process (plain `malloc`, `realloc` and `free` outside a fetch); on targets whose C
    /// library cannot tell a block's size (other than Linux, Android, FreeBSD and Apple's) the
    /// budget is not enforced.
    pub fn max_fetch_memory(mut self, bytes: u64) -> Self {
        self.cfg.max_fetch_memory = bytes;
        self
    }

    /// Most memory libgit2 may hold for all fetches together (default 4 GiB; 16 MiB to 16 TiB,
    /// and at least [`max_fetch_memory`](Self::max_fetch_memory)): the engine's worst case for
    /// fetches, however many [`workers`](Self::workers) run. A fetch that would take the total
    /// over it fails with [`FailureKind::MemoryCap`](crate::FailureKind::MemoryCap), like one
    /// over its own budget. What libgit2 never gives back (it leaks on some hostile packs,
    /// [`Stats::memory_leaked`](crate::Stats::memory_leaked)) stays counted, so the bound holds
    /// for the life of the process.
    pub fn max_total_fetch_memory(mut self, bytes: u64) -> Self {
        self.cfg.max_total_fetch_memory = bytes;
        self
    }

    /// Largest object libgit2 may build by applying a delta (default 100 MiB; 1 MiB to
    /// 4 GiB). A pack whose delta expands to a larger object fails the fetch with
    /// [`FailureKind::SizeCap`](crate::FailureKind::SizeCap): 80 KB on the wire can otherwise
    /// describe a gigabyte. Whole (non-delta) objects are never held in memory while a pack is
    /// indexed; they are bounded by [`max_fetch_bytes`](Self::max_fetch_bytes), and by the
    /// memory budget when a delta is applied to one.
    ///
    /// This is libgit2's `GIT_OPT_SET_PACK_MAX_OBJECT_SIZE`, which is process-wide: the first
    /// engine built in a process sets it (like [`connect_timeout`](Self::connect_timeout)),
    /// and it also applies to the host's own libgit2 reads of packed objects.
    pub fn max_object_size(mut self, bytes: u64) -> Self {
        self.cfg.max_object_size = bytes;
        self
    }

    /// Largest ref advertisement a server may send (default 32 MiB, about 500 000 refs; 64 KiB
    /// to 1 GiB). libgit2 holds every advertised ref in memory, a few hundred bytes each. A
    /// larger one ends the fetch with [`FailureKind::SizeCap`](crate::FailureKind::SizeCap).
    /// Checked over `git://` and `http://`, where the engine's socket stream reads the
    /// protocol; over `https://` it sees only TLS records, and the memory budget
    /// ([`max_fetch_memory`](Self::max_fetch_memory)) bounds the advertisement instead. HTTP
    /// header lines are held to 8 KiB each and 64 KiB per response the same way.
    pub fn max_advertisement_bytes(mut self, bytes: u64) -> Self {
        self.cfg.max_advertisement_bytes = bytes;
        self
    }

    /// Fetch only the last `depth` commits of history (a shallow fetch). Off by default: a
    /// released repository is served to cloners and needs its full history. `Some(0)` is
    /// refused.
    pub fn fetch_depth(mut self, depth: Option<u32>) -> Self {
        self.cfg.fetch_depth = depth;
        self
    }

    /// Number of worker threads, and so the most fetches in flight (default 32; 1 to 1024).
    /// Fetches wait on the network, not on the CPU: what bounds them is politeness (the
    /// per-domain caps of [`domain_limits`](Self::domain_limits)) and memory
    /// ([`max_total_fetch_memory`](Self::max_total_fetch_memory)), not the number of cores.
    /// Each worker is a thread with a 2 MiB stack (reserved, touched only as used).
    pub fn workers(mut self, n: usize) -> Self {
        self.cfg.workers = n;
        self
    }

    /// Prefix of the engine's thread names (default `psync`: threads `psync-sched`,
    /// `psync-w0`, …); 1 to 8 ASCII letters, digits or `-`, so that names fit the 15 bytes
    /// Linux shows.
    pub fn thread_name(mut self, prefix: impl Into<String>) -> Self {
        self.cfg.thread_name = prefix.into();
        self
    }

    /// Default per-domain limits: at most `max_concurrent` fetches in flight (default 5) and
    /// `per_minute` requests a minute (default 30, a GCRA quota). A request is what the remote
    /// host sees: each connection, and over smart HTTP each GET and POST; a fetch takes a
    /// cell for each of its requests, waiting for it if it must. Keeps the burst.
    pub fn domain_limits(mut self, max_concurrent: usize, per_minute: u32) -> Self {
        let burst = self.cfg.domain_limits.burst;
        self.cfg.domain_limits = DomainLimits::new(max_concurrent, per_minute).burst(burst);
        self
    }

    /// Default per-domain burst: how many fetches may start at once after a quiet spell
    /// (default 5).
    pub fn domain_burst(mut self, burst: u32) -> Self {
        self.cfg.domain_limits.burst = burst;
        self
    }

    /// Limits for one domain (a host name, matched exactly, case-insensitively), instead of
    /// the default ones.
    pub fn domain_override(mut self, domain: &str, limits: DomainLimits) -> Self {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        self.cfg.domain_overrides.insert(d, limits);
        self
    }

    /// The relay's own domain, never fetched from: `host` refuses every port of the host,
    /// `host:port` (or `[v6-address]:port`) only URLs whose port, given or their scheme's
    /// default, is `port`, so that a sibling git service on another port of the same host can
    /// still be fetched from. The host is matched on the whole host, not a substring, without
    /// case or trailing dot.
    ///
    /// A value that is not a host with an optional port (an empty one, a port outside
    /// 1 ..= 65535) makes [`build`](Self::build) fail with
    /// [`BuildError::InvalidSetting`] naming `our_domain`.
    pub fn our_domain(mut self, domain: &str) -> Self {
        // The same canonical form as the domains of clone URLs (IPv6 brackets, IDN, case).
        match crate::policy::OwnDomain::parse(domain) {
            Ok(own) => {
                self.cfg.url_policy = self.cfg.url_policy.clone().own_domain(Some(own));
                self.our_domain_error = None;
            }
            Err(why) => {
                self.cfg.url_policy = self.cfg.url_policy.clone().own_domain(None);
                self.our_domain_error = Some(format!("{domain:?}: {why}"));
            }
        }
        self
    }

    /// Whether the built-in fetcher hides its temporary refs from the relay's clients
    /// (default `true`). The objects of waiting events are pinned under
    /// [`TEMP_REF_PREFIX`](crate::TEMP_REF_PREFIX) so that `git gc` keeps them; served by
    /// `git upload-pack` (`git daemon`, `git http-backend`), those refs would be advertised to
    /// anyone who clones the repository while the events wait. Before it first pins objects
    /// in a repository the fetcher adds `transfer.hideRefs = refs/purgatory-sync/` to the
    /// repository's own configuration, unless a value there or in the system or global
    /// configuration already hides them, or explicitly shows them (`!refs/purgatory-sync/`).
    /// The value is written once and left in place. It also makes `git receive-pack` refuse
    /// pushes to those refs. `false` writes nothing.
    pub fn hide_temp_refs(mut self, hide: bool) -> Self {
        self.cfg.hide_temp_refs = hide;
        self
    }

    /// How long a domain with DNS or TLS certificate failures is skipped (default 12 h).
    pub fn naughty_duration(mut self, duration: Duration) -> Self {
        self.cfg.naughty_duration = duration;
        self
    }

    /// How long a domain with nothing in flight, nothing queued and nothing on the naughty
    /// list keeps its entry in [`Stats::domains`](crate::Stats::domains), and so its metrics'
    /// series (default 1 h; at least as long as its rate quota takes to refill). Clone URLs
    /// come from strangers' events: without retirement every domain ever named would be
    /// exported for the life of the engine. Engine-wide totals keep counting what retired
    /// domains did. Range 1 s ..= 1 year.
    pub fn domain_retention(mut self, duration: Duration) -> Self {
        self.cfg.domain_retention = duration;
        self
    }

    /// Whether clone URLs may point at loopback, private, link-local, multicast or
    /// unspecified addresses (default `false`; tests and the demo, which serve git on
    /// 127.0.0.x, set it).
    pub fn allow_private_addresses(mut self, allow: bool) -> Self {
        self.cfg.url_policy = self.cfg.url_policy.clone().allow_private_addresses(allow);
        self
    }

    /// The URL schemes that may be fetched (default `https`, `http`, `git`). `file`, `ssh`
    /// and `ext` can be listed but never should be for URLs from other people's events.
    pub fn allowed_schemes<I, S>(mut self, schemes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let schemes: Vec<String> = schemes.into_iter().map(Into::into).collect();
        self.cfg.url_policy = self.cfg.url_policy.clone().allowed_schemes(schemes);
        self
    }

    /// Keeps the engine's durable state in this file: waiting events with their remaining
    /// lifetimes, the expired-id memory and the naughty list. It is written atomically on
    /// [`shutdown`](crate::Engine::shutdown) and every
    /// [`checkpoint_interval`](Self::checkpoint_interval), and restored by `build`, so that a
    /// restart or a crash loses at most one interval. See `docs/state-file.md`.
    ///
    /// The file must be a regular file (or not exist yet: a first start); anything else, such
    /// as a directory or a FIFO, is refused with [`BuildError::StateFile`] and
    /// [`StateFileError::NotARegularFile`](crate::StateFileError::NotARegularFile), without
    /// reading from it.
    ///
    /// One engine at a time uses a state file. On Unix, `build` takes an exclusive advisory
    /// lock (`flock`) on `<name>.lock` beside it, created if missing and never removed, before
    /// reading the file, and holds it until the engine has shut down (after its final write)
    /// or is dropped; the kernel drops it if the process dies. A second engine on the same
    /// file, in this process or another, gets [`BuildError::StateFileLocked`]. The lock is on
    /// its own file because every write replaces the state file by a rename. On other
    /// platforms no lock is taken: do not share a state file between engines there.
    pub fn state_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.cfg.state_file = Some(path.into());
        self
    }

    /// How often the state file is written while the engine runs (default 60 s; 1 ms to
    /// 1 day).
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.cfg.checkpoint_interval = interval;
        self
    }

    /// What `build` does with a state file it cannot use (corrupt, truncated, of an unknown
    /// version, unreadable, not a regular file). `false` (the default): `build` fails with
    /// [`BuildError::StateFile`] and the file is left as it is. `true`: the file is renamed to
    /// `<name>.unreadable-<unix seconds>` beside it, kept for inspection, and the engine starts
    /// empty.
    pub fn move_unreadable_state_aside(mut self, move_aside: bool) -> Self {
        self.cfg.move_unreadable_state_aside = move_aside;
        self
    }

    /// Most events waiting at once; further submits get
    /// [`SubmitError::QueueFull`](crate::SubmitError::QueueFull) (default 1 000 000).
    ///
    /// Events restored from the [state file](Self::state_file) count too, but are never
    /// dropped for it: a restart with a lower limit than the events saved keeps them all and
    /// refuses new submits until fewer than `n` wait.
    pub fn max_events(mut self, n: usize) -> Self {
        self.cfg.max_events = n;
        self
    }

    /// Most object ids one event may wait for (default 1024).
    pub fn max_oids_per_event(mut self, n: usize) -> Self {
        self.cfg.max_oids_per_event = n;
        self
    }

    /// Most clone URLs one event may list (default 64).
    pub fn max_urls_per_event(mut self, n: usize) -> Self {
        self.cfg.max_urls_per_event = n;
        self
    }

    /// Most distinct clone URLs the waiting events of one identifier may list together
    /// (default 256; 1 to 65 536; URLs are the same when they are fetched the same: case,
    /// default port and trailing dot do not count). A submit that would pass it is refused
    /// with [`SubmitError::TooManyIdentifierUrls`](crate::SubmitError::TooManyIdentifierUrls);
    /// URLs of events that left no longer count. It bounds what one identifier costs every
    /// attempt and the work of each command on it, however many events strangers publish.
    pub fn max_urls_per_identifier(mut self, n: usize) -> Self {
        self.cfg.max_urls_per_identifier = n;
        self
    }

    /// Most [ref updates](crate::PendingEvent::ref_updates) one event may carry (default 256;
    /// 1 to 65 536).
    pub fn max_ref_updates_per_event(mut self, n: usize) -> Self {
        self.cfg.max_ref_updates_per_event = n;
        self
    }

    /// The clock every scheduling decision reads (default: the system clock). Tests pass a
    /// [`FakeClock`](crate::FakeClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Replaces the libgit2 fetcher, for tests that inject failures and panics.
    pub fn fetcher(mut self, fetcher: impl Fetcher) -> Self {
        self.fetcher = Some(Arc::new(fetcher));
        self
    }

    /// Checks every setting, starts the scheduler thread and the worker pool.
    ///
    /// # Errors
    /// [`BuildError::InvalidSetting`] names the first setting out of range;
    /// [`BuildError::Spawn`] if a thread could not be started (threads already started are
    /// stopped again).
    pub fn build(self) -> Result<crate::Engine, BuildError> {
        self.validate()?;
        let (fetcher, builtin) = match self.fetcher {
            Some(f) => (f, false),
            None => {
                crate::fetch::init(&self.cfg);
                (Arc::new(GitFetcher::new()) as Arc<dyn crate::Fetcher>, true)
            }
        };
        crate::engine::Engine::start(self.cfg, self.clock, fetcher, builtin)
    }

    /// Checks `event` as [`Engine::submit`](crate::Engine::submit) would with these settings,
    /// without an engine: every field, the clone URLs against the URL policy, and the
    /// repository (an existing bare git repository). `Ok` gives the clone URLs the policy
    /// refuses (which `submit` would skip); an event none of whose URLs is left can still
    /// wait for a push. What only a running engine knows (a full queue, an id that expired,
    /// the URLs of an identifier's other events) is not checked. For tools that validate a
    /// batch before starting anything, such as the command-line tool's manifest.
    ///
    /// ```
    /// use purgatory_sync::{Engine, PendingEvent, SubmitError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// git2::Repository::init_bare(dir.path())?;
    /// let builder = Engine::builder();
    /// let event = PendingEvent::new("e1", "alice/x", dir.path())
    ///     .oid(&"a".repeat(40))
    ///     .clone_url("https://git.example.com/alice/x.git")
    ///     .clone_url("http://127.0.0.1/alice/x.git"); // loopback: refused by default
    /// let refused = builder.check_event(&event)?;
    /// assert_eq!(refused.len(), 1);
    /// assert_eq!(refused[0].index, 1);
    ///
    /// let bad = PendingEvent::new("e2", "alice/x", dir.path()).oid("abc");
    /// assert!(matches!(builder.check_event(&bad), Err(SubmitError::InvalidObjectId { .. })));
    /// let nowhere = PendingEvent::new("e3", "alice/x", "/nonexistent/x.git").oid(&"a".repeat(40));
    /// assert!(matches!(builder.check_event(&nowhere), Err(SubmitError::InvalidRepository { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// The [`SubmitError`](crate::SubmitError) `submit` would return for these reasons.
    pub fn check_event(
        &self,
        event: &crate::PendingEvent,
    ) -> Result<Vec<crate::RefusedUrl>, crate::SubmitError> {
        let checked = crate::validate::event(event, &self.cfg)?;
        crate::validate::repository(&event.repo)?;
        Ok(checked.refused)
    }

    /// The settings so far, for the crate's tests.
    #[cfg(test)]
    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    fn validate(&self) -> Result<(), BuildError> {
        let c = &self.cfg;
        let ms = Duration::from_millis(1);
        let hour = Duration::from_secs(3600);
        let bad = |setting: &'static str, reason: String| {
            Err(BuildError::InvalidSetting { setting, reason })
        };
        let range = |setting, v: Duration, lo: Duration, hi: Duration| {
            if v < lo || v > hi {
                bad(setting, format!("{v:?} is outside {lo:?} ..= {hi:?}"))
            } else {
                Ok(())
            }
        };
        let year = Duration::from_secs(365 * 24 * 3600);
        if let Some(why) = &self.our_domain_error {
            return bad("our_domain", why.clone());
        }
        range("tick", c.tick, ms, hour)?;
        range("user_delay", c.user_delay, Duration::ZERO, year)?;
        range("sync_delay", c.sync_delay, Duration::ZERO, year)?;
        range("backoff_base", c.backoff_base, ms, year)?;
        range("backoff_cap", c.backoff_cap, c.backoff_base, year)?;
        range("event_lifetime", c.event_lifetime, ms, year)?;
        range("expired_memory", c.expired_memory, Duration::ZERO, year)?;
        range("fetch_deadline", c.fetch_deadline, ms, hour)?;
        range("connect_timeout", c.connect_timeout, ms, hour)?;
        range("io_timeout", c.io_timeout, ms, hour)?;
        range("shutdown_timeout", c.shutdown_timeout, Duration::ZERO, hour)?;
        let count = |setting, v: usize, hi: usize| {
            if v == 0 || v > hi {
                bad(setting, format!("{v} is outside 1 ..= {hi}"))
            } else {
                Ok(())
            }
        };
        count("workers", c.workers, 1024)?;
        count("max_events", c.max_events, usize::MAX / 2)?;
        count("max_oids_per_event", c.max_oids_per_event, 1 << 20)?;
        count("max_urls_per_event", c.max_urls_per_event, 4096)?;
        count(
            "max_urls_per_identifier",
            c.max_urls_per_identifier,
            1 << 16,
        )?;
        count(
            "max_ref_updates_per_event",
            c.max_ref_updates_per_event,
            1 << 16,
        )?;
        if c.max_fetch_bytes < 1024 {
            return bad(
                "max_fetch_bytes",
                format!("{} is below 1024", c.max_fetch_bytes),
            );
        }
        let mib = 1u64 << 20;
        let bytes_range = |setting, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                bad(setting, format!("{v} is outside {lo} ..= {hi} bytes"))
            } else {
                Ok(())
            }
        };
        bytes_range("max_fetch_memory", c.max_fetch_memory, 16 * mib, 1 << 40)?;
        bytes_range(
            "max_total_fetch_memory",
            c.max_total_fetch_memory,
            16 * mib,
            1 << 44,
        )?;
        if c.max_total_fetch_memory < c.max_fetch_memory {
            return bad(
                "max_total_fetch_memory",
                format!(
                    "{} is below max_fetch_memory ({})",
                    c.max_total_fetch_memory, c.max_fetch_memory
                ),
            );
        }
        bytes_range("max_object_size", c.max_object_size, mib, 4 << 30)?;
        bytes_range(
            "max_advertisement_bytes",
            c.max_advertisement_bytes,
            64 << 10,
            1 << 30,
        )?;
        if c.fetch_depth == Some(0) {
            return bad("fetch_depth", "a depth of 0 fetches nothing".to_owned());
        }
        c.domain_limits.check("domain_limits")?;
        for limits in c.domain_overrides.values() {
            limits.check("domain_override")?;
        }
        range("naughty_duration", c.naughty_duration, Duration::ZERO, year)?;
        range(
            "domain_retention",
            c.domain_retention,
            Duration::from_secs(1),
            year,
        )?;
        range(
            "checkpoint_interval",
            c.checkpoint_interval,
            ms,
            Duration::from_secs(24 * 3600),
        )?;
        if c.url_policy.schemes().is_empty() {
            return bad("allowed_schemes", "no scheme allowed".to_owned());
        }
        let name = &c.thread_name;
        if name.is_empty()
            || name.len() > 8
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad(
                "thread_name",
                format!("{name:?} is not 1 to 8 ASCII letters, digits or `-`"),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_to_cap() {
        let c = Config::default();
        let secs: Vec<u64> = (1..=6).map(|n| c.backoff(n).as_secs()).collect();
        assert_eq!(secs, [20, 40, 80, 120, 120, 120]);
        assert_eq!(c.backoff(u32::MAX), c.backoff_cap);
    }

    #[test]
    fn validation_names_the_setting() {
        let cases: Vec<(EngineBuilder, &str)> = vec![
            (EngineBuilder::new().tick(Duration::ZERO), "tick"),
            (EngineBuilder::new().workers(0), "workers"),
            (EngineBuilder::new().workers(5000), "workers"),
            (
                EngineBuilder::new()
                    .backoff_base(Duration::from_secs(30))
                    .backoff_cap(Duration::from_secs(10)),
                "backoff_cap",
            ),
            (
                EngineBuilder::new().event_lifetime(Duration::ZERO),
                "event_lifetime",
            ),
            (
                EngineBuilder::new().fetch_deadline(Duration::ZERO),
                "fetch_deadline",
            ),
            (EngineBuilder::new().max_events(0), "max_events"),
            (
                EngineBuilder::new().max_oids_per_event(0),
                "max_oids_per_event",
            ),
            (
                EngineBuilder::new().max_ref_updates_per_event(0),
                "max_ref_updates_per_event",
            ),
            (
                EngineBuilder::new().max_urls_per_identifier(0),
                "max_urls_per_identifier",
            ),
            (
                EngineBuilder::new().thread_name("much-too-long"),
                "thread_name",
            ),
            (EngineBuilder::new().thread_name("a b"), "thread_name"),
            (EngineBuilder::new().max_fetch_bytes(10), "max_fetch_bytes"),
            (EngineBuilder::new().fetch_depth(Some(0)), "fetch_depth"),
            (
                EngineBuilder::new().max_fetch_memory(1 << 20),
                "max_fetch_memory",
            ),
            (
                EngineBuilder::new().max_object_size(1024),
                "max_object_size",
            ),
            (
                EngineBuilder::new().max_advertisement_bytes(10),
                "max_advertisement_bytes",
            ),
            (EngineBuilder::new().domain_limits(0, 30), "domain_limits"),
            (EngineBuilder::new().domain_limits(5, 0), "domain_limits"),
            (EngineBuilder::new().domain_burst(0), "domain_limits"),
            (
                EngineBuilder::new().domain_override("x.example", DomainLimits::new(1, 0)),
                "domain_override",
            ),
            (
                EngineBuilder::new().allowed_schemes(Vec::<String>::new()),
                "allowed_schemes",
            ),
        ];
        for (b, name) in cases {
            match b.validate() {
                Err(BuildError::InvalidSetting { setting, reason }) => {
                    assert_eq!(setting, name, "{reason}")
                }
                other => panic!("{name}: expected InvalidSetting, got {other:?}"),
            }
        }
        assert!(EngineBuilder::new().validate().is_ok());
    }
}

#[cfg(test)]
mod our_domain_tests {
    use super::*;

    #[test]
    fn our_domain_takes_the_canonical_form_of_clone_url_domains() {
        for (given, canonical) in [
            ("Relay.Example.COM.", "relay.example.com"),
            ("[::1]", "::1"),
            ("127.0.0.3", "127.0.0.3"),
        ] {
            let b = EngineBuilder::new().our_domain(given);
            let own = b.cfg.url_policy.own().expect("a valid own domain");
            assert_eq!((&*own.host, own.port), (canonical, None), "{given}");
            let url = format!("https://{given}/r.git");
            assert_eq!(
                crate::policy::domain_of(&url).as_deref(),
                Some(canonical),
                "{given}"
            );
        }
    }

    #[test]
    fn our_domain_takes_a_port_with_the_host_in_canonical_form() {
        for (given, host, port) in [
            ("relay.example.com:8443", "relay.example.com", 8443),
            ("Relay.Example.COM.:443", "relay.example.com", 443),
            ("[::1]:9418", "::1", 9418),
            ("[0::1]:1", "::1", 1),
            ("127.0.0.3:65535", "127.0.0.3", 65535),
            (" relay.example.com:80 ", "relay.example.com", 80),
        ] {
            let b = EngineBuilder::new().our_domain(given);
            let own = b.cfg.url_policy.own().expect("a valid own domain");
            assert_eq!((&*own.host, own.port), (host, Some(port)), "{given}");
            assert!(b.validate().is_ok(), "{given}");
        }
    }

    #[test]
    fn an_own_domain_that_is_no_host_with_a_port_is_refused_at_build() {
        for given in [
            "",
            "relay.example.com:",
            "relay.example.com:0",
            "relay.example.com:65536",
            "relay.example.com:https",
            "relay.example.com:+443",
            "[::1",
            "[::1]443",
            "::1:99999",
            "fe80::1:443x",
            "relay.example.com/x",
            "user@relay.example.com",
            "a b",
        ] {
            match EngineBuilder::new().our_domain(given).validate() {
                Err(BuildError::InvalidSetting {
                    setting: "our_domain",
                    reason,
                }) => assert!(reason.starts_with(&format!("{given:?}: ")), "{reason}"),
                other => panic!("{given:?}: {other:?}"),
            }
        }
        // A later valid value replaces the refused one.
        let b = EngineBuilder::new()
            .our_domain("relay.example.com:0")
            .our_domain("relay.example.com");
        assert!(b.validate().is_ok());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Settings as configured, and any `Duration` up to the largest.
    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..=365 * 24 * 3_600_000).prop_map(Duration::from_millis),
            any::<u64>().prop_map(Duration::from_nanos),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    fn attempts() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..=100, any::<u32>(), (u32::MAX - 100)..=u32::MAX]
    }

    fn backoff(a: Duration, b: Duration) -> (Duration, Duration, Config) {
        let (base, cap) = (a.min(b), a.max(b));
        let cfg = Config {
            backoff_base: base,
            backoff_cap: cap,
            ..Config::default()
        };
        (base, cap, cfg)
    }

    /// The case the doubling property found: the wait stopped doubling at base × 2^31
    /// (24.8 days from 1 ms) and never reached a cap further away, which the validation
    /// allows (up to a year).
    #[test]
    fn backoff_reaches_a_cap_further_than_2_pow_31_bases() {
        let cfg = Config {
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_secs(365 * 24 * 3600),
            ..Config::default()
        };
        assert_eq!(cfg.backoff(32), Duration::from_millis(1 << 31));
        assert_eq!(cfg.backoff(33), Duration::from_millis(1 << 32));
        assert_eq!(cfg.backoff(40), cfg.backoff_cap);
        assert_eq!(cfg.backoff(u32::MAX), cfg.backoff_cap);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// For any base ≤ cap and any count of attempts, the wait is neither below the base nor
        /// above the cap, and it never shrinks as the count grows.
        #[test]
        fn backoff_stays_between_base_and_cap_and_never_decreases(
            a in duration(),
            b in duration(),
            n in attempts(),
            m in attempts(),
        ) {
            let (base, cap, cfg) = backoff(a, b);
            let (n, m) = (n.min(m), n.max(m));
            let (wn, wm) = (cfg.backoff(n), cfg.backoff(m));
            prop_assert!(base <= wn && wn <= cap, "backoff({}) = {:?}", n, wn);
            prop_assert!(base <= wm && wm <= cap, "backoff({}) = {:?}", m, wm);
            prop_assert!(wn <= wm, "backoff({}) = {:?} > backoff({}) = {:?}", n, wn, m, wm);
        }

        /// The wait is exactly base × 2^(n−1), or the cap once that is larger: doubling does
        /// not stop short of the cap however far apart base and cap are.
        #[test]
        fn backoff_doubles_up_to_the_cap(a in duration(), b in duration(), n in attempts()) {
            let (base, cap, cfg) = backoff(a, b);
            // `None` on overflow, past the largest `Duration` whatever the base (but 0).
            let doubled = match base.as_nanos() {
                0 => Some(0),
                nanos => 1u128
                    .checked_shl(n.saturating_sub(1))
                    .and_then(|f| nanos.checked_mul(f)),
            };
            let expected = match doubled {
                Some(nanos) if nanos < cap.as_nanos() => {
                    let secs = u64::try_from(nanos / 1_000_000_000).expect("below the cap");
                    Duration::new(secs, (nanos % 1_000_000_000) as u32)
                }
                _ => cap,
            };
            prop_assert_eq!(cfg.backoff(n), expected, "n = {}", n);
        }
    }
}
