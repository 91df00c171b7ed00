//! Property tests of the queue, driven through the core with the fake clock and the harness of
//! the unit tests next door: the wait between attempts, a new event never delaying the next
//! attempt, the round-robin domain queues.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use std::collections::BTreeSet;

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
