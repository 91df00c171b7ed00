//! NIP-34 events in: raw signed Nostr events turned into [`PendingEvent`]s.
//!
//! A GRASP relay holds [NIP-34](https://github.com/nostr-protocol/nips/blob/master/34.md) events
//! that point at git objects it does not have yet. This module reads such events as relays send
//! them (`{"id","pubkey","created_at","kind","tags","content","sig"}`) and says what the engine
//! should fetch for each:
//!
//! | kind | event | becomes |
//! |---|---|---|
//! | [30617](KIND_REPOSITORY_ANNOUNCEMENT) | repository announcement | an [`Announcement`]: the repository's clone URLs and maintainers |
//! | [30618](KIND_REPOSITORY_STATE) | repository state | its refs' object ids, one [`RefUpdate`] per `refs/` tag, plus `HEAD`; the complete set of branches and tags ([`replace_refs`](PendingEvent::replace_refs)) |
//! | [1618](KIND_PULL_REQUEST), [1619](KIND_PULL_REQUEST_UPDATE) | pull request, pull request update | its `c` tip, the ref `refs/nostr/<event-id>` |
//! | [1617](KIND_PATCH) with a `c` tag | a pull request sent with the patch kind | as a pull request |
//!
//! A patch (1617) without a `c` tag carries its change in its content and has nothing to fetch
//! ([`Nip34Error::NothingToFetch`]); every other kind is [`Nip34Error::UnsupportedKind`].
//!
//! **Clone URLs.** A state's repository is its author's (`pubkey` + `d` tag); a pull request's
//! is named by its `a` tag (`30617:<owner-pubkey>:<identifier>`). The clone URLs are those of the
//! announcements that [match](Announcement::matches) that repository: same identifier, and
//! written by the repository's owner or listing the owner among their `maintainers`, the owner's
//! own announcement first. So a maintainer's state gets the URLs of the announcement that names
//! them, and a stranger's state matches no one else's announcement. A pull request's own
//! `clone` tags come before the announcements' URLs. URLs are passed on as given (empty values
//! dropped, duplicates removed); the engine's URL policy checks them at
//! [`submit`](crate::Engine::submit).
//!
//! **Trust.** Signatures are *not* verified here: the relay verified each event before it
//! entered purgatory. The event id is not checked against the content either unless the
//! caller asks, with [`NostrEvent::verify_id`]; [`pending_event`] only checks the fields' shape.
//! Git ref names are checked with git's rules (so that an error can name the tag); the engine
//! checks them again at submit, together with limits (refs and object ids per event) and
//! clashes such as `refs/heads/a` next to `refs/heads/a/b`.
//!
//! ```
//! use purgatory_sync::nip34::{self, Announcement, NostrEvent};
//! use purgatory_sync::{Origin, RefUpdate};
//!
//! /// An event as a relay would hand it over, with its NIP-01 id.
//! fn event(pubkey: &str, kind: u32, tags: &[&[&str]]) -> NostrEvent {
//!     let mut ev = NostrEvent {
//!         id: String::new(),
//!         pubkey: pubkey.to_owned(),
//!         created_at: 1_700_000_000,
//!         kind,
//!         tags: tags
//!             .iter()
//!             .map(|t| t.iter().map(|s| s.to_string()).collect())
//!             .collect(),
//!         content: String::new(),
//!         sig: "0".repeat(128), // not verified here: the relay did
//!     };
//!     ev.id = ev.computed_id();
//!     ev
//! }
//!
//! let alice = "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";
//! let main = "e92758a50bbf13ea1fe986bbe254a709b0bf741c";
//! let announcement = event(alice, nip34::KIND_REPOSITORY_ANNOUNCEMENT, &[
//!     &["d", "hello"],
//!     &["clone", "https://git.example.com/alice/hello.git"],
//! ]);
//! let state = event(alice, nip34::KIND_REPOSITORY_STATE, &[
//!     &["d", "hello"],
//!     &["refs/heads/main", main],
//!     &["HEAD", "ref: refs/heads/main"],
//! ]);
//! // Events usually arrive as JSON.
//! let state = NostrEvent::from_json(&serde_json::to_string(&state)?)?;
//! state.verify_id()?;
//!
//! let announcements = [Announcement::from_event(&announcement)?];
//! let pending = nip34::pending_event(&state, &announcements, "/srv/git/hello.git", Origin::Sync)?;
//! assert_eq!(pending.id, state.id);
//! assert_eq!(pending.identifier, "hello");
//! assert_eq!(pending.oids, [main]);
//! assert_eq!(pending.clone_urls, ["https://git.example.com/alice/hello.git"]);
//! assert_eq!(
//!     pending.ref_updates,
//!     [
//!         RefUpdate::oid("refs/heads/main", main),
//!         RefUpdate::symbolic("HEAD", "refs/heads/main"),
//!     ]
//! );
//! // A state is the repository's complete set of branches and tags.
//! assert!(pending.replace_refs);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::validate::{is_bidi_control, BIDI_REASON};
use crate::{ObjectId, Origin, PendingEvent, RefUpdate, TEMP_REF_PREFIX};

/// Kind of a patch. Accepted by [`pending_event`] only with a `c` tag (then read as a pull
/// request); a plain patch carries its change in its content.
pub const KIND_PATCH: u32 = 1617;
/// Kind of a pull request: its `c` tag is the tip commit.
pub const KIND_PULL_REQUEST: u32 = 1618;
/// Kind of a pull request update: its `c` tag is the new tip commit.
pub const KIND_PULL_REQUEST_UPDATE: u32 = 1619;
/// Kind of a repository announcement: identifier, clone URLs, maintainers.
pub const KIND_REPOSITORY_ANNOUNCEMENT: u32 = 30617;
/// Kind of a repository state: its `refs/` tags map ref names to object ids.
pub const KIND_REPOSITORY_STATE: u32 = 30618;

/// Largest kind NIP-01 allows.
const MAX_KIND: u64 = 65_535;
/// Longest value quoted back in an error message, in characters.
const QUOTE_LIMIT: usize = 80;
/// Longest ref name git (and libgit2) accepts, in bytes.
const MAX_REF_NAME_BYTES: usize = 1024;
/// The suffix of a peeled entry in a state (`refs/tags/v1.0^{}`): the commit an annotated tag
/// points at, as `git ls-remote` lists it.
const PEELED_SUFFIX: &str = "^{}";
/// The expected form of an `a` tag, for error messages.
const ADDRESS_FORM: &str = "`30617:<pubkey>:<identifier>`";

/// A signed Nostr event, as relays send it.
///
/// Build one with [`from_json`](Self::from_json) or [`from_value`](Self::from_value), which
/// check the fields' shape. Deserializing it with serde directly does not check anything; call
/// [`check_shape`](Self::check_shape) then.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NostrEvent {
    /// The event id: SHA-256 of the NIP-01 serialization, 64 lower-case hex digits.
    pub id: String,
    /// The author's public key, 64 lower-case hex digits.
    pub pubkey: String,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// The event kind, 0 to 65535.
    pub kind: u32,
    /// The tags: each a list of strings, the first being the tag's name.
    pub tags: Vec<Vec<String>>,
    /// The content.
    pub content: String,
    /// The Schnorr signature, 128 hex digits. Not verified by this module.
    pub sig: String,
}

impl NostrEvent {
    /// Parses one event from JSON and checks its shape (id and pubkey 64 lower-case hex, sig
    /// 128 hex).
    ///
    /// Fields other than the seven of NIP-01 are ignored.
    pub fn from_json(json: &str) -> Result<NostrEvent, Nip34Error> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| Nip34Error::Json(e.to_string()))?;
        NostrEvent::from_value(value)
    }

    /// Like [`from_json`](Self::from_json), from an already-parsed [`serde_json::Value`].
    pub fn from_value(value: Value) -> Result<NostrEvent, Nip34Error> {
        let Value::Object(mut map) = value else {
            return Err(Nip34Error::Json(format!(
                "expected an event object, found {}",
                json_type(&value)
            )));
        };
        let mut take = |field: &'static str| {
            map.remove(field).ok_or(Nip34Error::Field {
                field,
                reason: "missing".to_owned(),
            })
        };
        let event = NostrEvent {
            id: string_field("id", take("id")?)?,
            pubkey: string_field("pubkey", take("pubkey")?)?,
            created_at: integer_field("created_at", take("created_at")?, u64::MAX)?,
            kind: integer_field("kind", take("kind")?, MAX_KIND)? as u32,
            tags: tags_field(take("tags")?)?,
            content: string_field("content", take("content")?)?,
            sig: string_field("sig", take("sig")?)?,
        };
        event.check_shape()?;
        Ok(event)
    }

    /// Checks the fields' shape: `id` and `pubkey` are 64 lower-case hex digits, `sig` is 128
    /// hex digits and `kind` is at most 65535. It does not verify the id or the signature.
    pub fn check_shape(&self) -> Result<(), Nip34Error> {
        let bad = |field: &'static str, reason: String| Err(Nip34Error::Field { field, reason });
        if !is_lower_hex(&self.id, 64) {
            return bad(
                "id",
                format!("{} is not 64 lower-case hex digits", quote(&self.id)),
            );
        }
        if !is_lower_hex(&self.pubkey, 64) {
            return bad(
                "pubkey",
                format!("{} is not 64 lower-case hex digits", quote(&self.pubkey)),
            );
        }
        if !is_hex(&self.sig, 128) {
            return bad("sig", format!("{} is not 128 hex digits", quote(&self.sig)));
        }
        if u64::from(self.kind) > MAX_KIND {
            return bad("kind", format!("{} is larger than {MAX_KIND}", self.kind));
        }
        Ok(())
    }

    /// The text whose SHA-256 is the event id (NIP-01): the UTF-8 JSON of
    /// `[0,<pubkey>,<created_at>,<kind>,<tags>,<content>]` without whitespace.
    ///
    /// Strings escape `"` `\` and the control characters line feed (`\n`), carriage return
    /// (`\r`), tab (`\t`), backspace (`\b`) and form feed (`\f`), as NIP-01 says; every other
    /// character is written as it is, except the remaining control characters below U+0020,
    /// which are written `\u00xx` as `JSON.stringify` and every common client library do (JSON
    /// cannot hold them raw).
    pub fn serialized_for_id(&self) -> String {
        serde_json::to_string(&(
            0u8,
            &self.pubkey,
            self.created_at,
            self.kind,
            &self.tags,
            &self.content,
        ))
        .expect("strings and integers always serialize")
    }

    /// The id computed per NIP-01: SHA-256 of [`serialized_for_id`](Self::serialized_for_id),
    /// as lower-case hex.
    pub fn computed_id(&self) -> String {
        let digest = Sha256::digest(self.serialized_for_id().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Checks that `id` is the [computed id](Self::computed_id); errors with
    /// [`Nip34Error::IdMismatch`] otherwise.
    pub fn verify_id(&self) -> Result<(), Nip34Error> {
        let expected = self.computed_id();
        if self.id == expected {
            Ok(())
        } else {
            Err(Nip34Error::IdMismatch {
                expected,
                found: self.id.clone(),
            })
        }
    }

    /// The tags named `name`, with their index in [`tags`](Self::tags).
    fn tags_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (usize, &'a [String])> {
        self.tags
            .iter()
            .enumerate()
            .filter(move |(_, tag)| tag.first().is_some_and(|n| n == name))
            .map(|(index, tag)| (index, tag.as_slice()))
    }

    /// The non-empty values of every tag named `name`, in order (`["clone", "a", "b"]` gives
    /// `a` and `b`).
    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (usize, &'a str)> {
        self.tags_named(name).flat_map(|(index, tag)| {
            tag[1..]
                .iter()
                .filter(|v| !v.is_empty())
                .map(move |v| (index, v.as_str()))
        })
    }

    /// The repository identifier: the value of the first `d` tag.
    fn identifier(&self) -> Result<String, Nip34Error> {
        let (index, tag) = self
            .tags_named("d")
            .next()
            .ok_or(Nip34Error::MissingTag { tag: "d" })?;
        match tag.get(1) {
            Some(d) if !d.is_empty() => Ok(d.clone()),
            _ => Err(bad_tag(index, "d", "the repository identifier is empty")),
        }
    }
}

/// The repository an event belongs to: its owner's public key and its identifier (the owner's
/// announcement's `d` tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoRef {
    /// The owner's public key, 64 lower-case hex digits.
    pub owner: String,
    /// The repository identifier.
    pub identifier: String,
}

impl RepoRef {
    /// The repository `identifier` of `owner`.
    pub fn new(owner: impl Into<String>, identifier: impl Into<String>) -> Self {
        RepoRef {
            owner: owner.into(),
            identifier: identifier.into(),
        }
    }

    /// Parses a NIP-33 address of a repository announcement, `30617:<pubkey>:<identifier>`
    /// (the value of an `a` tag). The pubkey may be in either case; it is lower-cased.
    pub fn from_address(address: &str) -> Option<RepoRef> {
        let mut parts = address.splitn(3, ':');
        let (kind, owner, identifier) = (parts.next()?, parts.next()?, parts.next()?);
        (kind == KIND_REPOSITORY_ANNOUNCEMENT.to_string()
            && is_hex(owner, 64)
            && !identifier.is_empty())
        .then(|| RepoRef::new(owner.to_ascii_lowercase(), identifier))
    }
}

impl fmt::Display for RepoRef {
    /// The announcement's address, `30617:<owner>:<identifier>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{KIND_REPOSITORY_ANNOUNCEMENT}:{}:{}",
            self.owner, self.identifier
        )
    }
}

/// A repository announcement (kind 30617): where a repository can be cloned from and who else
/// may publish its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The announcement event's id.
    pub event_id: String,
    /// Its author's public key.
    pub owner: String,
    /// The repository identifier (`d` tag).
    pub identifier: String,
    /// The clone URLs of every `clone` tag, in order, without duplicates or empty values.
    pub clone_urls: Vec<String>,
    /// The public keys of every `maintainers` tag, lower-cased, in order, without duplicates.
    pub maintainers: Vec<String>,
}

impl Announcement {
    /// Reads a repository announcement. `d` is required; a `clone` tag may list several URLs
    /// and there may be several `clone` and `maintainers` tags; other tags are ignored.
    ///
    /// Errors when the event is not of kind 30617, its shape is wrong, or a maintainer is not
    /// a 64-hex public key.
    pub fn from_event(event: &NostrEvent) -> Result<Announcement, Nip34Error> {
        event.check_shape()?;
        if event.kind != KIND_REPOSITORY_ANNOUNCEMENT {
            return Err(Nip34Error::Field {
                field: "kind",
                reason: format!(
                    "expected {KIND_REPOSITORY_ANNOUNCEMENT} (a repository announcement), found {}",
                    event.kind
                ),
            });
        }
        let identifier = event.identifier()?;
        let mut clone_urls = Vec::new();
        push_unique(
            &mut clone_urls,
            event.values_of("clone").map(|(_, url)| url),
        );
        let mut maintainers = Vec::new();
        for (index, key) in event.values_of("maintainers") {
            if !is_hex(key, 64) {
                return Err(bad_tag(
                    index,
                    "maintainers",
                    format!("{} is not a 64-hex public key", quote(key)),
                ));
            }
            push_unique(&mut maintainers, [key.to_ascii_lowercase().as_str()]);
        }
        Ok(Announcement {
            event_id: event.id.clone(),
            owner: event.pubkey.clone(),
            identifier,
            clone_urls,
            maintainers,
        })
    }

    /// The repository this announcement is its author's copy of.
    pub fn repo(&self) -> RepoRef {
        RepoRef::new(&self.owner, &self.identifier)
    }

    /// Whether this announcement describes `repo`: same identifier, and written by
    /// `repo.owner` or listing `repo.owner` among its maintainers.
    pub fn matches(&self, repo: &RepoRef) -> bool {
        self.identifier == repo.identifier
            && (self.owner == repo.owner || self.maintainers.contains(&repo.owner))
    }
}

/// The clone URLs of the announcements that [match](Announcement::matches) `repo`: those of
/// `repo.owner`'s own announcements first, then the others in the order given, without
/// duplicates.
pub fn clone_urls_for(repo: &RepoRef, announcements: &[Announcement]) -> Vec<String> {
    let matching = announcements.iter().filter(|a| a.matches(repo));
    let (own, others): (Vec<_>, Vec<_>) = matching.partition(|a| a.owner == repo.owner);
    let mut urls = Vec::new();
    for a in own.into_iter().chain(others) {
        push_unique(&mut urls, a.clone_urls.iter().map(String::as_str));
    }
    urls
}

/// The repository a state (its author + `d`), pull request, pull request update or patch (its
/// `a` tag) belongs to; an announcement's is its author + `d` too.
///
/// Of several `a` tags the first well-formed one (`30617:<pubkey>:<identifier>`) counts.
pub fn repository_of(event: &NostrEvent) -> Result<RepoRef, Nip34Error> {
    event.check_shape()?;
    match event.kind {
        KIND_REPOSITORY_STATE | KIND_REPOSITORY_ANNOUNCEMENT => {
            Ok(RepoRef::new(&event.pubkey, event.identifier()?))
        }
        KIND_PATCH | KIND_PULL_REQUEST | KIND_PULL_REQUEST_UPDATE => address_of(event),
        kind => Err(Nip34Error::UnsupportedKind { kind }),
    }
}

/// Turns a repository state, pull request or pull request update into a [`PendingEvent`] for
/// the local bare repository `repo`.
///
/// - **State (30618)**: `identifier` is the `d` tag; `oids` are the distinct object ids of the
///   `refs/` tags in tag order (the first value of each tag: NIP-34 allows ancestry after it),
///   lower-cased; `ref_updates` has one oid update per `refs/` tag, then `HEAD` when a `HEAD`
///   tag says `ref: refs/heads/<branch>`. A peeled entry (`refs/tags/v1.0^{}`, the commit an
///   annotated tag points at) adds its object id but no ref, and needs its ref (`refs/tags/v1.0`)
///   in the same state: alone it is [`Nip34Error::BadTag`]. A state lists *every* branch and
///   tag, so [`replace_refs`](PendingEvent::replace_refs) is set: once released, the
///   repository serves exactly the state's branches and tags. A state without `refs/` tags
///   means its author stopped tracking state: [`Nip34Error::NothingToFetch`].
/// - Every kind: [`created_at`](PendingEvent::created_at) is the event's, so that of two
///   states of a repository the newer wins whichever one's data arrives last.
/// - **Pull request (1618), update (1619), patch with a `c` tag (1617)**: `identifier` comes
///   from the `a` tag; `oids` is the `c` tip, lower-cased; `ref_updates` sets
///   `refs/nostr/<event-id>` to it. A patch without a `c` tag is
///   [`Nip34Error::NothingToFetch`].
///
/// Clone URLs are described in the [module documentation](self); none at all is
/// [`Nip34Error::NoCloneUrls`]. Pass the latest announcement of each author: every one given
/// that matches adds its URLs.
///
/// The event's shape is checked ([`NostrEvent::check_shape`]), but not its id or signature:
/// call [`NostrEvent::verify_id`] for the id.
pub fn pending_event(
    event: &NostrEvent,
    announcements: &[Announcement],
    repo: impl Into<PathBuf>,
    origin: Origin,
) -> Result<PendingEvent, Nip34Error> {
    event.check_shape()?;
    let (repository, oids, ref_updates, own_urls) = match event.kind {
        KIND_REPOSITORY_STATE => {
            let identifier = event.identifier()?;
            let (oids, ref_updates) = state_refs(event)?;
            let repository = RepoRef::new(&event.pubkey, identifier);
            (repository, oids, ref_updates, Vec::new())
        }
        KIND_PATCH | KIND_PULL_REQUEST | KIND_PULL_REQUEST_UPDATE => {
            let tip = match (tip_of(event)?, event.kind) {
                (Some(tip), _) => tip,
                (None, KIND_PATCH) => {
                    return Err(Nip34Error::NothingToFetch {
                        reason: "a patch (kind 1617) carries its change in its content; only \
                                 one with a `c` tag names a commit to fetch"
                            .to_owned(),
                    })
                }
                (None, _) => return Err(Nip34Error::MissingTag { tag: "c" }),
            };
            let repository = address_of(event)?;
            let name = format!("refs/nostr/{}", event.id);
            let mut own = Vec::new();
            push_unique(&mut own, event.values_of("clone").map(|(_, url)| url));
            (
                repository,
                vec![tip.clone()],
                vec![RefUpdate::oid(name, tip)],
                own,
            )
        }
        kind => return Err(Nip34Error::UnsupportedKind { kind }),
    };
    let mut clone_urls = own_urls;
    let announced = clone_urls_for(&repository, announcements);
    push_unique(&mut clone_urls, announced.iter().map(String::as_str));
    if clone_urls.is_empty() {
        return Err(Nip34Error::NoCloneUrls);
    }
    Ok(PendingEvent {
        id: event.id.clone(),
        identifier: repository.identifier,
        repo: repo.into(),
        oids,
        clone_urls,
        origin,
        ref_updates,
        // A state lists every branch and tag of the repository: the others go.
        replace_refs: event.kind == KIND_REPOSITORY_STATE,
        // Orders the states of a repository: the newest one wins.
        created_at: Some(event.created_at),
    })
}

/// The object ids and ref updates of a state's `refs/` and `HEAD` tags.
fn state_refs(event: &NostrEvent) -> Result<(Vec<String>, Vec<RefUpdate>), Nip34Error> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut distinct: HashSet<String> = HashSet::new();
    let mut oids = Vec::new();
    let mut updates = Vec::new();
    let mut head = None;
    let mut peeled_entries = Vec::new();
    for (index, tag) in event.tags.iter().enumerate() {
        let Some(name) = tag.first().map(String::as_str) else {
            continue;
        };
        if name != "HEAD" && !name.starts_with("refs/") {
            continue;
        }
        if let Some(first) = first_seen.insert(name, index) {
            return Err(bad_tag(
                index,
                name,
                format!("given twice (first at tag {first})"),
            ));
        }
        let value = tag.get(1).map(String::as_str).unwrap_or_default();
        if name == "HEAD" {
            head = Some(head_target(index, value)?);
            continue;
        }
        let (base, peeled) = match name.strip_suffix(PEELED_SUFFIX) {
            Some(base) => (base, true),
            None => (name, false),
        };
        if let Some(problem) = ref_name_problem(base) {
            return Err(bad_tag(
                index,
                name,
                format!("not a usable git ref name: {problem}"),
            ));
        }
        let oid = object_id(index, name, value, "object id")?;
        if distinct.insert(oid.clone()) {
            oids.push(oid.clone());
        }
        if peeled {
            peeled_entries.push((index, name, base));
        } else {
            updates.push(RefUpdate::oid(name, oid));
        }
    }
    // A peeled entry says what its ref's tag points at: without the ref it says nothing, and a
    // state made of peeled entries alone would list no branch or tag at all.
    if let Some((index, name, base)) = peeled_entries
        .into_iter()
        .find(|(_, _, base)| !first_seen.contains_key(base))
    {
        return Err(bad_tag(
            index,
            name,
            format!("a peeled entry without its ref `{base}` in the state"),
        ));
    }
    if oids.is_empty() {
        return Err(Nip34Error::NothingToFetch {
            reason: "the repository state has no `refs/` tags: its author no longer tracks \
                     state with it"
                .to_owned(),
        });
    }
    if let Some(target) = head {
        updates.push(RefUpdate::symbolic("HEAD", target));
    }
    Ok((oids, updates))
}

/// The branch ref a `HEAD` tag's value `ref: refs/heads/<branch>` names.
fn head_target(index: usize, value: &str) -> Result<String, Nip34Error> {
    value
        .strip_prefix("ref:")
        .map(str::trim)
        .filter(|target| {
            target.len() > "refs/heads/".len()
                && target.starts_with("refs/heads/")
                && ref_name_problem(target).is_none()
        })
        .map(str::to_owned)
        .ok_or_else(|| {
            bad_tag(
                index,
                "HEAD",
                format!(
                    "expected `ref: refs/heads/<branch>`, found {}",
                    quote(value)
                ),
            )
        })
}

/// The tip commit of a pull request: its `c` tag, if it has one.
fn tip_of(event: &NostrEvent) -> Result<Option<String>, Nip34Error> {
    let mut tags = event.tags_named("c");
    let Some((index, tag)) = tags.next() else {
        return Ok(None);
    };
    if let Some((second, _)) = tags.next() {
        return Err(bad_tag(
            second,
            "c",
            format!("a second `c` tag (first at tag {index}): a pull request has one tip"),
        ));
    }
    let value = tag.get(1).map(String::as_str).unwrap_or_default();
    object_id(index, "c", value, "commit id").map(Some)
}

/// The repository named by an event's first well-formed `a` tag.
fn address_of(event: &NostrEvent) -> Result<RepoRef, Nip34Error> {
    let mut first_bad = None;
    for (index, tag) in event.tags_named("a") {
        let value = tag.get(1).map(String::as_str).unwrap_or_default();
        match RepoRef::from_address(value) {
            Some(repo) => return Ok(repo),
            None => {
                first_bad.get_or_insert((index, value));
            }
        }
    }
    Err(match first_bad {
        Some((index, value)) => bad_tag(
            index,
            "a",
            format!("expected {ADDRESS_FORM}, found {}", quote(value)),
        ),
        None => Nip34Error::MissingTag { tag: "a" },
    })
}

/// `value` as a lower-case object id, or an error naming the tag.
fn object_id(index: usize, tag: &str, value: &str, what: &str) -> Result<String, Nip34Error> {
    if value.is_empty() {
        return Err(bad_tag(index, tag, format!("has no {what}")));
    }
    value
        .parse::<ObjectId>()
        .map(|oid| oid.to_string())
        .map_err(|_| {
            bad_tag(
                index,
                tag,
                format!("{} is not a 40-hex {what}", quote(value)),
            )
        })
}

/// What makes `name` (under `refs/`) unusable as a git ref name, following
/// `git check-ref-format`, or the engine's own namespace; `None` when it is fine. Control
/// characters are refused beyond ASCII too (U+0080 to U+009F), and so are Unicode
/// bidirectional formatting characters, which git accepts: submit refuses both, since the
/// engine prints ref names.
fn ref_name_problem(name: &str) -> Option<&'static str> {
    let ours = TEMP_REF_PREFIX.trim_end_matches('/');
    let lower = name.to_ascii_lowercase();
    if name.len() > MAX_REF_NAME_BYTES {
        Some("longer than 1024 bytes")
    } else if name
        .chars()
        .any(|c| c.is_control() || " ~^:?*[\\".contains(c))
    {
        Some("contains a space, a control character or one of ~ ^ : ? * [ \\")
    } else if name.chars().any(is_bidi_control) {
        Some(BIDI_REASON)
    } else if name.contains("..") {
        Some("contains `..`")
    } else if name.contains("@{") {
        Some("contains `@{`")
    } else if name.ends_with('.') {
        Some("ends with `.`")
    } else if name.split('/').any(str::is_empty) {
        Some("has an empty path component")
    } else if name.split('/').any(|c| c.starts_with('.')) {
        Some("has a path component starting with `.`")
    } else if name.split('/').any(|c| c.ends_with(".lock")) {
        Some("has a path component ending with `.lock`")
    } else if lower == ours || lower.starts_with(TEMP_REF_PREFIX) {
        Some("under refs/purgatory-sync/, the engine's own namespace")
    } else {
        None
    }
}

fn bad_tag(index: usize, tag: &str, reason: impl Into<String>) -> Nip34Error {
    Nip34Error::BadTag {
        index,
        tag: tag.to_owned(),
        reason: reason.into(),
    }
}

/// Appends the values not in `list` yet, in order.
fn push_unique<'a>(list: &mut Vec<String>, values: impl IntoIterator<Item = &'a str>) {
    for value in values {
        if !list.iter().any(|have| have == value) {
            list.push(value.to_owned());
        }
    }
}

fn is_hex(value: &str, len: usize) -> bool {
    value.len() == len && value.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_lower_hex(value: &str, len: usize) -> bool {
    is_hex(value, len) && !value.bytes().any(|b| b.is_ascii_uppercase())
}

/// `value` in backticks for an error message, cut after [`QUOTE_LIMIT`] characters. Control
/// and bidirectional formatting characters are written as `\u{..}` escapes: a tag value is
/// anyone's text, and printed as it is one could reorder or hide the rest of the message.
fn quote(value: &str) -> String {
    let (shown, cut) = match value.char_indices().nth(QUOTE_LIMIT) {
        None => (value, false),
        Some((end, _)) => (&value[..end], true),
    };
    let mut out = String::with_capacity(shown.len() + 16);
    out.push('`');
    for c in shown.chars() {
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    if cut {
        out.push_str(&format!("…` ({} bytes)", value.len()));
    } else {
        out.push('`');
    }
    out
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(field: &'static str, value: Value) -> Result<String, Nip34Error> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(Nip34Error::Field {
            field,
            reason: format!("expected a string, found {}", json_type(&other)),
        }),
    }
}

fn integer_field(field: &'static str, value: Value, max: u64) -> Result<u64, Nip34Error> {
    match value.as_u64() {
        Some(n) if n <= max => Ok(n),
        _ => Err(Nip34Error::Field {
            field,
            reason: format!("expected an integer from 0 to {max}, found {value}"),
        }),
    }
}

fn tags_field(value: Value) -> Result<Vec<Vec<String>>, Nip34Error> {
    let bad = |reason: String| Nip34Error::Field {
        field: "tags",
        reason,
    };
    let Value::Array(tags) = value else {
        return Err(bad(format!(
            "expected an array of tags, found {}",
            json_type(&value)
        )));
    };
    let mut out = Vec::with_capacity(tags.len());
    for (index, tag) in tags.into_iter().enumerate() {
        let Value::Array(items) = tag else {
            return Err(bad(format!(
                "tag {index} is {}, not an array of strings",
                json_type(&tag)
            )));
        };
        let mut strings = Vec::with_capacity(items.len());
        for (position, item) in items.into_iter().enumerate() {
            match item {
                Value::String(s) => strings.push(s),
                other => {
                    return Err(bad(format!(
                        "tag {index}, item {position} is {}, not a string",
                        json_type(&other)
                    )))
                }
            }
        }
        out.push(strings);
    }
    Ok(out)
}

/// Why an event could not be read or turned into a [`PendingEvent`]. The message names the
/// field or tag (with its index in `tags`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Nip34Error {
    /// The text is not JSON, or not a JSON object.
    Json(String),
    /// An event-level field (`id`, `pubkey`, `created_at`, `kind`, `tags`, `content`, `sig`)
    /// is missing or malformed, or `kind` is not the one expected.
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A required tag is absent (`d`, `a` or `c`).
    MissingTag {
        /// The tag's name.
        tag: &'static str,
    },
    /// A tag is malformed.
    BadTag {
        /// Its position in [`NostrEvent::tags`].
        index: usize,
        /// Its name.
        tag: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The event's kind is not one [`pending_event`] turns into a pending event.
    UnsupportedKind {
        /// The kind.
        kind: u32,
    },
    /// The event is well-formed but names no git object: a state without `refs/` tags, or a
    /// patch without a `c` tag. The caller decides what to do with it.
    NothingToFetch {
        /// Why.
        reason: String,
    },
    /// The event's `id` is not the NIP-01 id of its content.
    IdMismatch {
        /// The id computed from the content.
        expected: String,
        /// The id the event carries.
        found: String,
    },
    /// No clone URL at all: no announcement matched the repository and the event has no
    /// `clone` tag of its own.
    NoCloneUrls,
}

impl fmt::Display for Nip34Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nip34Error::Json(message) => write!(f, "not a Nostr event in JSON: {message}"),
            Nip34Error::Field { field, reason } => write!(f, "field `{field}`: {reason}"),
            Nip34Error::MissingTag { tag } => write!(f, "missing `{tag}` tag"),
            Nip34Error::BadTag { index, tag, reason } => {
                let name = quote(tag);
                write!(f, "tag {index} ({name}): {reason}")
            }
            Nip34Error::UnsupportedKind {
                kind: KIND_REPOSITORY_ANNOUNCEMENT,
            } => write!(
                f,
                "kind {KIND_REPOSITORY_ANNOUNCEMENT} is a repository announcement: it names no \
                 git object to fetch (read it with Announcement::from_event)"
            ),
            Nip34Error::UnsupportedKind { kind } => write!(
                f,
                "kind {kind} is not supported: expected a repository state \
                 ({KIND_REPOSITORY_STATE}), a pull request ({KIND_PULL_REQUEST}), a pull \
                 request update ({KIND_PULL_REQUEST_UPDATE}) or a patch ({KIND_PATCH}) with a \
                 `c` tag"
            ),
            Nip34Error::NothingToFetch { reason } => write!(f, "nothing to fetch: {reason}"),
            Nip34Error::IdMismatch { expected, found } => write!(
                f,
                "event id {found} does not match the event: its NIP-01 id is {expected}"
            ),
            Nip34Error::NoCloneUrls => f.write_str(
                "no clone URLs: no repository announcement matched and the event has no \
                 `clone` tag",
            ),
        }
    }
}

impl std::error::Error for Nip34Error {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ref-name rules agree with libgit2's on names under `refs/` (the engine checks with
    /// libgit2 at submit), but for the characters both refuse beyond git's rules (C1 controls,
    /// bidirectional formatting characters).
    #[test]
    fn ref_name_rules_agree_with_libgit2() {
        let names = [
            "refs/heads/main",
            "refs/heads/feature/x-1",
            "refs/tags/v1.0",
            "refs/heads/ünïcode",
            "refs/heads/@",
            "refs/heads/a@b",
            "refs/heads",
            "refs/heads/a b",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[b",
            "refs/heads/a\\b",
            "refs/heads/a\u{7f}b",
            "refs/heads/a\tb",
            "refs/heads/a..b",
            "refs/heads/a@{1}",
            "refs/heads/a.",
            "refs/heads/",
            "refs//heads/a",
            "refs/heads/.hidden",
            "refs/heads/x.lock",
            "refs/heads/x.lock/y",
            "refs/heads/a.b",
        ];
        for name in names {
            assert_eq!(
                ref_name_problem(name).is_none(),
                git2::Reference::is_valid_name(name),
                "{name:?}: {:?}",
                ref_name_problem(name)
            );
        }
        assert!(ref_name_problem(&format!("refs/heads/{}", "x".repeat(1100))).is_some());
        for ours in [
            "refs/purgatory-sync",
            "refs/purgatory-sync/x",
            "refs/Purgatory-Sync/x",
        ] {
            assert!(ref_name_problem(ours).is_some(), "{ours}");
        }
    }

    /// Names git accepts but the engine refuses, as submit does: a bidirectional formatting
    /// character would make the printed name read differently from what it is.
    #[test]
    fn ref_names_with_bidirectional_formatting_characters_are_refused() {
        for c in ['\u{061c}', '\u{200e}', '\u{202e}', '\u{2066}', '\u{2069}'] {
            let name = format!("refs/heads/a{c}b");
            assert!(git2::Reference::is_valid_name(&name), "{c:?}");
            assert_eq!(
                ref_name_problem(&name),
                Some("contains Unicode bidirectional formatting characters"),
                "{c:?}"
            );
        }
    }

    /// Values quoted back in an error are printed: control and bidirectional formatting
    /// characters in them are escaped, not written as they are.
    #[test]
    fn quote_escapes_control_and_bidirectional_formatting_characters() {
        assert_eq!(quote("a\u{202e}b\nc"), "`a\\u{202e}b\\u{a}c`");
        assert_eq!(quote("ünïcode"), "`ünïcode`");
    }

    #[test]
    fn quote_cuts_long_values_on_a_character_boundary() {
        assert_eq!(quote("abc"), "`abc`");
        let long = "é".repeat(100);
        let q = quote(&long);
        assert!(
            q.starts_with(&format!("`{}…`", "é".repeat(QUOTE_LIMIT))),
            "{q}"
        );
        assert!(q.ends_with("(200 bytes)"), "{q}");
    }

    #[test]
    fn head_targets() {
        assert_eq!(
            head_target(0, "ref: refs/heads/main").unwrap(),
            "refs/heads/main"
        );
        assert_eq!(
            head_target(0, "ref:refs/heads/dev").unwrap(),
            "refs/heads/dev"
        );
        for bad in [
            "",
            "refs/heads/main",
            "ref: refs/tags/v1",
            "ref: refs/heads/",
            "ref: refs/heads/a..b",
            "e92758a50bbf13ea1fe986bbe254a709b0bf741c",
        ] {
            assert!(head_target(0, bad).is_err(), "{bad:?}");
        }
    }
}
