//! Property tests of the queue, driven through the core with the fake clock and the harness of
//! the unit tests next door: the wait between attempts, a new event never delaying the next
//! attempt, the round-robin domain queues.

use super::*;
use crate::scheduler::ids;
use proptest::collection::vec;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashSet, VecDeque};

const IDENT: &str = "id";
const REPO: &str = "/r";

/// Ample capacity on every domain, so that only the behaviour under test decides when a fetch
/// starts.
fn roomy(cfg: Config) -> Config {
    Config {
        domain_limits: limits(64, 600_000, 100_000),
        ..cfg
    }
}

/// Failures that cost one URL and nothing more: DNS and TLS failures also make the domain
/// naughty, which is another behaviour.
fn failure() -> impl Strategy<Value = FailureKind> {
    prop::sample::select(vec![
        FailureKind::ConnectionRefused,
        FailureKind::Timeout,
        FailureKind::Deadline,
        FailureKind::SizeCap,
        FailureKind::MemoryCap,
        FailureKind::NotFound,
        FailureKind::Protocol,
        FailureKind::Network,
        FailureKind::LocalRepository,
        FailureKind::Refused,
        FailureKind::Cancelled,
        FailureKind::Panicked,
    ])
}

/// The objects of `pool` whose flag is set.
fn picked(pool: &[ObjectId], flags: &[bool]) -> Vec<ObjectId> {
    pool.iter()
        .zip(flags)
        .filter(|(_, f)| **f)
        .map(|(o, _)| *o)
        .collect()
}

fn next_attempt(h: &Harness) -> Option<Instant> {
    h.core.next_attempt_of(IDENT, Path::new(REPO))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// After every incomplete attempt (each URL failed, some objects perhaps fetched), the
    /// entry's next attempt is `backoff(n)` after the attempt's end: between base and cap, never
    /// shorter than the wait before, and no fetch starts earlier. `start` puts the entry's
    /// count of attempts near `u32::MAX` first, where it must saturate.
    #[test]
    fn the_wait_after_an_incomplete_attempt_is_between_base_and_cap(
        base_ms in 1u64..=30_000,
        extra_ms in 0u64..=600_000,
        urls in 1usize..=3,
        start in prop_oneof![Just(0u32), (u32::MAX - 8)..=u32::MAX],
        fetches in vec((0u64..=10_000, failure(), vec(any::<bool>(), 7)), 1..=60),
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base + Duration::from_millis(extra_ms);
        let cfg = roomy(Config {
            backoff_base: base,
            backoff_cap: cap,
            sync_delay: Duration::ZERO,
            event_lifetime: Duration::from_secs(365 * 24 * 3600),
            ..Config::default()
        });
        let mut h = Harness::with(cfg.clone());
        // oid 1 never arrives, so no attempt is complete.
        let oids: Vec<ObjectId> = (1..=8).map(oid).collect();
        let urls: Vec<String> = (0..urls).map(|k| format!("git://m{k}.example/r")).collect();
        let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        h.submit("e", IDENT, REPO, &oids, &url_refs, Origin::Sync);
        h.core.entries.values_mut().for_each(|e| e.attempts = start);
        let mut n = start;
        let mut previous = Duration::ZERO;
        for attempt in fetches.chunks(urls.len()) {
            for (took, kind, flags) in attempt {
                prop_assert_eq!(h.jobs.len(), 1, "one fetch at a time");
                h.advance(Duration::from_millis(*took));
                h.finish(&picked(&oids[1..], flags), Some(*kind));
            }
            if attempt.len() < urls.len() {
                break; // the attempt is not over
            }
            n = n.saturating_add(1);
            prop_assert!(h.jobs.is_empty(), "every URL was tried");
            let next = next_attempt(&h).expect("scheduled after its attempt");
            let wait = next - h.now();
            prop_assert!(base <= wait && wait <= cap, "{:?} not in {:?} ..= {:?}", wait, base, cap);
            prop_assert_eq!(wait, cfg.backoff(n));
            prop_assert!(wait >= previous, "{:?} after {:?}", wait, previous);
            previous = wait;
            h.advance(wait - Duration::from_nanos(1));
            prop_assert!(h.jobs.is_empty(), "no fetch before the wait is over");
            h.advance(Duration::from_nanos(1));
            prop_assert_eq!(h.jobs.len(), 1, "a fetch when it is over");
        }
        prop_assert!(h.outcomes.is_empty());
    }
}

/// One step on the one identifier of [`a_new_event_never_delays_the_next_attempt`].
#[derive(Debug, Clone)]
enum Op {
    /// An event for some of objects 1 ..= 6, with one of three clone URLs, submitted `lag`
    /// before the core gets the command.
    Submit {
        origin: Origin,
        oids: Vec<bool>,
        url: usize,
        lag: Duration,
    },
    Advance(Duration),
    /// The running fetch (if any) reports these objects and perhaps a failure.
    Finish {
        present: Vec<bool>,
        failure: Option<FailureKind>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let ms = Duration::from_millis;
    prop_oneof![
        3 => (
            prop_oneof![Just(Origin::User), Just(Origin::Sync)],
            vec(any::<bool>(), 6),
            0usize..3,
            prop_oneof![Just(0u64), 0u64..=2_000],
        )
            .prop_map(move |(origin, oids, url, lag)| Op::Submit {
                origin,
                oids,
                url,
                lag: ms(lag),
            }),
        3 => prop_oneof![0u64..=1_000, 0u64..=200_000].prop_map(move |t| Op::Advance(ms(t))),
        2 => (vec(any::<bool>(), 6), prop::option::weighted(0.7, failure()))
            .prop_map(|(present, failure)| Op::Finish { present, failure }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever happened before (events of either origin, fetches that succeed, fail or bring
    /// part of the objects, time passing, events expiring), submitting an event never moves its
    /// identifier's next attempt later: a scheduled one stays or moves to the new event's own
    /// first-attempt time if that is earlier; a new entry gets that time. And the promise
    /// holds past a running fetch: until a fetch starts, the entry is never scheduled later
    /// than the earliest first-attempt time of the events submitted since the last fetch
    /// started, or than the end of that fetch (when further URLs wait their turn).
    #[test]
    fn a_new_event_never_delays_the_next_attempt(ops in vec(op(), 1..=60)) {
        let cfg = roomy(Config::default());
        let mut h = Harness::with(cfg.clone());
        let urls = ["git://a.example/r", "git://b.example/r", "git://c.example/r"];
        let pool: Vec<ObjectId> = (1..=6).map(oid).collect();
        // The earliest first-attempt time asked for since the last fetch started, and when the
        // last fetch ended.
        let mut promised: Option<Instant> = None;
        let mut last_end: Option<Instant> = None;
        let mut started = 0;
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Submit { origin, oids, url, lag } => {
                    let mut wanted = picked(&pool, &oids);
                    if wanted.is_empty() {
                        wanted.push(pool[i % pool.len()]);
                    }
                    let mut ev = h.valid_event(
                        &format!("e{i}"),
                        IDENT,
                        REPO,
                        &wanted,
                        &wanted,
                        &[urls[url]],
                        &[],
                        origin,
                    );
                    let now = h.now();
                    ev.submitted = now.checked_sub(lag).unwrap_or(now);
                    let target = ev.submitted + cfg.first_delay(origin);
                    let queued = h.core.stats().queued_identifiers > 0;
                    let running = !h.jobs.is_empty();
                    let before = next_attempt(&h);
                    h.admitted.fetch_add(1, Ordering::SeqCst);
                    h.core
                        .identifier_urls()
                        .reserve(&ev.identifier, &ev.urls)
                        .expect("within the cap");
                    h.core.command(Command::Submit(ev), now);
                    let after = next_attempt(&h);
                    match (before, after) {
                        (Some(b), Some(a)) => {
                            prop_assert!(a <= b, "moved later by {:?}", a - b);
                            prop_assert!(a <= target, "later than the new event asks");
                        }
                        (Some(_), None) => prop_assert!(false, "unscheduled by a new event"),
                        (None, after) if !queued => prop_assert_eq!(after, Some(target)),
                        (None, after) => {
                            prop_assert!(running, "a queued entry is scheduled or running");
                            prop_assert_eq!(after, None, "a running entry stays running");
                        }
                    }
                    promised = Some(promised.map_or(target, |p| p.min(target)));
                    h.pass();
                }
                Op::Advance(d) => h.advance(d),
                Op::Finish { present, failure } => {
                    if h.jobs.is_empty() {
                        continue;
                    }
                    h.finish(&picked(&pool, &present), failure);
                    last_end = Some(h.now());
                }
            }
            let s = h.core.stats();
            if s.fetches_started > started {
                started = s.fetches_started;
                promised = None;
            }
            if s.queued_identifiers == 0 {
                promised = None;
            }
            if let (Some(next), Some(p)) = (next_attempt(&h), promised) {
                let bound = last_end.map_or(p, |end| end.max(p));
                prop_assert!(next <= bound, "scheduled {:?} past its promise", next - bound);
            }
        }
    }
}

/// A fetch result in [`a_capped_domain_serves_its_waiting_identifiers_round_robin`].
#[derive(Debug, Clone, Copy)]
enum Fetched {
    Failed(FailureKind),
    /// The first of the identifier's two objects, then a failure.
    Partial,
    /// Both objects: the identifier's event is released.
    Complete,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// N identifiers wait for one domain capped at one fetch at a time, each with 1 to 3 URLs
    /// on it; fetches complete one by one. Every waiting identifier is dispatched before N
    /// other dispatches pass it over, and none is dispatched twice before every identifier
    /// that waited at its first dispatch has had its turn. The domain's queue length in the
    /// stats is the number waiting.
    #[test]
    fn a_capped_domain_serves_its_waiting_identifiers_round_robin(
        url_counts in vec(1usize..=3, 2..=30),
        results in vec(prop_oneof![
            6 => failure().prop_map(Fetched::Failed),
            2 => Just(Fetched::Partial),
            1 => Just(Fetched::Complete),
        ], 90),
    ) {
        let n = url_counts.len();
        let mut h = polite(limits(1, 600_000, 100_000));
        let objects = |k: usize| {
            let k = u8::try_from(k).expect("at most 30 identifiers");
            [oid(2 * k + 1), oid(2 * k + 2)]
        };
        for (k, count) in url_counts.iter().enumerate() {
            let urls: Vec<String> =
                (0..*count).map(|j| format!("https://one.example/{k}/{j}")).collect();
            let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
            let name = format!("i{k}");
            h.submit(&name, &name, &format!("/r{k}"), &objects(k), &url_refs, Origin::Sync);
        }
        let ident = |job: &Job| -> usize { job.request.identifier[1..].parse().unwrap() };
        // The model: URLs each identifier has left in this attempt, who waits for the domain,
        // how many dispatches passed over each waiting one, and who waited at each one's
        // last dispatch.
        let mut left = url_counts.clone();
        let mut waiting: BTreeSet<usize> = (0..n).collect();
        let mut passed_over = vec![0usize; n];
        let mut waited_at_last: Vec<Option<BTreeSet<usize>>> = vec![None; n];
        let mut dispatched_since: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        let mut results = results.into_iter();
        let mut dispatches = 0;
        while let Some(job) = h.jobs.first().cloned() {
            prop_assert_eq!(h.jobs.len(), 1, "cap 1");
            let k = ident(&job);
            dispatches += 1;
            prop_assert!(waiting.remove(&k), "i{} dispatched without waiting", k);
            if let Some(before) = &waited_at_last[k] {
                let skipped: Vec<_> = before.difference(&dispatched_since[k]).collect();
                prop_assert!(
                    skipped.is_empty(),
                    "i{} dispatched again before {:?} (dispatch {})", k, skipped, dispatches
                );
            }
            for &y in &waiting {
                passed_over[y] += 1;
                prop_assert!(
                    passed_over[y] < n,
                    "i{} passed over {} times with {} identifiers", y, passed_over[y], n
                );
            }
            for (y, since) in dispatched_since.iter_mut().enumerate() {
                if y != k {
                    since.insert(k);
                }
            }
            passed_over[k] = 0;
            waited_at_last[k] = Some(waiting.clone());
            dispatched_since[k].clear();
            left[k] -= 1;
            let result = results.next().expect("at most 90 fetches");
            let own = objects(k);
            let present: &[ObjectId] = match result {
                Fetched::Failed(_) => &[],
                Fetched::Partial => &own[..1],
                Fetched::Complete => &own,
            };
            let error = match result {
                Fetched::Failed(kind) => Some(kind),
                Fetched::Partial => Some(FailureKind::NotFound),
                Fetched::Complete => None,
            };
            h.finish(present, error);
            if !matches!(result, Fetched::Complete) && left[k] > 0 {
                waiting.insert(k);
            }
            let queued = h.jobs.len() + h.core.stats().domains["one.example"].queued_identifiers;
            prop_assert_eq!(queued, waiting.len(), "waiting or just dispatched");
        }
        prop_assert!(waiting.is_empty(), "{:?} still wait with nothing in flight", waiting);
    }
}

/// A host's call, or something the scheduler does, in
/// [`calls_take_effect_in_order_however_late_the_core_applies_them`].
#[derive(Debug, Clone)]
enum Call {
    /// `submit` of event `e{id}`, decided on the host's side as the handle decides it.
    Submit {
        id: usize,
        origin: Origin,
        refs: bool,
    },
    Cancel(usize),
    /// A push brings the picked objects; the host calls `git_data_arrived` for the identifier.
    Push {
        objects: Vec<bool>,
        identifier: usize,
    },
    /// The scheduler applies the first `n` commands waiting in the channel, then passes.
    Apply(usize),
    Advance(Duration),
    /// The running fetch ends, bringing the picked objects of those it wanted.
    Finish(Vec<bool>),
    /// Every ref update asked for is written.
    WriteRefs,
}

/// Events `e0` .. `e3`, on two identifiers, each waiting for two of six objects.
const EVENTS: usize = 4;
const OBJECTS: usize = 6;

fn objects_of(id: usize) -> Vec<ObjectId> {
    let id = u8::try_from(id).expect("few events");
    vec![oid(id + 1), oid(5 + id % 2)]
}

fn call() -> impl Strategy<Value = Call> {
    let ms = Duration::from_millis;
    prop_oneof![
        5 => (0..EVENTS, prop_oneof![Just(Origin::User), Just(Origin::Sync)], prop::bool::weighted(0.2))
            .prop_map(|(id, origin, refs)| Call::Submit { id, origin, refs }),
        3 => (0..EVENTS).prop_map(Call::Cancel),
        1 => (vec(prop::bool::weighted(0.3), OBJECTS), 0usize..2)
            .prop_map(|(objects, identifier)| Call::Push { objects, identifier }),
        4 => (1usize..=4).prop_map(Call::Apply),
        2 => prop_oneof![0u64..=1_000, 0u64..=1_200_000].prop_map(move |t| Call::Advance(ms(t))),
        1 => vec(prop::bool::weighted(0.4), OBJECTS).prop_map(Call::Finish),
        1 => Just(Call::WriteRefs),
    ]
}

/// One queued submission of an id: from when the core queues it to its outcome or cancel.
#[derive(Debug, Default)]
struct Queued {
    outcomes: u32,
    cancelled: bool,
}

/// The model of what the host was promised, beside a core fed as the engine feeds it: the
/// host's calls are decided on its side at once and reach the core, in order, only when the
/// scheduler gets round to them.
struct Order {
    h: Harness,
    channel: VecDeque<(Command, Option<usize>)>,
    /// The objects in the one repository.
    present: HashSet<ObjectId>,
    /// Each `Pending` answer: its id, the queued submission it joined once applied, whether
    /// the host cancelled the id after it, and when it was given (`step`).
    answers: Vec<(usize, Option<usize>, bool, u64)>,
    queued: Vec<Queued>,
    /// Each outcome: its id and when it came (`step`).
    outcomes: Vec<(usize, u64)>,
    /// Counts answers and outcomes, to tell which came first.
    step: u64,
    /// The queued submission of each id, as the in-order model has it.
    active: [Option<usize>; EVENTS],
}

fn name(id: usize) -> String {
    format!("e{id}")
}

impl Order {
    fn now(&self) -> Instant {
        self.h.now()
    }

    /// What `Engine::try_submit` does with a valid event: the same decision, then the command.
    fn submit(&mut self, id: usize, origin: Origin, refs: bool) {
        let oids = objects_of(id);
        let missing: Vec<ObjectId> = oids
            .iter()
            .copied()
            .filter(|o| !self.present.contains(o))
            .collect();
        if missing.is_empty() && !refs {
            return; // AlreadySatisfied
        }
        let now = self.now();
        let known = self.h.core.ids().get(&name(id));
        let urls = self.h.core.identifier_urls();
        let identifier = format!("i{}", id % 2);
        let url = format!("git://{}.example/r", id % 3);
        let refs: Vec<RefUpdate> = if refs {
            vec![main_at(oids[0].as_bytes()[0])]
        } else {
            vec![]
        };
        let ev = self.h.valid_event(
            &name(id),
            &identifier,
            REPO,
            &oids,
            &missing,
            &[url.as_str()],
            &refs,
            origin,
        );
        match ids::submit_as(known, origin, !missing.is_empty(), now) {
            ids::SubmitAs::Refused(_) => return,
            ids::SubmitAs::Again => {
                self.h.admitted.fetch_add(1, Ordering::SeqCst);
                urls.reserve_uncapped(&ev.identifier, &ev.urls);
            }
            ids::SubmitAs::New => {
                self.h.admitted.fetch_add(1, Ordering::SeqCst);
                urls.reserve(&ev.identifier, &ev.urls)
                    .expect("within the cap");
            }
        }
        self.channel
            .push_back((Command::Submit(ev), Some(self.answers.len())));
        self.step += 1;
        self.answers.push((id, None, false, self.step));
    }

    fn cancel(&mut self, id: usize) {
        self.channel.push_back((Command::Cancel(name(id)), None));
        for answer in self.answers.iter_mut().filter(|a| a.0 == id) {
            answer.2 = true;
        }
    }

    /// The scheduler applies the next `n` commands, then passes.
    fn apply(&mut self, n: usize) -> Result<(), TestCaseError> {
        for _ in 0..n {
            let Some((command, answer)) = self.channel.pop_front() else {
                break;
            };
            let now = self.now();
            match (&command, answer) {
                (Command::Submit(ev), Some(answer)) => {
                    let id: usize = ev.id[1..].parse().expect("e<n>");
                    self.h.core.command(command, now);
                    // In order: a cancel or an outcome applied before this submit ended the
                    // id's queued submission, so it waits anew; otherwise it joins it.
                    let joined = *self.active[id].get_or_insert_with(|| {
                        self.queued.push(Queued::default());
                        self.queued.len() - 1
                    });
                    self.answers[answer].1 = Some(joined);
                    prop_assert!(
                        self.h.core.events.contains_key(name(id).as_str()),
                        "e{} does not wait after its submit was applied",
                        id
                    );
                }
                (Command::Cancel(event_id), _) => {
                    let id: usize = event_id[1..].parse().expect("e<n>");
                    if let Some(q) = self.active[id].take() {
                        self.queued[q].cancelled = true;
                    }
                    self.h.core.command(command, now);
                }
                _ => self.h.core.command(command, now),
            }
            self.carry_out()?;
        }
        let now = self.now();
        self.h.core.pass(now);
        self.carry_out()
    }

    /// Carries out the core's actions as the scheduler does (checks answered at once, fetches
    /// and ref writes left for later calls) and holds each outcome against the model.
    fn carry_out(&mut self) -> Result<(), TestCaseError> {
        loop {
            self.h.collect();
            for o in std::mem::take(&mut self.h.outcomes) {
                let id: usize = o.event_id()[1..].parse().expect("e<n>");
                let Some(q) = self.active[id].take() else {
                    return Err(TestCaseError::fail(format!(
                        "an outcome for e{id} with no queued submission (after a cancel, or a \
                         second one): {o:?}"
                    )));
                };
                self.queued[q].outcomes += 1;
                self.step += 1;
                self.outcomes.push((id, self.step));
            }
            if self.h.checks.is_empty() {
                break;
            }
            for (entry, _, oids) in std::mem::take(&mut self.h.checks) {
                let present = oids
                    .into_iter()
                    .filter(|o| self.present.contains(o))
                    .collect();
                let now = self.now();
                self.h.core.checked(entry, Ok(present), now);
            }
        }
        // The model and the core agree on which ids wait.
        for id in 0..EVENTS {
            prop_assert_eq!(
                self.active[id].is_some(),
                self.h.core.events.contains_key(name(id).as_str()),
                "e{} waits in the model or in the core, not both",
                id
            );
        }
        // `stats` checks the id index against the core's maps.
        let waiting = self.h.core.stats().waiting_events;
        if self.channel.is_empty() {
            // No reservation in flight: every admission and URL counted belongs to an event.
            prop_assert_eq!(self.h.admitted.load(Ordering::SeqCst), waiting);
            self.h.core.check_url_index_exactly();
        }
        Ok(())
    }

    fn write_refs(&mut self) -> Result<(), TestCaseError> {
        for (event_id, _, _, _) in std::mem::take(&mut self.h.applies) {
            let now = self.now();
            self.h.core.refs_applied(&event_id, Ok(()), now);
        }
        self.carry_out()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the interleaving of the host's calls (submits of either origin, with or without
    /// ref updates, re-submissions, cancels, pushes) with the scheduler applying them late,
    /// fetches ending, refs written and time passing (events expire, expired ids are remembered
    /// for a while): applied in order, every `Pending` answer not followed by a cancel of its id
    /// belongs to a queued submission that gets exactly one outcome; a queued submission gets
    /// at most one outcome, none after a cancel; a submit applied after a cancel of the same id
    /// waits again; the core's waiting ids, id index, admissions and URL reservations match.
    #[test]
    fn calls_take_effect_in_order_however_late_the_core_applies_them(
        calls in vec(call(), 1..=80),
        memory_min in prop_oneof![Just(0u64), Just(20), Just(7 * 24 * 60)],
    ) {
        let mut order = Order {
            h: Harness::with(roomy(Config {
                expired_memory: Duration::from_secs(memory_min * 60),
                ..Config::default()
            })),
            channel: VecDeque::new(),
            present: HashSet::new(),
            answers: Vec::new(),
            queued: Vec::new(),
            outcomes: Vec::new(),
            step: 0,
            active: [None; EVENTS],
        };
        let pool: Vec<ObjectId> = (1..=6).map(oid).collect();
        for call in calls {
            match call {
                Call::Submit { id, origin, refs } => order.submit(id, origin, refs),
                Call::Cancel(id) => order.cancel(id),
                Call::Push { objects, identifier } => {
                    order.present.extend(picked(&pool, &objects));
                    order.channel.push_back((Command::GitDataArrived(format!("i{identifier}")), None));
                }
                Call::Apply(n) => order.apply(n)?,
                Call::Advance(d) => {
                    order.h.clock.advance(d);
                    order.apply(0)?;
                }
                Call::Finish(bring) => {
                    if order.h.jobs.is_empty() {
                        continue;
                    }
                    let job = order.h.jobs.remove(0);
                    let brought = picked(&pool, &bring);
                    order.present.extend(brought.iter().copied());
                    let present: Vec<ObjectId> = job
                        .request
                        .wanted
                        .iter()
                        .copied()
                        .filter(|o| order.present.contains(o))
                        .collect();
                    let error = (present.len() < job.request.wanted.len())
                        .then(|| FetchError::new(FailureKind::NotFound, "not all here"));
                    let now = order.now();
                    order.h.core.job_done(job.id, FetchReport::new(present, error), now);
                    order.apply(0)?;
                }
                Call::WriteRefs => order.write_refs()?,
            }
        }
        // Everything left is applied, and every event still waiting expires.
        let left = order.channel.len();
        order.apply(left)?;
        for _ in 0..2 {
            order.write_refs()?;
            order.h.clock.advance(Duration::from_secs(31 * 60));
            order.apply(0)?;
        }
        prop_assert!(order.active.iter().all(Option::is_none), "{:?}", order.active);
        for (k, q) in order.queued.iter().enumerate() {
            if !q.cancelled {
                prop_assert_eq!(q.outcomes, 1, "queued submission {}", k);
            }
        }
        for (k, (id, joined, cancelled_after, at)) in order.answers.iter().enumerate() {
            if *cancelled_after {
                continue;
            }
            // What the host sees: an outcome for the id after the answer.
            prop_assert!(
                order.outcomes.iter().any(|(o, t)| o == id && t > at),
                "answer {} (e{}) was Pending, not cancelled, and no outcome followed", k, id
            );
            if let Some(q) = joined {
                prop_assert_eq!(order.queued[*q].outcomes, 1, "answer {} (e{})", k, id);
            }
        }
    }
}
