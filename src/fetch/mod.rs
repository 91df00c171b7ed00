//! The fetcher: the only part of the engine that touches the network.
//!
//! A worker runs one [`FetchRequest`] (one URL, one repository, the ids still missing) through
//! a [`Fetcher`] and hands the [`FetchReport`] back to the scheduler. The trait is small so
//! that tests can inject failures, stalls and panics; [`GitFetcher`] is the libgit2
//! implementation used by default.

mod git;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use git::GitFetcher;
pub use git::TEMP_REF_PREFIX;
pub(crate) use git::{init, open_bare};

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
        }
    }
}

/// Tells a running fetch when to give up: at its deadline (real time, because it bounds real
/// I/O) or when the engine shuts down.
#[derive(Debug, Clone)]
pub struct FetchControl {
    deadline: Instant,
    cancel: Arc<AtomicBool>,
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
    /// A control with the given real-time deadline and shared cancel flag.
    pub fn new(deadline: Instant, cancel: Arc<AtomicBool>) -> Self {
        FetchControl { deadline, cancel }
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
}

/// What kind of failure ended (part of) an attempt. Later policy (skip a domain, try another
/// URL) is decided on this, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FailureKind {
    /// The network failed: DNS, connection refused or reset, TLS, socket timeout.
    Network,
    /// The server answered, but not with a usable pack (it lacks the objects, or it speaks
    /// nonsense).
    Protocol,
    /// The fetch ran past its wall-clock deadline.
    Deadline,
    /// The engine shut down during the fetch.
    Cancelled,
    /// The local repository could not be opened or written.
    LocalRepository,
    /// The URL was refused before any traffic.
    Refused,
    /// The fetcher panicked; the engine counted it as a failed attempt.
    Panicked,
    /// Anything else.
    Other,
}

impl FailureKind {
    /// A short stable name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Network => "network",
            FailureKind::Protocol => "protocol",
            FailureKind::Deadline => "deadline",
            FailureKind::Cancelled => "cancelled",
            FailureKind::LocalRepository => "local_repository",
            FailureKind::Refused => "refused",
            FailureKind::Panicked => "panicked",
            FailureKind::Other => "other",
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
    /// Why the attempt, or part of it, failed. A report can carry both present ids and an
    /// error when a server had only some of the objects.
    pub error: Option<FetchError>,
    /// Bytes received from the server.
    pub bytes_received: u64,
}

impl FetchReport {
    /// A report of the ids present after the attempt and an optional failure.
    pub fn new(present: Vec<ObjectId>, error: Option<FetchError>) -> Self {
        FetchReport {
            present,
            error,
            bytes_received: 0,
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

    /// Sets `updates` in `repo` in one transaction: all of them or none. Called on the
    /// scheduler thread when an event with ref updates is released, while no fetch runs in
    /// `repo`. The updates were validated at submit. The default uses a libgit2 transaction.
    ///
    /// # Errors
    /// The repository could not be opened, a ref could not be locked (another writer holds
    /// it) or written; nothing was changed.
    fn apply_refs(&self, repo: &Path, updates: &[crate::RefUpdate]) -> Result<(), FetchError> {
        git::apply_refs(repo, updates)
    }
}
