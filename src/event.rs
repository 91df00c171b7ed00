//! What the host hands in and what it gets back: waiting events and their outcomes.

use std::path::PathBuf;
use std::time::Duration;

/// How an event reached the host, which decides how soon the first fetch is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Origin {
    /// Published by a user to this relay: a `git push` of the data usually follows, so the
    /// first fetch waits longer (default 180 s).
    User,
    /// Received from another relay by sync: nobody will push the data here, so the first fetch
    /// comes soon (default 500 ms), which still coalesces a burst of related events.
    #[default]
    Sync,
}

/// An event waiting in purgatory for git objects, as the host submits it.
///
/// Build it with a struct literal and `..Default::default()`, or with [`PendingEvent::new`]
/// and the chained setters.
///
/// ```
/// use purgatory_sync::{Origin, PendingEvent};
///
/// let ev = PendingEvent::new("event-1", "alice/project", "/srv/git/alice/project.git")
///     .oid("e92758a50bbf13ea1fe986bbe254a709b0bf741c")
///     .clone_url("https://git.example.com/alice/project.git")
///     .origin(Origin::User);
/// assert_eq!(ev.oids.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingEvent {
    /// The event's id (for Nostr, its 64-hex id). Non-empty, at most 256 bytes.
    pub id: String,
    /// The repository identifier the event belongs to. Events with the same identifier and
    /// repository share one queue entry and their fetches. Non-empty, at most 256 bytes.
    pub identifier: String,
    /// Path of the local bare repository the objects must arrive in.
    pub repo: PathBuf,
    /// The object ids the event waits for: full 40-hex ids, upper or lower case.
    pub oids: Vec<String>,
    /// Git servers that may hold the objects, tried in order.
    pub clone_urls: Vec<String>,
    /// How the event reached the host.
    pub origin: Origin,
    /// Refs to set, all or none, when the event is released (before
    /// [`Outcome::Released`] is sent): a repository state's branches and tags, `HEAD`, or a pull
    /// request's `refs/nostr/<event-id>`. Oid targets must be among [`oids`](Self::oids).
    ///
    /// Checked at submit: each name is `HEAD` or a valid git ref name under `refs/` (at most
    /// 1024 bytes, not under the engine's own `refs/purgatory-sync/`), no name is given twice
    /// or is a directory of another (`refs/heads/a` and `refs/heads/a/b`), an oid target is 40
    /// hex digits among [`oids`](Self::oids), only `HEAD` may have a symbolic target (a
    /// `refs/...` name), and `HEAD` may not be deleted ([`RefTarget::Delete`]). At most 256
    /// per event by default
    /// ([`EngineBuilder::max_ref_updates_per_event`](crate::EngineBuilder::max_ref_updates_per_event)).
    pub ref_updates: Vec<RefUpdate>,
    /// The event's [`ref_updates`](Self::ref_updates) are the repository's *complete* set of
    /// branches and tags, as a repository state event (NIP-34 kind 30618) lists them: when
    /// they are written, every existing ref under `refs/heads/` and `refs/tags/` that the
    /// event does not name is deleted, in the same all-or-none transaction. `HEAD` and refs
    /// in other namespaces (`refs/nostr/*`, the engine's `refs/purgatory-sync/*`) are never
    /// deleted by it.
    ///
    /// An event with `replace_refs` and no ref update is refused at submit
    /// ([`SubmitError::ReplaceRefsWithoutRefUpdates`](crate::SubmitError::ReplaceRefsWithoutRefUpdates)):
    /// an empty set would delete every branch and tag, which NIP-34 means by no state
    /// event at all.
    pub replace_refs: bool,
    /// When the event was created, in Unix seconds (a Nostr event's `created_at`), if known.
    ///
    /// It orders the complete ref sets ([`replace_refs`](Self::replace_refs)) of one
    /// repository: the newest state wins. Once a state with a `created_at` has been written,
    /// an *older* state of the same repository whose data arrives later is released without
    /// writing its refs ([`RefsOutcome::SkippedOlderState`]), so that the refs never roll
    /// back. The engine remembers the newest written state of each repository for the event
    /// lifetime after it was written (an older state can only wait in purgatory that long).
    /// Without `created_at`, or without `replace_refs`, an event's refs are written whatever
    /// was written before, in submission order.
    pub created_at: Option<u64>,
}

/// A ref to set when an event is released.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefUpdate {
    /// The full ref name: `refs/...`, or `HEAD` for a symbolic target.
    pub name: String,
    /// What the ref points at.
    pub target: RefTarget,
}

impl RefUpdate {
    /// A ref pointing at an object id (40 hex digits).
    pub fn oid(name: impl Into<String>, oid: impl Into<String>) -> Self {
        RefUpdate {
            name: name.into(),
            target: RefTarget::Oid(oid.into()),
        }
    }

    /// A symbolic ref, such as `HEAD` -> `refs/heads/main`.
    pub fn symbolic(name: impl Into<String>, target: impl Into<String>) -> Self {
        RefUpdate {
            name: name.into(),
            target: RefTarget::Symbolic(target.into()),
        }
    }

    /// The deletion of a ref (not `HEAD`); a ref that does not exist is no error.
    pub fn delete(name: impl Into<String>) -> Self {
        RefUpdate {
            name: name.into(),
            target: RefTarget::Delete,
        }
    }
}

/// The target of a [`RefUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefTarget {
    /// An object id, 40 hex digits.
    Oid(String),
    /// Another ref's full name (only for `HEAD`).
    Symbolic(String),
    /// No target: the ref is deleted if it exists (never `HEAD`). Deleting a ref that does
    /// not exist is not an error.
    Delete,
}

impl PendingEvent {
    /// An event with no object ids or URLs yet.
    pub fn new(
        id: impl Into<String>,
        identifier: impl Into<String>,
        repo: impl Into<PathBuf>,
    ) -> Self {
        PendingEvent {
            id: id.into(),
            identifier: identifier.into(),
            repo: repo.into(),
            ..Default::default()
        }
    }

    /// Adds an object id the event waits for.
    pub fn oid(mut self, oid: impl Into<String>) -> Self {
        self.oids.push(oid.into());
        self
    }

    /// Adds a clone URL to fetch from.
    pub fn clone_url(mut self, url: impl Into<String>) -> Self {
        self.clone_urls.push(url.into());
        self
    }

    /// Sets the origin.
    pub fn origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    /// Adds a ref to set on release.
    pub fn ref_update(mut self, update: RefUpdate) -> Self {
        self.ref_updates.push(update);
        self
    }

    /// Says whether the ref updates are the repository's complete set of branches and tags,
    /// whose writing deletes the branches and tags they do not name (the field of the same
    /// name).
    pub fn replace_refs(mut self, replace: bool) -> Self {
        self.replace_refs = replace;
        self
    }

    /// Sets when the event was created, in Unix seconds (the field of the same name).
    pub fn created_at(mut self, unix_seconds: u64) -> Self {
        self.created_at = Some(unix_seconds);
        self
    }
}

/// What [`Engine::submit`](crate::Engine::submit) did with an accepted event.
///
/// An event whose objects are all in the repository already but which carries
/// [`ref_updates`](PendingEvent::ref_updates) is `Pending`, not `AlreadySatisfied`: `submit`
/// only validates and enqueues, so the refs are set by the scheduler thread at its next pass
/// (within milliseconds, unless a fetch runs in that repository), and an
/// [`Outcome::Released`] follows once they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admission {
    /// The event waits in purgatory; an [`Outcome`] will follow unless it is cancelled.
    /// Submitting an event id that is already waiting is accepted again as `Pending` and
    /// changes nothing.
    ///
    /// `refused_urls` lists the clone URLs the URL policy refused (which and why): they are
    /// never fetched. The event waits even when every URL was refused, because a push may
    /// still bring its data.
    #[non_exhaustive]
    Pending {
        /// The refused clone URLs, in the order given.
        refused_urls: Vec<RefusedUrl>,
    },
    /// Every object id is already in the repository and the event has no ref updates: nothing
    /// was queued and no [`Outcome`] will follow.
    AlreadySatisfied,
}

impl Admission {
    /// `Pending` with no refused URL.
    pub fn pending() -> Self {
        Admission::Pending {
            refused_urls: Vec::new(),
        }
    }

    /// `Pending` with these refused URLs.
    pub fn pending_with(refused_urls: Vec<RefusedUrl>) -> Self {
        Admission::Pending { refused_urls }
    }

    /// Whether the event waits in purgatory.
    pub fn is_pending(&self) -> bool {
        matches!(self, Admission::Pending { .. })
    }

    /// The clone URLs the URL policy refused (empty unless `Pending`).
    pub fn refused_urls(&self) -> &[RefusedUrl] {
        match self {
            Admission::Pending { refused_urls } => refused_urls,
            _ => &[],
        }
    }
}

/// A clone URL the URL policy refused at submit; it is never fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusedUrl {
    /// Its position in [`PendingEvent::clone_urls`].
    pub index: usize,
    /// The URL as given.
    pub url: String,
    /// Why it was refused.
    pub reason: UrlRefusal,
}

impl RefusedUrl {
    /// A refusal of `url` at `index` for `reason`.
    pub fn new(index: usize, url: impl Into<String>, reason: UrlRefusal) -> Self {
        RefusedUrl {
            index,
            url: url.into(),
            reason,
        }
    }
}

/// Why the URL policy refused a clone URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlRefusal {
    /// The URL could not be parsed or has no host (a local path, say).
    Invalid(String),
    /// Its scheme is not in the allow-list (default `https`, `http`, `git`), in lower case;
    /// for git's `<transport>::<address>` form (`ext::…`), the transport with `::`.
    Scheme(String),
    /// It embeds credentials (`user:password@`).
    Credentials,
    /// Its host is, or resolves to, a loopback, private, link-local, multicast or unspecified
    /// address, and the engine does not allow private addresses.
    PrivateAddress(String),
    /// Its host is the relay's own domain.
    OwnDomain,
}

impl std::fmt::Display for UrlRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlRefusal::Invalid(why) => write!(f, "not a usable URL: {why}"),
            UrlRefusal::Scheme(s) => write!(f, "scheme {s:?} is not allowed"),
            UrlRefusal::Credentials => f.write_str("URLs with credentials are not allowed"),
            UrlRefusal::PrivateAddress(a) => write!(f, "{a} is a private or local address"),
            UrlRefusal::OwnDomain => f.write_str("the relay's own domain is never fetched from"),
        }
    }
}

/// Why an event left purgatory without its data.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExpiryReason {
    /// The event's lifetime in purgatory (default 30 min) ran out.
    LifetimeEnded,
    /// Its repository could not be opened when the engine restored its state at start (it
    /// was removed or broken while the engine was down).
    #[non_exhaustive]
    RepositoryGone {
        /// Why the repository could not be opened.
        message: String,
    },
    /// Every object arrived, but the event's [ref updates](PendingEvent::ref_updates) could
    /// not be written before its lifetime ran out (they are retried at every tick until then);
    /// none of them was written. `missing` is empty.
    #[non_exhaustive]
    RefUpdateFailed {
        /// The last error, from [`Fetcher::apply_refs`](crate::Fetcher::apply_refs).
        message: String,
    },
}

/// What became of a released event's [ref updates](PendingEvent::ref_updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefsOutcome {
    /// The event had no ref updates.
    NoRefUpdates,
    /// They were written, all of them, before the event was released.
    Written,
    /// None was written: the event is a complete ref set
    /// ([`replace_refs`](PendingEvent::replace_refs)) older, by its
    /// [`created_at`](PendingEvent::created_at), than a state of the same repository written
    /// before; writing it would roll the repository's refs back. The event's objects are in
    /// the repository.
    #[non_exhaustive]
    SkippedOlderState {
        /// The `created_at` of the newer state that was written.
        newer_created_at: u64,
    },
}

impl RefsOutcome {
    /// A [`RefsOutcome::SkippedOlderState`].
    pub fn skipped_older_state(newer_created_at: u64) -> Self {
        RefsOutcome::SkippedOlderState { newer_created_at }
    }
}

/// What finally happened to a submitted event, delivered on
/// [`Engine::outcomes`](crate::Engine::outcomes). Every pending event gets exactly one,
/// unless it is cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every object the event waited for is in its repository, and its
    /// [ref updates](PendingEvent::ref_updates), if any, are written, unless `refs` says they
    /// were skipped as an older state's.
    #[non_exhaustive]
    Released {
        /// The event's id.
        event_id: String,
        /// The event's repository identifier.
        identifier: String,
        /// The repository the objects are in.
        repo: PathBuf,
        /// How long the event waited, by the engine's clock.
        waited: Duration,
        /// What became of its ref updates.
        refs: RefsOutcome,
    },
    /// The event left purgatory without all its objects.
    #[non_exhaustive]
    Expired {
        /// The event's id.
        event_id: String,
        /// The event's repository identifier.
        identifier: String,
        /// The repository the objects were meant for.
        repo: PathBuf,
        /// The object ids still missing, as lower-case hex.
        missing: Vec<String>,
        /// Why it left.
        reason: ExpiryReason,
    },
}

impl Outcome {
    /// The event id this outcome is about.
    pub fn event_id(&self) -> &str {
        match self {
            Outcome::Released { event_id, .. } | Outcome::Expired { event_id, .. } => event_id,
        }
    }

    /// The repository identifier this outcome is about.
    pub fn identifier(&self) -> &str {
        match self {
            Outcome::Released { identifier, .. } | Outcome::Expired { identifier, .. } => {
                identifier
            }
        }
    }

    /// Whether this is a [`Outcome::Released`].
    pub fn is_released(&self) -> bool {
        matches!(self, Outcome::Released { .. })
    }
}

/// An outcome as one JSON object, the same shape the C ABI hands its hosts and
/// `purgatory-sync run` prints, one per line:
///
/// ```json
/// {"kind":"released","event_id":"…","identifier":"…","repo":"/srv/a.git","waited_ms":1234,
///  "refs":"written"}
/// {"kind":"released","event_id":"…","identifier":"…","repo":"/srv/a.git","waited_ms":1234,
///  "refs":"skipped_older_state","newer_created_at":1700000100}
/// {"kind":"expired","event_id":"…","identifier":"…","repo":"/srv/a.git","missing":["…"],
///  "reason":"lifetime_ended"}
/// ```
///
/// `refs` ([`RefsOutcome`]) is `none` (no ref updates), `written` or `skipped_older_state`;
/// the last adds `newer_created_at`, the `created_at` of the newer state written before.
/// `reason` is `lifetime_ended`, `repository_gone` or `ref_update_failed`; the last two add a
/// `message`. Paths that are not UTF-8 are written lossily.
///
/// ```
/// # use purgatory_sync::Outcome;
/// # fn show(outcome: &Outcome) -> serde_json::Result<()> {
/// println!("{}", serde_json::to_string(outcome)?);
/// # Ok(())
/// # }
/// ```
impl serde::Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (kind, event_id, identifier, repo) = match self {
            Outcome::Released {
                event_id,
                identifier,
                repo,
                ..
            } => ("released", event_id, identifier, repo),
            Outcome::Expired {
                event_id,
                identifier,
                repo,
                ..
            } => ("expired", event_id, identifier, repo),
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("kind", kind)?;
        map.serialize_entry("event_id", event_id)?;
        map.serialize_entry("identifier", identifier)?;
        map.serialize_entry("repo", &repo.to_string_lossy())?;
        match self {
            Outcome::Released { waited, refs, .. } => {
                map.serialize_entry("waited_ms", &crate::state_file::millis(*waited))?;
                match refs {
                    RefsOutcome::NoRefUpdates => map.serialize_entry("refs", "none")?,
                    RefsOutcome::Written => map.serialize_entry("refs", "written")?,
                    RefsOutcome::SkippedOlderState { newer_created_at } => {
                        map.serialize_entry("refs", "skipped_older_state")?;
                        map.serialize_entry("newer_created_at", newer_created_at)?;
                    }
                }
            }
            Outcome::Expired {
                missing, reason, ..
            } => {
                map.serialize_entry("missing", missing)?;
                let (reason, message) = match reason {
                    ExpiryReason::LifetimeEnded => ("lifetime_ended", None),
                    ExpiryReason::RefUpdateFailed { message } => {
                        ("ref_update_failed", Some(message))
                    }
                    ExpiryReason::RepositoryGone { message } => ("repository_gone", Some(message)),
                };
                map.serialize_entry("reason", reason)?;
                if let Some(message) = message {
                    map.serialize_entry("message", message)?;
                }
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(refs: RefsOutcome) -> serde_json::Value {
        serde_json::to_value(Outcome::Released {
            event_id: "e".into(),
            identifier: "i".into(),
            repo: PathBuf::from("/srv/a.git"),
            waited: Duration::from_millis(1234),
            refs,
        })
        .unwrap()
    }

    #[test]
    fn a_released_outcome_says_what_became_of_its_refs() {
        let base = serde_json::json!({"kind": "released", "event_id": "e", "identifier": "i",
                                      "repo": "/srv/a.git", "waited_ms": 1234});
        let with = |extra: serde_json::Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(
            released(RefsOutcome::NoRefUpdates),
            with(serde_json::json!({"refs": "none"}))
        );
        assert_eq!(
            released(RefsOutcome::Written),
            with(serde_json::json!({"refs": "written"}))
        );
        assert_eq!(
            released(RefsOutcome::skipped_older_state(1_700_000_100)),
            with(serde_json::json!({"refs": "skipped_older_state",
                                    "newer_created_at": 1_700_000_100u64}))
        );
    }
}
