//! Durable purgatory: the state file.
//!
//! The engine writes what it must not forget — waiting events with their remaining lifetimes,
//! the expired-id memory, the naughty list — as versioned JSON, atomically: a temporary file in
//! the same directory, `fsync`, `rename` over the old file, `fsync` of the directory. A crash
//! at any instant leaves either the old file or the new one, never a mix.
//!
//! Times are stored as durations remaining at the moment of the write, plus the wall-clock
//! time of the write: on restore, the downtime measured on the wall clock is taken off, and a
//! wall clock that went backwards counts as no downtime, so it never extends a lifetime.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The version of the state-file format this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateFile {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Wall-clock time of the write, in milliseconds since the Unix epoch.
    pub written_at_ms: u64,
    pub events: Vec<SavedEvent>,
    pub expired_ids: Vec<SavedExpiredId>,
    pub naughty: Vec<SavedNaughty>,
}

/// A waiting event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedEvent {
    pub id: String,
    pub identifier: String,
    pub repo: PathBuf,
    /// Every object id the event waits for, lower-case hex.
    pub oids: Vec<String>,
    pub clone_urls: Vec<String>,
    /// `"user"` or `"sync"`.
    pub origin: String,
    pub ref_updates: Vec<SavedRef>,
    /// Lifetime left at the write, in milliseconds.
    pub remaining_ms: u64,
    /// How long it had waited at the write, in milliseconds.
    pub waited_ms: u64,
}

/// A ref update of a waiting event: exactly one of `oid` and `symbolic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbolic: Option<String>,
}

/// An expired event id still refused on re-submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedExpiredId {
    pub id: String,
    pub remaining_ms: u64,
}

/// A domain on the naughty list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedNaughty {
    pub domain: String,
    /// `"dns"` or `"tls"`.
    pub category: String,
    pub reason: String,
    /// Wall-clock times, milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub count: u64,
    pub remaining_ms: u64,
}

/// Why a state file could not be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum StateFileError {
    /// It could not be read (permissions, a directory, an I/O error).
    Unreadable(io::Error),
    /// It is not a complete, valid state file: truncated, not JSON, or not of this shape.
    Corrupt(String),
    /// It was written by a version of the format this build does not know.
    UnknownVersion(u32),
}

impl fmt::Display for StateFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateFileError::Unreadable(e) => write!(f, "cannot be read: {e}"),
            StateFileError::Corrupt(why) => write!(f, "is corrupt: {why}"),
            StateFileError::UnknownVersion(v) => write!(
                f,
                "has format version {v}, this build reads version {STATE_VERSION}"
            ),
        }
    }
}

impl std::error::Error for StateFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateFileError::Unreadable(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads and checks a state file.
pub(crate) fn read(path: &Path) -> Result<StateFile, StateFileError> {
    let bytes = fs::read(path).map_err(StateFileError::Unreadable)?;
    // Read the version first, so that a newer format is named as such, not as corrupt.
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version =
        serde_json::from_slice(&bytes).map_err(|e| StateFileError::Corrupt(e.to_string()))?;
    if v.version != STATE_VERSION {
        return Err(StateFileError::UnknownVersion(v.version));
    }
    serde_json::from_slice(&bytes).map_err(|e| StateFileError::Corrupt(e.to_string()))
}

/// Writes `state` to `path` atomically.
pub(crate) fn write(path: &Path, state: &StateFile) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the state file has no name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = io::BufWriter::new(&mut f);
        serde_json::to_writer(&mut w, state).map_err(io::Error::other)?;
        w.write_all(b"\n")?;
        w.flush()?;
        drop(w);
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable once the directory is.
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Checks that `path` holds a complete state file this build can read, and returns how many
/// waiting events it holds. For tools and tests; the engine restores the file itself.
///
/// # Errors
/// The reason the file cannot be used.
pub fn check_state_file(path: &Path) -> Result<usize, StateFileError> {
    read(path).map(|s| s.events.len())
}
