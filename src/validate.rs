//! Checks on everything a host submits. Each failure names the field and the value.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::SubmitError;
use crate::event::RefusedUrl;
use crate::policy::CloneUrl;
use crate::{ObjectId, PendingEvent, RefTarget, RefUpdate, TEMP_REF_PREFIX};

/// Longest event id or identifier accepted, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 256;
/// Longest clone URL accepted, in bytes.
pub(crate) const MAX_URL_BYTES: usize = 2048;
/// Longest ref name (or symbolic target) accepted, in bytes: libgit2's own limit.
pub(crate) const MAX_REF_NAME_BYTES: usize = 1024;

#[derive(Debug)]
pub(crate) struct Checked {
    pub oids: Vec<ObjectId>,
    /// The URLs the policy accepted, in the order given, each fetch URL once.
    pub urls: Vec<CloneUrl>,
    /// The URLs the policy refused, in the order given: returned to the host, never fetched.
    pub refused: Vec<RefusedUrl>,
    /// The ref updates in the order given, oid targets in lower case.
    pub refs: Vec<RefUpdate>,
}

/// Why a value holding a [bidirectional formatting character](is_bidi_control) is refused.
pub(crate) const BIDI_REASON: &str = "contains Unicode bidirectional formatting characters";

/// Whether `c` is a Unicode bidirectional formatting character: the Arabic letter mark, the
/// left-to-right and right-to-left marks, embeddings, overrides and isolates. Printed in a
/// log line, a terminal or an error message, one makes the text after it read in another
/// order than it is written ("Trojan Source", CVE-2021-42574), so that an id could pass for
/// another; every value the engine prints refuses them, as it refuses control characters.
pub(crate) fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

fn name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        Err("empty")
    } else if value.len() > MAX_NAME_BYTES {
        Err("longer than 256 bytes")
    } else if value.chars().any(char::is_control) {
        Err("contains control characters")
    } else if value.chars().any(is_bidi_control) {
        Err(BIDI_REASON)
    } else {
        Ok(())
    }
}

/// Checks the event's fields that need no I/O. A clone URL that is malformed as a string
/// (empty, over-long, with whitespace) is an error; one the URL policy refuses is listed in
/// [`Checked::refused`] and left out, and the event is still valid.
pub(crate) fn event(ev: &PendingEvent, cfg: &Config) -> Result<Checked, SubmitError> {
    name(&ev.id).map_err(|reason| SubmitError::InvalidEventId {
        value: ev.id.clone(),
        reason,
    })?;
    name(&ev.identifier).map_err(|reason| SubmitError::InvalidIdentifier {
        value: ev.identifier.clone(),
        reason,
    })?;
    if ev.oids.is_empty() {
        return Err(SubmitError::NoObjectIds);
    }
    if ev.oids.len() > cfg.max_oids_per_event {
        return Err(SubmitError::TooManyObjectIds {
            count: ev.oids.len(),
            max: cfg.max_oids_per_event,
        });
    }
    let mut oids = Vec::with_capacity(ev.oids.len());
    for (index, value) in ev.oids.iter().enumerate() {
        let oid = value
            .parse::<ObjectId>()
            .map_err(|_| SubmitError::InvalidObjectId {
                index,
                value: value.clone(),
            })?;
        oids.push(oid);
    }
    oids.sort_unstable();
    oids.dedup();
    if ev.clone_urls.len() > cfg.max_urls_per_event {
        return Err(SubmitError::TooManyCloneUrls {
            count: ev.clone_urls.len(),
            max: cfg.max_urls_per_event,
        });
    }
    let policy = &cfg.url_policy;
    let mut urls: Vec<CloneUrl> = Vec::with_capacity(ev.clone_urls.len());
    let mut seen = std::collections::HashSet::with_capacity(ev.clone_urls.len());
    let mut refused = Vec::new();
    for (index, value) in ev.clone_urls.iter().enumerate() {
        let bad = |reason| SubmitError::InvalidCloneUrl {
            index,
            value: value.clone(),
            reason,
        };
        if value.is_empty() {
            return Err(bad("empty"));
        }
        if value.len() > MAX_URL_BYTES {
            return Err(bad("longer than 2048 bytes"));
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        if value.chars().any(is_bidi_control) {
            return Err(bad(BIDI_REASON));
        }
        match policy.check(value) {
            Ok(url) => {
                // URLs fetched the same are one URL (case, default port, trailing dot).
                if seen.insert(url.fetch_url.clone()) {
                    urls.push(url);
                }
            }
            Err(reason) => refused.push(RefusedUrl::new(index, value.as_str(), reason)),
        }
    }
    let refs = ref_updates(ev, &oids, cfg)?;
    Ok(Checked {
        oids,
        urls,
        refused,
        refs,
    })
}

/// Checks the event's ref updates against its (sorted) object ids.
fn ref_updates(
    ev: &PendingEvent,
    oids: &[ObjectId],
    cfg: &Config,
) -> Result<Vec<RefUpdate>, SubmitError> {
    let updates = &ev.ref_updates;
    if ev.replace_refs && updates.is_empty() {
        return Err(SubmitError::ReplaceRefsWithoutRefUpdates);
    }
    if updates.len() > cfg.max_ref_updates_per_event {
        return Err(SubmitError::TooManyRefUpdates {
            count: updates.len(),
            max: cfg.max_ref_updates_per_event,
        });
    }
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::with_capacity(updates.len());
    for (index, u) in updates.iter().enumerate() {
        let bad = |reason| SubmitError::InvalidRefUpdate {
            index,
            name: u.name.clone(),
            reason,
        };
        if u.name != "HEAD" {
            ref_name(&u.name).map_err(bad)?;
        }
        if seen.contains(u.name.as_str()) {
            return Err(bad("given twice"));
        }
        if clashes(&seen, &u.name) {
            return Err(bad(
                "clashes with another ref update: one name is a directory of the other",
            ));
        }
        seen.insert(&u.name);
        let target = match &u.target {
            RefTarget::Oid(hex) => {
                let oid = hex
                    .parse::<ObjectId>()
                    .map_err(|_| bad("target is not a full object id of 40 hex digits"))?;
                if oids.binary_search(&oid).is_err() {
                    return Err(bad("target is not among the event's oids"));
                }
                RefTarget::Oid(oid.to_string())
            }
            RefTarget::Symbolic(target) => {
                if u.name != "HEAD" {
                    return Err(bad("a symbolic target is only allowed for HEAD"));
                }
                ref_name(target)
                    .map_err(|_| bad("symbolic target is not a valid refs/... name"))?;
                RefTarget::Symbolic(target.clone())
            }
            RefTarget::Delete => {
                // A repository without HEAD is not one git can serve.
                if u.name == "HEAD" {
                    return Err(bad("HEAD cannot be deleted"));
                }
                RefTarget::Delete
            }
        };
        out.push(RefUpdate {
            name: u.name.clone(),
            target,
        });
    }
    Ok(out)
}

/// Checks a full ref name under `refs/`, outside the engine's own namespace.
fn ref_name(name: &str) -> Result<(), &'static str> {
    let ours = TEMP_REF_PREFIX.trim_end_matches('/');
    // Compared without case: on a case-insensitive file system `refs/Purgatory-Sync/x` is a
    // file in our namespace's directory.
    let lower = name.to_ascii_lowercase();
    if name.is_empty() {
        Err("empty")
    } else if name.len() > MAX_REF_NAME_BYTES {
        Err("longer than 1024 bytes")
    } else if name.chars().any(char::is_control) {
        Err("contains control characters")
    } else if name.chars().any(is_bidi_control) {
        // git accepts them; the engine prints ref names in errors and logs.
        Err(BIDI_REASON)
    } else if !name.starts_with("refs/") {
        Err("not HEAD or a full ref name under refs/")
    } else if !git2::Reference::is_valid_name(name) {
        Err("not a valid git ref name")
    } else if lower == ours || lower.starts_with(TEMP_REF_PREFIX) {
        Err("under refs/purgatory-sync/, the engine's own namespace")
    } else {
        Ok(())
    }
}

/// Whether `name` is a directory of a name in `seen`, or one of them is a directory of
/// `name`: git cannot hold both (`refs/heads/a` and `refs/heads/a/b`).
fn clashes(seen: &BTreeSet<&str>, name: &str) -> bool {
    let below = format!("{name}/");
    if seen
        .range(below.as_str()..)
        .next()
        .is_some_and(|s| s.starts_with(&below))
    {
        return true;
    }
    name.match_indices('/')
        .any(|(i, _)| seen.contains(&name[..i]))
}

/// Checks that `path` is an existing bare git repository and returns its canonical path, so
/// that two spellings of one repository share a queue entry.
pub(crate) fn repository(path: &Path) -> Result<PathBuf, SubmitError> {
    let canonical = existing_path(path)?;
    crate::fetch::open_bare(&canonical).map_err(|reason| SubmitError::InvalidRepository {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(canonical)
}

/// The canonical form of `path`, which must exist; whether it is a bare repository is left to
/// the caller (the built-in fetcher's presence check opens it as one anyway).
pub(crate) fn existing_path(path: &Path) -> Result<PathBuf, SubmitError> {
    let bad = |reason: String| SubmitError::InvalidRepository {
        path: path.to_path_buf(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("empty path".to_owned()));
    }
    std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names() {
        assert_eq!(ref_name("refs/heads/main"), Ok(()));
        assert_eq!(ref_name("refs/nostr/0123abcd"), Ok(()));
        for bad in [
            "",
            "main",
            "heads/main",
            "refs/heads/a..b",
            "refs/heads/x.lock",
            "refs/heads/a b",
            "refs/heads/a\0b",
            "refs/heads/a\nb",
            "refs/heads/",
            "refs/purgatory-sync/x",
            "refs/purgatory-sync",
            "refs/Purgatory-Sync/x",
        ] {
            assert!(ref_name(bad).is_err(), "{bad:?}");
        }
        assert!(ref_name(&format!("refs/heads/{}", "x".repeat(1100))).is_err());
    }

    /// Every Unicode bidirectional formatting character: printed, each can make the text
    /// around it read differently from what it is.
    const BIDI: [char; 12] = [
        '\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}',
        '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
    ];

    #[test]
    fn ids_urls_and_ref_names_refuse_bidirectional_formatting_characters() {
        let cfg = Config::default();
        let why = Err("contains Unicode bidirectional formatting characters");
        for c in BIDI {
            assert_eq!(name(&format!("event-{c}1")), why, "{c:?}");
            assert_eq!(name(&format!("{c}")), why, "{c:?}");
            assert_eq!(ref_name(&format!("refs/heads/a{c}b")), why, "{c:?}");
            let ev = PendingEvent::new("e", "alice/project", "/srv/r.git")
                .oid("e92758a50bbf13ea1fe986bbe254a709b0bf741c")
                .clone_url(format!("https://git.example.com/{c}x.git"));
            match event(&ev, &cfg) {
                Err(SubmitError::InvalidCloneUrl {
                    index: 0, reason, ..
                }) => {
                    assert_eq!(Err(reason), why, "{c:?}")
                }
                Err(e) => panic!("{c:?}: {e}"),
                Ok(_) => panic!("{c:?}: URL accepted"),
            }
        }
        // Other non-ASCII text, and the characters next to the refused ranges, are fine.
        for ok in ["ünïcode-€-\u{1F600}", "a\u{200d}b", "a\u{2065}b"] {
            assert_eq!(name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(name("a\u{85}b"), Err("contains control characters"));
    }

    fn with_refs(refs: Vec<RefUpdate>, replace: bool) -> Result<Checked, SubmitError> {
        let ev = PendingEvent {
            ref_updates: refs,
            replace_refs: replace,
            ..PendingEvent::new("e", "alice/project", "/srv/r.git")
                .oid("e92758a50bbf13ea1fe986bbe254a709b0bf741c")
        };
        event(&ev, &Config::default())
    }

    #[test]
    fn a_deletion_needs_no_object_and_never_names_head() {
        let checked = with_refs(
            vec![
                RefUpdate::delete("refs/heads/gone"),
                RefUpdate::oid(
                    "refs/heads/main",
                    "E92758A50BBF13EA1FE986BBE254A709B0BF741C",
                ),
                RefUpdate::delete("refs/tags/not-there-either"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            checked.refs,
            [
                RefUpdate::delete("refs/heads/gone"),
                RefUpdate::oid(
                    "refs/heads/main",
                    "e92758a50bbf13ea1fe986bbe254a709b0bf741c"
                ),
                RefUpdate::delete("refs/tags/not-there-either"),
            ]
        );
        for (refs, index, reason) in [
            (vec![RefUpdate::delete("HEAD")], 0, "HEAD cannot be deleted"),
            (
                vec![RefUpdate::delete("refs/purgatory-sync/x")],
                0,
                "under refs/purgatory-sync/, the engine's own namespace",
            ),
            (
                vec![
                    RefUpdate::delete("refs/heads/a"),
                    RefUpdate::delete("refs/heads/a"),
                ],
                1,
                "given twice",
            ),
            (
                vec![
                    RefUpdate::delete("refs/heads/a"),
                    RefUpdate::delete("refs/heads/a/b"),
                ],
                1,
                "clashes with another ref update: one name is a directory of the other",
            ),
            (
                vec![RefUpdate::delete("main")],
                0,
                "not HEAD or a full ref name under refs/",
            ),
        ] {
            match with_refs(refs, false) {
                Err(SubmitError::InvalidRefUpdate {
                    index: i,
                    reason: r,
                    ..
                }) => assert_eq!((i, r), (index, reason)),
                other => panic!("{reason}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_complete_ref_set_cannot_be_empty() {
        assert_eq!(
            with_refs(vec![], true).err(),
            Some(SubmitError::ReplaceRefsWithoutRefUpdates)
        );
        assert!(with_refs(vec![], false).is_ok());
        assert!(with_refs(vec![RefUpdate::delete("refs/heads/x")], true).is_ok());
    }

    #[test]
    fn directory_clashes() {
        let seen: BTreeSet<&str> = ["refs/heads/a", "refs/heads/c/d"].into_iter().collect();
        assert!(clashes(&seen, "refs/heads/a/b"));
        assert!(clashes(&seen, "refs/heads/c"));
        assert!(!clashes(&seen, "refs/heads/ab"));
        assert!(!clashes(&seen, "refs/heads/c-d"));
        assert!(!clashes(&seen, "refs/heads/b"));
    }
}
