//! The engine's state across restarts, both ways. At start: takes the state file's lock, reads
//! the file and checks every saved event again (the same validation as `submit`, the
//! repository, the objects present now) before the queue rebuilds itself from them
//! ([`restore`]). At every checkpoint: the queue hands over a [`Snapshot`] of plain values,
//! made into the file's contents here ([`Snapshot::into_state_file`]); the file's format
//! itself (its types, reading and atomic writing) is `crate::state_file`'s.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::error::BuildError;
use crate::fetch::Fetcher;
use crate::scheduler::queue::{Queue, RestoredEvent, ValidEvent};
use crate::state_file::{
    self, SavedEvent, SavedExpiredId, SavedNaughty, SavedNewestState, SavedRef, StateFile,
    StateFileError,
};
use crate::{NaughtyCategory, ObjectId, Origin, PendingEvent, RefTarget, RefUpdate};

pub(crate) use crate::state_file::unix_ms;

/// The state file's lock: the engine holding it is the only one that reads and writes the
/// file. It is released when this value is dropped (or the process dies).
///
/// The lock is on a separate file, `<name>.lock` beside the state file, because every write
/// replaces the state file by a rename: a lock on the state file itself would stay on the
/// replaced file. The lock file is never removed: another engine may have it open already,
/// and a removed and re-created lock file could then be locked by two engines at once.
#[derive(Debug)]
#[cfg_attr(not(unix), allow(dead_code))]
pub(crate) struct StateLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    _file: std::fs::File,
}

/// `<name>.lock` beside the state file `path`; `None` if `path` names no file.
#[cfg_attr(not(unix), allow(dead_code))]
fn lock_file_of(path: &Path) -> Option<PathBuf> {
    let mut name = path.file_name()?.to_os_string();
    name.push(".lock");
    Some(path.with_file_name(name))
}

/// Takes the configured state file's lock, before the file is read; `None` without a state
/// file. On Unix it is an `flock` on the lock file, created if missing. Elsewhere no lock is
/// taken and `None` is returned: two engines sharing a state file there is the host's mistake
/// to avoid.
///
/// # Errors
/// [`BuildError::StateFileLocked`] if another engine holds the lock, in this process or
/// another; [`BuildError::StateFile`] with [`StateFileError::Lock`] if the lock file cannot be
/// opened or locked (a missing or read-only directory, for one).
pub(crate) fn lock(cfg: &Config) -> Result<Option<StateLock>, BuildError> {
    let Some(path) = &cfg.state_file else {
        return Ok(None);
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let failed = |file: PathBuf, error| BuildError::StateFile {
            path: path.clone(),
            error: StateFileError::Lock { file, error },
        };
        let Some(lock_file) = lock_file_of(path) else {
            return Err(failed(
                path.clone(),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the state file path names no file",
                ),
            ));
        };
        // Non-blocking, in case something else than a plain file was put there: opening a
        // FIFO could otherwise wait.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NONBLOCK)
            .open(&lock_file)
            .map_err(|e| failed(lock_file.clone(), e))?;
        match try_lock_exclusive(&file) {
            Ok(true) => Ok(Some(StateLock { _file: file })),
            Ok(false) => Err(BuildError::StateFileLocked {
                path: path.clone(),
                lock_file,
            }),
            Err(e) => Err(failed(lock_file, e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(None)
    }
}

/// Moves an unusable state file aside, keeping it for inspection.
pub(crate) fn move_aside(
    path: &Path,
    wall: SystemTime,
    error: &StateFileError,
) -> Result<(), BuildError> {
    let aside = aside_name(path, wall);
    std::fs::rename(path, &aside).map_err(|e| BuildError::StateFile {
        path: path.to_path_buf(),
        error: StateFileError::Unreadable(e),
    })?;
    log::warn!(
        "state file {} {error}; moved to {} and starting empty",
        path.display(),
        aside.display()
    );
    Ok(())
}

/// Reads the configured state file, if any. A missing file is a first start. An unusable one
/// is an error, or is moved aside when the builder says so.
pub(crate) fn load(cfg: &Config, wall: SystemTime) -> Result<Option<StateFile>, BuildError> {
    let Some(path) = &cfg.state_file else {
        return Ok(None);
    };
    match state_file::read(path) {
        Ok(file) => Ok(Some(file)),
        Err(StateFileError::Unreadable(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) if cfg.move_unreadable_state_aside => {
            move_aside(path, wall, &error)?;
            Ok(None)
        }
        Err(error) => Err(BuildError::StateFile {
            path: path.clone(),
            error,
        }),
    }
}

fn aside_name(path: &Path, wall: SystemTime) -> std::path::PathBuf {
    let secs = unix_ms(wall) / 1000;
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let mut aside = path.with_file_name(format!("{name}.unreadable-{secs}"));
    // Never over another file moved aside earlier.
    let mut n = 1;
    while aside.exists() {
        aside = path.with_file_name(format!("{name}.unreadable-{secs}-{n}"));
        n += 1;
    }
    aside
}

/// Hands the saved state to the core. Saved events are checked like submitted ones; one that
/// no longer passes (the file was edited by hand) makes the file corrupt.
pub(crate) fn restore(
    core: &mut Queue,
    file: StateFile,
    cfg: &Config,
    fetcher: &dyn Fetcher,
    now: std::time::Instant,
    wall: SystemTime,
) -> Result<(), BuildError> {
    let path = cfg.state_file.clone().unwrap_or_default();
    let corrupt = |why: String| BuildError::StateFile {
        path: path.clone(),
        error: StateFileError::Corrupt(why),
    };
    let wall_ms = unix_ms(wall);
    // A wall clock that went backwards counts as no downtime: it never extends a lifetime.
    let downtime = Duration::from_millis(wall_ms.saturating_sub(file.written_at_ms));
    let mut events = Vec::with_capacity(file.events.len());
    // Each distinct repository is opened once, not once per event.
    let mut repos: HashMap<PathBuf, Result<PathBuf, String>> = HashMap::new();
    for saved in file.events {
        let origin = Origin::from(saved.origin);
        let mut ref_updates = Vec::with_capacity(saved.ref_updates.len());
        for r in &saved.ref_updates {
            ref_updates.push(match (&r.oid, &r.symbolic, r.delete) {
                (Some(o), None, false) => RefUpdate::oid(&r.name, o),
                (None, Some(t), false) => RefUpdate::symbolic(&r.name, t),
                (None, None, true) => RefUpdate::delete(&r.name),
                _ => {
                    return Err(corrupt(format!(
                        "event {}: ref {} needs exactly one of oid, symbolic and delete",
                        saved.id, r.name
                    )))
                }
            });
        }
        let pending = PendingEvent {
            id: saved.id.clone(),
            identifier: saved.identifier.clone(),
            repo: saved.repo.clone(),
            oids: saved.oids.clone(),
            clone_urls: saved.clone_urls.clone(),
            origin,
            ref_updates,
            replace_refs: saved.replace_refs,
            created_at: saved.created_at,
        };
        let checked = crate::validate::event(&pending, cfg)
            .map_err(|e| corrupt(format!("event {}: {e}", saved.id)))?;
        let checked_repo = repos
            .entry(saved.repo.clone())
            .or_insert_with(|| crate::validate::repository(&saved.repo).map_err(|e| e.to_string()))
            .clone();
        let (repo, gone) = match checked_repo {
            Ok(repo) => (repo, None),
            Err(e) => (saved.repo.clone(), Some(e)),
        };
        // Filled in below, one `present` call per repository.
        let missing = checked.oids.clone();
        events.push(RestoredEvent {
            event: ValidEvent {
                id: Arc::from(saved.id.as_str()),
                identifier: Arc::from(saved.identifier.as_str()),
                repo: Arc::from(repo.as_path()),
                oids: checked.oids,
                missing,
                urls: checked.urls,
                refs: checked.refs.into(),
                replace_refs: saved.replace_refs,
                created_at: saved.created_at,
                origin,
                submitted: now,
                restored: None,
            },
            // A file edited by hand, or written with a longer lifetime, cannot keep an event
            // waiting past this engine's lifetime.
            remaining: Duration::from_millis(saved.remaining_ms).min(cfg.event_lifetime),
            waited: Duration::from_millis(saved.waited_ms),
            gone,
        });
    }
    // Which objects arrived while the engine was down: one question per repository.
    let mut by_repo: HashMap<PathBuf, Vec<ObjectId>> = HashMap::new();
    for r in events.iter().filter(|r| r.gone.is_none()) {
        by_repo
            .entry(r.event.repo.to_path_buf())
            .or_default()
            .extend(r.event.oids.iter().copied());
    }
    let mut present: HashMap<PathBuf, HashSet<ObjectId>> = HashMap::new();
    for (repo, mut oids) in by_repo {
        oids.sort_unstable();
        oids.dedup();
        let found = fetcher.present(&repo, &oids).unwrap_or_default();
        present.insert(repo, found.into_iter().collect());
    }
    for r in events.iter_mut() {
        if let Some(found) = present.get(r.event.repo.as_ref()) {
            r.event.missing.retain(|o| !found.contains(o));
        }
    }
    // Like the events' lifetimes, the times left on expired ids and naughty domains are
    // capped at this engine's settings.
    let expired = file
        .expired_ids
        .into_iter()
        .map(|e| {
            (
                Arc::from(e.id.as_str()),
                Duration::from_millis(e.remaining_ms).min(cfg.expired_memory),
            )
        })
        .collect();
    let naughty = file
        .naughty
        .into_iter()
        .map(|n| naughty_record(n, cfg.naughty_duration))
        .collect();
    // Keyed by the canonical path, as the restored events' repositories are; capped like
    // the events' lifetimes, which they outlive by nothing.
    let newest_states = file
        .newest_states
        .into_iter()
        .map(|n| {
            let repo = std::fs::canonicalize(&n.repo).unwrap_or(n.repo);
            let left = Duration::from_millis(n.remaining_ms).min(cfg.event_lifetime);
            (Arc::from(repo.as_path()), n.created_at, left)
        })
        .collect();
    core.restore_newest_states(newest_states, downtime, now);
    core.restore(events, expired, naughty, downtime, now, wall_ms);
    Ok(())
}

/// The durable state the queue hands over at a checkpoint ([`Queue::snapshot`], under its
/// lock): plain values, made into the state file outside the lock by
/// [`into_state_file`](Self::into_state_file).
pub(crate) struct Snapshot {
    pub written_at_ms: u64,
    pub events: Vec<SnapshotEvent>,
    /// Recently expired ids with the time they are still refused.
    pub expired_ids: Vec<(Arc<str>, Duration)>,
    pub naughty: Vec<NaughtyRecord>,
    /// The newest complete ref set written in each repository, with the time it is still
    /// remembered.
    pub newest_states: Vec<(Arc<Path>, u64, Duration)>,
}

/// A waiting event in a [`Snapshot`].
pub(crate) struct SnapshotEvent {
    /// Submission order.
    pub seq: u64,
    pub id: Arc<str>,
    pub identifier: Arc<str>,
    pub repo: Arc<Path>,
    pub oids: Vec<ObjectId>,
    pub urls: Vec<Arc<str>>,
    pub origin: Origin,
    pub refs: Arc<[RefUpdate]>,
    pub replace_refs: bool,
    pub created_at: Option<u64>,
    pub remaining: Duration,
    pub waited: Duration,
}

impl Snapshot {
    /// The state file's contents: events in submission order (so that a restore keeps it),
    /// expired ids sorted.
    pub fn into_state_file(self) -> StateFile {
        let ms = state_file::millis;
        let mut events = self.events;
        events.sort_unstable_by_key(|e| e.seq);
        let events = events
            .into_iter()
            .map(|ev| SavedEvent {
                id: ev.id.to_string(),
                identifier: ev.identifier.to_string(),
                repo: ev.repo.to_path_buf(),
                oids: ev.oids.iter().map(ObjectId::to_string).collect(),
                clone_urls: ev.urls.iter().map(|u| u.to_string()).collect(),
                origin: ev.origin.into(),
                ref_updates: ev
                    .refs
                    .iter()
                    .map(|r| {
                        let saved = SavedRef::new(r.name.clone());
                        match &r.target {
                            RefTarget::Oid(o) => SavedRef {
                                oid: Some(o.clone()),
                                ..saved
                            },
                            RefTarget::Symbolic(t) => SavedRef {
                                symbolic: Some(t.clone()),
                                ..saved
                            },
                            RefTarget::Delete => SavedRef {
                                delete: true,
                                ..saved
                            },
                        }
                    })
                    .collect(),
                replace_refs: ev.replace_refs,
                created_at: ev.created_at,
                remaining_ms: ms(ev.remaining),
                waited_ms: ms(ev.waited),
            })
            .collect();
        let mut expired_ids: Vec<SavedExpiredId> = self
            .expired_ids
            .into_iter()
            .map(|(id, remaining)| SavedExpiredId {
                id: id.to_string(),
                remaining_ms: ms(remaining),
            })
            .collect();
        expired_ids.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut newest_states: Vec<SavedNewestState> = self
            .newest_states
            .into_iter()
            .map(|(repo, created_at, remaining)| SavedNewestState {
                repo: repo.to_path_buf(),
                created_at,
                remaining_ms: ms(remaining),
            })
            .collect();
        newest_states.sort_unstable_by(|a, b| a.repo.cmp(&b.repo));
        StateFile {
            version: state_file::STATE_VERSION,
            written_at_ms: self.written_at_ms,
            events,
            expired_ids,
            naughty: saved_naughty(self.naughty),
            newest_states,
        }
    }
}

/// A naughty-list entry as the scheduler's domain table keeps it, times on the wall clock: what
/// [`Snapshot::naughty`] holds and what [`restore`] hands back.
pub(crate) struct NaughtyRecord {
    pub host: Arc<str>,
    /// The scheme and port of an endpoint; `None` for the whole host name.
    pub endpoint: Option<(Arc<str>, u16)>,
    pub category: NaughtyCategory,
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub count: u64,
    /// How much longer the entry lasts.
    pub remaining: Duration,
}

/// The naughty list as the file keeps it, sorted by host and endpoint.
fn saved_naughty(records: Vec<NaughtyRecord>) -> Vec<SavedNaughty> {
    let mut saved: Vec<SavedNaughty> = records
        .into_iter()
        .map(|n| SavedNaughty {
            domain: n.host.to_string(),
            scheme: n.endpoint.as_ref().map(|(s, _)| s.to_string()),
            port: n.endpoint.as_ref().map(|(_, p)| *p),
            category: n.category.into(),
            reason: n.reason,
            first_seen_ms: n.first_seen_ms,
            last_seen_ms: n.last_seen_ms,
            count: n.count,
            remaining_ms: state_file::millis(n.remaining),
        })
        .collect();
    saved.sort_by(|a, b| (&a.domain, &a.scheme, a.port).cmp(&(&b.domain, &b.scheme, b.port)));
    saved
}

/// A naughty entry read from the file, its time left capped at `cap` (this engine's
/// `naughty_duration`). Files written before endpoints were kept name none: their TLS and
/// hostile entries were https ones, on port 443.
fn naughty_record(n: SavedNaughty, cap: Duration) -> NaughtyRecord {
    let category = NaughtyCategory::from(n.category);
    let endpoint = match (n.scheme, n.port) {
        (Some(scheme), Some(port)) => Some((Arc::from(scheme.as_str()), port)),
        _ if category != NaughtyCategory::Dns => Some((Arc::from("https"), 443)),
        _ => None,
    };
    NaughtyRecord {
        host: Arc::from(n.domain.as_str()),
        endpoint,
        category,
        reason: n.reason,
        first_seen_ms: n.first_seen_ms,
        last_seen_ms: n.last_seen_ms,
        count: n.count,
        remaining: Duration::from_millis(n.remaining_ms).min(cap),
    }
}

/// Takes an exclusive advisory lock on `file` without waiting (`flock(LOCK_EX | LOCK_NB)`).
/// `Ok(false)`: another open file description holds it, in this process or another. The lock
/// lasts until this open file is closed (dropped), and the kernel drops it when the process
/// dies, so a crash never leaves it behind.
#[cfg(unix)]
#[allow(unsafe_code)]
fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: `flock` takes a descriptor and flags and touches no memory of ours; `file`
        // keeps the descriptor open for the length of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(false),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}
