//! One error type per operation: building an engine, submitting an event, shutting down.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Longest value quoted back in an error message; longer values are cut with `…`.
const QUOTE_LIMIT: usize = 80;

fn quoted(value: &str) -> String {
    if value.chars().count() <= QUOTE_LIMIT {
        format!("{value:?}")
    } else {
        let cut: String = value.chars().take(QUOTE_LIMIT).collect();
        format!("{cut:?}… ({} bytes)", value.len())
    }
}

/// Why [`EngineBuilder::build`](crate::EngineBuilder::build) refused a configuration or could
/// not start the engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is out of range. `setting` is the builder method's name.
    InvalidSetting {
        /// The builder method whose value is wrong.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A thread could not be spawned.
    Spawn(std::io::Error),
    /// The state file exists but cannot be used. It was left as it is; see
    /// [`EngineBuilder::move_unreadable_state_aside`](crate::EngineBuilder::move_unreadable_state_aside).
    StateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: crate::StateFileError,
    },
    /// Another engine, in this process or another, holds the state file: its lock file
    /// (`<name>.lock` beside it) is locked. Two engines on one file would overwrite each
    /// other's checkpoints and lose events. See
    /// [`EngineBuilder::state_file`](crate::EngineBuilder::state_file).
    StateFileLocked {
        /// The state file.
        path: PathBuf,
        /// Its lock file.
        lock_file: PathBuf,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::InvalidSetting { setting, reason } => {
                write!(f, "invalid setting `{setting}`: {reason}")
            }
            BuildError::Spawn(e) => write!(f, "could not start engine threads: {e}"),
            BuildError::StateFile { path, error } => {
                write!(f, "state file {} {error}", path.display())
            }
            BuildError::StateFileLocked { path, lock_file } => write!(
                f,
                "state file {} is in use: another engine holds its lock file {}",
                path.display(),
                lock_file.display()
            ),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Spawn(e) => Some(e),
            BuildError::StateFile { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why [`Engine::submit`](crate::Engine::submit) refused an event. A refused event changes
/// nothing in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubmitError {
    /// The event id is empty, too long or contains control or Unicode bidirectional
    /// formatting characters (which would make the printed id read as another).
    InvalidEventId {
        /// The id as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The identifier is empty, too long or contains control or Unicode bidirectional
    /// formatting characters.
    InvalidIdentifier {
        /// The identifier as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The event lists no object id.
    NoObjectIds,
    /// The event lists more object ids than the engine accepts per event.
    TooManyObjectIds {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An object id is not 40 hexadecimal digits.
    InvalidObjectId {
        /// Its position in [`PendingEvent::oids`](crate::PendingEvent::oids).
        index: usize,
        /// The id as given.
        value: String,
    },
    /// The event lists more clone URLs than the engine accepts per event.
    TooManyCloneUrls {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The event's clone URLs would give its identifier more distinct URLs than
    /// [`EngineBuilder::max_urls_per_identifier`](crate::EngineBuilder::max_urls_per_identifier)
    /// allows, counting those of its waiting events. Nothing was queued.
    TooManyIdentifierUrls {
        /// The identifier.
        identifier: String,
        /// Distinct URLs its waiting events list now.
        distinct: usize,
        /// Distinct URLs the event would add.
        new: usize,
        /// The limit.
        max: usize,
    },
    /// A clone URL is empty, too long or contains whitespace, control or Unicode bidirectional
    /// formatting characters.
    InvalidCloneUrl {
        /// Its position in [`PendingEvent::clone_urls`](crate::PendingEvent::clone_urls).
        index: usize,
        /// The URL as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The event lists more ref updates than the engine accepts per event.
    TooManyRefUpdates {
        /// How many were given.
        count: usize,
        /// The limit
        /// ([`EngineBuilder::max_ref_updates_per_event`](crate::EngineBuilder::max_ref_updates_per_event)).
        max: usize,
    },
    /// A ref update has a bad name or target: not `HEAD` or a valid name under `refs/`, under
    /// the engine's own `refs/purgatory-sync/`, given twice or clashing with another, an oid
    /// target that is not 40 hex digits or not among the event's object ids, or a symbolic
    /// target that is not allowed or not a valid `refs/...` name.
    InvalidRefUpdate {
        /// Its position in [`PendingEvent::ref_updates`](crate::PendingEvent::ref_updates).
        index: usize,
        /// The ref name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`PendingEvent::replace_refs`](crate::PendingEvent::replace_refs) is set but the event
    /// has no ref update: an empty complete set would delete every branch and tag of the
    /// repository.
    ReplaceRefsWithoutRefUpdates,
    /// The repository path is not an existing bare git repository.
    InvalidRepository {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A synced event with this id expired recently and its data is still missing; such a
    /// re-submission stays refused for the expired-id memory (default 7 days) so that a
    /// re-broadcast event cannot linger forever. A user's re-submission, or one whose objects
    /// have all arrived, is not refused.
    PreviouslyExpired {
        /// The event id.
        event_id: String,
        /// How much longer the id stays refused.
        refused_for: Duration,
    },
    /// The engine already holds as many waiting events as it accepts.
    QueueFull {
        /// The limit ([`EngineBuilder::max_events`](crate::EngineBuilder::max_events)).
        max_events: usize,
    },
    /// The engine is shutting down or its scheduler has stopped.
    ShuttingDown,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::InvalidEventId { value, reason } => {
                write!(f, "invalid event id {}: {reason}", quoted(value))
            }
            SubmitError::InvalidIdentifier { value, reason } => {
                write!(f, "invalid identifier {}: {reason}", quoted(value))
            }
            SubmitError::NoObjectIds => write!(f, "invalid oids: the event lists no object id"),
            SubmitError::TooManyObjectIds { count, max } => {
                write!(f, "invalid oids: {count} object ids, at most {max} allowed")
            }
            SubmitError::InvalidObjectId { index, value } => write!(
                f,
                "invalid oids[{index}] {}: not a full object id of 40 hex digits",
                quoted(value)
            ),
            SubmitError::TooManyCloneUrls { count, max } => {
                write!(f, "invalid clone_urls: {count} URLs, at most {max} allowed")
            }
            SubmitError::InvalidCloneUrl {
                index,
                value,
                reason,
            } => write!(f, "invalid clone_urls[{index}] {}: {reason}", quoted(value)),
            SubmitError::TooManyIdentifierUrls {
                identifier,
                distinct,
                new,
                max,
            } => write!(
                f,
                "invalid clone_urls: identifier {} has {distinct} distinct clone URLs waiting \
                 and the event adds {new}, at most {max} allowed",
                quoted(identifier)
            ),
            SubmitError::TooManyRefUpdates { count, max } => write!(
                f,
                "invalid ref_updates: {count} ref updates, at most {max} allowed"
            ),
            SubmitError::InvalidRefUpdate {
                index,
                name,
                reason,
            } => write!(f, "invalid ref_updates[{index}] {}: {reason}", quoted(name)),
            SubmitError::ReplaceRefsWithoutRefUpdates => f.write_str(
                "invalid replace_refs: the event has no ref updates, and an empty complete set \
                 would delete every branch and tag",
            ),
            SubmitError::InvalidRepository { path, reason } => {
                write!(f, "invalid repo {}: {reason}", path.display())
            }
            SubmitError::PreviouslyExpired {
                event_id,
                refused_for,
            } => write!(
                f,
                "event {} expired in purgatory and is refused for another {} s",
                quoted(event_id),
                refused_for.as_secs()
            ),
            SubmitError::QueueFull { max_events } => {
                write!(f, "queue full: {max_events} events already wait")
            }
            SubmitError::ShuttingDown => write!(f, "the engine is shutting down"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// Why [`Engine::shutdown`](crate::Engine::shutdown) did not end cleanly. The engine is
/// stopped either way; this says what could not be waited for.
#[derive(Debug)]
#[non_exhaustive]
pub enum ShutdownError {
    /// Some fetches had not stopped when the shutdown timeout ran out. They were told to
    /// cancel and are left to finish on their own, each on its worker thread; the pool's idle
    /// threads end with the last of them.
    WorkersStillRunning {
        /// How many fetches (and so worker threads) were still running.
        count: usize,
    },
    /// The scheduler thread panicked; the message is the panic's.
    SchedulerPanicked(String),
    /// The final write of the state file failed; the previous checkpoint is still there.
    StateFile(std::io::Error),
}

impl fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownError::WorkersStillRunning { count } => write!(
                f,
                "{count} worker thread(s) were still fetching when the shutdown timeout ran out"
            ),
            ShutdownError::SchedulerPanicked(m) => write!(f, "the scheduler thread panicked: {m}"),
            ShutdownError::StateFile(e) => write!(f, "the final state file write failed: {e}"),
        }
    }
}

impl std::error::Error for ShutdownError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_in_messages() {
        let e = SubmitError::InvalidObjectId {
            index: 3,
            value: "z".repeat(10_000),
        };
        let msg = e.to_string();
        assert!(msg.starts_with("invalid oids[3] \"zzz"), "{msg}");
        assert!(msg.len() < 300, "{}", msg.len());
        assert!(msg.contains("10000 bytes"));
    }

    #[test]
    fn messages_name_the_field() {
        let e = SubmitError::InvalidCloneUrl {
            index: 1,
            value: "".into(),
            reason: "empty",
        };
        assert_eq!(e.to_string(), "invalid clone_urls[1] \"\": empty");
        let e = SubmitError::InvalidRefUpdate {
            index: 2,
            name: "refs/heads/x".into(),
            reason: "given twice",
        };
        assert_eq!(
            e.to_string(),
            "invalid ref_updates[2] \"refs/heads/x\": given twice"
        );
        let e = SubmitError::TooManyRefUpdates { count: 3, max: 2 };
        assert_eq!(
            e.to_string(),
            "invalid ref_updates: 3 ref updates, at most 2 allowed"
        );
    }
}
