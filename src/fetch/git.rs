//! The libgit2 fetcher.
//!
//! One `Repository` handle per job, no shared libgit2 state between workers. What arrives is
//! pinned under [`TEMP_REF_PREFIX`] so that `git gc` cannot drop it while its event waits, and
//! the repository's configuration hides that namespace from its clients.

use std::cell::Cell;
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Once};

use git2::{
    AutotagOption, ErrorClass, FetchOptions, RemoteCallbacks, RemoteRedirect, Repository,
    RepositoryOpenFlags,
};

use super::conn::{self, Guard, NetContext};
use super::framing::Protocol;
use super::quarantine::{self, Quarantine};
use super::{
    FailureKind, FetchControl, FetchError, FetchMode, FetchReport, FetchRequest, Fetcher,
    StopReason,
};
use crate::ObjectId;

/// Namespace of the refs that keep fetched objects reachable while their event waits:
/// `refs/purgatory-sync/<object id>`.
pub const TEMP_REF_PREFIX: &str = "refs/purgatory-sync/";

/// Most fetches one attempt may make while splitting the wanted ids to find those a server has.
const MAX_SPLIT_FETCHES: u32 = 32;

/// Initialises libgit2 once per process: its process-wide socket timeouts (for sockets our
/// stream does not serve), the largest object a delta may build, the allocator that counts each
/// fetch's memory, and the engine's socket stream, which enforces every fetch's limits. Called
/// from `EngineBuilder::build` before the engine's threads exist; the first engine's settings
/// are the process's.
pub(crate) fn init(cfg: &crate::config::Config) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // First: the git2 call initialises libgit2, which the raw calls below need.
        if let Err(e) = super::libgit2::set_git_timeouts(cfg.connect_timeout, cfg.io_timeout) {
            log::warn!("could not set libgit2 socket timeouts: {e}");
        }
        if let Err(e) = super::libgit2::set_max_object_size(cfg.max_object_size) {
            log::warn!("could not set libgit2's largest object size: {e}");
        }
        install_glue(super::libgit2::linked_version());
    });
}

/// What [`install_glue`] put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Glue {
    /// libgit2 allocates through the engine's allocator (each fetch's memory budget).
    pub allocator: bool,
    /// libgit2's standard stream is the engine's (deadline, byte cap, idle timeout, shutdown
    /// checked on every read and write).
    pub stream: bool,
}

/// Hands libgit2 the engine's allocator and socket stream, unless the libgit2 linked in
/// (`version`) is not the series their hand-written C layouts follow: then neither is
/// registered, and fetches run on libgit2's own sockets, bounded by its process-wide timeouts
/// (set above) and by the fetch's progress callback, without a memory budget.
pub(crate) fn install_glue(version: (u32, u32, u32)) -> Glue {
    let none = Glue {
        allocator: false,
        stream: false,
    };
    if let Err(why) = super::libgit2::check_layouts(version) {
        log::warn!(
            "{why}: neither is registered; fetches use libgit2's own sockets with its \
             timeouts and are not held to a memory budget"
        );
        return none;
    }
    let allocator = match crate::fetch::alloc::install() {
        Ok(true) => true,
        Ok(false) => {
            log::info!(
                "this platform cannot size allocations: fetches are not held to a memory budget"
            );
            false
        }
        Err(e) => {
            log::warn!(
                "could not install the allocator, fetches are not held to a memory budget: {e}"
            );
            false
        }
    };
    let stream = match crate::fetch::stream::register() {
        Ok(()) => true,
        Err(e) => {
            log::warn!(
                "could not register the engine's socket stream, fetch limits are weaker: {e}"
            );
            false
        }
    };
    Glue { allocator, stream }
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

/// Whether `odb` holds `oid`, without rescanning the pack directory when it does not (libgit2
/// does that at every miss by default: a stat and a directory read per missing id). Callers
/// open the database afresh, or refresh it, before a batch of checks.
fn has(odb: &git2::Odb<'_>, oid: ObjectId) -> bool {
    odb.exists_ext(oid.to_git(), git2::OdbLookupFlags::NO_REFRESH)
}

pub(crate) fn present(repo: &Path, oids: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
    let repo = open(repo)?;
    let odb = repo.odb().map_err(local)?;
    Ok(oids.iter().copied().filter(|o| has(&odb, *o)).collect())
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

/// The namespaces of a complete ref set ([`PendingEvent::replace_refs`](crate::PendingEvent)):
/// a repository state lists every branch and tag, and nothing else.
const COMPLETE_SET_NAMESPACES: [&str; 2] = ["refs/heads/", "refs/tags/"];

pub(crate) fn apply_refs(
    repo: &Path,
    updates: &[crate::RefUpdate],
    replace_refs: bool,
) -> Result<(), FetchError> {
    if updates.is_empty() && !replace_refs {
        return Ok(());
    }
    let repo = open(repo)?;
    // Every ref the transaction changes, with its new target (`Delete`: removed).
    let mut changes: Vec<(&str, &crate::RefTarget)> = updates
        .iter()
        .map(|u| (u.name.as_str(), &u.target))
        .collect();
    let unnamed = if replace_refs {
        unnamed_branches_and_tags(&repo, updates)?
    } else {
        Vec::new()
    };
    changes.extend(
        unnamed
            .iter()
            .map(|n| (n.as_str(), &crate::RefTarget::Delete)),
    );
    let mut tx = repo.transaction().map_err(local)?;
    for (name, _) in &changes {
        tx.lock_ref(name).map_err(local)?;
    }
    // With every lock held nobody else can change these refs: remember them, so that a
    // failure half-way through the writes below can be undone. (A branch pushed between the
    // listing above and the locks is not deleted: it is newer than the state being written.)
    let before: Vec<Option<Previous>> = changes
        .iter()
        .map(|(name, _)| previous(&repo, name))
        .collect();
    for ((name, target), old) in changes.iter().zip(&before) {
        match target {
            crate::RefTarget::Oid(hex) => {
                let oid = git2::Oid::from_str(hex).map_err(local)?;
                tx.set_target(name, oid, None, "purgatory-sync: release")
            }
            crate::RefTarget::Symbolic(target) => {
                tx.set_symbolic_target(name, target, None, "purgatory-sync: release")
            }
            // libgit2 fails the whole commit on the removal of a ref that does not exist;
            // a locked ref left unchanged is only unlocked.
            crate::RefTarget::Delete if old.is_none() => Ok(()),
            crate::RefTarget::Delete => tx.remove(name),
        }
        .map_err(local)?;
    }
    // Dropping an uncommitted transaction unlocks every ref without writing any; a commit
    // writes them one by one and may stop in the middle.
    if let Err(e) = tx.commit() {
        for ((name, _), old) in changes.iter().zip(before) {
            let restored = match old {
                Some(Previous::Direct(oid)) => repo
                    .reference(name, oid, true, "purgatory-sync: undo")
                    .map(drop),
                Some(Previous::Symbolic(target)) => repo
                    .reference_symbolic(name, &target, true, "purgatory-sync: undo")
                    .map(drop),
                None => match repo.find_reference(name) {
                    Ok(mut r) => r.delete(),
                    Err(_) => Ok(()),
                },
            };
            if let Err(undo) = restored {
                log::warn!("could not undo {name} after a failed update: {undo}");
            }
        }
        return Err(local(e));
    }
    Ok(())
}

/// The branches and tags of `repo` that `updates` does not name, sorted: what writing
/// `updates` as a complete ref set deletes.
fn unnamed_branches_and_tags(
    repo: &Repository,
    updates: &[crate::RefUpdate],
) -> Result<Vec<String>, FetchError> {
    let named: HashSet<&str> = updates.iter().map(|u| u.name.as_str()).collect();
    let mut refs = repo.references().map_err(local)?;
    let mut unnamed = Vec::new();
    for name in refs.names() {
        // An unreadable ref fails the write: leaving a branch the state does not list would
        // serve another set than the state's.
        let name = name.map_err(|e| {
            FetchError::new(
                FailureKind::LocalRepository,
                format!(
                    "cannot list the repository's branches and tags: {}",
                    e.message()
                ),
            )
        })?;
        if COMPLETE_SET_NAMESPACES
            .iter()
            .any(|ns| name.starts_with(ns))
            && !named.contains(name)
        {
            unnamed.push(name.to_owned());
        }
    }
    unnamed.sort_unstable();
    Ok(unnamed)
}

enum Previous {
    Direct(git2::Oid),
    Symbolic(String),
}

fn previous(repo: &Repository, name: &str) -> Option<Previous> {
    let r = repo.find_reference(name).ok()?;
    match r.symbolic_target().ok().flatten() {
        Some(t) => Some(Previous::Symbolic(t.to_owned())),
        None => r.target().map(Previous::Direct),
    }
}

/// The git configuration key that keeps refs out of `git upload-pack`'s and
/// `git receive-pack`'s advertisements.
const HIDE_REFS_KEY: &str = "transfer.hideRefs";

/// What a `transfer.hideRefs` value says of the engine's namespace: `Some(true)` hides it
/// all, `Some(false)` shows it all again (`!`), `None` is about other refs. git strips
/// trailing slashes from a value and matches it as a whole path prefix; `^` matches the full
/// name before a namespace is stripped, the same here.
fn hide_refs_value_covers(value: &str) -> Option<bool> {
    let (shown, pattern) = match value.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let pattern = pattern.strip_prefix('^').unwrap_or(pattern);
    let pattern = pattern.trim_end_matches('/');
    let ours = TEMP_REF_PREFIX.trim_end_matches('/');
    let covers = !pattern.is_empty()
        && ours
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    covers.then_some(!shown)
}

/// Makes sure `git upload-pack` does not advertise the engine's refs in `repo`: adds
/// `transfer.hideRefs = refs/purgatory-sync/` to the repository's own configuration unless
/// a value at any level already hides them or explicitly shows them (the administrator's
/// choice). Returns whether it wrote the value.
fn hide_temp_refs(repo: &Repository) -> Result<bool, git2::Error> {
    let config = repo.config()?;
    let mut hidden = false;
    match config.multivar(HIDE_REFS_KEY, None) {
        Ok(mut values) => {
            while let Some(entry) = values.next() {
                // A value that is not UTF-8 is no pattern of the engine's ASCII namespace.
                match entry?.value().ok().and_then(hide_refs_value_covers) {
                    Some(true) => hidden = true,
                    // Shown on purpose: leave it so.
                    Some(false) => return Ok(false),
                    None => {}
                }
            }
        }
        Err(e) if e.code() == git2::ErrorCode::NotFound => {}
        Err(e) => return Err(e),
    }
    if hidden {
        return Ok(false);
    }
    // A multi-valued key: a regular expression that matches no value adds one.
    let mut local = config.open_level(git2::ConfigLevel::Local)?;
    local.set_multivar(HIDE_REFS_KEY, "^$", TEMP_REF_PREFIX)?;
    Ok(true)
}

/// Where versions before 0.2 kept the refs of their broad fallback fetch, per process:
/// `refs/purgatory-sync/scratch/<pid>-<n>/...`. A process that died mid-fetch left them.
const SCRATCH_PREFIX: &str = "refs/purgatory-sync/scratch/";

/// Deletes the scratch refs of processes that no longer run, until `stop` says so. Returns
/// how many it deleted.
fn sweep_scratch_refs(repo: &Repository, stop: impl Fn() -> bool) -> usize {
    /// Most refs looked at per sweep: the next fetch into the repository goes on.
    const PER_SWEEP: usize = 65_536;
    let Ok(refs) = repo.references_glob(&format!("{SCRATCH_PREFIX}*")) else {
        return 0;
    };
    // Names first: deleting refs while libgit2 iterates over them is not something to rely on.
    let names: Vec<String> = refs
        .flatten()
        .take(PER_SWEEP)
        .filter_map(|r| r.name().ok().map(str::to_owned))
        .filter(|name| {
            let pid = name[SCRATCH_PREFIX.len()..]
                .split(['-', '/'])
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|p| p != std::process::id() && !quarantine::process_runs(p))
        })
        .collect();
    let mut deleted = 0;
    for (i, name) in names.iter().enumerate() {
        if i % CHECK_EVERY == CHECK_EVERY - 1 && stop() {
            break;
        }
        if let Ok(mut r) = repo.find_reference(name) {
            if r.delete().is_ok() {
                deleted += 1;
            }
        }
    }
    deleted
}

fn temp_ref(oid: ObjectId) -> String {
    format!("{TEMP_REF_PREFIX}{oid}")
}

fn local(e: git2::Error) -> FetchError {
    FetchError::new(FailureKind::LocalRepository, e.message())
}

/// The default [`Fetcher`]: libgit2 over the engine's own socket stream.
///
/// One attempt against one URL:
/// 1. Ask for the missing ids directly. When the server lacks some of them it fails the whole
///    request without naming which, so the set is split in halves and retried (bounded by
///    32 requests and the deadline) until every id it has arrived.
/// 2. If the server's advertisement does not allow fetching by id (no
///    `allow-tip-sha1-in-want` / `allow-reachable-sha1-in-want`; libgit2 refuses such wants
///    itself before sending them), fetch the advertised refs whose tips are missing ids.
/// 3. Otherwise fetch branches, tags and `refs/nostr/*` into a scratch ref namespace and keep
///    what arrived.
///
/// Whatever arrived is pinned under [`TEMP_REF_PREFIX`]; the scratch refs are removed. Before
/// it pins objects in a repository it makes sure `git upload-pack` does not advertise those
/// refs (`transfer.hideRefs`, unless [`FetchControl::hide_temp_refs`] is off).
#[derive(Debug, Clone)]
pub struct GitFetcher {
    _private: (),
}

impl GitFetcher {
    /// A fetcher. Its limits come with each call's [`FetchControl`]. The first fetcher or
    /// engine made in a process initialises libgit2 and registers the engine's socket stream.
    pub fn new() -> Self {
        init(&crate::config::Config::default());
        GitFetcher { _private: () }
    }
}

impl Default for GitFetcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Fetcher for GitFetcher {
    /// Checks the URL with the control's [`UrlPolicy`](crate::UrlPolicy) first (a refused URL
    /// is a [`FailureKind::Refused`] failure, without any traffic), then fetches; every
    /// connection of the fetch goes only to the URL's host, and, unless the policy allows
    /// private addresses, only to public addresses.
    fn fetch(&self, request: &FetchRequest, control: &FetchControl) -> FetchReport {
        let policy = control.url_policy();
        match policy.check(&request.url) {
            Ok(checked) => {
                let mut guard = Guard::new(&checked.domain, policy.private_addresses_allowed());
                if checked.port != 0 {
                    guard = guard.on_port(checked.port);
                }
                // The URL libgit2 sees has the host the policy checked.
                let mut request = request.clone();
                request.url = checked.fetch_url.to_string();
                self.fetch_guarded(
                    &request,
                    control,
                    guard,
                    Protocol::of_scheme(&checked.scheme),
                )
            }
            Err(reason) => {
                let error = FetchError::new(
                    FailureKind::Refused,
                    format!("refused by the URL policy: {reason}"),
                );
                let present = present(&request.repo, &request.wanted).unwrap_or_default();
                let missing = request
                    .wanted
                    .iter()
                    .copied()
                    .filter(|o| !present.contains(o))
                    .collect();
                FetchReport {
                    present,
                    missing,
                    error: Some(error),
                    ..FetchReport::default()
                }
            }
        }
    }
}

impl GitFetcher {
    /// The fetch of a URL that passed the policy: every connection is checked by `guard`.
    fn fetch_guarded(
        &self,
        request: &FetchRequest,
        control: &FetchControl,
        guard: Guard,
        protocol: Protocol,
    ) -> FetchReport {
        let ctx = Arc::new(
            NetContext::new(
                control.deadline(),
                control.cancel_flag(),
                control.max_bytes(),
                control.connect_timeout(),
                control.io_timeout(),
            )
            .with_memory_limit(control.max_memory())
            .with_memory_pool(control.memory_pool())
            .with_framing(protocol, control.max_advertisement())
            .with_guard(guard),
        );
        // Everything libgit2 allocates for the fetch, from opening the repository to freeing
        // the last handle, is counted against its budget.
        let mut report = conn::with_context(&ctx, || {
            let mut report = fetch_into(request, control, &ctx);
            // Every libgit2 handle of the fetch is freed: what libgit2 still holds for it, it
            // lost (libgit2 1.9 leaks the object of a delta that duplicates another one).
            report.memory_leaked = ctx.memory_live();
            report
        });
        report.bytes_received = ctx.received();
        report.memory_peak = ctx.memory_peak();
        if report.memory_leaked > 0 {
            log::debug!(
                "libgit2 kept {} bytes after the fetch from {}",
                report.memory_leaked,
                request.url
            );
        }
        report
    }
}

/// Most object ids one request asks for by id: libgit2 matches every advertised ref against
/// every requested id, so a request's cost grows with their product. The rest are asked for at
/// the next visit.
const MAX_WANTS_PER_REQUEST: usize = 4096;

/// How many ids or refs a loop handles between two looks at the deadline.
const CHECK_EVERY: usize = 1024;

/// The fetch, inside the fetch's context: repository handles are opened and freed here.
fn fetch_into(
    request: &FetchRequest,
    control: &FetchControl,
    ctx: &Arc<NetContext>,
) -> FetchReport {
    let failed = |e: FetchError| {
        let mut report = FetchReport::failed(e);
        report.missing = request.wanted.clone();
        report
    };
    let repo = match open(&request.repo) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let swept = quarantine::sweep(&repo.path().join("objects"));
    let refs = sweep_scratch_refs(&repo, || control.should_stop().is_some());
    if swept + refs > 0 {
        log::info!(
            "removed {swept} fetch quarantine(s) and {refs} scratch ref(s) left by processes \
             that no longer run in {}",
            request.repo.display()
        );
    }
    let mut job = Job {
        repo: &repo,
        control,
        ctx: ctx.clone(),
        fetches: 0,
        error: None,
        advertised: Vec::new(),
        advertisement_read: false,
        ids_allowed: None,
    };
    let missing_before = job.missing(&request.wanted);
    if !missing_before.is_empty() && job.error.is_none() {
        let quarantine = match Quarantine::open(&repo) {
            Ok(q) => q,
            Err(m) => return failed(FetchError::new(FailureKind::LocalRepository, m)),
        };
        job.run(&request.url, &missing_before, request.mode);
        let left = job.missing(&missing_before);
        if left.len() < missing_before.len() {
            // A wanted object arrived: what came with it stays.
            if let Err(e) = quarantine.keep() {
                job.note(FetchError::new(
                    FailureKind::LocalRepository,
                    format!("could not move the fetched pack into the repository: {e}"),
                ));
            }
        }
        // Otherwise the quarantine, and whatever the server sent, goes with it.
    }
    let mut error = job.error.take();
    let (advertised, advertisement_read, ids_allowed) = (
        std::mem::take(&mut job.advertised),
        job.advertisement_read,
        job.ids_allowed,
    );
    drop(job);
    drop(repo);
    // A new handle: the packs moved in are seen where they are now, not through the
    // quarantine's backend.
    let repo = match open(&request.repo) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let present_set: HashSet<ObjectId> = match repo.odb() {
        Ok(odb) => request
            .wanted
            .iter()
            .copied()
            .filter(|o| has(&odb, *o))
            .collect(),
        Err(e) => return failed(local(e)),
    };
    let (present, missing): (Vec<ObjectId>, Vec<ObjectId>) =
        request.wanted.iter().partition(|o| present_set.contains(o));
    if !present.is_empty() && control.hide_temp_refs() {
        // The pins are kept all the same: losing the objects to `git gc` would be worse than
        // showing their refs.
        if let Err(e) = hide_temp_refs(&repo) {
            log::warn!(
                "could not hide the temporary refs of {} from its clients: {e}",
                request.repo.display()
            );
        }
    }
    for oid in &present {
        if let Err(e) = repo.reference(&temp_ref(*oid), oid.to_git(), true, "purgatory-sync: pin") {
            error.get_or_insert_with(|| local(e));
        }
    }
    let error = if missing.is_empty() {
        None
    } else {
        Some(error.unwrap_or_else(|| {
            let how = match request.mode {
                FetchMode::OneVisit => "does not advertise",
                _ => "does not have",
            };
            FetchError::new(
                FailureKind::NotFound,
                format!(
                    "the server {how} {} of the {} wanted objects",
                    missing.len(),
                    request.wanted.len()
                ),
            )
        }))
    };
    FetchReport {
        present,
        missing,
        error,
        advertised,
        advertisement_read,
        ids_allowed,
        ..FetchReport::default()
    }
}

/// What one libgit2 fetch call came to.
enum Call {
    Done,
    /// libgit2 refused to ask for ids: the server's advertisement does not allow it.
    IdsNotAllowed,
    Failed(FetchError),
}

struct Job<'a> {
    repo: &'a Repository,
    control: &'a FetchControl,
    ctx: Arc<NetContext>,
    fetches: u32,
    error: Option<FetchError>,
    /// The wanted ids the server advertised, sorted.
    advertised: Vec<ObjectId>,
    advertisement_read: bool,
    ids_allowed: Option<bool>,
}

impl Job<'_> {
    /// Which of `oids` the repository (with the fetch's quarantine) lacks. Stops at the
    /// deadline, counting the unchecked ones as missing.
    fn missing(&mut self, oids: &[ObjectId]) -> Vec<ObjectId> {
        let odb = match self.repo.odb() {
            Ok(odb) => odb,
            Err(e) => {
                self.note(local(e));
                return oids.to_vec();
            }
        };
        // Packs written since the last look (by this fetch, into its quarantine) are seen.
        if let Err(e) = odb.refresh() {
            self.note(local(e));
        }
        let mut missing = Vec::new();
        for (i, o) in oids.iter().enumerate() {
            if i % CHECK_EVERY == CHECK_EVERY - 1 && self.stop_now() {
                missing.extend_from_slice(&oids[i..]);
                break;
            }
            if !has(&odb, *o) {
                missing.push(*o);
            }
        }
        missing
    }

    /// Keeps the most telling failure: one that ends the attempt wins over the first
    /// one recorded.
    fn note(&mut self, e: FetchError) {
        if self.error.is_none() || ends_attempt(e.kind) {
            self.error = Some(e);
        }
    }

    fn stopped(&self) -> bool {
        self.error.as_ref().is_some_and(|e| ends_attempt(e.kind))
            || self.control.should_stop().is_some()
    }

    /// Whether the fetch must stop now; records why.
    fn stop_now(&mut self) -> bool {
        match self.control.should_stop() {
            Some(reason) => {
                self.note(stopped(reason));
                true
            }
            None => self.stopped(),
        }
    }

    /// Visits `url` for `missing` (ids the repository lacks): one connection reads the
    /// advertisement, and the wanted ids the server advertises are downloaded on it. In
    /// [`FetchMode::Everything`] the ids it does not advertise are then asked for by id where
    /// the server allows it (splitting the set when it refuses it as a whole), or else its
    /// branches, tags and `refs/nostr/*` are fetched.
    fn run(&mut self, url: &str, missing: &[ObjectId], mode: FetchMode) {
        let mut remote = match self.repo.remote_anonymous(url) {
            // git config `insteadOf` rewrites can turn a checked URL into another one.
            Ok(r) if r.url().ok() != Some(url) => {
                self.note(FetchError::new(
                    FailureKind::Refused,
                    "git configuration rewrites this URL",
                ));
                return;
            }
            Ok(r) => r,
            Err(e) => {
                self.note(FetchError::new(
                    FailureKind::Refused,
                    sanitize(&strip_urls(e.message())),
                ));
                return;
            }
        };
        let http = url.starts_with("http");
        if self.visit(&mut remote, missing, http, mode) {
            return;
        }
        if mode == FetchMode::OneVisit || !self.advertisement_read || self.stopped() {
            return;
        }
        // What the server advertised was asked for already, and is not asked for again if it
        // did not come (the server failed at it).
        let unadvertised: Vec<ObjectId> = missing
            .iter()
            .copied()
            .filter(|o| self.advertised.binary_search(o).is_err())
            .collect();
        let left = self.missing(&unadvertised);
        if left.is_empty() || self.stopped() {
            return;
        }
        if self.ids_allowed == Some(false) {
            // Its tips were asked for already: what is left may be reachable from its refs.
            // Patterns need a destination in libgit2; a download never writes it.
            let broad = [
                format!("+refs/heads/*:{TEMP_REF_PREFIX}fallback/heads/*"),
                format!("+refs/tags/*:{TEMP_REF_PREFIX}fallback/tags/*"),
                format!("+refs/nostr/*:{TEMP_REF_PREFIX}fallback/nostr/*"),
            ];
            if let Call::Failed(e) = self.call(&mut remote, &broad, http) {
                self.note(e);
            }
        } else {
            let asked = &left[..left.len().min(MAX_WANTS_PER_REQUEST)];
            self.fetch_by_id(&mut remote, vec![asked.to_vec()], http);
        }
    }

    /// One connection: the advertisement, then the download of the wanted ids it lists, on
    /// the same connection (`git://`; smart HTTP: its GET and one POST). When it lists none
    /// of them and the server allows wants by id, the connection asks for them by id instead
    /// (in [`FetchMode::Everything`] splitting the set on new connections if the server
    /// refuses it): returns `true` then, the probe is done.
    fn visit(
        &mut self,
        remote: &mut git2::Remote<'_>,
        missing: &[ObjectId],
        http: bool,
        mode: FetchMode,
    ) -> bool {
        // The first request's cell came with the fetch's slot.
        if !self.control.take_request() {
            self.note(throttled(self.control));
            return false;
        }
        let control = self.control;
        let _ = self.ctx.take_failure();
        match super::libgit2::connect_for_fetch(remote) {
            Ok(()) => {}
            Err(e) => {
                let stream_failure = self.ctx.take_failure();
                self.note(classify(
                    &e,
                    stream_failure,
                    control.should_stop(),
                    false,
                    false,
                ));
                return false;
            }
        };
        self.advertisement_read = true;
        self.ids_allowed = Some(super::libgit2::ids_allowed(remote));
        let wanted: HashSet<ObjectId> = missing.iter().copied().collect();
        // The first ref naming each wanted id, in the order advertised.
        let mut tips: Vec<(ObjectId, String)> = Vec::new();
        if let Ok(heads) = remote.list() {
            let mut seen = HashSet::new();
            for (i, h) in heads.iter().enumerate() {
                if i % CHECK_EVERY == CHECK_EVERY - 1 && self.stop_now() {
                    return false;
                }
                let oid = ObjectId::from_git(h.oid());
                if wanted.contains(&oid) && h.name().starts_with("refs/") && seen.insert(oid) {
                    tips.push((oid, h.name().to_owned()));
                }
            }
        }
        self.advertised = tips.iter().map(|(o, _)| *o).collect();
        self.advertised.sort_unstable();
        if self.stopped() {
            return false;
        }
        if tips.is_empty() {
            if self.ids_allowed != Some(true) {
                return false;
            }
            // Nothing wanted is advertised: the connection, open and unused, carries a probe
            // by id. It cannot cost what another server advertises (there is nothing to lose),
            // and a server that lacks the ids still costs one connection over `git://` (over
            // HTTP the POST, as a plain fetch would). In the first round the set is asked for
            // whole; in the second it is split on refusal.
            let asked = missing[..missing.len().min(MAX_WANTS_PER_REQUEST)].to_vec();
            let specs: Vec<String> = asked.iter().map(ObjectId::to_string).collect();
            if http && !self.control.take_request() {
                self.note(throttled(self.control));
                return true;
            }
            if let Call::Failed(e) = self.download(remote, &specs) {
                let end = ends_attempt(e.kind);
                self.note(e);
                if mode == FetchMode::Everything && !end && asked.len() > 1 {
                    let (a, b) = asked.split_at(asked.len() / 2);
                    self.fetch_by_id(remote, vec![b.to_vec(), a.to_vec()], http);
                }
            }
            return true;
        }
        // An advertised id may be wanted as such only where the server allows ids; its ref
        // name works everywhere.
        let specs: Vec<String> = if self.ids_allowed == Some(true) {
            tips.iter().map(|(o, _)| o.to_string()).collect()
        } else {
            tips.into_iter().map(|(_, name)| name).collect()
        };
        if http && !self.control.take_request() {
            // The POST is a request of its own.
            self.note(throttled(self.control));
            return false;
        }
        if let Call::Failed(e) = self.download(remote, &specs) {
            self.note(e);
        }
        false
    }

    /// Fetches each set of `work` (the last first) by id, splitting a set when the server
    /// refuses it as a whole; each request is a new connection.
    fn fetch_by_id(
        &mut self,
        remote: &mut git2::Remote<'_>,
        mut work: Vec<Vec<ObjectId>>,
        http: bool,
    ) {
        while let Some(set) = work.pop() {
            if self.fetches >= MAX_SPLIT_FETCHES || self.stop_now() {
                break;
            }
            let set = self.missing(&set);
            if set.is_empty() {
                continue;
            }
            let specs: Vec<String> = set.iter().map(ObjectId::to_string).collect();
            match self.call(remote, &specs, http) {
                Call::Done => {}
                Call::IdsNotAllowed => break,
                Call::Failed(e) => {
                    let end = ends_attempt(e.kind);
                    self.note(e);
                    if end {
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

    /// One libgit2 fetch of `refspecs` on a new connection: its cells of the quota first (the
    /// connection, and over HTTP the POST).
    fn call(&mut self, remote: &mut git2::Remote<'_>, refspecs: &[String], http: bool) -> Call {
        if let Err(e) = remote.disconnect() {
            log::debug!("disconnecting: {e}");
        }
        let cells = if http { 2 } else { 1 };
        for _ in 0..cells {
            if !self.control.take_request() {
                return Call::Failed(throttled(self.control));
            }
        }
        self.download(remote, refspecs)
    }

    /// libgit2's download of `refspecs`: on the remote's connection if it has one, else on a
    /// new one. Objects only: the download writes no ref.
    fn download(&mut self, remote: &mut git2::Remote<'_>, refspecs: &[String]) -> Call {
        let control = self.control;
        let pack_started = Cell::new(false);
        let mut callbacks = RemoteCallbacks::new();
        callbacks.transfer_progress(|p| {
            if p.received_bytes() > 0 || p.received_objects() > 0 || p.total_objects() > 0 {
                pack_started.set(true);
            }
            control.should_stop().is_none()
        });
        callbacks.sideband_progress(|_| control.should_stop().is_none());
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .download_tags(AutotagOption::None)
            .update_fetchhead(false)
            .follow_redirects(RemoteRedirect::None);
        if let Some(depth) = control.depth() {
            options.depth(i32::try_from(depth).unwrap_or(i32::MAX));
        }
        self.fetches += 1;
        let _ = self.ctx.take_failure();
        let result = remote.download(refspecs, Some(&mut options));
        drop(options);
        let stream_failure = self.ctx.take_failure();
        let call = match result {
            Ok(()) => Call::Done,
            Err(e)
                if e.class() == ErrorClass::Invalid && e.message().contains("specific object") =>
            {
                Call::IdsNotAllowed
            }
            Err(e) => {
                let advertised = remote.list().is_ok_and(|h| !h.is_empty());
                Call::Failed(classify(
                    &e,
                    stream_failure,
                    control.should_stop(),
                    pack_started.get(),
                    advertised,
                ))
            }
        };
        if let Err(e) = remote.disconnect() {
            log::debug!("disconnecting: {e}");
        }
        call
    }
}

/// The failure of a fetch that had to stop while it waited for its domain's quota.
fn throttled(control: &FetchControl) -> FetchError {
    control.should_stop().map_or_else(
        || FetchError::new(FailureKind::Cancelled, "stopped waiting for the quota"),
        stopped,
    )
}

/// The failure of a fetch stopped by the engine.
fn stopped(reason: StopReason) -> FetchError {
    match reason {
        StopReason::Deadline => FetchError::new(FailureKind::Deadline, "the fetch deadline passed"),
        StopReason::Cancelled => {
            FetchError::new(FailureKind::Cancelled, "the engine is shutting down")
        }
    }
}

/// Failures after which a further request to the same URL in this attempt is pointless.
fn ends_attempt(kind: FailureKind) -> bool {
    !matches!(
        kind,
        FailureKind::NotFound | FailureKind::Protocol | FailureKind::Network
    )
}

/// Sorts a failed libgit2 fetch into a [`FailureKind`], from facts first: the engine's own stop
/// (deadline, shutdown), then what the socket stream recorded (DNS, refused, timeout, size
/// cap), then libgit2's error class; message text is only read with URLs stripped out, so that
/// a repository named `ssl-tools` is not taken for a TLS failure.
fn classify(
    e: &git2::Error,
    stream: Option<(FailureKind, String)>,
    stop: Option<StopReason>,
    pack_started: bool,
    advertised: bool,
) -> FetchError {
    let message = sanitize(&strip_urls(e.message()));
    if let Some(reason) = stop {
        return stopped(reason);
    }
    if let Some((kind, msg)) = &stream {
        if *kind != FailureKind::Network {
            return FetchError::new(*kind, msg.clone());
        }
    }
    let lower = message.to_ascii_lowercase();
    if lower.contains("overly large object") {
        // libgit2's own check of `max_object_size`, before it allocates a delta's result.
        return FetchError::new(
            FailureKind::SizeCap,
            format!(
                "a delta in the pack builds an object larger than the object size limit: {message}"
            ),
        );
    }
    if e.class() == ErrorClass::Ssl
        || lower.contains("certificate")
        || lower.contains("ssl error")
        || (lower.contains("tls") && lower.contains("handshake"))
    {
        return FetchError::new(FailureKind::Tls, message);
    }
    if e.class() == ErrorClass::Http || lower.contains("http status") {
        let kind = if lower.contains("404") {
            FailureKind::NotFound
        } else {
            FailureKind::Protocol
        };
        return FetchError::new(kind, message);
    }
    if matches!(
        e.class(),
        ErrorClass::Odb
            | ErrorClass::Repository
            | ErrorClass::Reference
            | ErrorClass::Filesystem
            | ErrorClass::Index
    ) {
        return FetchError::new(FailureKind::LocalRepository, message);
    }
    if pack_started {
        let kind = if stream.is_some() {
            FailureKind::Network
        } else {
            FailureKind::Protocol
        };
        return FetchError::new(
            kind,
            format!("the transfer broke off in the middle of the pack: {message}"),
        );
    }
    if advertised {
        // The server listed its refs, then hung up on our wants without sending a pack: the
        // way servers say they lack a wanted object (libgit2 reports a broken pipe, an early
        // EOF or an unexpected packet, never the object).
        return FetchError::new(
            FailureKind::NotFound,
            format!("the server did not send the wanted objects: {message}"),
        );
    }
    match stream {
        Some((kind, msg)) => FetchError::new(kind, msg),
        None => FetchError::new(FailureKind::Protocol, message),
    }
}

/// A message from a server (or from libgit2 quoting one) made safe to log and show: control
/// characters (terminal escapes, CR, LF, NUL) and Unicode bidirectional controls become
/// spaces, and it is cut to 1 000 characters.
pub(crate) fn sanitize(message: &str) -> String {
    const MAX_CHARS: usize = 1000;
    let mut out: String = message
        .chars()
        .take(MAX_CHARS)
        .map(|c| {
            if c.is_control() || crate::validate::is_bidi_control(c) {
                ' '
            } else {
                c
            }
        })
        .collect();
    if message.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Replaces every URL in a message with `<url>`: URLs come from other people's events and must
/// neither leak credentials into logs nor sway classification.
pub(crate) fn strip_urls(message: &str) -> String {
    message
        .split_inclusive(char::is_whitespace)
        .map(|word| {
            if let Some(at) = word.find("://") {
                let start = word[..at]
                    .rfind(|c: char| {
                        !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
                    })
                    .map_or(0, |i| i + 1);
                let end = word[at..]
                    .find(|c: char| c.is_whitespace() || c == '\'' || c == '"')
                    .map_or(word.len(), |i| at + i);
                format!("{}<url>{}", &word[..start], &word[end..])
            } else {
                word.to_owned()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hide_refs_values_are_read_as_git_reads_them() {
        for (value, says) in [
            ("refs/purgatory-sync/", Some(true)),
            ("refs/purgatory-sync", Some(true)),
            ("refs/purgatory-sync//", Some(true)),
            ("^refs/purgatory-sync", Some(true)),
            ("refs", Some(true)),
            ("refs/", Some(true)),
            ("!refs/purgatory-sync/", Some(false)),
            ("!^refs", Some(false)),
            ("refs/purgatory-syncx", None),
            ("refs/purgatory-sync/x", None),
            ("!refs/purgatory-sync/x", None),
            ("refs/pull", None),
            ("re", None),
            ("", None),
            ("!", None),
        ] {
            assert_eq!(hide_refs_value_covers(value), says, "{value:?}");
        }
    }

    /// The values of `transfer.hideRefs` in the repository's own configuration.
    fn local_hide_refs(repo: &Repository) -> Vec<String> {
        let config = repo
            .config()
            .unwrap()
            .open_level(git2::ConfigLevel::Local)
            .unwrap();
        let mut values = Vec::new();
        if let Ok(mut entries) = config.multivar(HIDE_REFS_KEY, None) {
            while let Some(entry) = entries.next() {
                values.push(entry.unwrap().value().unwrap().to_owned());
            }
        }
        values
    }

    /// The socket stream and the allocator copy libgit2 1.9's C layouts by hand: handed to
    /// another series they could corrupt memory, so they are registered only with 1.9, and this
    /// build links 1.9 (so they are in use).
    #[test]
    fn the_hand_written_layouts_are_registered_only_with_libgit2_1_9() {
        use crate::fetch::libgit2::{check_layouts, linked_version};
        assert_eq!(
            check_layouts(linked_version()),
            Ok(()),
            "{:?}",
            linked_version()
        );
        assert!(check_layouts((1, 9, 0)).is_ok());
        assert!(check_layouts((1, 9, 42)).is_ok());
        for other in [(1, 8, 4), (1, 10, 0), (2, 9, 0), (0, 28, 5)] {
            let why = check_layouts(other).expect_err("another series is refused");
            let (major, minor, rev) = other;
            assert!(
                why.contains(&format!("libgit2 {major}.{minor}.{rev}")),
                "{why}"
            );
            assert!(why.contains("libgit2 1.9"), "{why}");
            assert_eq!(
                install_glue(other),
                Glue {
                    allocator: false,
                    stream: false
                },
                "nothing is registered with libgit2 {other:?}"
            );
        }
    }

    #[test]
    fn temporary_refs_are_hidden_once_and_an_administrators_choice_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r.git")).unwrap();
        assert!(hide_temp_refs(&repo).unwrap());
        assert!(!hide_temp_refs(&repo).unwrap(), "written once");
        assert_eq!(local_hide_refs(&repo), [TEMP_REF_PREFIX]);

        // Values that already hide the namespace, or show it on purpose, are left alone;
        // others are kept beside the new one.
        for (existing, added) in [
            ("refs", false),
            ("refs/purgatory-sync", false),
            ("!refs/purgatory-sync/", false),
            ("refs/pull", true),
            ("refs/purgatory-sync/scratch", true),
        ] {
            let repo = Repository::init_bare(dir.path().join(format!("{existing}.git"))).unwrap();
            repo.config()
                .unwrap()
                .open_level(git2::ConfigLevel::Local)
                .unwrap()
                .set_multivar(HIDE_REFS_KEY, "^$", existing)
                .unwrap();
            assert_eq!(hide_temp_refs(&repo).unwrap(), added, "{existing}");
            let mut want = vec![existing.to_owned()];
            if added {
                want.push(TEMP_REF_PREFIX.to_owned());
            }
            assert_eq!(local_hide_refs(&repo), want, "{existing}");
        }
    }

    #[test]
    fn urls_are_stripped_from_messages() {
        assert_eq!(
            strip_urls("failed to fetch 'https://user:pw@ssl-tools.example/x.git': 404"),
            "failed to fetch '<url>': 404"
        );
        assert_eq!(strip_urls("no url here"), "no url here");
        assert_eq!(strip_urls("from git://h:9418/r.git: EOF"), "from <url> EOF");
    }

    /// The connect-time checks hold under libgit2, for every transport, even for a URL the
    /// policy would pass (a name that resolves to a private address, a redirect, a rewrite).
    #[test]
    fn connections_go_only_to_the_urls_host_and_public_addresses() {
        use std::net::TcpListener;
        use std::sync::atomic::AtomicBool;
        use std::time::Duration;
        use std::time::Instant;

        let fetcher = GitFetcher::new();
        let dir = tempfile::tempdir().unwrap();
        Repository::init_bare(dir.path()).unwrap();
        let listener = TcpListener::bind("127.0.0.2:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let control = FetchControl::new(
            Instant::now() + Duration::from_secs(10),
            Arc::new(AtomicBool::new(false)),
        );
        let wanted: Vec<ObjectId> =
            vec!["e92758a50bbf13ea1fe986bbe254a709b0bf741c".parse().unwrap()];
        for scheme in ["git", "http", "https"] {
            let url = format!("{scheme}://127.0.0.2:{port}/r.git");
            let request = FetchRequest::new("id", dir.path(), url, wanted.clone());
            for (guard, says) in [
                (Guard::new("127.0.0.2", false), "resolves to 127.0.0.2"),
                (
                    Guard::new("127.0.0.3", true),
                    "the fetch is for host 127.0.0.3",
                ),
            ] {
                let report = fetcher.fetch_guarded(&request, &control, guard, Protocol::Opaque);
                let error = report.error.expect("refused");
                assert_eq!(error.kind, FailureKind::Refused, "{scheme}: {error}");
                assert!(error.message.contains(says), "{scheme}: {error}");
                assert_eq!(report.missing, wanted);
            }
        }
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a connection reached the server: {other:?}"),
        }
    }

    #[test]
    fn a_refused_url_is_not_fetched() {
        use std::sync::atomic::AtomicBool;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let have = ObjectId::from_git(repo.blob(b"hello").unwrap());
        let lack: ObjectId = "e92758a50bbf13ea1fe986bbe254a709b0bf741c".parse().unwrap();
        let control = FetchControl::new(
            Instant::now() + Duration::from_secs(10),
            Arc::new(AtomicBool::new(false)),
        );
        let mut wanted = vec![have, lack];
        wanted.sort_unstable();
        for url in [
            "file:///srv/x.git",
            "/srv/x.git",
            "ext::sh -c id",
            "https://u:p@git.example.com/x.git",
            "git://127.0.0.1/x.git",
            "http://localhost/x.git",
        ] {
            let request = FetchRequest::new("id", dir.path(), url, wanted.clone());
            let report = GitFetcher::new().fetch(&request, &control);
            let error = report.error.expect("refused");
            assert_eq!(error.kind, FailureKind::Refused, "{url}: {error}");
            assert!(
                error.message.starts_with("refused by the URL policy"),
                "{error}"
            );
            assert!(!error.message.contains("://"), "no URL in {error}");
            assert_eq!(report.present, [have], "{url}");
            assert_eq!(report.missing, [lack], "{url}");
        }
        let owned = control.with_url_policy(crate::UrlPolicy::new().our_domain("git.example.com"));
        let request = FetchRequest::new("id", dir.path(), "https://git.example.com/x", wanted);
        let error = GitFetcher::new().fetch(&request, &owned).error.unwrap();
        assert_eq!(error.kind, FailureKind::Refused, "{error}");
    }

    #[test]
    fn a_repository_named_ssl_tools_is_not_a_tls_failure() {
        let e = git2::Error::new(
            git2::ErrorCode::GenericError,
            ErrorClass::Net,
            "unexpected EOF from https://ssl-tools.example/certificate.git",
        );
        let f = classify(&e, None, None, false, true);
        assert_eq!(f.kind, FailureKind::NotFound, "{f}");
        assert!(!f.message.contains("ssl-tools"));
    }
}
