//! The scheduler's decisions, as a plain state machine.
//!
//! [`Queue`] owns the purgatory queue and decides everything: which entry is ready, which URL to
//! try next, when to back off, when an event is released or expired. It performs no I/O and
//! reads no clock: callers pass `now` and carry out the [`Action`]s it returns. The scheduler
//! thread is a thin loop around it, and unit tests drive it directly with a fake clock.
//!
//! An event with ref updates is not released when its last object arrives: it then *awaits its
//! refs*. The core asks for them to be written ([`Action::ApplyRefs`]) once no fetch runs in the
//! repository, and releases the event only when [`Queue::refs_applied`] reports success. A
//! failure is retried at the first pass a tick later, until the event's lifetime ends.
//!
//! Complete ref sets (repository states) with a `created_at` are ordered: the core remembers,
//! per repository, the newest one written, and releases an older one without writing it. An
//! older state also waits while a newer one of its repository awaits its refs, so that the
//! newer one is written last whichever is satisfied first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound::{Excluded, Unbounded};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::domains::Domains;
use super::ids::{EventIds, IdentifierUrls};
use crate::config::Config;
use crate::event::{ExpiryReason, Origin, Outcome, RefUpdate, RefsOutcome};
use crate::fetch::{FailureKind, FetchError, FetchMode, FetchReport, FetchRequest};
use crate::policy::CloneUrl;
use crate::stats::{FailureRecord, ReleaseHistogram, Stats};
use crate::ObjectId;

pub(crate) type EntryId = u64;
pub(crate) type JobId = u64;

/// A submitted event after validation on the host's thread.
#[derive(Debug, Clone)]
pub(crate) struct ValidEvent {
    pub id: Arc<str>,
    pub identifier: Arc<str>,
    pub repo: Arc<Path>,
    pub oids: Vec<ObjectId>,
    /// The ids not in the repository when the host submitted the event.
    pub missing: Vec<ObjectId>,
    pub urls: Vec<CloneUrl>,
    /// Refs to write, all or none, before the event is released; validated, oid targets in
    /// lower case.
    pub refs: Arc<[RefUpdate]>,
    /// `refs` are the repository's complete set of branches and tags
    /// ([`PendingEvent::replace_refs`](crate::PendingEvent::replace_refs)).
    pub replace_refs: bool,
    /// The event's creation time, Unix seconds, if the host gave it.
    pub created_at: Option<u64>,
    pub origin: Origin,
    /// When the host submitted it: delays and the lifetime count from here, not from when the
    /// scheduler got round to the command.
    pub submitted: Instant,
    /// For an event restored from the state file: when it expires and when its first attempt
    /// is due, instead of counting from `submitted`.
    pub restored: Option<(Instant, Instant)>,
}

/// An event read back from the state file, checked on the build thread.
#[derive(Debug)]
pub(crate) struct RestoredEvent {
    pub event: ValidEvent,
    /// Lifetime left when the file was written.
    pub remaining: Duration,
    /// How long it had waited when the file was written.
    pub waited: Duration,
    /// Why its repository cannot be used any more, if it cannot.
    pub gone: Option<String>,
}

/// What the host asks of the scheduler.
#[derive(Debug)]
pub(crate) enum Command {
    Submit(ValidEvent),
    GitDataArrived(String),
    Cancel(String),
}

/// A fetch for a worker.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub id: JobId,
    pub request: FetchRequest,
    /// Lets its requests after the first through with cells of its domain's quota.
    pub gate: Arc<super::domains::RequestGate>,
}

/// Something the scheduler loop must do for the core, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Run this fetch on a worker and hand the report to [`Queue::job_done`].
    Dispatch(Job),
    /// Send this outcome to the host.
    Emit(Outcome),
    /// Ask the repository which of `oids` it holds and hand the answer to [`Queue::checked`].
    Check {
        entry: EntryId,
        repo: Arc<Path>,
        oids: Vec<ObjectId>,
    },
    /// Remove the temporary refs of `oids`; the repository has no fetch running, and stays
    /// busy (no fetch, no ref write) until [`Queue::refs_dropped`].
    DropRefs {
        repo: Arc<Path>,
        oids: Vec<ObjectId>,
    },
    /// Write the event's ref updates in one transaction (with `replace_refs`, deleting the
    /// branches and tags they do not name) and hand the result to [`Queue::refs_applied`]; the
    /// repository has no fetch running.
    ApplyRefs {
        event_id: Arc<str>,
        repo: Arc<Path>,
        updates: Arc<[RefUpdate]>,
        replace_refs: bool,
    },
}

struct Entry {
    identifier: Arc<str>,
    repo: Arc<Path>,
    /// The waiting events, by submission order (`EventState::seq`).
    events: BTreeMap<u64, Arc<str>>,
    /// The clone URLs of the waiting events, each once (by fetch URL).
    urls: Vec<CloneUrl>,
    /// Parallel to `urls`: tried in the current attempt.
    tried: Vec<bool>,
    /// Parallel to `urls`: how many waiting events list it. A URL no event lists any more goes.
    url_events: Vec<u32>,
    /// Parallel to `urls`: whether the attempt's second round probes it for the ids its visit
    /// left missing.
    probe: Vec<Probe>,
    /// In this attempt some wanted object arrived or was advertised: the event's data is out
    /// there, so ids no server advertises are worth a split probe.
    evidence: bool,
    /// The attempt is in its second round: probing servers for ids they do not advertise,
    /// after every URL was asked for what it advertises.
    probing: bool,
    /// Which missing ids each URL advertised at its last visit (by fetch URL): the next
    /// attempt visits URLs that had some first. Bounded by the entry's URLs and missing ids.
    had: HashMap<Arc<str>, Vec<ObjectId>>,
    /// `urls` by fetch URL: adding a URL costs the same however many the entry has.
    url_index: HashMap<Arc<str>, usize>,
    /// The objects some waiting event misses, with how many events miss each.
    missing: HashMap<ObjectId, u32>,
    in_attempt: bool,
    /// Incomplete attempts in a row since the last new event.
    attempts: u32,
    /// When the entry is next ready; its key in `Queue::schedule` while not running.
    next_attempt: Instant,
    running: Option<JobId>,
    /// Earliest first-attempt time asked for by events that arrived during an attempt or a
    /// fetch.
    requested: Option<Instant>,
    /// The entry's turns in busy domains' queues: (domain, ticket). A turn is taken when an
    /// attempt finds a URL's domain without capacity, and is served when the domain has
    /// capacity again, oldest first: the URL is fetched then. It holds only that domain's
    /// turn: the entry stays on the schedule, so its other URLs, new URLs of new events and its
    /// backoff go on meanwhile. The ticket tells this turn's record in the domain's queue from
    /// stale ones.
    turns: Vec<(Arc<str>, u64)>,
}

struct EventState {
    entry: EntryId,
    oids: Vec<ObjectId>,
    missing: Vec<ObjectId>,
    submitted: Instant,
    expires: Instant,
    origin: Origin,
    /// The event's own clone URLs (the entry has every event's): for the state file, and to
    /// take them from the entry when the event leaves.
    urls: Vec<CloneUrl>,
    /// Submission order: events awaiting their refs get them in this order, so that a later
    /// event's refs win over an earlier one's written at the same pass.
    seq: u64,
    refs: Arc<[RefUpdate]>,
    replace_refs: bool,
    created_at: Option<u64>,
    /// An [`Action::ApplyRefs`] for it is out and not answered yet.
    applying: bool,
    /// After a failed ref update: not retried before this.
    retry_at: Option<Instant>,
    /// The last ref update failure.
    ref_error: Option<String>,
}

/// Whether an attempt's second round probes a URL for the ids its visit left missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    No,
    /// It advertised some of what is missing (the rest may be below its tips), or it allows
    /// no wants by id (its branches and tags may hold it).
    Yes,
    /// It advertised none and was asked for the whole set by id on its visit's connection,
    /// which it refused: a split probe, if the attempt found the data is out there.
    IfEvidence,
}

impl Probe {
    fn wanted(self, evidence: bool) -> bool {
        match self {
            Probe::No => false,
            Probe::Yes => true,
            Probe::IfEvidence => evidence,
        }
    }
}

impl Entry {
    /// Whether the attempt, in its first round, has URLs to probe in a second.
    fn wants_second_round(&self) -> bool {
        !self.probing && self.probe.iter().any(|p| p.wanted(self.evidence))
    }

    fn new(identifier: Arc<str>, repo: Arc<Path>, next_attempt: Instant) -> Self {
        Entry {
            identifier,
            repo,
            events: BTreeMap::new(),
            urls: Vec::new(),
            tried: Vec::new(),
            url_events: Vec::new(),
            probe: Vec::new(),
            evidence: false,
            probing: false,
            had: HashMap::new(),
            url_index: HashMap::new(),
            missing: HashMap::new(),
            in_attempt: false,
            attempts: 0,
            next_attempt,
            running: None,
            requested: None,
            turns: Vec::new(),
        }
    }

    /// Whether the entry waits for a turn in `domain`'s queue.
    fn waits_in(&self, domain: &str) -> bool {
        self.turns.iter().any(|(d, _)| &**d == domain)
    }

    /// One more event lists `url`.
    fn add_url(&mut self, url: &CloneUrl) {
        match self.url_index.get(&url.fetch_url) {
            Some(&i) => self.url_events[i] += 1,
            None => {
                self.url_index
                    .insert(url.fetch_url.clone(), self.urls.len());
                self.urls.push(url.clone());
                self.tried.push(false);
                self.url_events.push(1);
                self.probe.push(Probe::No);
            }
        }
    }

    /// One event fewer lists `url`; the last one takes it away.
    fn drop_url(&mut self, url: &CloneUrl) {
        let Some(&i) = self.url_index.get(&url.fetch_url) else {
            return;
        };
        self.url_events[i] -= 1;
        if self.url_events[i] > 0 {
            return;
        }
        self.url_index.remove(&url.fetch_url);
        self.had.remove(&url.fetch_url);
        self.urls.swap_remove(i);
        self.tried.swap_remove(i);
        self.url_events.swap_remove(i);
        self.probe.swap_remove(i);
        if let Some(moved) = self.urls.get(i) {
            self.url_index.insert(moved.fetch_url.clone(), i);
        }
    }

    /// Counts `oids` as missed by one more event.
    fn add_missing(&mut self, oids: &[ObjectId]) {
        for o in oids {
            *self.missing.entry(*o).or_default() += 1;
        }
    }

    /// Counts `oids` as missed by one event fewer.
    fn drop_missing(&mut self, oids: &[ObjectId]) {
        for o in oids {
            if let Some(n) = self.missing.get_mut(o) {
                *n -= 1;
                if *n == 0 {
                    self.missing.remove(o);
                }
            }
        }
    }

    /// Whether any waiting event misses objects.
    fn has_missing(&self) -> bool {
        !self.missing.is_empty()
    }

    /// The objects some waiting event misses, sorted.
    fn wanted(&self) -> Vec<ObjectId> {
        let mut w: Vec<ObjectId> = self.missing.keys().copied().collect();
        w.sort_unstable();
        w
    }
}

impl EventState {
    /// Every object is present but its refs are not written yet.
    fn awaits_refs(&self) -> bool {
        self.missing.is_empty() && !self.refs.is_empty()
    }

    /// The `created_at` of a complete ref set that has one: the events ordered by the newest
    /// state rule.
    fn state_created_at(&self) -> Option<u64> {
        self.created_at.filter(|_| self.replace_refs)
    }
}

/// The newest complete ref set written in a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NewestState {
    created_at: u64,
    /// Forgotten then: an older state can only wait in purgatory for one event lifetime.
    until: Instant,
}

struct Running {
    entry: EntryId,
    repo: Arc<Path>,
    identifier: Arc<str>,
    url: CloneUrl,
    /// When it was dispatched.
    started: Instant,
}

/// A fetch after which libgit2 still holds this much memory lost it to what the server sent
/// (libgit2 1.9 leaks the object of a delta that duplicates another), and the server's
/// endpoint goes on the naughty list. Below it, the memory may be a block libgit2 keeps on
/// purpose (a thread's last error message, a cache entry of a pack another handle shares).
pub(crate) const LEAK_NAUGHTY_BYTES: u64 = 1 << 20;

/// How many failures [`Stats::recent_failures`] keeps.
const RECENT_FAILURES: usize = 32;

#[derive(Default)]
struct Counters {
    submitted: u64,
    released: u64,
    expired: u64,
    cancelled: u64,
    rechecks: u64,
    refs_applied: u64,
    ref_failures: u64,
    fetches_started: u64,
    fetches_succeeded: u64,
    fetches_partial: u64,
    fetches_failed: u64,
    /// Memory libgit2 kept after fetches, lost for good (`FetchReport::memory_leaked`).
    memory_leaked: u64,
    failures: BTreeMap<FailureKind, u64>,
    recent_failures: VecDeque<FailureRecord>,
    /// The `waited` of every [`Outcome::Released`].
    release_times: ReleaseHistogram,
    /// How long each fetch ran, dispatch to report.
    fetch_durations: ReleaseHistogram,
    /// Bytes received by fetches that ended.
    bytes_received: u64,
}

/// The purgatory queue and every scheduling decision.
pub(crate) struct Queue {
    cfg: Arc<Config>,
    /// Events admitted by the handle and not yet gone; the handle increments it, the core
    /// decrements it when an event leaves.
    admitted: Arc<AtomicUsize>,
    entries: HashMap<EntryId, Entry>,
    by_key: HashMap<(Arc<str>, Arc<Path>), EntryId>,
    by_identifier: HashMap<Arc<str>, Vec<EntryId>>,
    by_repo: HashMap<Arc<Path>, Vec<EntryId>>,
    events: HashMap<Arc<str>, EventState>,
    /// Entries not running, ordered by next attempt: a pass reads only the ready front.
    schedule: BTreeSet<(Instant, EntryId)>,
    expiries: BTreeSet<(Instant, Arc<str>)>,
    expired_ids: HashMap<Arc<str>, Instant>,
    expired_order: VecDeque<(Instant, Arc<str>)>,
    /// `events` and `expired_ids` again, by id, for `submit` to read without this core's lock;
    /// changed together with them.
    ids: Arc<EventIds>,
    running: HashMap<JobId, Running>,
    busy_repos: HashSet<Arc<Path>>,
    busy_identifiers: HashSet<Arc<str>>,
    pending_drops: HashMap<Arc<Path>, Vec<ObjectId>>,
    /// For each repository, the objects its waiting events wait for (present or not), with how
    /// many events wait for each: a temporary ref is dropped only when none does.
    repo_needs: HashMap<Arc<Path>, HashMap<ObjectId, u32>>,
    /// The distinct clone URLs of each identifier's waiting events, for `submit` to cap without
    /// this core's lock; changed together with the entries.
    urls: Arc<IdentifierUrls>,
    /// Events whose objects are all present and whose refs are not written yet, by `seq`.
    awaiting_refs: BTreeMap<u64, Arc<str>>,
    /// The newest complete ref set with a `created_at` written in each repository.
    newest_states: HashMap<Arc<Path>, NewestState>,
    /// Repositories where the last [`flush_refs`](Self::flush_refs) held an older state back
    /// for a newer one awaiting its refs: the newer one's write releases it at once.
    held_back: HashSet<Arc<Path>>,
    actions: Vec<Action>,
    next_entry: EntryId,
    next_seq: u64,
    next_job: JobId,
    /// Numbers the turns entries take in domain queues.
    next_ticket: u64,
    stopping: bool,
    counters: Counters,
    domains: Domains,
    /// The latest `now` given to the core.
    last_now: Instant,
}

impl Queue {
    pub fn new(cfg: Arc<Config>, admitted: Arc<AtomicUsize>) -> Self {
        let cfg_for_domains = cfg.clone();
        let cfg_urls_cap = cfg.max_urls_per_identifier;
        Queue {
            cfg,
            admitted,
            entries: HashMap::new(),
            by_key: HashMap::new(),
            by_identifier: HashMap::new(),
            by_repo: HashMap::new(),
            events: HashMap::new(),
            schedule: BTreeSet::new(),
            expiries: BTreeSet::new(),
            expired_ids: HashMap::new(),
            expired_order: VecDeque::new(),
            ids: Arc::new(EventIds::default()),
            running: HashMap::new(),
            busy_repos: HashSet::new(),
            busy_identifiers: HashSet::new(),
            pending_drops: HashMap::new(),
            repo_needs: HashMap::new(),
            urls: Arc::new(IdentifierUrls::new(cfg_urls_cap)),
            awaiting_refs: BTreeMap::new(),
            newest_states: HashMap::new(),
            held_back: HashSet::new(),
            actions: Vec::new(),
            next_entry: 0,
            next_seq: 0,
            next_job: 0,
            next_ticket: 0,
            stopping: false,
            counters: Counters::default(),
            domains: Domains::new(cfg_for_domains),
            last_now: Instant::now(),
        }
    }

    /// The index of waiting and expired event ids, kept in step with this core.
    pub fn ids(&self) -> Arc<EventIds> {
        self.ids.clone()
    }

    /// The index of each identifier's distinct clone URLs, kept in step with this core.
    pub fn identifier_urls(&self) -> Arc<IdentifierUrls> {
        self.urls.clone()
    }

    /// The actions decided since the last call, in the order they must be carried out.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// How much longer `event_id` is refused because it expired, if it is (`submit` asks the
    /// id index, which says the same).
    #[cfg(test)]
    pub fn refused_for(&self, event_id: &str, now: Instant) -> Option<Duration> {
        let until = *self.expired_ids.get(event_id)?;
        (until > now).then(|| until - now)
    }

    /// No further fetch is dispatched; results of running ones are still taken.
    pub fn stop_dispatching(&mut self) {
        self.stopping = true;
    }

    pub fn in_flight(&self) -> usize {
        self.running.len()
    }

    pub fn command(&mut self, command: Command, now: Instant) {
        self.domains.set_now(now);
        self.last_now = self.last_now.max(now);
        match command {
            Command::Submit(ev) => self.submit(ev, now),
            Command::GitDataArrived(identifier) => self.recheck(&identifier),
            Command::Cancel(event_id) => {
                if self.events.contains_key(event_id.as_str()) {
                    self.counters.cancelled += 1;
                    self.leave(&event_id);
                }
            }
        }
    }

    /// Adds a validated event. Its work is independent of how many events and URLs its entry
    /// has already: sets and counts, no scans (a host command runs under the core's lock).
    fn submit(&mut self, ev: ValidEvent, now: Instant) {
        // A command may wait in the channel; never date an event in the future.
        let at = ev.submitted.min(now);
        if self.events.contains_key(&ev.id) || (ev.missing.is_empty() && ev.refs.is_empty()) {
            // Already waiting (a re-broadcast, or a submit the handle sent not knowing whether
            // a cancel would come first), or nothing to wait for: the handle counted it as
            // admitted and reserved its URLs, so give both back.
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            self.urls.release(&ev.identifier, &ev.urls);
            if ev.origin == Origin::User {
                self.republished_by_user(&ev.id, at);
            }
            return;
        }
        self.counters.submitted += 1;
        // An expired id that waits again (a user's, or one whose data arrived since) is no
        // longer refused. Its record in `expired_order` goes stale: pruning compares it with
        // the map, and `set_waiting` below replaces the index's state.
        self.expired_ids.remove(&ev.id);
        let target = match ev.restored {
            Some((_, first_attempt)) => first_attempt,
            None => at + self.cfg.first_delay(ev.origin),
        };
        // An event with every object present only awaits its refs: no fetch for it.
        let wants = !ev.missing.is_empty();
        let key = (ev.identifier.clone(), ev.repo.clone());
        let id = match self.by_key.get(&key) {
            Some(&id) => {
                if wants {
                    self.ask_attempt(id, target);
                }
                id
            }
            None => {
                let id = self.next_entry;
                self.next_entry += 1;
                self.entries.insert(
                    id,
                    Entry::new(ev.identifier.clone(), ev.repo.clone(), target),
                );
                self.by_key.insert(key, id);
                self.by_identifier
                    .entry(ev.identifier.clone())
                    .or_default()
                    .push(id);
                self.by_repo.entry(ev.repo.clone()).or_default().push(id);
                if wants {
                    self.schedule.insert((target, id));
                }
                id
            }
        };
        let expires = match ev.restored {
            Some((expires, _)) => expires,
            None => at + self.cfg.event_lifetime,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let e = self.entries.get_mut(&id).expect("entry exists");
        e.events.insert(seq, ev.id.clone());
        for url in &ev.urls {
            e.add_url(url);
        }
        e.add_missing(&ev.missing);
        let needs = self.repo_needs.entry(ev.repo.clone()).or_default();
        for o in &ev.oids {
            *needs.entry(*o).or_default() += 1;
        }
        self.expiries.insert((expires, ev.id.clone()));
        if !wants {
            // Refs are written at the next pass.
            self.awaiting_refs.insert(seq, ev.id.clone());
        }
        self.ids.set_waiting(ev.id.clone());
        self.events.insert(
            ev.id,
            EventState {
                entry: id,
                oids: ev.oids,
                missing: ev.missing,
                submitted: at,
                expires,
                origin: ev.origin,
                urls: ev.urls,
                seq,
                refs: ev.refs,
                replace_refs: ev.replace_refs,
                created_at: ev.created_at,
                applying: false,
                retry_at: None,
                ref_error: None,
            },
        );
    }

    /// An event that misses objects joins entry `id`, asking for an attempt at `target`: the
    /// count of attempts starts over and the next attempt moves earlier, never later.
    fn ask_attempt(&mut self, id: EntryId, target: Instant) {
        let e = self.entries.get_mut(&id).expect("indexed entry exists");
        // An entry whose events all await their refs is not scheduled: the first event
        // that misses objects schedules it as if it were new.
        let idle = !e.has_missing();
        e.attempts = 0;
        if idle && e.running.is_none() {
            e.in_attempt = false;
            e.requested = None;
        }
        if e.in_attempt || e.running.is_some() {
            e.requested = Some(e.requested.map_or(target, |r| r.min(target)));
        }
        // An entry waiting for a busy domain's turn is on the schedule like any other: the
        // new event's URLs are tried at its time.
        if e.running.is_none() && (idle || target < e.next_attempt) {
            self.schedule.remove(&(e.next_attempt, id));
            e.next_attempt = target;
            self.schedule.insert((target, id));
        }
    }

    /// A user published `id`, which may wait as a synced event: it becomes a user event, as
    /// the reference relay upgrades it, and so its lifetime starts again at `at` (never ending
    /// sooner than it would have) and its entry is asked for an attempt as by a new user
    /// event. A user event published again is left as it is.
    fn republished_by_user(&mut self, id: &Arc<str>, at: Instant) {
        let Some(state) = self.events.get_mut(id) else {
            return;
        };
        if state.origin != Origin::Sync {
            return;
        }
        state.origin = Origin::User;
        let expires = state.expires.max(at + self.cfg.event_lifetime);
        self.expiries.remove(&(state.expires, id.clone()));
        self.expiries.insert((expires, id.clone()));
        state.expires = expires;
        if !state.missing.is_empty() {
            let entry = state.entry;
            self.ask_attempt(entry, at + self.cfg.first_delay(Origin::User));
        }
    }

    /// Whether any event of the entry still misses objects.
    fn has_missing(&self, id: EntryId) -> bool {
        self.entries[&id].has_missing()
    }

    fn recheck(&mut self, identifier: &str) {
        let Some(ids) = self.by_identifier.get(identifier) else {
            return;
        };
        for &id in ids {
            let e = &self.entries[&id];
            let oids = e.wanted();
            if oids.is_empty() {
                // Its events only await their refs.
                continue;
            }
            self.counters.rechecks += 1;
            self.actions.push(Action::Check {
                entry: id,
                repo: e.repo.clone(),
                oids,
            });
        }
    }

    /// The answer to an [`Action::Check`].
    pub fn checked(
        &mut self,
        entry: EntryId,
        result: Result<Vec<ObjectId>, FetchError>,
        now: Instant,
    ) {
        match result {
            Ok(present) => {
                if self.entries.contains_key(&entry) {
                    self.apply_present(entry, &present, now);
                    self.remove_if_empty(entry);
                    // Satisfied events' refs are written, and released events' temporary refs
                    // go, now rather than at the next wake.
                    self.flush_refs(now);
                    self.flush_drops();
                }
            }
            Err(e) => log::warn!("could not re-check repository: {e}"),
        }
    }

    /// One decision pass: expire, forget old expired ids, drop temporary refs and write the
    /// ref updates of satisfied events in idle repositories, dispatch ready entries to free
    /// workers.
    pub fn pass(&mut self, now: Instant) {
        self.domains.set_now(now);
        self.last_now = self.last_now.max(now);
        self.domains.prune(now);
        self.expire(now);
        while let Some((until, _)) = self.expired_order.front() {
            if *until > now {
                break;
            }
            let (until, id) = self.expired_order.pop_front().expect("front exists");
            if self.expired_ids.get(&id) == Some(&until) {
                self.expired_ids.remove(&id);
            }
            self.ids.forget_expired(&id, until);
        }
        self.newest_states.retain(|_, n| n.until > now);
        self.flush_drops();
        // Before dispatch, which could make a repository busy again.
        self.flush_refs(now);
        self.dispatch(now);
    }

    /// Asks for the ref updates of events awaiting them in repositories with no fetch
    /// running, unless already asked or a failure is not a tick old yet. A complete ref set
    /// older than one written in its repository is released without being written; one older
    /// than another awaiting its refs in its repository waits for that one.
    fn flush_refs(&mut self, now: Instant) {
        // The newest complete set awaiting its refs in each repository.
        let mut newest_awaiting: HashMap<&Arc<Path>, u64> = HashMap::new();
        for ev in self.awaiting_refs.values() {
            let state = &self.events[ev];
            if let Some(at) = state.state_created_at() {
                let newest = newest_awaiting
                    .entry(&self.entries[&state.entry].repo)
                    .or_insert(at);
                *newest = (*newest).max(at);
            }
        }
        let mut skipped = Vec::new();
        self.held_back.clear();
        for ev in self.awaiting_refs.values() {
            let state = self.events.get_mut(ev).expect("awaiting events wait");
            if state.applying {
                continue;
            }
            let repo = &self.entries[&state.entry].repo;
            if let Some(at) = state.state_created_at() {
                let written = self.newest_states.get(repo).filter(|n| n.until > now);
                if let Some(newer) = written.filter(|n| n.created_at > at) {
                    skipped.push((ev.clone(), newer.created_at));
                    continue;
                }
                if newest_awaiting.get(repo).is_some_and(|n| *n > at) {
                    self.held_back.insert(repo.clone());
                    continue;
                }
            }
            if state.retry_at.is_some_and(|t| t > now) || self.busy_repos.contains(repo) {
                continue;
            }
            state.applying = true;
            self.actions.push(Action::ApplyRefs {
                event_id: ev.clone(),
                repo: repo.clone(),
                updates: state.refs.clone(),
                replace_refs: state.replace_refs,
            });
        }
        for (ev, newer_created_at) in skipped {
            self.release(&ev, RefsOutcome::skipped_older_state(newer_created_at), now);
        }
        if !self.pending_drops.is_empty() {
            self.flush_drops();
        }
    }

    /// The answer to an [`Action::ApplyRefs`]: on success the event is released, on failure
    /// it is retried a tick later.
    pub fn refs_applied(&mut self, event_id: &str, result: Result<(), FetchError>, now: Instant) {
        let Some(state) = self.events.get_mut(event_id) else {
            return;
        };
        if !std::mem::take(&mut state.applying) {
            return;
        }
        match result {
            Ok(()) => {
                self.counters.refs_applied += 1;
                if let Some(at) = state.state_created_at() {
                    let repo = self.entries[&state.entry].repo.clone();
                    let until = now + self.cfg.event_lifetime;
                    let newest = self.newest_states.entry(repo).or_insert(NewestState {
                        created_at: at,
                        until,
                    });
                    if newest.until <= now {
                        newest.created_at = at;
                    }
                    newest.created_at = newest.created_at.max(at);
                    newest.until = until;
                }
                let repo = self.entries[&self.events[event_id].entry].repo.clone();
                self.release(event_id, RefsOutcome::Written, now);
                // Older states held back for this one are released now, not at the next
                // pass; other writes need no new look at every event awaiting its refs.
                if self.held_back.contains(&repo) {
                    self.flush_refs(now);
                }
                self.flush_drops();
            }
            Err(e) => {
                self.counters.ref_failures += 1;
                log::warn!(
                    "could not write the refs of event {event_id} in {}, retrying: {e}",
                    self.entries[&state.entry].repo.display()
                );
                state.retry_at = Some(now + self.cfg.tick);
                state.ref_error = Some(e.message);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.expiries.first() {
            if *at > now {
                break;
            }
            let (_, id) = self.expiries.pop_first().expect("first exists");
            let Some(ev) = self.events.get(&id) else {
                continue;
            };
            let e = &self.entries[&ev.entry];
            let reason = match &ev.ref_error {
                Some(message) if ev.awaits_refs() => ExpiryReason::RefUpdateFailed {
                    message: message.clone(),
                },
                _ => ExpiryReason::LifetimeEnded,
            };
            let outcome = Outcome::Expired {
                event_id: id.to_string(),
                identifier: e.identifier.to_string(),
                repo: e.repo.to_path_buf(),
                missing: ev.missing.iter().map(ObjectId::to_string).collect(),
                reason,
            };
            self.counters.expired += 1;
            self.actions.push(Action::Emit(outcome));
            self.remember_expiry(&id, now);
            self.leave(&id);
        }
    }

    /// Refuses `id`, which expired at `now`, for `expired_memory` (not at all when that is
    /// zero).
    fn remember_expiry(&mut self, id: &Arc<str>, now: Instant) {
        if !self.cfg.expired_memory.is_zero() {
            self.remember_expired(id.clone(), now + self.cfg.expired_memory);
        }
    }

    /// Refuses `id` until `until`: in the map, the id index and the pruning order together.
    fn remember_expired(&mut self, id: Arc<str>, until: Instant) {
        self.expired_ids.insert(id.clone(), until);
        self.ids.set_expired(id.clone(), until);
        self.expired_order.push_back((until, id));
    }

    fn flush_drops(&mut self) {
        let idle: Vec<Arc<Path>> = self
            .pending_drops
            .keys()
            .filter(|r| !self.busy_repos.contains(*r))
            .cloned()
            .collect();
        for repo in idle {
            let mut oids = self.pending_drops.remove(&repo).unwrap_or_default();
            // Another waiting event of the same repository may still need an object.
            let needs = self.repo_needs.get(&repo);
            oids.retain(|o| needs.is_none_or(|n| !n.contains_key(o)));
            oids.sort_unstable();
            oids.dedup();
            if !oids.is_empty() {
                // Busy until the refs are gone (`refs_dropped`): no fetch or ref write starts
                // in the repository meanwhile.
                self.busy_repos.insert(repo.clone());
                self.actions.push(Action::DropRefs { repo, oids });
            }
        }
    }

    /// The temporary refs of an [`Action::DropRefs`] are gone (or could not be removed):
    /// the repository is free again.
    pub fn refs_dropped(&mut self, repo: &Arc<Path>) {
        self.busy_repos.remove(repo);
    }

    fn dispatch(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        // Identifiers waiting for a domain's capacity come before newly ready ones.
        self.serve_domain_queues(now);
        // Entries whose repository or identifier is busy stay at the front; step past them.
        let mut after: Option<(Instant, EntryId)> = None;
        while self.running.len() < self.cfg.workers {
            let next = match after {
                None => self.schedule.first().copied(),
                Some(k) => self
                    .schedule
                    .range((Excluded(k), Unbounded))
                    .next()
                    .copied(),
            };
            let Some((at, id)) = next else {
                break;
            };
            if at > now {
                break;
            }
            if !self.has_missing(id) {
                // Its events only await their refs: nothing to fetch until an event that
                // misses objects schedules it again.
                self.schedule.remove(&(at, id));
                continue;
            }
            let e = &self.entries[&id];
            if self.busy_repos.contains(&e.repo) || self.busy_identifiers.contains(&e.identifier) {
                after = Some((at, id));
                continue;
            }
            self.schedule.remove(&(at, id));
            self.start_next_fetch(id, now);
        }
    }

    /// Dispatches the entry's next untried URL whose domain has capacity. A URL whose domain
    /// has none (its slots or quota taken, or others waiting for it) costs the entry a turn in
    /// that domain's queue instead; when no URL can start now, the attempt ends with its
    /// backoff, and the turns wait on. An attempt with no usable URL left ends too.
    fn start_next_fetch(&mut self, id: EntryId, now: Instant) {
        let e = self.entries.get_mut(&id).expect("scheduled entry exists");
        if !e.in_attempt {
            e.in_attempt = true;
            e.requested = None;
            e.probing = false;
            e.tried.iter_mut().for_each(|t| *t = false);
            e.probe.iter_mut().for_each(|p| *p = Probe::No);
            e.evidence = false;
        }
        // URLs of our own domain or on the naughty list count as tried: they are not fetched.
        for (i, url) in e.urls.iter().enumerate() {
            if !e.tried[i] && !self.domains.usable(url, now) {
                e.tried[i] = true;
            }
        }
        if e.tried.iter().all(|t| *t) && e.wants_second_round() {
            // Every URL was asked for what it advertises and objects are still missing: the
            // second round probes the servers that may have them unadvertised.
            e.probing = true;
            let evidence = e.evidence;
            for (t, p) in e.tried.iter_mut().zip(&e.probe) {
                *t = !p.wanted(evidence);
            }
            e.probe.iter_mut().for_each(|p| *p = Probe::No);
        }
        let mut untried: Vec<usize> = (0..e.urls.len()).filter(|i| !e.tried[*i]).collect();
        // URLs that advertised missing ids last time first, then those not visited yet, then
        // those that had none of them.
        let rank = |i: &usize| match e.had.get(&e.urls[*i].fetch_url) {
            Some(ids) if ids.iter().any(|o| e.missing.contains_key(o)) => 0,
            None => 1,
            Some(_) => 2,
        };
        untried.sort_by_cached_key(|i| (rank(i), *i));
        let mut busy: Vec<Arc<str>> = Vec::new();
        for &i in &untried {
            let e = &self.entries[&id];
            let domain = e.urls[i].domain.clone();
            // Nobody jumps a domain's queue, the entry itself neither: a turn it holds is
            // served by the queue.
            if e.waits_in(&domain) || self.first_waiting(&domain).is_some() {
                busy.push(domain);
                continue;
            }
            if self.domains.try_acquire(&domain, now).is_ok() {
                self.launch(id, i, now);
                return;
            }
            busy.push(domain);
        }
        busy.sort();
        busy.dedup();
        for domain in busy {
            self.take_turn(id, domain);
        }
        self.finish_attempt(id, now);
    }

    /// Queues the entry for a turn in `domain`, unless it waits there already.
    fn take_turn(&mut self, id: EntryId, domain: Arc<str>) {
        let e = self.entries.get_mut(&id).expect("entry exists");
        if e.waits_in(&domain) {
            return;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.domains.park(&domain, id, ticket);
        e.turns.push((domain, ticket));
    }

    /// The entry no longer waits for a turn in `domain`: its record there goes stale.
    fn leave_turn(&mut self, id: EntryId, domain: &str) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let before = e.turns.len();
        e.turns.retain(|(d, _)| &**d != domain);
        if e.turns.len() < before {
            self.domains.leave(domain);
        }
    }

    /// The entry no longer waits for any turn (it left, or needs no fetch any more).
    fn unpark(&mut self, id: EntryId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        for (d, _) in std::mem::take(&mut e.turns) {
            self.domains.leave(&d);
        }
    }

    /// Whether a queued (entry, ticket) still waits.
    fn still_parked(&self, id: EntryId, ticket: u64) -> bool {
        parked_at(&self.entries, id, ticket)
    }

    /// The first entry still waiting in `domain`'s queue, dropping stale ones in front of it.
    fn first_waiting(&mut self, domain: &Arc<str>) -> Option<EntryId> {
        loop {
            let &(id, ticket) = self.domains.queue(domain).front()?;
            if self.still_parked(id, ticket) {
                return Some(id);
            }
            self.domains.queue(domain).pop_front();
        }
    }

    /// Serves the turns waiting in domain queues, oldest first in each domain, while the
    /// domain has capacity and workers are free. Runs at every pass, so capacity that returns
    /// by a completed fetch or by the rate quota refilling (with nothing in flight) is used.
    fn serve_domain_queues(&mut self, now: Instant) {
        for domain in self.domains.with_queues() {
            while self.running.len() < self.cfg.workers && self.domains.has_slot(&domain) {
                // The oldest turn whose entry, repository and identifier are free. The scan
                // stops at the first one: turns in front of it are stale or busy, and at most
                // `workers` entries are busy.
                let mut pick = None;
                let queue = self.domains.queue_of(&domain).into_iter().flatten();
                for (pos, (id, ticket)) in queue.enumerate() {
                    if !self.still_parked(*id, *ticket) {
                        continue;
                    }
                    let e = &self.entries[id];
                    if e.running.is_some()
                        || self.busy_repos.contains(&e.repo)
                        || self.busy_identifiers.contains(&e.identifier)
                    {
                        continue;
                    }
                    let url = (0..e.urls.len()).find(|i| {
                        !e.tried[*i]
                            && e.urls[*i].domain == domain
                            && self.domains.usable(&e.urls[*i], now)
                    });
                    pick = Some((pos, *id, url));
                    break;
                }
                let Some((pos, id, url)) = pick else {
                    break;
                };
                let Some(i) = url else {
                    // Nothing left to fetch on this domain; other turns may still wait.
                    self.domains.queue(&domain).remove(pos);
                    self.leave_turn(id, &domain);
                    continue;
                };
                if self.domains.try_acquire(&domain, now).is_err() {
                    break;
                }
                self.domains.queue(&domain).remove(pos);
                self.leave_turn(id, &domain);
                self.launch(id, i, now);
            }
            // Drop what went stale (the statistics count only live records either way).
            let entries = &self.entries;
            self.domains
                .tidy_queue(&domain, |id, ticket| parked_at(entries, id, ticket));
        }
    }

    /// Starts the fetch of the entry's URL `i`; the domain's permit is taken. The entry leaves
    /// the schedule while the fetch runs (it may be there at its backoff time, when a turn
    /// starts the fetch).
    fn launch(&mut self, id: EntryId, i: usize, now: Instant) {
        let e = self.entries.get_mut(&id).expect("entry exists");
        self.schedule.remove(&(e.next_attempt, id));
        e.tried[i] = true;
        let job_id = self.next_job;
        self.next_job += 1;
        e.running = Some(job_id);
        let e = &self.entries[&id];
        let mode = if e.probing {
            FetchMode::Everything
        } else {
            FetchMode::OneVisit
        };
        let request = FetchRequest::new(
            e.identifier.to_string(),
            e.repo.to_path_buf(),
            e.urls[i].fetch_url.to_string(),
            e.wanted(),
        )
        .with_mode(mode);
        let gate = self.domains.gate(&e.urls[i].domain);
        self.busy_repos.insert(e.repo.clone());
        self.busy_identifiers.insert(e.identifier.clone());
        self.running.insert(
            job_id,
            Running {
                entry: id,
                repo: e.repo.clone(),
                identifier: e.identifier.clone(),
                url: e.urls[i].clone(),
                started: now,
            },
        );
        self.counters.fetches_started += 1;
        self.actions.push(Action::Dispatch(Job {
            id: job_id,
            request,
            gate,
        }));
    }

    /// The durable state: waiting events with their remaining lifetimes, the expired-id
    /// memory, the naughty list. `wall_ms` is `now` on the wall clock.
    ///
    /// A checkpoint calls this under the core's lock, so it only copies shared handles and
    /// plain values; [`Snapshot::into_state_file`] makes the file's text outside the lock.
    pub fn snapshot(&self, now: Instant, wall_ms: u64) -> crate::persist::Snapshot {
        let events = self
            .events
            .iter()
            .map(|(id, ev)| {
                let e = &self.entries[&ev.entry];
                crate::persist::SnapshotEvent {
                    seq: ev.seq,
                    id: Arc::clone(id),
                    identifier: Arc::clone(&e.identifier),
                    repo: Arc::clone(&e.repo),
                    oids: ev.oids.clone(),
                    urls: ev.urls.iter().map(|u| u.url.clone()).collect(),
                    origin: ev.origin,
                    refs: Arc::clone(&ev.refs),
                    replace_refs: ev.replace_refs,
                    created_at: ev.created_at,
                    remaining: ev.expires.saturating_duration_since(now),
                    waited: now.saturating_duration_since(ev.submitted),
                }
            })
            .collect();
        let expired_ids = self
            .expired_ids
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(id, until)| (Arc::clone(id), until.saturating_duration_since(now)))
            .collect();
        let newest_states = self
            .newest_states
            .iter()
            .filter(|(_, n)| n.until > now)
            .map(|(repo, n)| (Arc::clone(repo), n.created_at, n.until - now))
            .collect();
        crate::persist::Snapshot {
            written_at_ms: wall_ms,
            events,
            expired_ids,
            naughty: self.domains.save(now, wall_ms),
            newest_states,
        }
    }

    /// Takes back the newest complete ref set written in each repository from the state file
    /// read at start, `downtime` after it was written: `(repository, created_at, time it was
    /// still remembered at the write)`. Called before [`restore`](Self::restore), so that the
    /// restored events are held to them.
    pub fn restore_newest_states(
        &mut self,
        states: Vec<(Arc<Path>, u64, Duration)>,
        downtime: Duration,
        now: Instant,
    ) {
        for (repo, created_at, left) in states {
            if left <= downtime {
                continue;
            }
            let until = now + (left - downtime);
            let newest = self
                .newest_states
                .entry(repo)
                .or_insert(NewestState { created_at, until });
            if created_at >= newest.created_at {
                *newest = NewestState { created_at, until };
            }
        }
    }

    /// Rebuilds the queue from a state file read at start, `downtime` after it was written.
    /// Events whose lifetime ended meanwhile, or whose repository is gone, expire at once;
    /// events whose objects arrived meanwhile are released at the first pass; the others wait,
    /// their first attempt after the sync delay.
    pub fn restore(
        &mut self,
        events: Vec<RestoredEvent>,
        expired_ids: Vec<(Arc<str>, Duration)>,
        naughty: Vec<crate::persist::NaughtyRecord>,
        downtime: Duration,
        now: Instant,
        wall_ms: u64,
    ) {
        self.domains.set_now(now);
        self.last_now = self.last_now.max(now);
        for (id, left) in expired_ids {
            if left > downtime {
                self.remember_expired(id, now + (left - downtime));
            }
        }
        self.expired_order.make_contiguous().sort();
        self.domains.restore(naughty, downtime, now, wall_ms);
        for r in events {
            let RestoredEvent {
                mut event,
                remaining,
                waited,
                gone,
            } = r;
            let waited = waited + downtime;
            let submitted = now.checked_sub(waited).unwrap_or(now);
            let expire = |core: &mut Self, reason: ExpiryReason, missing: &[ObjectId]| {
                core.counters.expired += 1;
                core.actions.push(Action::Emit(Outcome::Expired {
                    event_id: event.id.to_string(),
                    identifier: event.identifier.to_string(),
                    repo: event.repo.to_path_buf(),
                    missing: missing.iter().map(ObjectId::to_string).collect(),
                    reason,
                }));
                core.remember_expiry(&event.id, now);
            };
            if let Some(message) = gone {
                let all = event.oids.clone();
                expire(self, ExpiryReason::RepositoryGone { message }, &all);
                continue;
            }
            if remaining <= downtime {
                let missing = event.missing.clone();
                expire(self, ExpiryReason::LifetimeEnded, &missing);
                continue;
            }
            if event.missing.is_empty() && event.refs.is_empty() {
                // Pushed while the engine was down.
                self.emit_released(
                    &event.id,
                    &event.identifier,
                    &event.repo,
                    waited,
                    RefsOutcome::NoRefUpdates,
                );
                continue;
            }
            event.submitted = submitted;
            event.restored = Some((now + (remaining - downtime), now + self.cfg.sync_delay));
            // Counted as the handle counts a submit, but never refused: the events were waiting.
            self.admitted.fetch_add(1, Ordering::SeqCst);
            self.urls.reserve_uncapped(&event.identifier, &event.urls);
            self.submit(event, now);
        }
    }

    /// When the scheduler must wake by itself: the next scheduled attempt, expiry, expired-id
    /// pruning or rate-quota refill after `now`. Entries that are ready but wait for a worker
    /// or a busy repository are not included: a job result wakes the scheduler for those.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        let after = (now, EntryId::MAX);
        [
            self.schedule
                .range((Excluded(after), Unbounded))
                .next()
                .map(|(t, _)| *t),
            self.expiries.first().map(|(t, _)| *t).filter(|t| *t > now),
            self.expired_order
                .front()
                .map(|(t, _)| *t)
                .filter(|t| *t > now),
            self.domains.next_wake(now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Ends the entry's attempt and schedules the next one after the backoff (or earlier, if a
    /// new event asked for it). Turns in busy domains' queues wait on.
    fn finish_attempt(&mut self, id: EntryId, now: Instant) {
        let e = self.entries.get_mut(&id).expect("entry exists");
        e.in_attempt = false;
        e.attempts = e.attempts.saturating_add(1);
        let mut next = now + self.cfg.backoff(e.attempts);
        if let Some(r) = e.requested.take() {
            next = next.min(r);
        }
        e.next_attempt = next;
        self.schedule.insert((next, id));
    }

    /// The report of a dispatched fetch.
    pub fn job_done(&mut self, job: JobId, report: FetchReport, now: Instant) {
        self.domains.set_now(now);
        self.last_now = self.last_now.max(now);
        let Some(run) = self.running.remove(&job) else {
            return;
        };
        self.busy_repos.remove(&run.repo);
        self.busy_identifiers.remove(&run.identifier);
        // An error with some wanted objects present after all: a server that had only some.
        let partial = !report.present.is_empty();
        self.domains.release(
            &run.url,
            report.error.as_ref().map(|e| (e.kind, e.message.as_str())),
            partial,
            report.bytes_received,
            now,
        );
        self.counters.bytes_received = self
            .counters
            .bytes_received
            .saturating_add(report.bytes_received);
        self.counters
            .fetch_durations
            .observe(now.saturating_duration_since(run.started));
        if report.memory_leaked > 0 {
            self.counters.memory_leaked = self
                .counters
                .memory_leaked
                .saturating_add(report.memory_leaked);
            if report.memory_leaked >= LEAK_NAUGHTY_BYTES {
                self.domains.hostile(
                    &run.url,
                    format!(
                        "libgit2 lost {} bytes on what this server sent (objects that \
                         duplicate others)",
                        report.memory_leaked
                    ),
                    now,
                );
            }
        }
        match &report.error {
            None => self.counters.fetches_succeeded += 1,
            Some(e) => {
                if partial {
                    self.counters.fetches_partial += 1;
                } else {
                    self.counters.fetches_failed += 1;
                    *self.counters.failures.entry(e.kind).or_default() += 1;
                }
                if self.counters.recent_failures.len() == RECENT_FAILURES {
                    self.counters.recent_failures.pop_front();
                }
                self.counters.recent_failures.push_back(FailureRecord {
                    identifier: run.identifier.to_string(),
                    url: run.url.url.to_string(),
                    kind: e.kind,
                    message: e.message.clone(),
                });
            }
        }
        let id = run.entry;
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        e.running = None;
        if let Some(&i) = e.url_index.get(&run.url.fetch_url) {
            if report.advertisement_read {
                e.had
                    .insert(run.url.fetch_url.clone(), report.advertised.clone());
                if !report.advertised.is_empty() || !report.present.is_empty() {
                    e.evidence = true;
                }
                let lacking = report
                    .error
                    .as_ref()
                    .is_some_and(|e| e.kind == FailureKind::NotFound);
                // What it advertised was asked for: a probe would only ask again.
                let advertised: HashSet<&ObjectId> = report.advertised.iter().collect();
                let unadvertised = report
                    .missing
                    .iter()
                    .filter(|o| !advertised.contains(o))
                    .count();
                e.probe[i] =
                    if e.probing || !lacking || unadvertised == 0 || report.ids_allowed.is_none() {
                        Probe::No
                    } else if report.ids_allowed == Some(true) && report.advertised.is_empty() {
                        // Probed by id on its visit's connection, the set whole: split only if
                        // the data is known to be out there and there is a set to split.
                        if unadvertised > 1 {
                            Probe::IfEvidence
                        } else {
                            Probe::No
                        }
                    } else {
                        // It advertised some of what is missing and may have the rest
                        // unadvertised, or it allows no wants by id and may have it below its
                        // tips.
                        Probe::Yes
                    };
            }
        }
        let mut present = report.present;
        present.sort_unstable();
        self.apply_present(id, &present, now);
        if self.remove_if_empty(id) {
            return;
        }
        let idle = !self.has_missing(id);
        let e = self.entries.get_mut(&id).expect("entry still waits");
        if idle {
            // Every object arrived and the events left await their refs: the attempt is over,
            // and the entry waits unscheduled for an event that misses objects.
            e.in_attempt = false;
            e.requested = None;
            self.unpark(id);
            return;
        }
        if !e.in_attempt {
            // A turn in a busy domain's queue started this fetch after the attempt had ended:
            // the next attempt comes at its time, and no sooner than a backoff after this
            // fetch, unless a new event asked for earlier.
            let mut next = e
                .next_attempt
                .max(now + self.cfg.backoff(e.attempts.max(1)));
            if let Some(r) = e.requested.take() {
                next = next.min(r);
            }
            e.next_attempt = next;
            self.schedule.insert((next, id));
            // The attempt's other URLs still owed a visit take their turns, behind those who
            // waited meanwhile.
            let owed: Vec<Arc<str>> = e
                .urls
                .iter()
                .zip(&e.tried)
                .filter(|(u, tried)| !**tried && self.domains.usable(u, now))
                .map(|(u, _)| u.domain.clone())
                .collect();
            for domain in owed {
                self.take_turn(id, domain);
            }
        } else if e.tried.iter().any(|t| !t) || e.wants_second_round() {
            // More URLs to try in this attempt, or a second round to probe: queue behind
            // entries already ready.
            e.next_attempt = now;
            self.schedule.insert((now, id));
        } else {
            self.finish_attempt(id, now);
        }
    }

    /// Marks `present` (sorted) as arrived for the entry's events; releases those now
    /// satisfied, or queues their ref updates.
    fn apply_present(&mut self, id: EntryId, present: &[ObjectId], now: Instant) {
        let e = self.entries.get_mut(&id).expect("entry exists");
        // Only objects some event misses matter; most reports bring none of them or all.
        let arrived: Vec<ObjectId> = present
            .iter()
            .copied()
            .filter(|o| e.missing.remove(o).is_some())
            .collect();
        if arrived.is_empty() {
            return;
        }
        let mut satisfied = Vec::new();
        for ev in e.events.values() {
            let state = self.events.get_mut(ev).expect("entry events exist");
            if state.missing.is_empty() {
                // Already awaiting its refs.
                continue;
            }
            state.missing.retain(|o| arrived.binary_search(o).is_err());
            if state.missing.is_empty() {
                satisfied.push(ev.clone());
            }
        }
        for ev in satisfied {
            let state = &self.events[&ev];
            if state.refs.is_empty() {
                self.release(&ev, RefsOutcome::NoRefUpdates, now);
            } else {
                self.awaiting_refs.insert(state.seq, ev);
            }
        }
    }

    /// Sends [`Outcome::Released`] for a waiting event and removes it.
    fn release(&mut self, event_id: &str, refs: RefsOutcome, now: Instant) {
        let state = &self.events[event_id];
        let e = &self.entries[&state.entry];
        let (identifier, repo) = (e.identifier.clone(), e.repo.clone());
        let waited = now.saturating_duration_since(state.submitted);
        self.emit_released(event_id, &identifier, &repo, waited, refs);
        self.leave(event_id);
    }

    /// Counts an [`Outcome::Released`], records its wait and sends it.
    fn emit_released(
        &mut self,
        event_id: &str,
        identifier: &str,
        repo: &Path,
        waited: Duration,
        refs: RefsOutcome,
    ) {
        self.counters.released += 1;
        self.counters.release_times.observe(waited);
        self.actions.push(Action::Emit(Outcome::Released {
            event_id: event_id.to_owned(),
            identifier: identifier.to_owned(),
            repo: repo.to_path_buf(),
            waited,
            refs,
        }));
    }

    /// Removes a waiting event, its expiry and, when nothing else waits, its entry.
    fn leave(&mut self, event_id: &str) {
        let Some(ev) = self.events.remove(event_id) else {
            return;
        };
        self.ids.forget_waiting(event_id);
        self.admitted.fetch_sub(1, Ordering::SeqCst);
        self.expiries.remove(&(ev.expires, Arc::from(event_id)));
        self.awaiting_refs.remove(&ev.seq);
        let e = self
            .entries
            .get_mut(&ev.entry)
            .expect("event's entry exists");
        e.events.remove(&ev.seq);
        e.drop_missing(&ev.missing);
        for url in &ev.urls {
            e.drop_url(url);
        }
        self.urls.release(&e.identifier, &ev.urls);
        if let Some(needs) = self.repo_needs.get_mut(&e.repo) {
            for o in &ev.oids {
                if let Some(n) = needs.get_mut(o) {
                    *n -= 1;
                    if *n == 0 {
                        needs.remove(o);
                    }
                }
            }
            if needs.is_empty() {
                self.repo_needs.remove(&e.repo);
            }
        }
        self.pending_drops
            .entry(e.repo.clone())
            .or_default()
            .extend(ev.oids);
        self.remove_if_empty(ev.entry);
    }

    /// Removes the entry if no event waits for it and no fetch runs for it. True when the
    /// entry is gone (now or before).
    fn remove_if_empty(&mut self, id: EntryId) -> bool {
        let Some(e) = self.entries.get(&id) else {
            return true;
        };
        if !e.events.is_empty() {
            return false;
        }
        // No event waits: no turn either, even while a fetch still runs.
        let running = e.running.is_some();
        self.unpark(id);
        if running {
            // Removed when its fetch reports back.
            return false;
        }
        let e = self.entries.remove(&id).expect("entry exists");
        self.schedule.remove(&(e.next_attempt, id));
        self.by_key.remove(&(e.identifier.clone(), e.repo.clone()));
        remove_from_index(&mut self.by_identifier, &e.identifier, id);
        remove_from_index(&mut self.by_repo, &e.repo, id);
        true
    }

    /// When the entry of `identifier` in `repo` is next ready, if it waits for that time:
    /// `None` when there is no such entry, or it is not in the schedule (a fetch of it runs,
    /// it waits in a domain queue, or its events only await their refs).
    #[cfg(test)]
    pub(crate) fn next_attempt_of(&self, identifier: &str, repo: &Path) -> Option<Instant> {
        let (id, e) = self
            .entries
            .iter()
            .find(|(_, e)| &*e.identifier == identifier && &*e.repo == repo)?;
        self.schedule
            .contains(&(e.next_attempt, *id))
            .then_some(e.next_attempt)
    }

    /// The core's part of [`Stats`].
    /// The core's part of [`Stats`] as of the last `now` it was given.
    #[cfg(test)]
    pub fn stats(&self) -> Stats {
        self.stats_at(self.last_now, std::time::SystemTime::now())
    }

    /// Events waiting, cheaply.
    #[cfg(test)]
    pub(crate) fn waiting_events(&self) -> usize {
        self.events.len()
    }

    /// Checks that the identifier URL index counts exactly the URLs of the waiting events (no
    /// reservation in flight: the core tests submit straight to the core).
    #[cfg(test)]
    pub(crate) fn check_url_index_exactly(&self) {
        assert_eq!(
            self.urls.all(),
            self.listed_urls(),
            "the identifier URL index"
        );
    }

    /// Each identifier's fetch URLs with how many waiting events list each: what the
    /// identifier URL index must count.
    #[cfg(test)]
    fn listed_urls(&self) -> HashMap<Arc<str>, HashMap<Arc<str>, u32>> {
        let mut urls: HashMap<Arc<str>, HashMap<Arc<str>, u32>> = HashMap::new();
        for ev in self.events.values() {
            let identifier = &self.entries[&ev.entry].identifier;
            for u in &ev.urls {
                *urls
                    .entry(identifier.clone())
                    .or_default()
                    .entry(u.fetch_url.clone())
                    .or_default() += 1;
            }
        }
        urls
    }

    /// Checks that the id index says what the core's maps say.
    #[cfg(test)]
    fn check_ids(&self) {
        use super::ids::IdState;
        let mut expect: HashMap<Arc<str>, IdState> = self
            .expired_ids
            .iter()
            .map(|(id, until)| (id.clone(), IdState::Expired(*until)))
            .collect();
        for id in self.events.keys() {
            assert!(
                expect.insert(id.clone(), IdState::Waiting).is_none(),
                "{id} waits and is refused as expired"
            );
        }
        assert_eq!(
            self.ids.all(),
            expect,
            "the id index against the core's maps"
        );
        let urls = self.listed_urls();
        // A submit the handle has sent and the scheduler not applied yet holds a reservation
        // the core does not know of yet: the index may count more, never less.
        let index = self.urls.all();
        for (identifier, counts) in &urls {
            for (url, n) in counts {
                let reserved = index.get(identifier).and_then(|c| c.get(url)).copied();
                assert!(
                    reserved.unwrap_or(0) >= *n,
                    "{identifier} {url}: {n} events list it, the index counts {reserved:?}"
                );
            }
        }
        for e in self.entries.values() {
            let mut listed: HashMap<&str, u32> = HashMap::new();
            for ev in e.events.values() {
                for u in &self.events[ev].urls {
                    *listed.entry(&u.fetch_url).or_default() += 1;
                }
            }
            let kept: HashMap<&str, u32> = e
                .urls
                .iter()
                .zip(&e.url_events)
                .map(|(u, n)| (&*u.fetch_url, *n))
                .collect();
            assert_eq!(kept, listed, "{}: the entry's URLs", e.identifier);
            for (i, u) in e.urls.iter().enumerate() {
                assert_eq!(e.url_index.get(&u.fetch_url), Some(&i), "{}", u.fetch_url);
            }
            let mut missing: HashMap<ObjectId, u32> = HashMap::new();
            for ev in e.events.values() {
                for o in &self.events[ev].missing {
                    *missing.entry(*o).or_default() += 1;
                }
            }
            assert_eq!(
                e.missing, missing,
                "{}: the entry's missing objects",
                e.identifier
            );
        }
    }

    /// The core's part of [`Stats`]; `now` and `wall` are the same instant on the engine's
    /// clock, for the naughty list's calendar times.
    pub fn stats_at(&self, now: Instant, wall: std::time::SystemTime) -> Stats {
        let c = &self.counters;
        #[cfg(test)]
        self.check_ids();
        #[cfg(test)]
        for (domain, (kept, scanned)) in self
            .domains
            .waiting_by_scan(|id, g| self.still_parked(id, g))
        {
            assert_eq!(
                kept, scanned,
                "entries waiting in {domain}: counted vs in the queue"
            );
        }
        let (domains, naughty) = self.domains.stats(now, wall);
        let requests = self.domains.requests_total();
        Stats {
            domains,
            naughty,
            queued_identifiers: self.entries.len(),
            waiting_events: self.events.len(),
            awaiting_refs: self.awaiting_refs.len(),
            in_flight: self.running.len(),
            workers: self.cfg.workers,
            submitted: c.submitted,
            released: c.released,
            expired: c.expired,
            cancelled: c.cancelled,
            rechecks: c.rechecks,
            ref_updates_applied: c.refs_applied,
            ref_update_failures: c.ref_failures,
            fetches_started: c.fetches_started,
            requests,
            fetches_succeeded: c.fetches_succeeded,
            fetches_partial: c.fetches_partial,
            fetches_failed: c.fetches_failed,
            memory_leaked: c.memory_leaked,
            failures: c.failures.clone(),
            recent_failures: c.recent_failures.iter().cloned().collect(),
            expired_ids_remembered: self.expired_ids.len(),
            release_times: c.release_times.clone(),
            fetch_durations: c.fetch_durations.clone(),
            bytes_received: c.bytes_received,
            ..Stats::default()
        }
    }
}

/// Whether entry `id` still waits for the turn `ticket` (`Queue::still_parked`, for where
/// `self` is borrowed elsewhere).
fn parked_at(entries: &HashMap<EntryId, Entry>, id: EntryId, ticket: u64) -> bool {
    entries
        .get(&id)
        .is_some_and(|e| e.turns.iter().any(|(_, t)| *t == ticket))
}

fn remove_from_index<K: std::hash::Hash + Eq + ?Sized>(
    index: &mut HashMap<Arc<K>, Vec<EntryId>>,
    key: &Arc<K>,
    id: EntryId,
) {
    if let Some(ids) = index.get_mut(key) {
        ids.retain(|x| *x != id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

#[cfg(test)]
mod tests;
