//! The manifest `purgatory-sync run` reads: JSON Lines, one object per line.
//!
//! ```text
//! {"repository": {"identifier": "hello", "owner": "<64-hex pubkey>", "path": "relay/hello.git"}}
//! {"event": {"id": "…", "identifier": "hello", "repo": "relay/hello.git", "oids": ["…"],
//!            "clone_urls": ["https://…"], "origin": "sync",
//!            "ref_updates": [{"name": "refs/heads/main", "oid": "…"},
//!                            {"name": "refs/heads/old", "delete": true},
//!                            {"name": "HEAD", "symbolic": "refs/heads/main"}],
//!            "replace_refs": true, "created_at": 1700000000}}
//! {"nostr": {"id": "…", "pubkey": "…", "kind": 30618, "tags": [[…]], …}, "origin": "sync"}
//! ```
//!
//! * `repository` lines name the local bare repositories events go to. A plain event may name
//!   its `repo` itself; a Nostr event finds its repository by owner and identifier (a
//!   maintainer's state goes to the repository of the owner whose announcement lists the
//!   maintainer; a line without `owner` matches any owner).
//! * `event` lines are waiting events as the library takes them. `"replace_refs": true` says
//!   the ref updates are the repository's complete set of branches and tags (the others are
//!   deleted when they are written); `created_at` (Unix seconds) orders such sets of one
//!   repository, so that an older one released later is not written.
//! * `nostr` lines are raw NIP-34 events: announcements (kind 30617) give clone URLs,
//!   repository states (30618) and pull requests (1618, 1619) become waiting events.
//!
//! Relative paths are relative to the manifest's directory. Blank lines and lines starting with
//! `#` are skipped. Every problem is reported with the file, the line and the field.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use purgatory_sync::nip34::{self, Announcement, NostrEvent, RepoRef};
use purgatory_sync::{Origin, PendingEvent, RefUpdate};
use serde_json::{Map, Value};

/// A problem in the manifest: where, which field, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based; `None` for problems with the whole file.
    pub line: Option<usize>,
    /// The field, as a path such as `event.oids[2]`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A waiting event from the manifest, with the line it came from.
#[derive(Debug, Clone)]
pub struct Entry {
    pub line: usize,
    pub event: PendingEvent,
}

/// How to read a manifest.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Check that raw Nostr events' ids are the hash of their content.
    pub verify_ids: bool,
    /// Create missing target repositories (bare) instead of reporting them.
    pub create_repos: bool,
}

/// The events a manifest lists, in file order.
#[derive(Debug, Default)]
pub struct Manifest {
    pub entries: Vec<Entry>,
    /// Kind 30617 announcements read (they give URLs, they do not wait).
    pub announcements: usize,
}

/// A field-level problem; the line is added by the caller.
struct FieldError {
    field: String,
    message: String,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A JSON object being read, with its path for messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, path: &str) -> Result<Obj<'a>, FieldError> {
        match value {
            Value::Object(map) => Ok(Obj {
                map,
                path: path.to_owned(),
            }),
            other => Err(field_error(
                path,
                format!("expected an object, found {}", json_type(other)),
            )),
        }
    }

    fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Refuses keys other than `known`, naming the first unknown one.
    fn only(&self, known: &[&str]) -> Result<(), FieldError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(field_error(
                self.at(k),
                format!("unknown field (expected one of: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(field_error(
                self.at(key),
                format!("expected a string, found {}", json_type(other)),
            )),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str, FieldError> {
        self.opt_str(key)?
            .ok_or_else(|| field_error(self.at(key), "missing"))
    }

    fn opt_bool(&self, key: &str) -> Result<bool, FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(field_error(
                self.at(key),
                format!("expected true or false, found {}", json_type(other)),
            )),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64()),
            Some(other) => Err(field_error(
                self.at(key),
                format!(
                    "expected a whole number of seconds from 0, found {}",
                    json_type(other)
                ),
            )),
        }
    }

    fn list(&self, key: &str) -> Result<&'a [Value], FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(field_error(
                self.at(key),
                format!("expected a list, found {}", json_type(other)),
            )),
        }
    }

    fn str_list(&self, key: &str) -> Result<Vec<String>, FieldError> {
        self.list(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(field_error(
                    format!("{}[{i}]", self.at(key)),
                    format!("expected a string, found {}", json_type(other)),
                )),
            })
            .collect()
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn origin(obj: &Obj<'_>, key: &str) -> Result<Origin, FieldError> {
    match obj.opt_str(key)? {
        None | Some("sync") => Ok(Origin::Sync),
        Some("user") => Ok(Origin::User),
        Some(other) => Err(field_error(
            obj.at(key),
            format!("`{other}` is not an origin (expected `sync` or `user`)"),
        )),
    }
}

/// A `repository` line.
struct Repository {
    line: usize,
    owner: Option<String>,
    identifier: String,
    path: PathBuf,
}

/// A `nostr` line, resolved once every line is read.
struct NostrLine {
    line: usize,
    event: NostrEvent,
    origin: Origin,
}

/// Reads and checks the manifest at `path`; every problem found, or the events.
pub fn load(path: &Path, options: LoadOptions) -> Result<Manifest, Vec<ManifestError>> {
    let whole = |message: String| {
        vec![ManifestError {
            file: path.to_owned(),
            line: None,
            field: None,
            message,
        }]
    };
    // `-` is standard input; its relative paths resolve against the working directory.
    let (text, base) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
            .map_err(|e| whole(format!("cannot read standard input: {e}")))?;
        (text, PathBuf::new())
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| whole(format!("cannot read: {e}")))?;
        (text, path.parent().unwrap_or(Path::new("")).to_owned())
    };
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };

    let mut errors = Vec::new();
    let mut manifest = Manifest::default();
    let mut repositories: Vec<Repository> = Vec::new();
    let mut announcements: Vec<Announcement> = Vec::new();
    let mut nostr: Vec<NostrLine> = Vec::new();
    let mut to_create: Vec<(usize, PathBuf)> = Vec::new();
    let fail = |errors: &mut Vec<ManifestError>, line: usize, e: FieldError| {
        errors.push(ManifestError {
            file: path.to_owned(),
            line: Some(line),
            field: (!e.field.is_empty()).then_some(e.field),
            message: e.message,
        })
    };

    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let value: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                fail(
                    &mut errors,
                    line,
                    field_error("", format!("not JSON: {e} (each line is one JSON object)")),
                );
                continue;
            }
        };
        let parsed = (|| -> Result<(), FieldError> {
            let top = Obj::new(&value, "")?;
            let keys: Vec<&str> = top.map.keys().map(String::as_str).collect();
            match keys.as_slice() {
                ["repository"] => {
                    let r = Obj::new(&top.map["repository"], "repository")?;
                    r.only(&["identifier", "owner", "path", "create"])?;
                    let path = resolve(r.str("path")?);
                    if !path.exists() {
                        if options.create_repos || r.opt_bool("create")? {
                            // Created once the whole manifest is known to be good.
                            to_create.push((line, path.clone()));
                        } else {
                            return Err(field_error(
                                r.at("path"),
                                format!(
                                    "{} does not exist (create it, add \"create\": true, or pass --create-repos)",
                                    path.display()
                                ),
                            ));
                        }
                    }
                    repositories.push(Repository {
                        line,
                        owner: r.opt_str("owner")?.map(str::to_ascii_lowercase),
                        identifier: r.str("identifier")?.to_owned(),
                        path,
                    });
                }
                ["event"] => {
                    let event = plain_event(&top.map["event"], &resolve)?;
                    manifest.entries.push(Entry { line, event });
                }
                ["nostr"] | ["nostr", "origin"] | ["origin", "nostr"] => {
                    let event = NostrEvent::from_value(top.map["nostr"].clone())
                        .map_err(|e| field_error("nostr", e.to_string()))?;
                    if options.verify_ids {
                        event
                            .verify_id()
                            .map_err(|e| field_error("nostr.id", e.to_string()))?;
                    }
                    let origin = origin(&top, "origin")?;
                    if event.kind == nip34::KIND_REPOSITORY_ANNOUNCEMENT {
                        let a = Announcement::from_event(&event)
                            .map_err(|e| field_error("nostr", e.to_string()))?;
                        announcements.push(a);
                        manifest.announcements += 1;
                    } else {
                        nostr.push(NostrLine {
                            line,
                            event,
                            origin,
                        });
                    }
                }
                _ => {
                    return Err(field_error(
                        "",
                        format!(
                            "expected an object with one key, `repository`, `event` or `nostr`; found keys {keys:?}"
                        ),
                    ))
                }
            }
            Ok(())
        })();
        if let Err(e) = parsed {
            fail(&mut errors, line, e);
        }
    }

    // Nostr events, now that every announcement and repository is known.
    for n in nostr {
        let result = nip34::repository_of(&n.event)
            .map_err(|e| field_error("nostr", e.to_string()))
            .and_then(|repo_ref| {
                let repo = find_repository(&repositories, &announcements, &repo_ref)?;
                nip34::pending_event(&n.event, &announcements, repo, n.origin)
                    .map_err(|e| field_error("nostr", e.to_string()))
            });
        match result {
            Ok(event) => manifest.entries.push(Entry {
                line: n.line,
                event,
            }),
            Err(e) => fail(&mut errors, n.line, e),
        }
    }
    manifest.entries.sort_by_key(|e| e.line);

    // The same id twice is a mistake in the manifest.
    let mut seen = HashSet::new();
    for e in &manifest.entries {
        if !seen.insert(e.event.id.clone()) {
            fail(
                &mut errors,
                e.line,
                field_error("", format!("event {} is listed twice", e.event.id)),
            );
        }
    }
    if errors.is_empty() {
        for (line, path) in to_create {
            if let Err(e) = git2::Repository::init_bare(&path) {
                fail(
                    &mut errors,
                    line,
                    field_error("repository.path", format!("cannot create: {e}")),
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(manifest)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
}

/// The local repository of `r`: the `repository` line of its owner; for a maintainer's state,
/// the line of an owner whose announcement lists the maintainer; else a line without owner.
fn find_repository(
    repos: &[Repository],
    announcements: &[Announcement],
    r: &RepoRef,
) -> Result<PathBuf, FieldError> {
    let owner = r.owner.to_ascii_lowercase();
    let of_owner = |owner: &str| {
        repos
            .iter()
            .find(|x| x.identifier == r.identifier && x.owner.as_deref() == Some(owner))
    };
    of_owner(&owner)
        .or_else(|| {
            announcements
                .iter()
                .filter(|a| a.identifier == r.identifier && a.maintainers.contains(&owner))
                .find_map(|a| of_owner(&a.owner.to_ascii_lowercase()))
        })
        .or_else(|| {
            repos
                .iter()
                .find(|x| x.identifier == r.identifier && x.owner.is_none())
        })
        .map(|x| x.path.clone())
        .ok_or_else(|| {
            let near: Vec<String> = repos
                .iter()
                .filter(|x| x.identifier == r.identifier)
                .map(|x| format!("line {}", x.line))
                .collect();
            field_error(
                "nostr",
                format!(
                    "no `repository` line for identifier `{}` of owner {}{}",
                    r.identifier,
                    r.owner,
                    if near.is_empty() {
                        String::new()
                    } else {
                        format!(" (other owners' at {})", near.join(", "))
                    }
                ),
            )
        })
}

fn plain_event(
    value: &Value,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<PendingEvent, FieldError> {
    let e = Obj::new(value, "event")?;
    e.only(&[
        "id",
        "identifier",
        "repo",
        "oids",
        "clone_urls",
        "origin",
        "ref_updates",
        "replace_refs",
        "created_at",
    ])?;
    let mut ref_updates = Vec::new();
    for (i, u) in e.list("ref_updates")?.iter().enumerate() {
        let u = Obj::new(u, &format!("event.ref_updates[{i}]"))?;
        u.only(&["name", "oid", "symbolic", "delete"])?;
        let name = u.str("name")?;
        let target = (
            u.opt_str("oid")?,
            u.opt_str("symbolic")?,
            u.opt_bool("delete")?,
        );
        ref_updates.push(match target {
            (Some(oid), None, false) => RefUpdate::oid(name, oid),
            (None, Some(target), false) => RefUpdate::symbolic(name, target),
            (None, None, true) => RefUpdate::delete(name),
            _ => {
                return Err(field_error(
                    u.path.clone(),
                    "give exactly one of `oid`, `symbolic` and `\"delete\": true`",
                ))
            }
        });
    }
    Ok(PendingEvent {
        id: e.str("id")?.to_owned(),
        identifier: e.str("identifier")?.to_owned(),
        repo: resolve(e.str("repo")?),
        oids: e.str_list("oids")?,
        clone_urls: e.str_list("clone_urls")?,
        origin: origin(&e, "origin")?,
        ref_updates,
        replace_refs: e.opt_bool("replace_refs")?,
        created_at: e.opt_u64("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, options: LoadOptions) -> Result<Manifest, Vec<ManifestError>> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r.git")).unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, text).unwrap();
        load(&path, options)
    }

    fn one_error(text: &str) -> String {
        let errors = load_text(text, LoadOptions::default()).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        format!(
            "{}:{}: {}",
            e.line.unwrap(),
            e.field.clone().unwrap_or_default(),
            e.message
        )
    }

    const OID: &str = "e92758a50bbf13ea1fe986bbe254a709b0bf741c";

    #[test]
    fn plain_events_are_read_with_relative_paths_and_defaults() {
        let text = format!(
            "# a comment\n\n{{\"event\": {{\"id\": \"e1\", \"identifier\": \"hello\", \"repo\": \"r.git\", \"oids\": [\"{OID}\"], \"clone_urls\": [\"https://example.com/h.git\"], \"ref_updates\": [{{\"name\": \"refs/heads/main\", \"oid\": \"{OID}\"}}, {{\"name\": \"HEAD\", \"symbolic\": \"refs/heads/main\"}}]}}}}\n"
        );
        let m = load_text(&text, LoadOptions::default()).unwrap();
        assert_eq!(m.entries.len(), 1);
        let e = &m.entries[0];
        assert_eq!(e.line, 3);
        assert!(e.event.repo.ends_with("r.git") && e.event.repo.is_absolute());
        assert_eq!(e.event.origin, Origin::Sync);
        assert_eq!(e.event.ref_updates.len(), 2);
    }

    #[test]
    fn deletions_and_complete_ref_sets_are_read() {
        let text = format!(
            "{{\"event\": {{\"id\": \"e1\", \"identifier\": \"hello\", \"repo\": \"r.git\", \"oids\": [\"{OID}\"], \"ref_updates\": [{{\"name\": \"refs/heads/main\", \"oid\": \"{OID}\"}}, {{\"name\": \"refs/tags/old\", \"delete\": true}}], \"replace_refs\": true, \"created_at\": 1700000000}}}}\n\
             {{\"event\": {{\"id\": \"e2\", \"identifier\": \"hello\", \"repo\": \"r.git\", \"oids\": [\"{OID}\"]}}}}\n"
        );
        let m = load_text(&text, LoadOptions::default()).unwrap();
        let e = &m.entries[0].event;
        assert_eq!(
            e.ref_updates,
            [
                RefUpdate::oid("refs/heads/main", OID),
                RefUpdate::delete("refs/tags/old")
            ]
        );
        assert!(e.replace_refs);
        assert_eq!(e.created_at, Some(1_700_000_000));
        assert!(!m.entries[1].event.replace_refs, "false unless given");
        assert_eq!(m.entries[1].event.created_at, None);

        let event = |extra: &str| {
            format!("{{\"event\": {{\"id\": \"e\", \"identifier\": \"i\", \"repo\": \"r.git\", {extra}}}}}")
        };
        assert_eq!(
            one_error(&event(
                r#""ref_updates": [{"name": "refs/heads/x", "delete": false}]"#
            )),
            "1:event.ref_updates[0]: give exactly one of `oid`, `symbolic` and `\"delete\": true`"
        );
        assert_eq!(
            one_error(&event(&format!(
                r#""ref_updates": [{{"name": "refs/heads/x", "oid": "{OID}", "delete": true}}]"#
            ))),
            "1:event.ref_updates[0]: give exactly one of `oid`, `symbolic` and `\"delete\": true`"
        );
        assert_eq!(
            one_error(&event(
                r#""ref_updates": [{"name": "refs/heads/x", "delete": "yes"}]"#
            )),
            "1:event.ref_updates[0].delete: expected true or false, found a string"
        );
        assert_eq!(
            one_error(&event(r#""replace_refs": 1"#)),
            "1:event.replace_refs: expected true or false, found a number"
        );
        for bad in ["-1", "1.5", "\"1700000000\""] {
            let e = one_error(&event(&format!(r#""created_at": {bad}"#)));
            assert!(
                e.starts_with("1:event.created_at: expected a whole number of seconds"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        assert_eq!(
            one_error("\n{\"event\": {\"id\": \"e\", \"identifier\": \"i\", \"repo\": \"r.git\", \"oids\": [\"a\", 3]}}"),
            "2:event.oids[1]: expected a string, found a number"
        );
        assert_eq!(
            one_error("{\"event\": {\"identifier\": \"i\", \"repo\": \"r.git\"}}"),
            "1:event.id: missing"
        );
        assert_eq!(
            one_error("{\"event\": {\"id\": \"e\", \"identifier\": \"i\", \"repo\": \"r.git\", \"oid\": []}}"),
            "1:event.oid: unknown field (expected one of: id, identifier, repo, oids, clone_urls, origin, ref_updates, replace_refs, created_at)"
        );
        assert_eq!(
            one_error("{\"event\": {\"id\": \"e\", \"identifier\": \"i\", \"repo\": \"r.git\", \"origin\": \"push\"}}"),
            "1:event.origin: `push` is not an origin (expected `sync` or `user`)"
        );
        assert!(one_error("{\"event\": ").starts_with("1:: not JSON"));
        assert!(one_error("[1]").contains("expected an object"));
        assert!(one_error("{\"events\": {}}").contains("`repository`, `event` or `nostr`"));
        assert!(
            one_error("{\"repository\": {\"identifier\": \"i\", \"path\": \"nope.git\"}}")
                .starts_with("1:repository.path: ")
        );
    }

    #[test]
    fn every_bad_line_is_reported_not_just_the_first() {
        let errors =
            load_text("{}\nnot json\n{\"event\": 1}\n", LoadOptions::default()).unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line.unwrap()).collect();
        assert_eq!(lines, vec![1, 2, 3]);
    }

    #[test]
    fn a_missing_manifest_names_the_file() {
        let e = load(Path::new("/nonexistent/m.jsonl"), LoadOptions::default()).unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("/nonexistent/m.jsonl: cannot read"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn create_repos_makes_missing_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"repository\": {\"identifier\": \"i\", \"path\": \"new/i.git\"}}",
        )
        .unwrap();
        assert!(load(&path, LoadOptions::default()).is_err());
        let options = LoadOptions {
            create_repos: true,
            ..LoadOptions::default()
        };
        load(&path, options).unwrap();
        assert!(git2::Repository::open_bare(dir.path().join("new/i.git")).is_ok());
    }
}
