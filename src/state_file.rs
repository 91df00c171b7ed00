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

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{NaughtyCategory, Origin};

/// A duration in whole milliseconds, as the state file (and the C ABI's JSON) stores it.
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

/// The version of the state-file format this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// [`SavedEvent::origin`]: `"user"` or `"sync"`, as [`Origin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SavedOrigin {
    /// An event a user published to this relay.
    User,
    /// An event received by sync.
    Sync,
}

impl From<Origin> for SavedOrigin {
    fn from(origin: Origin) -> Self {
        match origin {
            Origin::User => SavedOrigin::User,
            Origin::Sync => SavedOrigin::Sync,
        }
    }
}

impl From<SavedOrigin> for Origin {
    fn from(origin: SavedOrigin) -> Self {
        match origin {
            SavedOrigin::User => Origin::User,
            SavedOrigin::Sync => Origin::Sync,
        }
    }
}

/// [`SavedNaughty::category`]: `"dns"`, `"tls"` or `"hostile"`, as [`NaughtyCategory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SavedCategory {
    /// A DNS failure.
    Dns,
    /// A TLS failure.
    Tls,
    /// A server whose answer made libgit2 lose memory.
    Hostile,
}

impl From<NaughtyCategory> for SavedCategory {
    fn from(category: NaughtyCategory) -> Self {
        match category {
            NaughtyCategory::Dns => SavedCategory::Dns,
            NaughtyCategory::Tls => SavedCategory::Tls,
            NaughtyCategory::Hostile => SavedCategory::Hostile,
        }
    }
}

impl From<SavedCategory> for NaughtyCategory {
    fn from(category: SavedCategory) -> Self {
        match category {
            SavedCategory::Dns => NaughtyCategory::Dns,
            SavedCategory::Tls => NaughtyCategory::Tls,
            SavedCategory::Hostile => NaughtyCategory::Hostile,
        }
    }
}

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
    /// The newest complete ref set written in each repository; absent (empty) in files
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub newest_states: Vec<SavedNewestState>,
}

/// A waiting event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedEvent {
    pub id: String,
    pub identifier: String,
    /// A string; a Unix path that is not UTF-8 is written as `{"hex": "<its bytes>"}`.
    #[serde(with = "repo_path")]
    pub repo: PathBuf,
    /// Every object id the event waits for, lower-case hex.
    pub oids: Vec<String>,
    pub clone_urls: Vec<String>,
    pub origin: SavedOrigin,
    pub ref_updates: Vec<SavedRef>,
    /// The ref updates are the repository's complete set of branches and tags; absent
    /// (false) in files written before it existed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub replace_refs: bool,
    /// The event's creation time, Unix seconds; absent when the host gave none, and in files
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
    /// Lifetime left at the write, in milliseconds.
    pub remaining_ms: u64,
    /// How long it had waited at the write, in milliseconds.
    pub waited_ms: u64,
}

/// A ref update of a waiting event: exactly one of `oid`, `symbolic` and `delete: true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbolic: Option<String>,
    /// The ref is deleted; absent (false) otherwise, and in files written before deletions
    /// existed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delete: bool,
}

impl SavedRef {
    /// A ref update of `name` without a target yet.
    pub fn new(name: String) -> Self {
        SavedRef {
            name,
            oid: None,
            symbolic: None,
            delete: false,
        }
    }
}

/// serde's test for a `false` field left out of the file.
fn is_false(b: &bool) -> bool {
    !*b
}

/// The newest complete ref set (with a `created_at`) written in a repository: an older one
/// released later is not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedNewestState {
    /// Written like [`SavedEvent::repo`].
    #[serde(with = "repo_path")]
    pub repo: PathBuf,
    /// Its `created_at`, Unix seconds.
    pub created_at: u64,
    /// How much longer it is remembered, in milliseconds.
    pub remaining_ms: u64,
}

/// An expired event id still remembered (a synced re-submission whose data is still missing is
/// refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedExpiredId {
    pub id: String,
    pub remaining_ms: u64,
}

/// A host name or endpoint on the naughty list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedNaughty {
    /// The host.
    pub domain: String,
    /// The scheme and port of an endpoint; both absent for a whole host name (files written
    /// before endpoints were kept have neither: their TLS entries are read as `https` on 443).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub category: SavedCategory,
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
    /// It is not a regular file (nor a symbolic link to one) but, say, a directory or a FIFO.
    /// Nothing is read from it: opening a FIFO to read waits until some process writes.
    NotARegularFile {
        /// What it is: `"a directory"`, `"a FIFO"`, `"a socket"`, `"a device"`, or
        /// `"something else"`.
        kind: &'static str,
    },
    /// Its lock file (`<name>.lock` beside it, see
    /// [`EngineBuilder::state_file`](crate::EngineBuilder::state_file)) could not be opened or
    /// locked, for another reason than another engine holding it.
    Lock {
        /// The lock file.
        file: PathBuf,
        /// Why.
        error: io::Error,
    },
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
            StateFileError::NotARegularFile { kind } => {
                write!(f, "is not a regular file: it is {kind}")
            }
            StateFileError::Lock { file, error } => {
                write!(f, "cannot be locked: {}: {error}", file.display())
            }
        }
    }
}

impl std::error::Error for StateFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateFileError::Unreadable(e) | StateFileError::Lock { error: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// Reads and checks a state file.
pub(crate) fn read(path: &Path) -> Result<StateFile, StateFileError> {
    let bytes = read_regular(path)?;
    parse(&bytes)
}

/// The bytes of `path`, which must be a regular file or a symbolic link to one. Anything else
/// is refused before a byte is read: reading a FIFO would wait until some process wrote to it,
/// and a device could give anything.
fn read_regular(path: &Path) -> Result<Vec<u8>, StateFileError> {
    let unreadable = StateFileError::Unreadable;
    regular(&fs::metadata(path).map_err(unreadable)?)?;
    // Opened without blocking, and checked again once open: something else may have been put
    // at the path since, and opening a FIFO to read blocks until a writer comes.
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let mut file = options.open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    regular(&meta)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(unreadable)?;
    Ok(bytes)
}

/// [`StateFileError::NotARegularFile`] unless `meta` is a regular file's.
fn regular(meta: &fs::Metadata) -> Result<(), StateFileError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else {
        special_kind(t)
    };
    Err(StateFileError::NotARegularFile { kind })
}

#[cfg(unix)]
fn special_kind(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "something else"
    }
}

#[cfg(not(unix))]
fn special_kind(_: fs::FileType) -> &'static str {
    "something else"
}

/// Parses and checks the bytes of a state file.
pub(crate) fn parse(bytes: &[u8]) -> Result<StateFile, StateFileError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(StateFileError::Corrupt("the file is empty".into()));
    }
    // serde_path_to_error names the field a message is about (`events[0].origin: unknown
    // variant ...`); `end` refuses anything after the object.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize::<_, StateFile>(&mut de)
        .map_err(|e| e.to_string())
        .and_then(|state| de.end().map(|()| state).map_err(|e| e.to_string()));
    match parsed {
        Ok(state) if state.version != STATE_VERSION => {
            Err(StateFileError::UnknownVersion(state.version))
        }
        Ok(state) => {
            check(&state)?;
            Ok(state)
        }
        Err(e) => {
            // A file of another format version is named as such, not as corrupt. Only read
            // again on failure: the whole file is parsed once in the common case.
            #[derive(Deserialize)]
            struct Version {
                version: u32,
            }
            match serde_json::from_slice::<Version>(bytes) {
                Ok(v) if v.version != STATE_VERSION => {
                    Err(StateFileError::UnknownVersion(v.version))
                }
                _ => Err(StateFileError::Corrupt(e)),
            }
        }
    }
}

/// The checks serde's derive cannot express: exactly one target per ref update, both or neither
/// of a naughty entry's scheme and port.
fn check(state: &StateFile) -> Result<(), StateFileError> {
    let corrupt = |what: String| Err(StateFileError::Corrupt(what));
    for (i, ev) in state.events.iter().enumerate() {
        for (j, r) in ev.ref_updates.iter().enumerate() {
            let targets = [r.oid.is_some(), r.symbolic.is_some(), r.delete];
            if targets.into_iter().filter(|t| *t).count() != 1 {
                return corrupt(format!(
                    "events[{i}].ref_updates[{j}] must have exactly one of \"oid\", \"symbolic\" \
                     and \"delete\": true"
                ));
            }
        }
    }
    for (i, n) in state.naughty.iter().enumerate() {
        if n.scheme.is_some() != n.port.is_some() {
            return corrupt(format!(
                "naughty[{i}] must have both or neither of \"scheme\" and \"port\""
            ));
        }
    }
    Ok(())
}

/// Serializes writers within the process, so that a writer may remove every temporary file it
/// finds (see [`write`]).
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Writes `state` to `path` atomically.
///
/// The temporary file is `.<name>.tmp-<pid>` in the same directory. Temporary files of the
/// same state file left by a process that died mid-write are removed first, so at most one
/// can exist at any time. Writers in one process take turns; a second process writing the same
/// state file (a mistake) can make a write fail, never produce a mixed file.
pub(crate) fn write(path: &Path, state: &StateFile) -> io::Result<()> {
    write_with(path, state, |_| Ok(()))
}

/// [`write`], calling `before_rename` with the temporary file's path once it is complete and
/// synced: the tests' fault-injection point.
fn write_with(
    path: &Path,
    state: &StateFile,
    before_rename: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the state file has no name"))?;
    let prefix = temp_prefix(name);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let _turn = WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    remove_stale_temps(&dir, &prefix);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = io::BufWriter::with_capacity(1 << 16, &mut f);
        serde_json::to_writer(&mut w, state).map_err(io::Error::other)?;
        w.write_all(b"\n")?;
        w.flush()?;
        drop(w);
        f.sync_all()?;
        drop(f);
        before_rename(&tmp)?;
        fs::rename(&tmp, path)?;
        // The rename is durable once the directory is.
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `.<name>.tmp-`: the start of every temporary file name of the state file `name`.
fn temp_prefix(name: &OsStr) -> String {
    format!(".{}.tmp-", name.to_string_lossy())
}

/// Removes the temporary files of earlier writes that never reached their rename (the process
/// was killed). Best effort: a file that cannot be removed costs nothing but disk space.
fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directories cannot be opened as files here; the rename is as durable as the platform makes
/// it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Checks that `path` holds a complete state file this build can read, and returns how many
/// waiting events it holds. For tools and tests; the engine restores the file itself.
///
/// # Errors
/// The reason the file cannot be used.
pub fn check_state_file(path: &Path) -> Result<usize, StateFileError> {
    read(path).map(|s| s.events.len())
}

/// `repo` as a JSON string, or, for a Unix path that is not valid UTF-8 (which the engine
/// accepts, and which a JSON string cannot hold), as `{"hex": "<the path's bytes>"}`, so that
/// one such event does not make every write fail.
mod repo_path {
    use std::fmt;
    use std::path::{Path, PathBuf};

    use serde::de::{self, MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        if let Some(text) = path.to_str() {
            return s.serialize_str(text);
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let bytes = path.as_os_str().as_bytes();
            let mut hex = String::with_capacity(bytes.len() * 2);
            for b in bytes {
                hex.push_str(&format!("{b:02x}"));
            }
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry("hex", &hex)?;
            map.end()
        }
        #[cfg(not(unix))]
        {
            use serde::ser::Error;
            Err(S::Error::custom(format!(
                "repository path {} is not valid Unicode",
                path.display()
            )))
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        d.deserialize_any(RepoVisitor)
    }

    struct RepoVisitor;

    impl<'de> Visitor<'de> for RepoVisitor {
        type Value = PathBuf;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a path string or {\"hex\": \"...\"}")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<PathBuf, E> {
            Ok(PathBuf::from(v))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PathBuf, A::Error> {
            let mut hex: Option<String> = None;
            while let Some(key) = map.next_key::<String>()? {
                if key != "hex" {
                    return Err(de::Error::unknown_field(&key, &["hex"]));
                }
                if hex.is_some() {
                    return Err(de::Error::duplicate_field("hex"));
                }
                hex = Some(map.next_value()?);
            }
            let hex = hex.ok_or_else(|| de::Error::missing_field("hex"))?;
            let bytes = decode_hex(&hex)
                .ok_or_else(|| de::Error::custom("\"hex\" is not an even number of hex digits"))?;
            from_bytes(bytes)
        }
    }

    fn decode_hex(hex: &str) -> Option<Vec<u8>> {
        if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect()
    }

    #[cfg(unix)]
    fn from_bytes<E: de::Error>(bytes: Vec<u8>) -> Result<PathBuf, E> {
        use std::os::unix::ffi::OsStringExt;
        Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
    }

    #[cfg(not(unix))]
    fn from_bytes<E: de::Error>(bytes: Vec<u8>) -> Result<PathBuf, E> {
        String::from_utf8(bytes)
            .map(PathBuf::from)
            .map_err(|_| E::custom("a non-Unicode repository path cannot be used on this platform"))
    }
}

/// A parsed state file, for the crate's benches. Not part of the API.
#[doc(hidden)]
#[derive(Debug)]
pub struct StateBench(StateFile);

impl StateBench {
    /// Reads and checks the state file at `path`.
    ///
    /// # Errors
    /// Why the file cannot be used.
    pub fn read(path: &Path) -> Result<Self, StateFileError> {
        read(path).map(StateBench)
    }

    /// Writes it to `path` the way the engine does.
    ///
    /// # Errors
    /// The write failed; `path` is unchanged.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        write(path, &self.0)
    }

    /// How many waiting events it holds.
    pub fn events(&self) -> usize {
        self.0.events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "e92758a50bbf13ea1fe986bbe254a709b0bf741c";
    const B: &str = "0123456789abcdef0123456789abcdef01234567";

    /// One of every kind of state.
    fn sample() -> StateFile {
        StateFile {
            version: STATE_VERSION,
            written_at_ms: 1_732_000_000_123,
            events: vec![
                SavedEvent {
                    id: "ev-user".into(),
                    identifier: "alice/project".into(),
                    repo: PathBuf::from("/srv/git/alice/project.git"),
                    oids: vec![A.into(), B.into()],
                    clone_urls: vec![
                        "https://git.example.com/alice/project.git".into(),
                        "git://mirror.example.org/alice/project.git".into(),
                    ],
                    origin: SavedOrigin::User,
                    ref_updates: vec![
                        SavedRef {
                            oid: Some(A.into()),
                            ..SavedRef::new("refs/heads/main".into())
                        },
                        SavedRef {
                            oid: Some(B.into()),
                            ..SavedRef::new("refs/tags/v1.0".into())
                        },
                        SavedRef {
                            symbolic: Some("refs/heads/main".into()),
                            ..SavedRef::new("HEAD".into())
                        },
                        SavedRef {
                            delete: true,
                            ..SavedRef::new("refs/heads/old".into())
                        },
                    ],
                    replace_refs: true,
                    created_at: Some(1_731_999_000),
                    remaining_ms: 1_234_567,
                    waited_ms: 565_433,
                },
                SavedEvent {
                    id: "ev-sync \"quoted\" ünïcode \u{1F600}".into(),
                    identifier: "bob/thing".into(),
                    repo: PathBuf::from("relative/dir with spaces/thing.git"),
                    oids: vec![B.into()],
                    clone_urls: vec![],
                    origin: SavedOrigin::Sync,
                    ref_updates: vec![],
                    replace_refs: false,
                    created_at: None,
                    remaining_ms: 0,
                    waited_ms: u64::MAX,
                },
            ],
            expired_ids: vec![
                SavedExpiredId {
                    id: "gone-1".into(),
                    remaining_ms: 86_399_999,
                },
                SavedExpiredId {
                    id: "gone-2".into(),
                    remaining_ms: 1,
                },
            ],
            naughty: vec![
                SavedNaughty {
                    domain: "nxdomain.example".into(),
                    scheme: None,
                    port: None,
                    category: SavedCategory::Dns,
                    reason: "failed to resolve address".into(),
                    first_seen_ms: 1_731_990_000_000,
                    last_seen_ms: 1_731_999_000_000,
                    count: 3,
                    remaining_ms: 43_000_000,
                },
                SavedNaughty {
                    domain: "badcert.example".into(),
                    scheme: Some("https".into()),
                    port: Some(8443),
                    category: SavedCategory::Tls,
                    reason: "certificate has expired".into(),
                    first_seen_ms: 1_731_999_999_000,
                    last_seen_ms: 1_731_999_999_000,
                    count: 1,
                    remaining_ms: 1,
                },
            ],
            newest_states: vec![
                SavedNewestState {
                    repo: PathBuf::from("/srv/git/alice/project.git"),
                    created_at: 1_731_998_000,
                    remaining_ms: 1_700_000,
                },
                SavedNewestState {
                    repo: PathBuf::from("relative/other.git"),
                    created_at: 0,
                    remaining_ms: 1,
                },
            ],
        }
    }

    fn empty() -> StateFile {
        StateFile {
            version: STATE_VERSION,
            written_at_ms: 0,
            events: vec![],
            expired_ids: vec![],
            naughty: vec![],
            newest_states: vec![],
        }
    }

    fn sample_json() -> String {
        serde_json::to_string(&sample()).unwrap()
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn corrupt(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(StateFileError::Corrupt(why)) => why,
            other => panic!(
                "{:?}: expected Corrupt, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    /// `sample_json()` with `from` replaced by `to` (which must occur).
    fn edited(from: &str, to: &str) -> String {
        let json = sample_json();
        assert!(json.contains(from), "{from} not in {json}");
        json.replacen(from, to, 1)
    }

    #[test]
    fn every_kind_of_state_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &sample()).unwrap();
        assert_eq!(read(&path).unwrap(), sample());
        assert_eq!(check_state_file(&path).unwrap(), 2);
        assert_eq!(listing(dir.path()), ["state.json"]);

        // Over an existing file, and an empty state.
        write(&path, &empty()).unwrap();
        assert_eq!(read(&path).unwrap(), empty());
        assert_eq!(check_state_file(&path).unwrap(), 0);
        assert_eq!(listing(dir.path()), ["state.json"]);
    }

    /// `docs/state-file.md` documents the format with an example: it must load, field by field.
    #[test]
    fn the_documented_example_is_a_valid_state_file() {
        let doc = include_str!("../docs/state-file.md");
        let section = &doc[doc.find("## The format").expect("a format section")..];
        let start = section.find("```json\n").expect("a JSON example") + "```json\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let state = parse(example.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{example}"));
        assert_eq!(state.version, STATE_VERSION);
        assert_eq!(state.written_at_ms, 1_764_100_000_000);
        let ev = &state.events[0];
        assert_eq!(ev.origin, SavedOrigin::User);
        assert_eq!(ev.repo, Path::new("/srv/git/alice/project.git"));
        assert_eq!(ev.oids, [A]);
        assert_eq!(ev.ref_updates[0].oid.as_deref(), Some(A));
        assert_eq!(
            ev.ref_updates[1].symbolic.as_deref(),
            Some("refs/heads/main")
        );
        assert_eq!(ev.remaining_ms, 1_500_000);
        assert_eq!(state.expired_ids.len(), 1);
        assert_eq!(state.naughty[0].category, SavedCategory::Tls);
        // The fields added since version 1 first shipped.
        assert_eq!(ev.ref_updates[2].name, "refs/heads/old");
        assert!(ev.ref_updates[2].delete);
        assert!(ev.replace_refs);
        assert_eq!(ev.created_at, Some(1_764_099_700));
        assert_eq!(state.newest_states[0].created_at, 1_764_099_500);
        assert_eq!(state.newest_states[0].remaining_ms, 1_200_000);
        // Written back, it is the same state.
        let compact = serde_json::to_vec(&state).unwrap();
        assert_eq!(parse(&compact).unwrap(), state);
    }

    /// A file written before deletions, complete ref sets, `created_at` and the newest states
    /// existed reads as it always did, with their defaults.
    #[test]
    fn a_file_without_the_optional_fields_reads_with_their_defaults() {
        let old = format!(
            r#"{{"version":1,"written_at_ms":5,"events":[{{"id":"e","identifier":"i",
            "repo":"/r.git","oids":["{A}"],"clone_urls":[],"origin":"sync",
            "ref_updates":[{{"name":"refs/heads/main","oid":"{A}"}}],"remaining_ms":1,
            "waited_ms":2}}],"expired_ids":[],"naughty":[]}}"#
        );
        let state = parse(old.as_bytes()).unwrap();
        let ev = &state.events[0];
        assert!(!ev.replace_refs);
        assert_eq!(ev.created_at, None);
        assert!(!ev.ref_updates[0].delete);
        assert!(state.newest_states.is_empty());
    }

    #[test]
    fn the_file_is_one_line_of_json_with_the_documented_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &sample()).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["events"][0]["origin"], "user");
        assert_eq!(v["events"][1]["origin"], "sync");
        assert_eq!(v["events"][0]["ref_updates"][0]["oid"], A);
        // Absent targets are left out, not written as null.
        let head = v["events"][0]["ref_updates"][2].as_object().unwrap();
        assert_eq!(head.len(), 2, "{head:?}");
        assert_eq!(head["symbolic"], "refs/heads/main");
        let gone = v["events"][0]["ref_updates"][3].as_object().unwrap();
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert_eq!(gone["delete"], true);
        assert_eq!(v["events"][0]["replace_refs"], true);
        assert_eq!(v["events"][0]["created_at"], 1_731_999_000u64);
        assert_eq!(
            v["newest_states"][0],
            serde_json::json!({"repo": "/srv/git/alice/project.git",
                               "created_at": 1_731_998_000u64, "remaining_ms": 1_700_000})
        );
        // False and absent values of the newer fields are left out, as older files have them.
        let plain = v["events"][1].as_object().unwrap();
        assert!(!plain.contains_key("replace_refs"), "{plain:?}");
        assert!(!plain.contains_key("created_at"), "{plain:?}");
        write(&path, &empty()).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("newest_states"), "{text}");
        assert_eq!(v["naughty"][0]["category"], "dns");
        assert_eq!(v["naughty"][1]["category"], "tls");
        assert_eq!(
            v["events"][0]["repo"], "/srv/git/alice/project.git",
            "a UTF-8 path is a plain string"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_repository_path_that_is_not_utf8_round_trips() {
        use std::os::unix::ffi::OsStrExt;
        let raw = b"/srv/git/caf\xe9.git";
        let mut state = sample();
        state.events[0].repo = PathBuf::from(OsStr::from_bytes(raw));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &state).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(r#""repo":{"hex":"2f7372762f6769742f636166e92e676974"}"#),
            "{text}"
        );
        let back = read(&path).unwrap();
        assert_eq!(back.events[0].repo.as_os_str().as_bytes(), raw);
        assert_eq!(back, state);
    }

    #[test]
    fn the_hex_form_of_a_path_is_checked() {
        for (bad, why) in [
            (r#"{"hex":"2f7"}"#, "even number of hex digits"),
            (r#"{"hex":"zz"}"#, "even number of hex digits"),
            (r#"{"hex":"2f","other":1}"#, "unknown field `other`"),
            (r#"{}"#, "missing field `hex`"),
            (r#"{"hex":"2f","hex":"2f"}"#, "duplicate field `hex`"),
            ("17", "a path string"),
            ("null", "a path string"),
        ] {
            let json = edited(r#""/srv/git/alice/project.git""#, bad);
            let msg = corrupt(json.as_bytes());
            assert!(msg.contains(why), "{bad}: {msg}");
        }
        // A valid hex form of a UTF-8 path is accepted too.
        let json = edited(r#""/srv/git/alice/project.git""#, r#"{"hex":"2f78"}"#);
        assert_eq!(
            parse(json.as_bytes()).unwrap().events[0].repo,
            Path::new("/x")
        );
    }

    #[test]
    fn a_missing_file_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        match read(&dir.path().join("nope.json")) {
            Err(StateFileError::Unreadable(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_state_file(&dir.path().join("nope.json")),
            Err(StateFileError::Unreadable(_))
        ));
    }

    #[test]
    fn a_directory_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        match read(dir.path()) {
            Err(
                e @ StateFileError::NotARegularFile {
                    kind: "a directory",
                },
            ) => {
                assert_eq!(e.to_string(), "is not a regular file: it is a directory");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_file_is_corrupt() {
        assert_eq!(corrupt(b""), "the file is empty");
        assert_eq!(corrupt(b"\n"), "the file is empty");
        assert_eq!(corrupt(b"  \r\n\t"), "the file is empty");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        File::create(&path).unwrap();
        match read(&path) {
            Err(e @ StateFileError::Corrupt(_)) => {
                assert_eq!(e.to_string(), "is corrupt: the file is empty")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_file_is_corrupt_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &sample()).unwrap();
        let full = fs::read(&path).unwrap();
        // Without its final newline the file is still complete; every shorter cut is not.
        let json_len = full.len() - 1;
        assert!(json_len > 1000, "{json_len}");
        for cut in 0..json_len {
            corrupt(&full[..cut]);
        }
        // And through the file system, at a few lengths.
        for cut in [
            1,
            2,
            10,
            json_len / 3,
            json_len / 2,
            json_len - 2,
            json_len - 1,
        ] {
            fs::write(&path, &full[..cut]).unwrap();
            assert!(
                matches!(read(&path), Err(StateFileError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        fs::write(&path, &full[..json_len]).unwrap();
        assert_eq!(read(&path).unwrap(), sample());
    }

    #[test]
    fn text_that_is_not_json_is_corrupt() {
        for bad in [
            &b"hello"[..],
            b"version = 1",
            b"\x00\x01\x02\xff\xfe",
            b"\xef\xbb\xbf{}",
            b"{\"version\":1,",
            b"}",
            b"\"version\"",
        ] {
            corrupt(bad);
        }
        // Trailing bytes after a complete document.
        corrupt(format!("{}x", sample_json()).as_bytes());
        corrupt(format!("{0}{0}", sample_json()).as_bytes());
    }

    #[test]
    fn json_of_the_wrong_shape_is_corrupt() {
        for bad in ["[]", "1", "null", "\"state\"", "{}", r#"{"version":1}"#] {
            corrupt(bad.as_bytes());
        }
        let cases: &[(&str, &str, &str)] = &[
            // (replace, with, what the message says; serde's own messages give the column)
            (
                r#""written_at_ms":1732000000123"#,
                r#""written_at_ms":"soon""#,
                "expected u64",
            ),
            (
                r#""written_at_ms":1732000000123"#,
                r#""written_at_ms":-1"#,
                "",
            ),
            (r#""remaining_ms":1234567"#, r#""remaining_ms":1.5"#, ""),
            (r#""remaining_ms":1234567,"#, "", "remaining_ms"),
            (r#""oids":["#, r#""oids":[1,"#, ""),
            (
                r#""origin":"user""#,
                r#""origin":"User""#,
                "events[0].origin",
            ),
            (r#""origin":"sync""#, r#""origin":null"#, ""),
            (
                r#""category":"tls""#,
                r#""category":"http""#,
                "naughty[1].category",
            ),
            (
                r#""symbolic":"refs/heads/main""#,
                r#""symbolic":"refs/heads/main","oid":"e92758a50bbf13ea1fe986bbe254a709b0bf741c""#,
                "events[0].ref_updates[2]",
            ),
            (
                r#","symbolic":"refs/heads/main""#,
                "",
                "events[0].ref_updates[2]",
            ),
            (
                r#","symbolic":"refs/heads/main""#,
                r#","delete":false"#,
                "events[0].ref_updates[2]",
            ),
            (
                r#","symbolic":"refs/heads/main""#,
                r#","symbolic":"refs/heads/main","delete":true"#,
                "events[0].ref_updates[2]",
            ),
            (r#""delete":true"#, r#""delete":"yes""#, ""),
            (r#""replace_refs":true"#, r#""replace_refs":1"#, ""),
            (r#""created_at":1731999000"#, r#""created_at":-1"#, ""),
            (r#""created_at":1731999000"#, r#""created_at":"now""#, ""),
            (r#""created_at":1731998000"#, r#""created_at":null"#, ""),
            (
                r#""created_at":0,"remaining_ms":1}"#,
                r#""remaining_ms":1}"#,
                "created_at",
            ),
            (r#""newest_states":["#, r#""newest_states":{},"z":["#, ""),
            (r#""expired_ids":["#, r#""expired_ids":{},"x":["#, ""),
            (r#""naughty":["#, r#""naughty":null,"y":["#, ""),
        ];
        for (from, to, names) in cases {
            let msg = corrupt(edited(from, to).as_bytes());
            assert!(msg.contains(names), "{from} -> {to}: {msg}");
        }
    }

    #[test]
    fn an_unknown_field_is_corrupt() {
        for (from, to) in [
            (r#"{"version":1,"#, r#"{"version":1,"comment":"hi","#),
            (r#""id":"ev-user","#, r#""id":"ev-user","priority":3,"#),
            (r#""name":"HEAD","#, r#""name":"HEAD","force":true,"#),
            (r#""id":"gone-1","#, r#""id":"gone-1","why":"x","#),
            (r#""count":3,"#, r#""count":3,"weight":443,"#),
            (r#""created_at":0,"#, r#""created_at":0,"peeled":true,"#),
        ] {
            let msg = corrupt(edited(from, to).as_bytes());
            assert!(msg.contains("unknown field"), "{to}: {msg}");
        }
    }

    #[test]
    fn another_format_version_is_named() {
        for v in [0u32, 2, 17, u32::MAX] {
            // The same shape as version 1, and a shape this build cannot know.
            let same_shape = edited(r#""version":1"#, &format!(r#""version":{v}"#));
            let other_shape = format!(r#"{{"events":{{"a":[]}},"version":{v},"new":true}}"#);
            for json in [same_shape, other_shape] {
                match parse(json.as_bytes()) {
                    Err(e @ StateFileError::UnknownVersion(_)) => {
                        assert!(matches!(e, StateFileError::UnknownVersion(n) if n == v));
                        assert_eq!(
                            e.to_string(),
                            format!("has format version {v}, this build reads version 1")
                        );
                    }
                    other => panic!("{json}: {other:?}"),
                }
            }
        }
        // A version that is not a number of the right kind is plain corruption.
        for bad in [
            r#""version":"1""#,
            r#""version":-1"#,
            r#""version":1.0"#,
            r#""version":4294967296"#,
        ] {
            corrupt(edited(r#""version":1"#, bad).as_bytes());
        }
    }

    #[test]
    fn a_write_leaves_no_temporary_file_and_clears_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // Left by processes killed mid-write, and files of other names that must stay.
        for stale in [".state.json.tmp-1", ".state.json.tmp-99999"] {
            fs::write(dir.path().join(stale), b"{\"vers").unwrap();
        }
        fs::write(dir.path().join(".other.json.tmp-1"), b"x").unwrap();
        fs::write(dir.path().join("state.json.bak"), b"x").unwrap();
        write(&path, &sample()).unwrap();
        assert_eq!(
            listing(dir.path()),
            [".other.json.tmp-1", "state.json", "state.json.bak"]
        );
        for _ in 0..3 {
            write(&path, &sample()).unwrap();
        }
        assert_eq!(
            listing(dir.path()),
            [".other.json.tmp-1", "state.json", "state.json.bak"]
        );
    }

    #[test]
    fn the_old_file_stays_whole_until_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &empty()).unwrap();
        let before = fs::read(&path).unwrap();
        let mut seen = None;
        write_with(&path, &sample(), |tmp| {
            // The new content is complete and synced in the temporary file, next to the
            // untouched old file.
            assert_eq!(tmp.parent(), Some(dir.path()));
            seen = Some(read(tmp).unwrap());
            assert_eq!(fs::read(&path).unwrap(), before);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, Some(sample()));
        assert_eq!(read(&path).unwrap(), sample());
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, &sample()).unwrap();
        let before = fs::read(&path).unwrap();

        // Failing after the temporary file is complete (the disk filled up, say).
        let err = write_with(&path, &empty(), |_| Err(io::Error::other("injected"))).unwrap_err();
        assert_eq!(err.to_string(), "injected");
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(listing(dir.path()), ["state.json"]);
        assert_eq!(read(&path).unwrap(), sample());

        // A later write succeeds.
        write(&path, &empty()).unwrap();
        assert_eq!(read(&path).unwrap(), empty());
    }

    #[test]
    fn writing_over_a_directory_fails_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"keep").unwrap();
        assert!(write(&path, &sample()).is_err());
        assert!(path.is_dir());
        assert_eq!(listing(&path), ["inside"]);
        assert_eq!(listing(dir.path()), ["state.json"]);
    }

    #[test]
    fn writing_into_a_missing_directory_fails_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("state.json");
        let err = write(&path, &sample()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(listing(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let err = write(Path::new("/"), &sample()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn concurrent_writers_in_one_process_never_mix_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let states = [sample(), empty()];
        std::thread::scope(|s| {
            for state in &states {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write(path, state).unwrap();
                    }
                });
            }
            for _ in 0..50 {
                if let Ok(read_back) = read(&path) {
                    assert!(states.contains(&read_back));
                }
            }
        });
        assert!(states.contains(&read(&path).unwrap()));
        assert_eq!(listing(dir.path()), ["state.json"]);
    }
}
