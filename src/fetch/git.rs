//! The libgit2 fetcher.
//!
//! One `Repository` handle per job, no shared libgit2 state between workers. What arrives is
//! pinned under [`TEMP_REF_PREFIX`] so that `git gc` cannot drop it while its event waits.

use std::cell::Cell;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use git2::{
    AutotagOption, ErrorClass, FetchOptions, RemoteCallbacks, RemoteRedirect, Repository,
    RepositoryOpenFlags,
};

use super::{
    FailureKind, FetchControl, FetchError, FetchReport, FetchRequest, Fetcher, StopReason,
};
use crate::ObjectId;

/// Namespace of the refs that keep fetched objects reachable while their event waits:
/// `refs/purgatory-sync/<object id>`.
pub const TEMP_REF_PREFIX: &str = "refs/purgatory-sync/";

/// Most fetches one attempt may make while splitting the wanted ids to find those a server has.
const MAX_SPLIT_FETCHES: u32 = 32;

/// Initialises libgit2 and sets its process-wide socket timeouts, once per process.
///
/// libgit2 reads these settings without synchronisation, so they are written once, before the
/// first engine spawns its threads. Setting only the connect timeout breaks fetches, so both are
/// set together.
pub(crate) fn init(connect: Duration, io: Duration) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: called once per process through `Once`, from `EngineBuilder::build` before
        // the engine's threads exist; no fetch of ours can be running concurrently.
        #[allow(unsafe_code)]
        let result = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(ms(connect))
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(ms(io)))
        };
        if let Err(e) = result {
            log::warn!("could not set libgit2 socket timeouts: {e}");
        }
    });
}

/// Opens `path` as a bare repository, without searching parent directories.
pub(crate) fn open_bare(path: &Path) -> Result<Repository, String> {
    let repo = Repository::open_ext(
        path,
        RepositoryOpenFlags::NO_SEARCH,
        std::iter::empty::<&std::ffi::OsStr>(),
    )
    .map_err(|e| e.message().to_owned())?;
    if !repo.is_bare() {
        return Err("not a bare repository".to_owned());
    }
    Ok(repo)
}

fn open(path: &Path) -> Result<Repository, FetchError> {
    open_bare(path).map_err(|m| FetchError::new(FailureKind::LocalRepository, m))
}

pub(crate) fn present(repo: &Path, oids: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
    let repo = open(repo)?;
    let odb = repo.odb().map_err(local)?;
    Ok(oids
        .iter()
        .copied()
        .filter(|o| odb.exists(o.to_git()))
        .collect())
}

pub(crate) fn drop_temp_refs(repo: &Path, oids: &[ObjectId]) -> Result<(), FetchError> {
    let repo = open(repo)?;
    for oid in oids {
        match repo.find_reference(&temp_ref(*oid)) {
            Ok(mut r) => r.delete().map_err(local)?,
            Err(e) if e.code() == git2::ErrorCode::NotFound => {}
            Err(e) => return Err(local(e)),
        }
    }
    Ok(())
}

pub(crate) fn apply_refs(repo: &Path, updates: &[crate::RefUpdate]) -> Result<(), FetchError> {
    if updates.is_empty() {
        return Ok(());
    }
    let repo = open(repo)?;
    let mut tx = repo.transaction().map_err(local)?;
    for u in updates {
        tx.lock_ref(&u.name).map_err(local)?;
    }
    for u in updates {
        match &u.target {
            crate::RefTarget::Oid(hex) => {
                let oid = git2::Oid::from_str(hex).map_err(local)?;
                tx.set_target(&u.name, oid, None, "purgatory-sync: release")
            }
            crate::RefTarget::Symbolic(target) => {
                tx.set_symbolic_target(&u.name, target, None, "purgatory-sync: release")
            }
        }
        .map_err(local)?;
    }
    // Dropping an uncommitted transaction unlocks every ref without writing any.
    tx.commit().map_err(local)
}

fn temp_ref(oid: ObjectId) -> String {
    format!("{TEMP_REF_PREFIX}{oid}")
}

fn local(e: git2::Error) -> FetchError {
    FetchError::new(FailureKind::LocalRepository, e.message())
}

/// The default [`Fetcher`]: libgit2 fetches by object id.
#[derive(Debug, Default, Clone)]
pub struct GitFetcher {
    _private: (),
}

impl GitFetcher {
    /// A fetcher with default settings.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Fetcher for GitFetcher {
    fn fetch(&self, request: &FetchRequest, control: &FetchControl) -> FetchReport {
        let repo = match open(&request.repo) {
            Ok(r) => r,
            Err(e) => return FetchReport::failed(e),
        };
        let mut job = Job {
            repo: &repo,
            control,
            bytes: 0,
            fetches: 0,
            error: None,
        };
        let missing = job.missing(&request.wanted);
        if !missing.is_empty() {
            match repo.remote_anonymous(&request.url) {
                // git config `insteadOf` rewrites can turn a checked URL into another one.
                Ok(remote) if remote.url().ok() != Some(request.url.as_str()) => {
                    job.error = Some(FetchError::new(
                        FailureKind::Refused,
                        "git configuration rewrites this URL",
                    ));
                }
                Ok(mut remote) => job.fetch_all_it_has(&mut remote, missing),
                Err(e) => job.error = Some(FetchError::new(FailureKind::Refused, e.message())),
            }
        }
        let still_missing = job.missing(&request.wanted);
        let mut present: Vec<ObjectId> = request
            .wanted
            .iter()
            .copied()
            .filter(|o| !still_missing.contains(o))
            .collect();
        present.sort_unstable();
        for oid in &present {
            if let Err(e) =
                repo.reference(&temp_ref(*oid), oid.to_git(), true, "purgatory-sync: pin")
            {
                job.error.get_or_insert_with(|| local(e));
            }
        }
        FetchReport {
            present,
            error: job.error,
            bytes_received: job.bytes,
        }
    }
}

struct Job<'a> {
    repo: &'a Repository,
    control: &'a FetchControl,
    bytes: u64,
    fetches: u32,
    error: Option<FetchError>,
}

impl Job<'_> {
    fn missing(&self, oids: &[ObjectId]) -> Vec<ObjectId> {
        match self.repo.odb() {
            Ok(odb) => oids
                .iter()
                .copied()
                .filter(|o| !odb.exists(o.to_git()))
                .collect(),
            Err(_) => oids.to_vec(),
        }
    }

    /// Fetches `wanted`; when the server refuses the whole set (it does when it lacks any one
    /// id, without saying which), splits the set in halves and tries again, so that the ids it
    /// does have still arrive. Bounded by [`MAX_SPLIT_FETCHES`] and the deadline.
    fn fetch_all_it_has(&mut self, remote: &mut git2::Remote<'_>, wanted: Vec<ObjectId>) {
        let mut work = vec![wanted];
        while let Some(set) = work.pop() {
            if self.fetches >= MAX_SPLIT_FETCHES || self.control.should_stop().is_some() {
                break;
            }
            let set = self.missing(&set);
            if set.is_empty() {
                continue;
            }
            self.fetches += 1;
            match self.fetch_once(remote, &set) {
                Ok(()) => {}
                Err(e) => {
                    let stopped = matches!(e.kind, FailureKind::Deadline | FailureKind::Cancelled);
                    // A server we cannot reach will not answer a smaller request either.
                    let unreachable = self.fetches == 1 && is_connect_failure(&e.message);
                    let first_error = self.error.is_none();
                    if first_error || stopped {
                        self.error = Some(e);
                    }
                    if stopped || unreachable {
                        break;
                    }
                    if set.len() > 1 {
                        let (a, b) = set.split_at(set.len() / 2);
                        work.push(b.to_vec());
                        work.push(a.to_vec());
                    }
                }
            }
        }
    }

    fn fetch_once(
        &mut self,
        remote: &mut git2::Remote<'_>,
        wanted: &[ObjectId],
    ) -> Result<(), FetchError> {
        let control = self.control;
        let received = Cell::new(0u64);
        let mut callbacks = RemoteCallbacks::new();
        callbacks.transfer_progress(|p| {
            received.set(p.received_bytes() as u64);
            control.should_stop().is_none()
        });
        callbacks.sideband_progress(|_| control.should_stop().is_none());
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .download_tags(AutotagOption::None)
            .update_fetchhead(false)
            .follow_redirects(RemoteRedirect::None);
        let refspecs: Vec<String> = wanted.iter().map(ObjectId::to_string).collect();
        let result = remote.fetch(&refspecs, Some(&mut options), None);
        self.bytes += received.get();
        result.map_err(|e| classify(&e, control.should_stop()))
    }
}

fn is_connect_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("failed to connect")
        || m.contains("failed to resolve")
        || m.contains("could not resolve")
}

/// Sorts a libgit2 error into a [`FailureKind`]; a stop requested by the engine wins over
/// whatever libgit2 reported for the aborted transfer.
fn classify(e: &git2::Error, stop: Option<StopReason>) -> FetchError {
    let kind = match stop {
        Some(StopReason::Deadline) => FailureKind::Deadline,
        Some(StopReason::Cancelled) => FailureKind::Cancelled,
        None => match e.class() {
            ErrorClass::Net | ErrorClass::Ssl | ErrorClass::Http | ErrorClass::Ssh => {
                FailureKind::Network
            }
            ErrorClass::Odb
            | ErrorClass::Repository
            | ErrorClass::Reference
            | ErrorClass::Filesystem
            | ErrorClass::Index => FailureKind::LocalRepository,
            ErrorClass::Os => FailureKind::Network,
            _ => FailureKind::Protocol,
        },
    };
    FetchError::new(kind, e.message())
}
