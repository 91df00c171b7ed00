//! The fetcher: the only part of the engine that touches the network.
//!
//! A worker runs one [`FetchRequest`] (one URL, one repository, the ids still missing) through
//! a [`Fetcher`] and hands the [`FetchReport`] back to the scheduler. The trait is small so
//! that tests can inject failures, stalls and panics; [`GitFetcher`] is the libgit2
//! implementation used by default.

#[allow(unsafe_code)]
mod alloc;
pub(crate) mod conn;
mod framing;
mod git;
#[allow(unsafe_code)]
mod libgit2;
mod quarantine;
#[allow(unsafe_code)]
mod stream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use git::GitFetcher;

pub use git::TEMP_REF_PREFIX;
pub(crate) use git::{init, open_bare};

use crate::config::net_defaults;
use crate::policy::UrlPolicy;
use crate::ObjectId;

/// One fetch: the objects an identifier still misses, from one URL, into one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FetchRequest {
    /// The identifier the objects are fetched for.
    pub identifier: String,
    /// The local bare repository to fetch into.
    pub repo: PathBuf,
    /// The remote to fetch from.
    pub url: String,
    /// The object ids still missing, sorted, without duplicates.
    pub wanted: Vec<ObjectId>,
    /// What to ask the server for (default [`FetchMode::Everything`]).
    pub mode: FetchMode,
}

/// What one fetch asks a server for.
///
/// Requests are the scarce resource: the engine first visits every URL of an attempt once
/// ([`OneVisit`](FetchMode::OneVisit): one connection, which over smart HTTP is a GET and a
/// POST), and only then, if objects are still missing, probes the servers that advertised
/// some of them for the others ([`Everything`](FetchMode::Everything)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FetchMode {
    /// What one connection can ask without risk: the wanted ids the server advertises (any
    /// ref, `refs/nostr/*` included); or, when it advertises none of them and allows wants by
    /// id, all of them by id on the same connection, not split if refused. A server lacking
    /// everything costs one connection (over HTTP its GET, and a POST if it allows ids), as a
    /// plain fetch would; a probe there cannot lose what it advertises, since it advertises
    /// none of it.
    OneVisit,
    /// Every wanted id: the advertised ones, then the others by id where the server allows
    /// it (splitting the set when the server refuses it as a whole), or else its branches,
    /// tags and `refs/nostr/*`.
    #[default]
    Everything,
}

impl FetchRequest {
    /// A request; public so that tests of custom fetchers can build one.
    pub fn new(
        identifier: impl Into<String>,
        repo: impl Into<PathBuf>,
        url: impl Into<String>,
        wanted: Vec<ObjectId>,
    ) -> Self {
        FetchRequest {
            identifier: identifier.into(),
            repo: repo.into(),
            url: url.into(),
            wanted,
            mode: FetchMode::Everything,
        }
    }

    /// The same request in another mode.
    pub fn with_mode(mut self, mode: FetchMode) -> Self {
        self.mode = mode;
        self
    }
}

/// Tells a running fetch when to give up and how much it may take: its deadline (real time,
/// because it bounds real I/O), the engine's cancel flag, the per-attempt limits, and the
/// [`UrlPolicy`] the URL must pass right before the fetch (and every address it connects to).
#[derive(Debug, Clone)]
pub struct FetchControl {
    deadline: Instant,
    cancel: Arc<AtomicBool>,
    max_bytes: u64,
    max_memory: u64,
    /// The memory of all the engine's fetches together; none outside the engine.
    memory_pool: Option<Arc<conn::MemoryPool>>,
    max_advertisement: u64,
    /// Lets each request after the first through with a cell of the domain's quota; none
    /// outside the engine (a control made by a caller lets every request through).
    gate: Option<(
        Arc<crate::scheduler::domains::RequestGate>,
        Arc<dyn crate::clock::Clock>,
    )>,
    depth: Option<u32>,
    connect_timeout: Duration,
    io_timeout: Duration,
    url_policy: UrlPolicy,
    hide_temp_refs: bool,
}

/// Why a fetch should stop now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The fetch's wall-clock deadline has passed.
    Deadline,
    /// The engine is shutting down.
    Cancelled,
}

impl FetchControl {
    /// A control with the given real-time deadline and shared cancel flag, and default limits
    /// (1 GiB received, 512 MiB of memory, 32 MiB of ref advertisement, full history, 10 s connect and 30 s idle timeouts), the strict
    /// [`UrlPolicy::new`] (no private addresses: set
    /// [`with_url_policy`](Self::with_url_policy) to fetch from loopback), and temporary refs
    /// hidden from the repository's clients.
    pub fn new(deadline: Instant, cancel: Arc<AtomicBool>) -> Self {
        FetchControl {
            deadline,
            cancel,
            max_bytes: net_defaults::MAX_FETCH_BYTES,
            max_memory: net_defaults::MAX_FETCH_MEMORY,
            memory_pool: None,
            max_advertisement: net_defaults::MAX_ADVERTISEMENT_BYTES,
            gate: None,
            depth: None,
            connect_timeout: net_defaults::CONNECT_TIMEOUT,
            io_timeout: net_defaults::IO_TIMEOUT,
            url_policy: UrlPolicy::new(),
            hide_temp_refs: true,
        }
    }

    /// Sets the URL policy checked right before the fetch, and at every connection.
    pub fn with_url_policy(mut self, policy: UrlPolicy) -> Self {
        self.url_policy = policy;
        self
    }

    /// Sets the most bytes the attempt may receive.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets the most memory libgit2 may hold for the fetch at once.
    pub fn with_max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = bytes;
        self
    }

    /// Sets the largest ref advertisement a server may send (checked over `git://` and
    /// `http://`, where the engine's stream sees the protocol).
    pub fn with_max_advertisement(mut self, bytes: u64) -> Self {
        self.max_advertisement = bytes;
        self
    }

    /// Asks for a shallow fetch of `depth` commits (`None`: full history).
    pub fn with_depth(mut self, depth: Option<u32>) -> Self {
        self.depth = depth;
        self
    }

    /// Sets the socket connect timeout and the longest a connection may stay silent.
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        self.connect_timeout = connect;
        self.io_timeout = io;
        self
    }

    /// Sets whether the fetcher hides its temporary refs from the repository's clients
    /// (`transfer.hideRefs`, see
    /// [`EngineBuilder::hide_temp_refs`](crate::EngineBuilder::hide_temp_refs)).
    pub fn with_hide_temp_refs(mut self, hide: bool) -> Self {
        self.hide_temp_refs = hide;
        self
    }

    /// `Some` once the fetch must stop.
    pub fn should_stop(&self) -> Option<StopReason> {
        if self.cancel.load(Ordering::Relaxed) {
            Some(StopReason::Cancelled)
        } else if Instant::now() >= self.deadline {
            Some(StopReason::Deadline)
        } else {
            None
        }
    }

    /// The real-time deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The most bytes the attempt may receive.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The most memory libgit2 may hold for the fetch at once.
    pub fn max_memory(&self) -> u64 {
        self.max_memory
    }

    /// The largest ref advertisement a server may send.
    pub fn max_advertisement(&self) -> u64 {
        self.max_advertisement
    }

    /// Counts the fetch's memory in the engine's `pool` of all fetches, and holds it to the
    /// pool's limit.
    pub(crate) fn with_memory_pool(mut self, pool: Arc<conn::MemoryPool>) -> Self {
        self.memory_pool = Some(pool);
        self
    }

    pub(crate) fn memory_pool(&self) -> Option<Arc<conn::MemoryPool>> {
        self.memory_pool.clone()
    }

    pub(crate) fn with_gate(
        mut self,
        gate: Arc<crate::scheduler::domains::RequestGate>,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Self {
        self.gate = Some((gate, clock));
        self
    }

    /// Takes a cell of the domain's quota for one more request, waiting for it while the
    /// fetch may go on; `false` when the fetch must stop first. Always `true` outside the
    /// engine.
    pub(crate) fn take_request(&self) -> bool {
        let Some((gate, clock)) = &self.gate else {
            return true;
        };
        loop {
            match gate.try_take(clock.now()) {
                Ok(()) => return true,
                Err(wait) => {
                    if self.should_stop().is_some() {
                        return false;
                    }
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    // Look again when the cell is due (a fake clock may move sooner), and
                    // notice a shutdown.
                    std::thread::sleep(
                        wait.min(left)
                            .clamp(Duration::from_millis(1), Duration::from_millis(100)),
                    );
                }
            }
        }
    }

    /// The shallow-fetch depth, if any.
    pub fn depth(&self) -> Option<u32> {
        self.depth
    }

    /// The socket connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The longest a connection may stay silent.
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// The URL policy of the fetch.
    pub fn url_policy(&self) -> &UrlPolicy {
        &self.url_policy
    }

    /// Whether the fetcher hides its temporary refs from the repository's clients.
    pub fn hide_temp_refs(&self) -> bool {
        self.hide_temp_refs
    }

    pub(crate) fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }
}

/// Why (part of) an attempt failed. Later policy (try another URL, skip a domain for hours) is
/// decided on this, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FailureKind {
    /// The host name did not resolve.
    Dns,
    /// The TLS handshake or the server's certificate failed.
    Tls,
    /// The server refused the connection.
    ConnectionRefused,
    /// Connecting took longer than the connect timeout, or the connection stayed silent longer
    /// than the idle timeout.
    Timeout,
    /// The attempt ran past its wall-clock deadline.
    Deadline,
    /// The server sent more than the per-attempt byte cap, an object larger than the
    /// per-object limit, or a part of its answer larger than that part's limit (an HTTP header
    /// line, an HTTP header block, the ref advertisement); the message says which.
    SizeCap,
    /// What the server sent needed more memory than one fetch may use: a pack crafted to
    /// expand when its deltas are resolved, objects or headers too large to hold.
    MemoryCap,
    /// The server does not have (some of) the wanted objects, or not the repository.
    NotFound,
    /// The server answered, but not in a way a git client can use: garbage, an HTTP error, a
    /// redirect, a connection cut in the middle of a pack.
    Protocol,
    /// Any other network failure (reset, unreachable network).
    Network,
    /// The local repository could not be opened or written.
    LocalRepository,
    /// The URL was refused before any traffic.
    Refused,
    /// The engine shut down during the attempt.
    Cancelled,
    /// The fetcher panicked; the engine counted it as a failed attempt.
    Panicked,
}

impl FailureKind {
    /// A short stable name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Dns => "dns",
            FailureKind::Tls => "tls",
            FailureKind::ConnectionRefused => "connection_refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Deadline => "deadline",
            FailureKind::SizeCap => "size_cap",
            FailureKind::MemoryCap => "memory_cap",
            FailureKind::NotFound => "not_found",
            FailureKind::Protocol => "protocol",
            FailureKind::Network => "network",
            FailureKind::LocalRepository => "local_repository",
            FailureKind::Refused => "refused",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Panicked => "panicked",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure with a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    /// The class of failure.
    pub kind: FailureKind,
    /// What happened, for logs.
    pub message: String,
}

impl FetchError {
    /// A failure of `kind` with `message`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        FetchError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for FetchError {}

/// The result of one fetch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FetchReport {
    /// Which of the wanted ids are in the repository after the attempt (whoever brought them).
    pub present: Vec<ObjectId>,
    /// Which of the wanted ids are still not in the repository.
    pub missing: Vec<ObjectId>,
    /// Why the attempt, or part of it, failed. A report can carry both present ids and an
    /// error when a server had only some of the objects.
    pub error: Option<FetchError>,
    /// Bytes received from the server.
    pub bytes_received: u64,
    /// The most memory libgit2 held for the fetch at once (0 where it is not counted).
    pub memory_peak: u64,
    /// The wanted ids the server advertised as ref tips (empty when its advertisement was not
    /// read). The engine tries a URL that advertised missing ids first at the next attempt.
    pub advertised: Vec<ObjectId>,
    /// Whether the server's advertisement was read (the visit got that far).
    pub advertisement_read: bool,
    /// Whether the server allows wants of ids it does not advertise
    /// (`allow-tip-sha1-in-want` / `allow-reachable-sha1-in-want`), once known.
    pub ids_allowed: Option<bool>,
    /// Memory libgit2 still held for the fetch after every handle of it was freed: lost for
    /// good. libgit2 1.9 leaks the object of a delta that duplicates another object of the
    /// pack, which no real server sends; the engine counts such memory against its budget and
    /// skips the host for a while.
    pub memory_leaked: u64,
}

impl FetchReport {
    /// A report of the ids present after the attempt and an optional failure.
    pub fn new(present: Vec<ObjectId>, error: Option<FetchError>) -> Self {
        FetchReport {
            present,
            missing: Vec::new(),
            error,
            bytes_received: 0,
            memory_peak: 0,
            memory_leaked: 0,
            advertised: Vec::new(),
            advertisement_read: false,
            ids_allowed: None,
        }
    }

    /// A failed attempt that brought nothing.
    pub fn failed(error: FetchError) -> Self {
        Self::new(Vec::new(), Some(error))
    }
}

/// Fetches objects into a repository and answers which objects it holds.
///
/// Implementations run on worker threads ([`fetch`](Fetcher::fetch)) and on the scheduler
/// thread ([`present`](Fetcher::present), [`drop_temp_refs`](Fetcher::drop_temp_refs)), so
/// they must be `Send + Sync`. A panic inside `fetch` is caught by the engine and counted as a
/// failed attempt.
pub trait Fetcher: Send + Sync + 'static {
    /// Fetches `request.wanted` from `request.url` into `request.repo`, stopping when `control`
    /// says so, keeps what arrived reachable under the temporary ref namespace, and reports
    /// which wanted ids are present afterwards.
    fn fetch(&self, request: &FetchRequest, control: &FetchControl) -> FetchReport;

    /// Which of `oids` are in the object database of `repo` now. The default reads the
    /// repository with libgit2.
    ///
    /// # Errors
    /// The repository could not be opened or read.
    fn present(&self, repo: &Path, oids: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
        git::present(repo, oids)
    }

    /// Removes the temporary refs that kept `oids` reachable in `repo`, once no waiting event
    /// needs them. The default deletes them with libgit2; missing refs are not an error.
    ///
    /// # Errors
    /// The repository could not be opened or a ref could not be deleted.
    fn drop_temp_refs(&self, repo: &Path, oids: &[ObjectId]) -> Result<(), FetchError> {
        git::drop_temp_refs(repo, oids)
    }

    /// Sets `updates` in `repo` in one transaction: all of them or none. A
    /// [`RefTarget::Delete`](crate::RefTarget::Delete) deletes its ref if it exists. With
    /// `replace_refs` ([`PendingEvent::replace_refs`](crate::PendingEvent::replace_refs)),
    /// every existing ref under `refs/heads/` and `refs/tags/` that `updates` does not name is
    /// deleted in the same transaction. Called on the scheduler thread when an event with ref
    /// updates is released, while no fetch runs in `repo`. The updates were validated at
    /// submit. The default uses a libgit2 transaction that locks every ref it changes before
    /// writing any.
    ///
    /// # Errors
    /// The repository could not be opened, a ref could not be locked (another writer holds
    /// it) or written; nothing was changed.
    fn apply_refs(
        &self,
        repo: &Path,
        updates: &[crate::RefUpdate],
        replace_refs: bool,
    ) -> Result<(), FetchError> {
        git::apply_refs(repo, updates, replace_refs)
    }
}
