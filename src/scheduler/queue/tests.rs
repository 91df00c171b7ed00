//! The behaviour table, driven through the scheduler core with a fake clock.

use super::*;
use crate::clock::{Clock, FakeClock};
use crate::policy::{OwnDomain, UrlPolicy};
use crate::state_file::SavedOrigin;
use std::path::PathBuf;

fn oid(n: u8) -> ObjectId {
    ObjectId::from_bytes([n; 20])
}

/// An [`Action::ApplyRefs`]: event id, repository, updates, whether they replace the
/// repository's branches and tags.
type Apply = (Arc<str>, Arc<Path>, Arc<[RefUpdate]>, bool);

struct Harness {
    core: Queue,
    clock: FakeClock,
    admitted: Arc<AtomicUsize>,
    outcomes: Vec<Outcome>,
    jobs: Vec<Job>,
    checks: Vec<(EntryId, Arc<Path>, Vec<ObjectId>)>,
    drops: Vec<(Arc<Path>, Vec<ObjectId>)>,
    /// Asked-for ref updates, not answered yet.
    applies: Vec<Apply>,
}

impl Harness {
    fn new() -> Self {
        Self::with(Config::default())
    }

    fn with(cfg: Config) -> Self {
        let admitted = Arc::new(AtomicUsize::new(0));
        Harness {
            core: Queue::new(Arc::new(cfg), admitted.clone()),
            clock: FakeClock::new(),
            admitted,
            outcomes: Vec::new(),
            jobs: Vec::new(),
            checks: Vec::new(),
            drops: Vec::new(),
            applies: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    /// An event without ref updates, all its objects missing.
    fn submit(
        &mut self,
        id: &str,
        ident: &str,
        repo: &str,
        oids: &[ObjectId],
        urls: &[&str],
        origin: Origin,
    ) {
        let ev = self.valid_event(id, ident, repo, oids, oids, urls, &[], origin);
        self.submit_event(ev);
    }

    /// A sync event with ref updates, all its objects missing.
    fn submit_refs(&mut self, id: &str, repo: &str, oids: &[ObjectId], refs: &[RefUpdate]) {
        let ev = self.valid_event(
            id,
            "id",
            repo,
            oids,
            oids,
            &["git://a/r"],
            refs,
            Origin::Sync,
        );
        self.submit_event(ev);
    }

    /// A repository state of identifier `id`: a complete ref set (`main` on its first object)
    /// created at `created_at`, all its objects missing.
    fn submit_state(&mut self, id: &str, repo: &str, oids: &[ObjectId], created_at: Option<u64>) {
        let refs = [RefUpdate::oid("refs/heads/main", oids[0].to_string())];
        let mut ev = self.valid_event(
            id,
            "id",
            repo,
            oids,
            oids,
            &["git://a/r"],
            &refs,
            Origin::Sync,
        );
        ev.replace_refs = true;
        ev.created_at = created_at;
        self.submit_event(ev);
    }

    /// What each released event's outcome says of its refs, in order.
    fn released_refs(&self) -> Vec<(&str, RefsOutcome)> {
        self.outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Released { event_id, refs, .. } => Some((event_id.as_str(), *refs)),
                _ => None,
            })
            .collect()
    }

    /// The events whose ref updates were asked for, in order, answered or not.
    fn asked_refs(&self) -> Vec<&str> {
        self.applies.iter().map(|(id, ..)| &**id).collect()
    }

    /// Submits as the handle does: counts the admission, then sends the command.
    fn submit_event(&mut self, ev: ValidEvent) {
        self.admitted.fetch_add(1, Ordering::SeqCst);
        self.core
            .identifier_urls()
            .reserve(&ev.identifier, &ev.urls)
            .expect("within the cap");
        let now = self.now();
        self.core.command(Command::Submit(ev), now);
        self.pass();
    }

    /// An event as the handle validates it, submitted now.
    #[allow(clippy::too_many_arguments)]
    fn valid_event(
        &self,
        id: &str,
        ident: &str,
        repo: &str,
        oids: &[ObjectId],
        missing: &[ObjectId],
        urls: &[&str],
        refs: &[RefUpdate],
        origin: Origin,
    ) -> ValidEvent {
        ValidEvent {
            id: id.into(),
            identifier: ident.into(),
            repo: Arc::from(PathBuf::from(repo).as_path()),
            oids: oids.to_vec(),
            missing: missing.to_vec(),
            urls: urls.iter().map(|u| crate::policy::clone_url(u)).collect(),
            refs: refs.into(),
            replace_refs: false,
            created_at: None,
            origin,
            submitted: self.now(),
            restored: None,
        }
    }

    fn pass(&mut self) {
        let now = self.now();
        self.core.pass(now);
        // A repository freed by a drop of temporary refs is served at once, as the
        // scheduler's next pass would.
        while self.collect() {
            self.core.pass(now);
        }
        // At every pass of the small scenarios; a scan per pass would make the large ones
        // quadratic.
        if self.core.waiting_events() <= 1000 {
            self.core.check_url_index_exactly();
        }
    }

    /// Takes the core's actions; whether a drop of temporary refs freed a repository.
    fn collect(&mut self) -> bool {
        let mut dropped = false;
        for a in self.core.take_actions() {
            match a {
                Action::Dispatch(j) => self.jobs.push(j),
                Action::Emit(o) => self.outcomes.push(o),
                Action::Check { entry, repo, oids } => self.checks.push((entry, repo, oids)),
                Action::DropRefs { repo, oids } => {
                    // Done at once, as a worker would report it.
                    self.core.refs_dropped(&repo);
                    self.drops.push((repo, oids));
                    dropped = true;
                }
                Action::ApplyRefs {
                    event_id,
                    repo,
                    updates,
                    replace_refs,
                } => self.applies.push((event_id, repo, updates, replace_refs)),
            }
        }
        dropped
    }

    /// Answers the oldest ref update asked for.
    fn answer_refs(&mut self, result: Result<(), &str>) -> Arc<str> {
        let (event_id, ..) = self.applies.remove(0);
        let result = result.map_err(|m| FetchError::new(FailureKind::LocalRepository, m));
        let now = self.now();
        self.core.refs_applied(&event_id, result, now);
        if self.collect() {
            self.pass();
        }
        event_id
    }

    fn advance(&mut self, d: Duration) {
        self.clock.advance(d);
        self.pass();
    }

    /// Completes the oldest running job, reporting `present` and an optional failure.
    fn finish(&mut self, present: &[ObjectId], error: Option<FailureKind>) -> Job {
        let job = self.jobs.remove(0);
        let report = FetchReport::new(
            present.to_vec(),
            error.map(|k| FetchError::new(k, "test failure")),
        );
        let now = self.now();
        self.core.job_done(job.id, report, now);
        self.pass();
        job
    }

    /// Completes the oldest running job as a visit that read the advertisement: `advertised`
    /// of the wanted ids were listed, `present` arrived, `missing` did not; `ids` says whether
    /// the server allows wants by id.
    fn visit(
        &mut self,
        advertised: &[ObjectId],
        present: &[ObjectId],
        missing: &[ObjectId],
        ids: bool,
    ) -> Job {
        let job = self.jobs.remove(0);
        let error =
            (!missing.is_empty()).then(|| FetchError::new(FailureKind::NotFound, "lacking"));
        let mut report = FetchReport::new(present.to_vec(), error);
        report.missing = missing.to_vec();
        report.advertised = advertised.to_vec();
        report.advertisement_read = true;
        report.ids_allowed = Some(ids);
        let now = self.now();
        self.core.job_done(job.id, report, now);
        self.pass();
        job
    }

    fn fail(&mut self) -> Job {
        self.finish(&[], Some(FailureKind::Protocol))
    }

    fn released(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter(|o| o.is_released())
            .map(|o| o.event_id())
            .collect()
    }

    fn expired(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter(|o| !o.is_released())
            .map(|o| o.event_id())
            .collect()
    }

    /// Advances in 100 ms steps until a job is dispatched; returns the time it took.
    fn time_to_next_job(&mut self, limit: Duration) -> Option<Duration> {
        let start = self.now();
        let before = self.jobs.len();
        while self.now() - start <= limit {
            if self.jobs.len() > before {
                return Some(self.now() - start);
            }
            self.advance(Duration::from_millis(100));
        }
        None
    }
}

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

#[test]
fn sync_event_is_first_tried_after_500ms() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    assert!(h.jobs.is_empty());
    h.advance(499 * MS);
    assert!(h.jobs.is_empty(), "not before 500 ms");
    h.advance(MS);
    assert_eq!(h.jobs.len(), 1);
    let j = &h.jobs[0];
    assert_eq!(j.request.url, "git://a/r");
    assert_eq!(j.request.wanted, vec![oid(1)]);
    assert_eq!(j.request.identifier, "id");
}

#[test]
fn user_event_is_first_tried_after_180s() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::User);
    h.advance(179 * SEC);
    assert!(h.jobs.is_empty(), "a push is expected first");
    h.advance(SEC);
    assert_eq!(h.jobs.len(), 1);
}

#[test]
fn incomplete_attempts_back_off_20_40_80_then_120() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    let mut waits = Vec::new();
    for _ in 0..6 {
        h.fail();
        let w = h
            .time_to_next_job(Duration::from_secs(200))
            .expect("retried");
        waits.push(w.as_secs());
    }
    assert_eq!(waits, [20, 40, 80, 120, 120, 120]);
    assert!(h.outcomes.is_empty());
}

#[test]
fn an_attempt_tries_every_url_in_order_then_backs_off() {
    let mut h = Harness::new();
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &["git://a/r", "git://b/r", "git://c/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    let urls: Vec<String> = (0..3)
        .map(|_| {
            assert_eq!(h.jobs.len(), 1, "one job per identifier at a time");
            h.fail().request.url
        })
        .collect();
    assert_eq!(urls, ["git://a/r", "git://b/r", "git://c/r"]);
    assert!(h.jobs.is_empty(), "URLs used up for this attempt");
    assert_eq!(h.time_to_next_job(Duration::from_secs(30)), Some(20 * SEC));
    assert_eq!(
        h.jobs[0].request.url, "git://a/r",
        "the next attempt starts over"
    );
}

#[test]
fn objects_from_different_urls_add_up() {
    let mut h = Harness::new();
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1), oid(2)],
        &["git://a/r", "git://b/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    // Mirror a has only the first object.
    h.finish(&[oid(1)], Some(FailureKind::Protocol));
    assert!(h.outcomes.is_empty());
    assert_eq!(
        h.jobs[0].request.wanted,
        vec![oid(2)],
        "only what is still missing"
    );
    h.finish(&[oid(2)], None);
    assert_eq!(h.released(), ["e"]);
    let s = h.core.stats();
    assert_eq!(
        (s.waiting_events, s.queued_identifiers, s.released),
        (0, 0, 1)
    );
    assert_eq!(h.admitted.load(Ordering::SeqCst), 0);
}

#[test]
fn release_reports_the_wait_and_drops_temporary_refs_once_the_repo_is_idle() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(2 * SEC);
    h.finish(&[oid(1)], None);
    match &h.outcomes[0] {
        Outcome::Released {
            waited,
            repo,
            identifier,
            ..
        } => {
            assert_eq!(*waited, 2 * SEC);
            assert_eq!(repo, &PathBuf::from("/r"));
            assert_eq!(identifier, "id");
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(h.drops.len(), 1);
    assert_eq!(h.drops[0].1, vec![oid(1)]);
}

#[test]
fn refs_still_needed_by_another_waiting_event_are_kept() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.submit(
        "e2",
        "id",
        "/r",
        &[oid(1), oid(2)],
        &["git://a/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    h.finish(&[oid(1)], Some(FailureKind::Protocol));
    assert_eq!(h.released(), ["e1"]);
    assert!(
        h.drops.is_empty(),
        "e2 still needs oid 1 pinned: {:?}",
        h.drops
    );
    h.core.command(Command::Cancel("e2".into()), h.now());
    h.pass();
    assert_eq!(h.drops.len(), 1);
    assert_eq!(h.drops[0].1, vec![oid(1), oid(2)]);
}

#[test]
fn refs_are_not_dropped_while_a_fetch_runs_in_the_repo() {
    let mut h = Harness::new();
    h.submit("e1", "id1", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.submit("e2", "id2", "/r", &[oid(2)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 1, "one fetch per repository");
    h.core.command(Command::Cancel("e2".into()), h.now());
    h.pass();
    assert!(h.drops.is_empty(), "a fetch into /r is running");
    h.finish(&[oid(1)], None);
    let mut dropped: Vec<ObjectId> = h.drops.iter().flat_map(|d| d.1.clone()).collect();
    dropped.sort_unstable();
    assert_eq!(dropped, [oid(1), oid(2)], "both dropped once /r is idle");
    assert!(h.drops.iter().all(|(r, _)| &**r == Path::new("/r")));
}

#[test]
fn events_expire_after_30_minutes_and_their_ids_are_remembered_for_7_days() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1), oid(2)], &[], Origin::Sync);
    h.advance(30 * 60 * SEC - MS);
    assert!(h.outcomes.is_empty());
    h.advance(MS);
    match &h.outcomes[..] {
        [Outcome::Expired {
            event_id,
            missing,
            reason,
            ..
        }] => {
            assert_eq!(event_id, "e");
            assert_eq!(missing, &[oid(1).to_string(), oid(2).to_string()]);
            assert_eq!(*reason, ExpiryReason::LifetimeEnded);
        }
        o => panic!("{o:?}"),
    }
    let s = h.core.stats();
    assert_eq!(
        (s.expired, s.waiting_events, s.queued_identifiers),
        (1, 0, 0)
    );
    assert_eq!(h.core.refused_for("e", h.now()), Some(7 * 24 * 3600 * SEC));
    h.advance(7 * 24 * 3600 * SEC - MS);
    assert_eq!(h.core.refused_for("e", h.now()), Some(MS));
    h.advance(MS);
    assert_eq!(h.core.refused_for("e", h.now()), None);
    assert_eq!(h.core.stats().expired_ids_remembered, 0, "memory is pruned");
}

const LIFE: Duration = Duration::from_secs(30 * 60);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

/// An expired id queued again (the handle sends a user's re-submission, or one whose data
/// arrived) waits and is no longer refused; when it expires again, its refusal counts from
/// then, and the end of the first refusal, still in the pruning order, leaves the second
/// alone. The id index says the same as the core's maps throughout (`stats` checks it).
#[test]
fn an_expired_id_that_waits_again_is_not_refused_until_it_expires_again() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &[], Origin::Sync);
    h.advance(LIFE);
    assert_eq!(h.expired(), ["e"]);
    assert_eq!(h.core.refused_for("e", h.now()), Some(WEEK));
    h.submit("e", "id", "/r", &[oid(1)], &[], Origin::User);
    assert_eq!(h.core.refused_for("e", h.now()), None, "waits again");
    let s = h.core.stats();
    assert_eq!(
        (s.submitted, s.waiting_events, s.expired_ids_remembered),
        (2, 1, 0)
    );
    h.advance(LIFE);
    assert_eq!(h.expired(), ["e", "e"]);
    assert_eq!(h.core.refused_for("e", h.now()), Some(WEEK));
    // When the first refusal would have ended.
    h.advance(WEEK - LIFE);
    assert_eq!(h.core.refused_for("e", h.now()), Some(LIFE));
    assert_eq!(h.core.stats().expired_ids_remembered, 1);
    h.advance(LIFE);
    assert_eq!(h.core.refused_for("e", h.now()), None);
    assert_eq!(h.core.stats().expired_ids_remembered, 0, "memory is pruned");
}

/// A user re-publishing a waiting synced event makes it a user event, as the reference relay
/// does: its lifetime starts again from the re-submission, and the state file says so. Any
/// other re-submission (synced again, a user event again or re-broadcast by sync) changes
/// nothing.
#[test]
fn a_user_republishing_a_waiting_synced_event_restarts_its_lifetime() {
    let mut h = Harness::new();
    h.submit("up", "id", "/r", &[oid(1)], &[], Origin::Sync);
    h.submit("sync", "id", "/r", &[oid(2)], &[], Origin::Sync);
    h.submit("user", "id", "/r", &[oid(3)], &[], Origin::User);
    h.advance(10 * 60 * SEC);
    h.submit("up", "id", "/r", &[oid(1)], &[], Origin::User);
    h.submit("sync", "id", "/r", &[oid(2)], &[], Origin::Sync);
    h.submit("user", "id", "/r", &[oid(3)], &[], Origin::Sync);
    h.submit("user", "id", "/r", &[oid(3)], &[], Origin::User);
    assert_eq!(h.admitted.load(Ordering::SeqCst), 3);
    assert_eq!(h.core.stats().submitted, 3);
    let file = h.core.snapshot(h.now(), 0).into_state_file();
    let saved = |id: &str| {
        let e = file.events.iter().find(|e| e.id == id).unwrap();
        (
            match e.origin {
                SavedOrigin::User => "user",
                SavedOrigin::Sync => "sync",
            },
            e.remaining_ms / 60_000,
            e.waited_ms / 60_000,
        )
    };
    assert_eq!(
        saved("up"),
        ("user", 30, 10),
        "a new lifetime, the same wait"
    );
    assert_eq!(saved("sync"), ("sync", 20, 10));
    assert_eq!(saved("user"), ("user", 20, 10));
    h.advance(20 * 60 * SEC);
    assert_eq!(h.expired(), ["sync", "user"]);
    h.advance(10 * 60 * SEC - MS);
    assert_eq!(h.expired(), ["sync", "user"]);
    h.advance(MS);
    assert_eq!(h.expired(), ["sync", "user", "up"]);
}

/// The upgraded event asks for an attempt as a new user event does: at the user delay after
/// the re-submission if that is earlier than the next attempt, never later, and the backoff
/// starts over.
#[test]
fn a_republished_event_moves_the_next_attempt_earlier_never_later() {
    let mut h = Harness::with(Config {
        user_delay: 10 * SEC,
        ..Config::default()
    });
    h.submit("e1", "id1", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(100 * MS);
    h.submit("e1", "id1", "/r", &[oid(1)], &["git://a/r"], Origin::User);
    assert_eq!(
        h.time_to_next_job(20 * SEC),
        Some(400 * MS),
        "still at the sync delay"
    );
    h.finish(&[oid(1)], None);
    assert_eq!(h.released(), ["e1"]);
    h.submit("e2", "id2", "/r", &[oid(2)], &["git://b/r"], Origin::Sync);
    h.advance(500 * MS);
    h.fail(); // next in 20 s
    assert_eq!(h.time_to_next_job(30 * SEC), Some(20 * SEC));
    h.fail(); // next in 40 s
    assert_eq!(h.time_to_next_job(50 * SEC), Some(40 * SEC));
    h.fail(); // next in 80 s
    h.advance(10 * SEC);
    h.submit("e2", "id2", "/r", &[oid(2)], &["git://b/r"], Origin::User);
    assert_eq!(
        h.time_to_next_job(100 * SEC),
        Some(10 * SEC),
        "the user delay, earlier than the 70 s of backoff left"
    );
    h.fail();
    assert_eq!(
        h.time_to_next_job(100 * SEC),
        Some(20 * SEC),
        "backoff starts over"
    );
}

#[test]
fn a_new_event_resets_backoff_and_moves_the_next_attempt_earlier() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    h.fail(); // next in 20 s
    h.time_to_next_job(30 * SEC).unwrap();
    h.fail(); // next in 40 s
    h.time_to_next_job(50 * SEC).unwrap();
    h.fail(); // next in 80 s
    h.advance(10 * SEC);
    h.submit("e2", "id", "/r", &[oid(2)], &[], Origin::Sync);
    assert_eq!(
        h.time_to_next_job(10 * SEC),
        Some(500 * MS),
        "earlier than the 80 s backoff"
    );
    assert_eq!(h.jobs[0].request.wanted, vec![oid(1), oid(2)]);
    h.fail();
    assert_eq!(
        h.time_to_next_job(100 * SEC),
        Some(20 * SEC),
        "backoff starts over"
    );
}

#[test]
fn a_new_event_never_moves_the_next_attempt_later() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(100 * MS);
    h.submit("e2", "id", "/r", &[oid(2)], &[], Origin::User);
    assert_eq!(
        h.time_to_next_job(10 * SEC),
        Some(400 * MS),
        "still at the sync delay"
    );
}

#[test]
fn a_user_event_then_a_sync_event_is_tried_at_the_sync_delay() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::User);
    h.advance(60 * SEC);
    h.submit("e2", "id", "/r", &[oid(2)], &[], Origin::Sync);
    assert_eq!(h.time_to_next_job(200 * SEC), Some(500 * MS));
}

#[test]
fn an_event_arriving_during_an_attempt_gets_its_own_prompt_attempt() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 1);
    // e2 arrives while e1's fetch runs, and that fetch does not want e2's object.
    h.submit("e2", "id", "/r", &[oid(2)], &["git://a/r"], Origin::Sync);
    assert_eq!(h.jobs.len(), 1, "still one job for the identifier");
    h.finish(&[oid(1)], None);
    assert_eq!(h.released(), ["e1"]);
    let wait = h.time_to_next_job(30 * SEC).unwrap();
    assert!(wait <= 500 * MS, "not the 20 s backoff: {wait:?}");
    assert_eq!(h.jobs[0].request.wanted, vec![oid(2)]);
}

#[test]
fn never_more_jobs_than_workers() {
    let mut h = Harness::with(Config {
        workers: 2,
        ..Config::default()
    });
    for i in 0..5u8 {
        h.submit(
            &format!("e{i}"),
            &format!("id{i}"),
            &format!("/r{i}"),
            &[oid(i)],
            &["git://a/r"],
            Origin::Sync,
        );
    }
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 2);
    assert_eq!(h.core.stats().in_flight, 2);
    h.advance(10 * SEC);
    assert_eq!(h.jobs.len(), 2, "ready entries wait for a free worker");
    h.finish(&[oid(0)], None);
    assert_eq!(h.jobs.len(), 2, "a freed worker is used at once");
    assert_eq!(h.core.stats().in_flight, 2);
}

#[test]
fn one_fetch_per_identifier_across_repositories() {
    let mut h = Harness::new();
    h.submit("e1", "same", "/r1", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.submit("e2", "same", "/r2", &[oid(2)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 1);
    assert_eq!(h.core.stats().queued_identifiers, 2);
    h.finish(&[oid(1)], None);
    assert_eq!(h.jobs.len(), 1);
    assert_eq!(h.jobs[0].request.repo, PathBuf::from("/r2"));
}

#[test]
fn one_fetch_per_repository_across_identifiers() {
    let mut h = Harness::new();
    h.submit("e1", "id1", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.submit("e2", "id2", "/r", &[oid(2)], &["git://a/r"], Origin::Sync);
    h.submit(
        "e3",
        "id3",
        "/other",
        &[oid(3)],
        &["git://a/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    let repos: Vec<PathBuf> = h.jobs.iter().map(|j| j.request.repo.clone()).collect();
    assert_eq!(
        repos,
        [PathBuf::from("/r"), PathBuf::from("/other")],
        "busy /r is stepped over"
    );
    h.finish(&[oid(1)], None);
    assert_eq!(h.jobs.last().unwrap().request.identifier, "id2");
}

#[test]
fn cancel_forgets_the_event_and_drops_an_idle_entry() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::User);
    h.core.command(Command::Cancel("e".into()), h.now());
    h.core.command(Command::Cancel("unknown".into()), h.now());
    h.pass();
    let s = h.core.stats();
    assert_eq!(
        (s.waiting_events, s.queued_identifiers, s.cancelled),
        (0, 0, 1)
    );
    assert_eq!(h.admitted.load(Ordering::SeqCst), 0);
    h.advance(31 * 60 * SEC);
    assert!(
        h.jobs.is_empty() && h.outcomes.is_empty(),
        "no fetch and no outcome"
    );
}

#[test]
fn an_entry_emptied_during_its_fetch_leaves_when_the_fetch_reports() {
    let mut h = Harness::new();
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &["git://a/r", "git://b/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    h.core.command(Command::Cancel("e".into()), h.now());
    h.pass();
    assert_eq!(h.core.stats().queued_identifiers, 1, "its fetch still runs");
    h.fail();
    assert!(
        h.jobs.is_empty(),
        "nothing waits: the next URL is not tried"
    );
    assert_eq!(h.core.stats().queued_identifiers, 0);
    assert!(h.outcomes.is_empty());
}

#[test]
fn git_data_arrived_checks_the_repository_without_a_fetch() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::User);
    h.submit("e2", "id", "/r", &[oid(2)], &["git://a/r"], Origin::User);
    h.core
        .command(Command::GitDataArrived("id".into()), h.now());
    h.core
        .command(Command::GitDataArrived("unknown".into()), h.now());
    h.collect();
    assert_eq!(h.checks.len(), 1);
    let (entry, repo, oids) = h.checks.remove(0);
    assert_eq!(&*repo, Path::new("/r"));
    assert_eq!(oids, vec![oid(1), oid(2)]);
    h.core.checked(entry, Ok(vec![oid(1)]), h.now());
    h.collect();
    assert_eq!(h.released(), ["e1"]);
    assert!(h.jobs.is_empty());
    assert_eq!(h.core.stats().rechecks, 1);
    assert_eq!(h.core.stats().waiting_events, 1);
}

#[test]
fn a_failed_recheck_changes_nothing() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &[], Origin::User);
    h.core
        .command(Command::GitDataArrived("id".into()), h.now());
    h.collect();
    let (entry, _, _) = h.checks.remove(0);
    h.core.checked(
        entry,
        Err(FetchError::new(FailureKind::LocalRepository, "gone")),
        h.now(),
    );
    h.collect();
    assert!(h.outcomes.is_empty());
    assert_eq!(h.core.stats().waiting_events, 1);
}

#[test]
fn a_duplicate_submit_is_ignored_and_gives_its_admission_back() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(10 * SEC);
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    assert_eq!(h.admitted.load(Ordering::SeqCst), 1);
    assert_eq!(h.core.stats().submitted, 1);
    h.advance(30 * 60 * SEC - 10 * SEC);
    assert_eq!(
        h.expired(),
        ["e"],
        "the lifetime counts from the first submit"
    );
}

#[test]
fn an_event_without_urls_waits_for_a_push_until_it_expires() {
    let mut h = Harness::with(Config {
        event_lifetime: 10 * SEC,
        ..Config::default()
    });
    h.submit("e", "id", "/r", &[oid(1)], &[], Origin::Sync);
    h.advance(9 * SEC);
    assert!(h.jobs.is_empty() && h.outcomes.is_empty());
    h.core
        .command(Command::GitDataArrived("id".into()), h.now());
    h.collect();
    let (entry, _, _) = h.checks.remove(0);
    h.core.checked(entry, Ok(vec![oid(1)]), h.now());
    h.collect();
    assert_eq!(h.released(), ["e"]);
}

#[test]
fn a_panicked_fetch_counts_as_a_failure_and_the_next_url_is_tried() {
    let mut h = Harness::new();
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &["git://a/r", "git://b/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    h.finish(&[], Some(FailureKind::Panicked));
    assert_eq!(h.jobs[0].request.url, "git://b/r");
    h.finish(&[oid(1)], None);
    let s = h.core.stats();
    assert_eq!(
        (s.fetches_started, s.fetches_succeeded, s.fetches_failed),
        (2, 1, 1)
    );
    assert_eq!(s.failures.get(&FailureKind::Panicked), Some(&1));
    assert_eq!(h.released(), ["e"]);
}

/// A fetch that ends with an error is partial when some wanted objects are present after it,
/// failed when none are: each counted once, in the totals and per domain, and only failed ones
/// by kind.
#[test]
fn a_fetch_with_an_error_is_partial_if_it_left_some_wanted_objects_else_failed() {
    let mut h = Harness::new();
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1), oid(2), oid(3)],
        &["git://a/r", "git://b/r", "git://c/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    h.finish(&[oid(1)], Some(FailureKind::NotFound));
    h.finish(&[], Some(FailureKind::NotFound));
    h.finish(&[oid(2), oid(3)], None);
    assert_eq!(h.released(), ["e"]);
    let s = h.core.stats();
    assert_eq!(
        (
            s.fetches_started,
            s.fetches_succeeded,
            s.fetches_partial,
            s.fetches_failed
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(s.failures.get(&FailureKind::NotFound), Some(&1));
    assert_eq!(s.recent_failures.len(), 2, "both errors are kept");
    let per = |d: &str| {
        let d = &s.domains[d];
        (d.succeeded, d.partial, d.failed.values().sum::<u64>())
    };
    assert_eq!(
        (per("a"), per("b"), per("c")),
        ((0, 1, 0), (0, 0, 1), (1, 0, 0))
    );
}

#[test]
fn urls_of_later_events_join_the_running_attempt() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    h.submit(
        "e2",
        "id",
        "/r",
        &[oid(1)],
        &["git://b/r", "git://a/r"],
        Origin::Sync,
    );
    h.fail();
    assert_eq!(h.jobs[0].request.url, "git://b/r");
}

#[test]
fn stopping_dispatches_nothing_more() {
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.core.stop_dispatching();
    h.advance(10 * SEC);
    assert!(h.jobs.is_empty());
}

#[test]
fn a_pass_touches_only_ready_entries() {
    // 10 000 entries scheduled in the future and one ready: the pass dispatches exactly one.
    let mut h = Harness::new();
    for i in 0..10_000u32 {
        let b = i.to_be_bytes();
        let o = ObjectId::from_bytes([
            b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ]);
        h.submit(
            &format!("e{i}"),
            &format!("id{i}"),
            &format!("/r{i}"),
            &[o],
            &["git://a/r"],
            Origin::User,
        );
    }
    h.submit(
        "ready",
        "ready",
        "/ready",
        &[oid(9)],
        &["git://a/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 1);
    assert_eq!(h.jobs[0].request.identifier, "ready");
}

// Ref updates on release.

fn main_at(n: u8) -> RefUpdate {
    RefUpdate::oid("refs/heads/main", oid(n).to_string())
}

/// A repository state's complete ref set, with a deletion: the write is asked with
/// `replace_refs`, and a checkpoint keeps both the flag and the deletion.
#[test]
fn a_complete_ref_set_is_written_as_one_and_kept_by_a_checkpoint() {
    let mut h = Harness::new();
    let refs = [main_at(1), RefUpdate::delete("refs/tags/old")];
    let mut ev = h.valid_event(
        "state",
        "id",
        "/r",
        &[oid(1)],
        &[oid(1)],
        &["git://a/r"],
        &refs,
        Origin::Sync,
    );
    ev.replace_refs = true;
    h.submit_event(ev);
    h.submit_refs("pr", "/r", &[oid(2)], &[main_at(2)]);

    let file = h.core.snapshot(h.now(), 0).into_state_file();
    let saved = &file.events[0];
    assert_eq!(saved.id, "state");
    assert!(saved.replace_refs);
    let gone = &saved.ref_updates[1];
    assert_eq!(
        (gone.name.as_str(), gone.delete, &gone.oid, &gone.symbolic),
        ("refs/tags/old", true, &None, &None)
    );
    assert!(!file.events[1].replace_refs);

    h.advance(500 * MS);
    h.finish(&[oid(1), oid(2)], None);
    let asked: Vec<(&str, bool)> = h
        .applies
        .iter()
        .map(|(id, _, _, replace)| (&**id, *replace))
        .collect();
    assert_eq!(asked, [("state", true), ("pr", false)]);
    assert_eq!(&h.applies[0].2[..], &refs);
}

#[test]
fn an_event_with_refs_is_released_only_after_they_are_written() {
    let mut h = Harness::new();
    let refs = [main_at(1), RefUpdate::symbolic("HEAD", "refs/heads/main")];
    h.submit_refs("e", "/r", &[oid(1)], &refs);
    h.advance(500 * MS);
    h.finish(&[oid(1)], None);
    assert!(h.outcomes.is_empty(), "not released before its refs");
    assert_eq!(h.applies.len(), 1);
    let (event_id, repo, updates, replace_refs) = &h.applies[0];
    assert!(!replace_refs);
    assert_eq!((&**event_id, &**repo), ("e", Path::new("/r")));
    assert_eq!(&updates[..], &refs);
    assert!(
        h.drops.is_empty(),
        "objects stay pinned until the refs exist"
    );
    let s = h.core.stats();
    assert_eq!((s.waiting_events, s.awaiting_refs, s.released), (1, 1, 0));
    // Asked once: further passes wait for the answer.
    h.advance(10 * SEC);
    assert_eq!(h.applies.len(), 1);
    assert!(
        h.jobs.is_empty(),
        "nothing is fetched for an event awaiting refs"
    );

    h.answer_refs(Ok(()));
    assert_eq!(h.released(), ["e"]);
    assert_eq!(
        h.drops.len(),
        1,
        "temporary refs go once the event is released"
    );
    assert_eq!(h.drops[0].1, vec![oid(1)]);
    let s = h.core.stats();
    assert_eq!(
        (
            s.waiting_events,
            s.awaiting_refs,
            s.queued_identifiers,
            s.released,
            s.ref_updates_applied
        ),
        (0, 0, 0, 1, 1)
    );
    assert_eq!(h.admitted.load(Ordering::SeqCst), 0);
}

#[test]
fn ref_updates_wait_while_a_fetch_runs_in_the_repository() {
    let mut h = Harness::new();
    let ev = h.valid_event(
        "e1",
        "id1",
        "/r",
        &[oid(1)],
        &[oid(1)],
        &[],
        &[main_at(1)],
        Origin::User,
    );
    h.submit_event(ev);
    h.submit("e2", "id2", "/r", &[oid(2)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 1, "e2's fetch runs in /r");
    // A push brings e1's object while e2's fetch runs.
    h.core
        .command(Command::GitDataArrived("id1".into()), h.now());
    h.collect();
    let (entry, _, _) = h.checks.remove(0);
    h.core.checked(entry, Ok(vec![oid(1)]), h.now());
    h.collect();
    h.pass();
    assert!(h.applies.is_empty(), "deferred: a fetch runs in /r");
    assert_eq!(h.core.stats().awaiting_refs, 1);
    h.finish(&[], Some(FailureKind::Protocol));
    assert_eq!(h.applies.len(), 1, "written as soon as /r is idle");
    h.answer_refs(Ok(()));
    assert_eq!(h.released(), ["e1"]);
}

#[test]
fn refs_are_written_before_the_next_fetch_into_the_repository_starts() {
    let mut h = Harness::new();
    h.submit_refs("e1", "/r", &[oid(1)], &[main_at(1)]);
    h.submit("e2", "id2", "/r", &[oid(2)], &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    let job = h.jobs.remove(0);
    assert_eq!(
        job.request.identifier, "id",
        "e1's fetch; e2's waits for /r"
    );
    let now = h.now();
    h.core
        .job_done(job.id, FetchReport::new(vec![oid(1)], None), now);
    h.core.pass(now);
    // One pass decided both; the loop carries actions out in order, so the refs are written
    // before e2's fetch into /r is handed to a worker.
    let kinds: Vec<&str> = h
        .core
        .take_actions()
        .iter()
        .map(|a| match a {
            Action::ApplyRefs { .. } => "apply",
            Action::Dispatch(_) => "dispatch",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["apply", "dispatch"]);
}

#[test]
fn a_failed_ref_update_is_retried_a_tick_later_and_wants_no_fetch() {
    let mut h = Harness::with(Config {
        event_lifetime: 60 * SEC,
        ..Config::default()
    });
    h.submit_refs("e", "/r", &[oid(1)], &[main_at(1)]);
    h.advance(500 * MS);
    h.finish(&[oid(1)], None);
    h.answer_refs(Err("failed to lock refs/heads/main"));
    assert!(h.outcomes.is_empty());
    assert!(h.applies.is_empty(), "not retried at once");
    let s = h.core.stats();
    assert_eq!(
        (s.waiting_events, s.awaiting_refs, s.ref_update_failures),
        (1, 1, 1)
    );
    h.advance(SEC - MS);
    assert!(h.applies.is_empty(), "not before a tick");
    h.advance(MS);
    assert_eq!(h.applies.len(), 1, "retried at the next tick");
    h.answer_refs(Err("still locked"));
    h.advance(SEC);
    assert_eq!(h.applies.len(), 1);
    // A new event of the entry wants only its own object, not the awaiting event's.
    h.submit("e2", "id", "/r", &[oid(2)], &[], Origin::Sync);
    h.advance(500 * MS);
    assert_eq!(h.jobs.len(), 1);
    assert_eq!(h.jobs[0].request.wanted, vec![oid(2)]);
    h.answer_refs(Ok(()));
    assert_eq!(h.released(), ["e"]);
    assert_eq!(h.core.stats().ref_update_failures, 2);
    assert!(h.drops.is_empty(), "/r is busy with e2's fetch");
}

// The newest state wins.

const WRITTEN: RefsOutcome = RefsOutcome::Written;

/// The newer state's data arrives first and it is written; the older state's data arrives
/// later: its refs are not written (they would roll `main` back), it is released saying so,
/// and its pinned objects go.
#[test]
fn an_older_state_satisfied_after_a_newer_one_was_written_is_released_unwritten() {
    let mut h = Harness::new();
    h.submit_state("newer", "/r", &[oid(2)], Some(200));
    h.submit_state("older", "/r", &[oid(1)], Some(100));
    h.advance(500 * MS);
    h.finish(&[oid(2)], Some(FailureKind::NotFound));
    assert_eq!(h.asked_refs(), ["newer"]);
    h.answer_refs(Ok(()));
    assert_eq!(h.released_refs(), [("newer", WRITTEN)]);

    let job = h
        .time_to_next_job(60 * SEC)
        .expect("the older state is fetched again");
    assert_eq!(job, 20 * SEC, "backoff");
    h.finish(&[oid(1)], None);
    assert!(
        h.applies.is_empty(),
        "the older state's refs are not asked for"
    );
    assert_eq!(
        h.released_refs(),
        [
            ("newer", WRITTEN),
            ("older", RefsOutcome::skipped_older_state(200))
        ]
    );
    assert!(
        h.drops.iter().any(|(_, oids)| oids.contains(&oid(1))),
        "its pins go: {:?}",
        h.drops
    );
    let s = h.core.stats();
    assert_eq!(
        (
            s.waiting_events,
            s.awaiting_refs,
            s.released,
            s.ref_updates_applied
        ),
        (0, 0, 2, 1)
    );
    assert_eq!(h.admitted.load(Ordering::SeqCst), 0);
}

/// The other order: the older state's data comes first, so it is written, then the newer
/// one is written over it.
#[test]
fn states_satisfied_oldest_first_are_all_written_in_that_order() {
    let mut h = Harness::new();
    h.submit_state("newer", "/r", &[oid(2)], Some(200));
    h.submit_state("older", "/r", &[oid(1)], Some(100));
    h.advance(500 * MS);
    h.finish(&[oid(1)], Some(FailureKind::NotFound));
    h.answer_refs(Ok(()));
    h.time_to_next_job(60 * SEC).expect("fetched again");
    h.finish(&[oid(2)], None);
    h.answer_refs(Ok(()));
    assert_eq!(h.asked_refs(), Vec::<&str>::new(), "every write answered");
    assert_eq!(h.released_refs(), [("older", WRITTEN), ("newer", WRITTEN)]);
}

/// Both satisfied by one fetch, in either submission order: the newer state is written, the
/// older one waits for it and is then released unwritten, without a write that the newer
/// one would have to undo.
#[test]
fn states_satisfied_together_write_only_the_newest() {
    for newer_first in [true, false] {
        let mut h = Harness::new();
        let submit = |h: &mut Harness, newer: bool| {
            if newer {
                h.submit_state("newer", "/r", &[oid(2)], Some(200));
            } else {
                h.submit_state("older", "/r", &[oid(1)], Some(100));
            }
        };
        submit(&mut h, newer_first);
        submit(&mut h, !newer_first);
        h.advance(500 * MS);
        h.finish(&[oid(1), oid(2)], None);
        assert_eq!(h.asked_refs(), ["newer"], "newer first: {newer_first}");
        h.answer_refs(Ok(()));
        assert!(h.applies.is_empty(), "newer first: {newer_first}");
        assert_eq!(
            h.released_refs(),
            [
                ("newer", WRITTEN),
                ("older", RefsOutcome::skipped_older_state(200))
            ],
            "newer first: {newer_first}"
        );
    }
}

/// An older state waits while a newer one's write fails; when the newer one expires without
/// being written, the older one is written after all: nothing newer reached the repository.
#[test]
fn an_older_state_is_written_if_the_newer_one_never_could_be() {
    let mut h = Harness::with(Config {
        event_lifetime: 10 * SEC,
        ..Config::default()
    });
    h.submit_state("newer", "/r", &[oid(2)], Some(200));
    h.advance(SEC);
    h.submit_state("older", "/r", &[oid(1)], Some(100));
    h.advance(500 * MS);
    h.finish(&[oid(1), oid(2)], None);
    let mut asked = Vec::new();
    while h.expired().is_empty() {
        if !h.applies.is_empty() {
            asked.push(h.answer_refs(Err("refs/heads/main is locked")));
        }
        h.advance(100 * MS);
    }
    assert!(
        asked.len() > 5 && asked.iter().all(|id| &**id == "newer"),
        "{asked:?}"
    );
    assert_eq!(h.expired(), ["newer"]);
    h.advance(100 * MS);
    assert_eq!(h.asked_refs(), ["older"]);
    h.answer_refs(Ok(()));
    assert_eq!(h.released_refs(), [("older", WRITTEN)]);
}

/// Without `created_at`, or without `replace_refs`, events keep the submission-order
/// behaviour: whatever is satisfied is written, older or not.
#[test]
fn without_created_at_or_a_complete_set_every_state_is_written() {
    for (newer, older) in [(None, None), (Some(200), None), (None, Some(100))] {
        let mut h = Harness::new();
        h.submit_state("newer", "/r", &[oid(2)], newer);
        h.submit_state("older", "/r", &[oid(1)], older);
        h.advance(500 * MS);
        h.finish(&[oid(2)], Some(FailureKind::NotFound));
        h.answer_refs(Ok(()));
        h.time_to_next_job(60 * SEC).expect("fetched again");
        h.finish(&[oid(1)], None);
        assert_eq!(h.asked_refs(), ["older"], "{newer:?} {older:?}");
        h.answer_refs(Ok(()));
        assert_eq!(
            h.released_refs(),
            [("newer", WRITTEN), ("older", WRITTEN)],
            "{newer:?} {older:?}"
        );
    }
    // A pull request's ref (no complete set) is written whatever its created_at.
    let mut h = Harness::new();
    h.state_written("newer", "/r", oid(2), Some(200));
    let mut pr = h.valid_event(
        "pr",
        "id",
        "/r",
        &[oid(1)],
        &[oid(1)],
        &["git://a/r"],
        &[RefUpdate::oid("refs/nostr/pr", oid(1).to_string())],
        Origin::Sync,
    );
    pr.created_at = Some(1);
    h.submit_event(pr);
    h.advance(500 * MS);
    h.finish(&[oid(1)], None);
    assert_eq!(h.asked_refs(), ["pr"]);
}

impl Harness {
    /// A complete state of `repo` waiting for `o`, fetched at its first attempt: its refs are
    /// asked for (or skipped) now.
    fn state_satisfied(&mut self, id: &str, repo: &str, o: ObjectId, created_at: Option<u64>) {
        self.submit_state(id, repo, &[o], created_at);
        self.advance(500 * MS);
        self.finish(&[o], None);
    }

    /// The same, and its refs written.
    fn state_written(&mut self, id: &str, repo: &str, o: ObjectId, created_at: Option<u64>) {
        self.state_satisfied(id, repo, o, created_at);
        self.answer_refs(Ok(()));
    }
}

/// Each repository has its own newest state.
#[test]
fn the_newest_state_is_per_repository() {
    let mut h = Harness::new();
    h.state_written("newer", "/r", oid(2), Some(200));
    h.state_satisfied("older-elsewhere", "/s", oid(1), Some(100));
    assert_eq!(h.asked_refs(), ["older-elsewhere"]);
}

/// The newest state is remembered for an event lifetime after it was written: an older state
/// can only wait in purgatory that long. After that an older state is written again.
#[test]
fn the_newest_state_is_forgotten_an_event_lifetime_after_it_was_written() {
    let lifetime = 30 * 60 * SEC;
    let mut h = Harness::new();
    h.state_written("newer", "/r", oid(2), Some(200));
    h.advance(lifetime - SEC);
    h.state_satisfied("older", "/r", oid(1), Some(100));
    assert!(h.applies.is_empty());
    assert_eq!(
        h.released_refs()[1],
        ("older", RefsOutcome::skipped_older_state(200))
    );
    assert_eq!(
        h.core
            .snapshot(h.now(), 0)
            .into_state_file()
            .newest_states
            .len(),
        1
    );
    h.advance(SEC);
    assert!(
        h.core
            .snapshot(h.now(), 0)
            .into_state_file()
            .newest_states
            .is_empty(),
        "forgotten"
    );
    h.state_satisfied("oldest", "/r", oid(3), Some(50));
    assert_eq!(h.asked_refs(), ["oldest"]);
}

/// A checkpoint keeps each event's `created_at` and the newest state of each repository with
/// the time it is still remembered; restored after a downtime, the newest state still holds
/// back an older one, and is forgotten when the downtime outlasted it.
#[test]
fn the_newest_states_survive_a_restart() {
    let mut h = Harness::new();
    h.state_written("newer", "/r", oid(2), Some(200));
    h.submit_state("waiting", "/r", &[oid(5)], Some(300));
    h.advance(60 * SEC);
    let file = h.core.snapshot(h.now(), 0).into_state_file();
    assert_eq!(file.events[0].created_at, Some(300));
    assert!(file.events[0].replace_refs);
    let [saved] = &file.newest_states[..] else {
        panic!("{:?}", file.newest_states)
    };
    assert_eq!(
        (saved.repo.as_path(), saved.created_at, saved.remaining_ms),
        (Path::new("/r"), 200, (30 * 60 - 60) * 1000)
    );

    for (downtime, skipped) in [(10 * 60 * SEC, true), (29 * 60 * SEC, false)] {
        let mut h = Harness::new();
        let states = file
            .newest_states
            .iter()
            .map(|n| {
                let repo: Arc<Path> = Arc::from(n.repo.as_path());
                (repo, n.created_at, Duration::from_millis(n.remaining_ms))
            })
            .collect();
        let now = h.now();
        h.core.restore_newest_states(states, downtime, now);
        h.submit_state("older", "/r", &[oid(1)], Some(100));
        h.advance(500 * MS);
        h.finish(&[oid(1)], None);
        if skipped {
            assert!(h.applies.is_empty(), "{downtime:?}");
            assert_eq!(
                h.released_refs(),
                [("older", RefsOutcome::skipped_older_state(200))]
            );
        } else {
            assert_eq!(h.asked_refs(), ["older"], "{downtime:?}");
        }
    }
}

#[test]
fn an_event_whose_refs_keep_failing_expires_with_the_last_error() {
    let mut h = Harness::with(Config {
        event_lifetime: 10 * SEC,
        ..Config::default()
    });
    h.submit_refs("e", "/r", &[oid(1)], &[main_at(1)]);
    h.advance(500 * MS);
    h.finish(&[oid(1)], None);
    let mut failures = 0;
    while h.outcomes.is_empty() && failures < 100 {
        if !h.applies.is_empty() {
            failures += 1;
            h.answer_refs(Err(&format!("locked {failures}")));
        }
        h.advance(100 * MS);
    }
    assert!(failures >= 9, "retried every tick: {failures}");
    match &h.outcomes[..] {
        [Outcome::Expired {
            event_id,
            missing,
            reason,
            ..
        }] => {
            assert_eq!(event_id, "e");
            assert!(missing.is_empty(), "{missing:?}");
            assert_eq!(
                *reason,
                ExpiryReason::RefUpdateFailed {
                    message: format!("locked {failures}")
                }
            );
        }
        o => panic!("{o:?}"),
    }
    let s = h.core.stats();
    assert_eq!(
        (s.waiting_events, s.awaiting_refs, s.expired, s.released),
        (0, 0, 1, 0)
    );
    assert_eq!(h.admitted.load(Ordering::SeqCst), 0);
    assert_eq!(h.drops.len(), 1, "its temporary refs go");
    assert!(h.core.refused_for("e", h.now()).is_some());
}

#[test]
fn an_event_complete_at_submit_with_refs_is_written_at_the_next_pass() {
    let mut h = Harness::new();
    let ev = h.valid_event(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &[],
        &["git://a/r"],
        &[main_at(1)],
        Origin::User,
    );
    h.submit_event(ev);
    assert_eq!(h.applies.len(), 1, "asked at the pass after the command");
    let s = h.core.stats();
    assert_eq!((s.submitted, s.waiting_events, s.awaiting_refs), (1, 1, 1));
    h.answer_refs(Ok(()));
    match &h.outcomes[..] {
        [Outcome::Released {
            event_id, waited, ..
        }] => {
            assert_eq!(event_id, "e");
            assert_eq!(*waited, Duration::ZERO);
        }
        o => panic!("{o:?}"),
    }
    h.advance(200 * SEC);
    assert!(h.jobs.is_empty(), "nothing was ever fetched");
    assert_eq!(h.core.stats().queued_identifiers, 0);
    assert_eq!(h.admitted.load(Ordering::SeqCst), 0);
}

#[test]
fn an_entry_left_with_events_awaiting_refs_is_scheduled_afresh_by_a_new_event() {
    let mut h = Harness::with(Config {
        event_lifetime: 3600 * SEC,
        ..Config::default()
    });
    h.submit_refs("e1", "/r", &[oid(1)], &[main_at(1)]);
    h.advance(500 * MS);
    h.finish(&[oid(1)], None);
    h.answer_refs(Err("locked"));
    // Backoff state is gone with the complete attempt; a user event waits for its push.
    h.advance(100 * SEC);
    h.submit("e2", "id", "/r", &[oid(2)], &[], Origin::User);
    assert_eq!(h.time_to_next_job(300 * SEC), Some(180 * SEC));
    assert_eq!(h.jobs[0].request.wanted, vec![oid(2)]);
}

#[test]
fn events_without_refs_never_ask_for_ref_updates() {
    let mut h = Harness::new();
    h.submit("e1", "id", "/r", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.submit_refs("e2", "/r", &[oid(1), oid(2)], &[main_at(2)]);
    h.advance(500 * MS);
    h.finish(&[oid(1)], Some(FailureKind::Protocol));
    assert_eq!(h.released(), ["e1"], "released at once, as before");
    assert!(h.applies.is_empty());
    h.time_to_next_job(30 * SEC)
        .expect("e2 is retried after the backoff");
    h.finish(&[oid(2)], None);
    assert_eq!(h.applies.len(), 1);
    assert_eq!(&*h.applies[0].0, "e2");
}

#[test]
fn a_recheck_writes_refs_at_once_and_skips_entries_with_nothing_missing() {
    let mut h = Harness::new();
    let ev = h.valid_event(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &[oid(1)],
        &[],
        &[main_at(1)],
        Origin::User,
    );
    h.submit_event(ev);
    h.core
        .command(Command::GitDataArrived("id".into()), h.now());
    h.collect();
    let (entry, _, _) = h.checks.remove(0);
    h.core.checked(entry, Ok(vec![oid(1)]), h.now());
    h.collect();
    assert_eq!(
        h.applies.len(),
        1,
        "within the same wake, not at the next tick"
    );
    h.answer_refs(Err("locked"));
    h.core
        .command(Command::GitDataArrived("id".into()), h.now());
    h.collect();
    assert!(h.checks.is_empty(), "nothing left to look for");
    assert_eq!(h.core.stats().rechecks, 1);
}

#[test]
fn a_cancelled_event_awaiting_refs_is_forgotten() {
    let mut h = Harness::new();
    h.submit_refs("e", "/r", &[oid(1)], &[main_at(1)]);
    h.advance(500 * MS);
    h.finish(&[oid(1)], None);
    h.answer_refs(Err("locked"));
    h.core.command(Command::Cancel("e".into()), h.now());
    h.advance(10 * SEC);
    assert!(h.applies.is_empty() && h.outcomes.is_empty());
    let s = h.core.stats();
    assert_eq!((s.waiting_events, s.awaiting_refs, s.cancelled), (0, 0, 1));
    assert_eq!(h.drops.len(), 1);
}

// ---- politeness: per-domain limits, domain queues, naughty list, our own domain ----

fn polite(limits: crate::config::DomainLimits) -> Harness {
    Harness::with(Config {
        domain_limits: limits,
        sync_delay: Duration::ZERO,
        ..Config::default()
    })
}

fn limits(max_concurrent: usize, per_minute: u32, burst: u32) -> crate::config::DomainLimits {
    crate::config::DomainLimits::new(max_concurrent, per_minute).burst(burst)
}

impl Harness {
    /// Completes the running job of `identifier` with a failure of `kind`.
    fn fail_ident(&mut self, identifier: &str, kind: FailureKind) -> Job {
        let pos = self
            .jobs
            .iter()
            .position(|j| j.request.identifier == identifier)
            .unwrap_or_else(|| panic!("no job for {identifier}: {:?}", self.jobs));
        let job = self.jobs.remove(pos);
        let now = self.now();
        self.core.job_done(
            job.id,
            FetchReport::failed(FetchError::new(kind, "test")),
            now,
        );
        self.pass();
        job
    }

    fn running_identifiers(&self) -> Vec<String> {
        self.jobs
            .iter()
            .map(|j| j.request.identifier.clone())
            .collect()
    }
}

/// The number of entries waiting in each domain's queue is kept as entries park and leave
/// (the statistics no longer scan the queue): every way out of a queue lowers it, in every
/// domain the entry waited in. (`stats` also checks the count against a scan of the queues in
/// unit tests.)
#[test]
fn every_way_out_of_a_domain_queue_lowers_its_waiting_count() {
    let mut h = polite(limits(1, 600_000, 100_000));
    let queued = |h: &Harness| {
        let s = h.core.stats();
        let n = |d: &str| s.domains.get(d).map_or(0, |d| d.queued_identifiers);
        (n("a.example"), n("b.example"))
    };
    // id0 and id1 take the only slot of each domain; id2..id5 wait in both queues.
    h.submit(
        "e0",
        "id0",
        "/r0",
        &[oid(1)],
        &["https://a.example/r"],
        Origin::Sync,
    );
    h.submit(
        "e1",
        "id1",
        "/r1",
        &[oid(1)],
        &["https://b.example/r"],
        Origin::Sync,
    );
    let both = ["https://a.example/r", "https://b.example/r"];
    for k in 2..=5u8 {
        let (e, id) = (format!("e{k}"), format!("id{k}"));
        h.submit(&e, &id, &format!("/r{k}"), &[oid(k)], &both, Origin::Sync);
    }
    assert_eq!(h.running_identifiers(), ["id0", "id1"]);
    assert_eq!(queued(&h), (4, 4));
    // Cancelled while waiting.
    h.core.command(Command::Cancel("e2".into()), h.now());
    h.pass();
    assert_eq!(queued(&h), (3, 3), "cancel");
    // Released by a push while waiting: the recheck finds its object.
    h.core
        .command(Command::GitDataArrived("id3".into()), h.now());
    h.collect();
    let (entry, _, _) = h.checks.remove(0);
    h.core.checked(entry, Ok(vec![oid(3)]), h.now());
    h.collect();
    assert_eq!(h.released(), ["e3"]);
    assert_eq!(queued(&h), (2, 2), "released by a push");
    // Served: id4 takes a.example's slot and leaves its queue; it still waits in b.example's
    // for its URL there.
    h.fail_ident("id0", FailureKind::NotFound);
    assert_eq!(h.running_identifiers(), ["id1", "id4"]);
    assert_eq!(queued(&h), (1, 2), "served");
    // Expired while waiting.
    h.advance(31 * 60 * SEC);
    assert!(h.expired().contains(&"e5"), "{:?}", h.expired());
    assert_eq!(queued(&h), (0, 0), "expired");
}

#[test]
fn a_domain_never_has_more_fetches_in_flight_than_its_cap() {
    let mut h = polite(limits(2, 600, 100));
    for i in 0..5u8 {
        let id = format!("id{i}");
        h.submit(
            &id,
            &id,
            &format!("/r{i}"),
            &[oid(i)],
            &["https://host.example/r"],
            Origin::Sync,
        );
    }
    assert_eq!(h.running_identifiers(), ["id0", "id1"]);
    let s = h.core.stats();
    assert_eq!(s.domains["host.example"].in_flight, 2);
    assert_eq!(s.domains["host.example"].queued_identifiers, 3);
    h.fail_ident("id1", FailureKind::NotFound);
    assert_eq!(
        h.running_identifiers(),
        ["id0", "id2"],
        "the oldest waiting one is next"
    );
    h.fail_ident("id0", FailureKind::NotFound);
    h.fail_ident("id2", FailureKind::NotFound);
    assert_eq!(h.running_identifiers(), ["id3", "id4"]);
}

#[test]
fn domains_do_not_hold_each_other_up() {
    let mut h = polite(limits(1, 600, 100));
    h.submit(
        "a",
        "a",
        "/a",
        &[oid(1)],
        &["https://busy.example/r"],
        Origin::Sync,
    );
    h.submit(
        "b",
        "b",
        "/b",
        &[oid(2)],
        &["https://busy.example/r"],
        Origin::Sync,
    );
    h.submit(
        "c",
        "c",
        "/c",
        &[oid(3)],
        &["https://other.example/r"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["a", "c"]);
}

#[test]
fn a_rate_limited_idle_domain_is_served_when_its_quota_refills_without_any_completion() {
    // One start every 10 s, burst 1.
    let mut h = polite(limits(5, 6, 1));
    h.submit(
        "a",
        "a",
        "/a",
        &[oid(1)],
        &["https://slow.example/r"],
        Origin::Sync,
    );
    h.submit(
        "b",
        "b",
        "/b",
        &[oid(2)],
        &["https://slow.example/r"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["a"]);
    h.fail_ident("a", FailureKind::NotFound);
    assert!(
        h.jobs.is_empty(),
        "b waits for a cell with nothing in flight"
    );
    let s = h.core.stats();
    assert_eq!(
        s.domains["slow.example"].next_cell_in,
        Duration::from_secs(10)
    );
    // The scheduler is told when to wake: the refill, not the next tick.
    assert_eq!(
        h.core.next_wake(h.now()),
        Some(h.now() + Duration::from_secs(10))
    );
    h.advance(Duration::from_millis(9_900));
    assert!(h.jobs.is_empty());
    h.advance(Duration::from_millis(100));
    assert_eq!(
        h.running_identifiers(),
        ["b"],
        "served by a pass, no completion needed"
    );
}

#[test]
fn identifiers_on_one_capped_domain_are_served_round_robin() {
    let mut h = polite(limits(1, 600_000, 1000));
    for id in ["A", "B", "C"] {
        let urls = [
            format!("https://one.example/{id}1"),
            format!("https://one.example/{id}2"),
        ];
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        h.submit(
            id,
            id,
            &format!("/{id}"),
            &[oid(id.as_bytes()[0])],
            &urls,
            Origin::Sync,
        );
    }
    let mut order = Vec::new();
    for _ in 0..6 {
        assert_eq!(h.jobs.len(), 1, "cap 1");
        let job = h.jobs[0].clone();
        order.push(job.request.url.rsplit('/').next().unwrap().to_owned());
        h.fail_ident(&job.request.identifier, FailureKind::NotFound);
    }
    assert_eq!(order, ["A1", "B1", "C1", "A2", "B2", "C2"]);
}

#[test]
fn dns_and_tls_failures_put_a_domain_on_the_naughty_list_for_12_hours() {
    for kind in [FailureKind::Dns, FailureKind::Tls] {
        let mut h = Harness::with(Config {
            domain_limits: limits(5, 600_000, 1000),
            sync_delay: Duration::ZERO,
            event_lifetime: Duration::from_secs(24 * 3600),
            ..Config::default()
        });
        h.submit(
            "a",
            "a",
            "/a",
            &[oid(1)],
            &["https://bad.example/r"],
            Origin::Sync,
        );
        h.fail_ident("a", kind);
        let s = h.core.stats();
        assert_eq!(s.naughty.len(), 1, "{kind:?}");
        assert_eq!(s.naughty[0].domain, "bad.example");
        assert_eq!(s.naughty[0].count, 1);
        // Another identifier with a URL there and one elsewhere: only elsewhere is fetched.
        h.submit(
            "b",
            "b",
            "/b",
            &[oid(2)],
            &["https://bad.example/r", "https://good.example/r"],
            Origin::Sync,
        );
        assert_eq!(h.jobs.len(), 1);
        assert_eq!(h.jobs[0].request.url, "https://good.example/r", "{kind:?}");
        h.fail_ident("b", FailureKind::NotFound);
        // 12 hours later the domain is tried again.
        h.advance(Duration::from_secs(12 * 3600));
        assert!(h.core.stats().naughty.is_empty());
        let urls: Vec<String> = h.jobs.iter().map(|j| j.request.url.clone()).collect();
        assert!(
            urls.contains(&"https://bad.example/r".to_owned()),
            "{kind:?}: {urls:?}"
        );
    }
}

#[test]
fn timeouts_refusals_and_missing_objects_do_not_make_a_domain_naughty() {
    for kind in [
        FailureKind::Timeout,
        FailureKind::ConnectionRefused,
        FailureKind::NotFound,
        FailureKind::Deadline,
        FailureKind::Protocol,
    ] {
        let mut h = polite(limits(5, 600_000, 1000));
        h.submit(
            "a",
            "a",
            "/a",
            &[oid(1)],
            &["https://flaky.example/r"],
            Origin::Sync,
        );
        h.fail_ident("a", kind);
        assert!(h.core.stats().naughty.is_empty(), "{kind:?}");
        h.submit(
            "b",
            "b",
            "/b",
            &[oid(2)],
            &["https://flaky.example/r"],
            Origin::Sync,
        );
        assert_eq!(h.running_identifiers(), ["b"], "{kind:?}");
    }
}

#[test]
fn our_own_domain_is_never_fetched_and_matched_on_the_whole_host() {
    let mut h = Harness::with(Config {
        url_policy: UrlPolicy::new()
            .own_domain(Some(OwnDomain::parse("relay.example.com").unwrap())),
        sync_delay: Duration::ZERO,
        ..Config::default()
    });
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &[
            "https://relay.example.com/r",
            "https://notrelay.example.com.evil/r",
        ],
        Origin::Sync,
    );
    assert_eq!(h.jobs.len(), 1);
    assert_eq!(h.jobs[0].request.url, "https://notrelay.example.com.evil/r");
    h.fail_ident("id", FailureKind::NotFound);
    assert!(h.jobs.is_empty(), "our own URL counts as tried");
}

/// An own domain with a port is only that authority: another port of the host is a sibling
/// service and is fetched from, and a URL naming the port, or no port for a scheme whose
/// default it is, is not.
#[test]
fn our_own_domain_with_a_port_skips_only_that_port() {
    let mut h = Harness::with(Config {
        url_policy: UrlPolicy::new()
            .own_domain(Some(OwnDomain::parse("relay.example.com:443").unwrap())),
        sync_delay: Duration::ZERO,
        ..Config::default()
    });
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &[
            "https://relay.example.com/r",
            "https://relay.example.com:443/s",
            "git://relay.example.com:443/t",
            "https://relay.example.com:8443/r",
        ],
        Origin::Sync,
    );
    assert_eq!(h.jobs.len(), 1);
    assert_eq!(h.jobs[0].request.url, "https://relay.example.com:8443/r");
    h.fail_ident("id", FailureKind::NotFound);
    assert!(h.jobs.is_empty(), "the URLs on port 443 count as tried");
}

#[test]
fn a_domain_override_replaces_the_default_limits() {
    let mut cfg = Config {
        domain_limits: limits(1, 600_000, 1000),
        sync_delay: Duration::ZERO,
        ..Config::default()
    };
    cfg.domain_overrides
        .insert("big.example".into(), limits(3, 600_000, 1000));
    let mut h = Harness::with(cfg);
    for i in 0..4u8 {
        let id = format!("big{i}");
        h.submit(
            &id,
            &id,
            &format!("/b{i}"),
            &[oid(i)],
            &["https://big.example/r"],
            Origin::Sync,
        );
        let id = format!("small{i}");
        h.submit(
            &id,
            &id,
            &format!("/s{i}"),
            &[oid(i + 10)],
            &["https://small.example/r"],
            Origin::Sync,
        );
    }
    let s = h.core.stats();
    assert_eq!(s.domains["big.example"].in_flight, 3);
    assert_eq!(s.domains["small.example"].in_flight, 1);
    assert_eq!(s.domains["big.example"].requests_started, 3);
}

// ---------------------------------------------------------------------------------------------
// Time to release

impl Harness {
    /// A push of every object of `identifier`: the re-check finds them all.
    fn push_arrived(&mut self, identifier: &str) {
        self.core
            .command(Command::GitDataArrived(identifier.into()), self.now());
        self.collect();
        for (entry, _, oids) in std::mem::take(&mut self.checks) {
            self.core.checked(entry, Ok(oids), self.now());
        }
        self.collect();
    }

    /// The histogram of the `waited` of every released outcome seen so far.
    fn waits_of_outcomes(&self) -> ReleaseHistogram {
        let mut h = ReleaseHistogram::default();
        for o in &self.outcomes {
            if let Outcome::Released { waited, .. } = o {
                h.observe(*waited);
            }
        }
        h
    }
}

/// The cumulative bucket counts, `+Inf` last.
fn cumulative(h: &ReleaseHistogram) -> Vec<u64> {
    h.cumulative().map(|(_, n)| n).collect()
}

#[test]
fn release_waits_land_in_their_buckets_bounds_inclusive() {
    let mut h = Harness::with(Config {
        event_lifetime: Duration::from_secs(7200),
        ..Config::default()
    });
    // Released after these waits (ascending), each pushed by the host: no fetch needed.
    let waits = [
        0, 100, 101, 500, 2_000, 2_500, 10_000, 45_000, 1_800_000, 1_800_001,
    ]
    .map(Duration::from_millis);
    for i in 0..waits.len() {
        let n = u8::try_from(i).unwrap();
        let id = format!("e{i}");
        h.submit(&id, &id, &format!("/r{i}"), &[oid(n)], &[], Origin::User);
    }
    let start = h.now();
    for (i, w) in waits.iter().enumerate() {
        h.clock.advance(start + *w - h.now());
        h.push_arrived(&format!("e{i}"));
    }
    assert_eq!(h.released().len(), waits.len());
    let s = h.core.stats();
    let t = &s.release_times;
    assert_eq!(t.count(), 10);
    assert_eq!(s.released, t.count());
    assert_eq!(t.sum(), Duration::from_millis(3_660_202));
    //                            0.1 .5  1 2.5  5 10 30 60 120 300 600 1800 +Inf
    assert_eq!(cumulative(t), [2, 4, 4, 6, 6, 7, 7, 8, 8, 8, 8, 9, 10]);
    assert_eq!(*t, h.waits_of_outcomes(), "the waits the outcomes report");
}

#[test]
fn releases_after_a_fetch_and_after_ref_updates_are_timed() {
    let mut h = Harness::new();
    h.submit("plain", "a", "/a", &[oid(1)], &["git://a/r"], Origin::Sync);
    h.advance(2 * SEC);
    h.finish(&[oid(1)], None);
    h.submit_refs("refs", "/b", &[oid(2)], &[main_at(2)]);
    h.advance(40 * SEC);
    h.finish(&[oid(2)], None);
    assert_eq!(h.released(), ["plain"], "refs not written yet");
    h.answer_refs(Ok(()));
    assert_eq!(h.released(), ["plain", "refs"]);
    let t = h.core.stats().release_times;
    assert_eq!(t.count(), 2);
    assert_eq!(t.sum(), 42 * SEC);
    //                            0.1 .5  1 2.5  5 10 30 60 120 300 600 1800 +Inf
    assert_eq!(cumulative(&t), [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
    assert_eq!(t, h.waits_of_outcomes());
}

#[test]
fn expired_and_cancelled_events_are_not_timed() {
    let mut h = Harness::new();
    h.submit("gone", "a", "/a", &[oid(1)], &[], Origin::User);
    h.submit("late", "b", "/b", &[oid(2)], &[], Origin::User);
    h.core.command(Command::Cancel("gone".into()), h.now());
    h.advance(Duration::from_secs(1800));
    assert_eq!(h.expired(), ["late"]);
    assert_eq!(h.core.stats().release_times, ReleaseHistogram::default());
}

#[test]
fn restored_events_are_timed_from_their_first_submission() {
    let mut h = Harness::new();
    let restored = |h: &Harness, id: &str, missing: &[ObjectId], waited: Duration| {
        let event = h.valid_event(
            id,
            id,
            &format!("/{id}"),
            &[oid(1)],
            missing,
            &["git://a/r"],
            &[],
            Origin::Sync,
        );
        RestoredEvent {
            event,
            remaining: Duration::from_secs(1200),
            waited,
            gone: None,
        }
    };
    // Pushed while the engine was down for 50 s, after 20 s of waiting: released at restore.
    let pushed = restored(&h, "pushed", &[], 20 * SEC);
    // Still missing its object; released by a fetch 3 s after the restore.
    let fetched = restored(&h, "fetched", &[oid(1)], 200 * SEC);
    let now = h.now();
    h.core.restore(
        vec![pushed, fetched],
        Vec::new(),
        Vec::new(),
        50 * SEC,
        now,
        0,
    );
    h.pass();
    assert_eq!(h.released(), ["pushed"]);
    h.advance(3 * SEC);
    h.finish(&[oid(1)], None);
    assert_eq!(h.released(), ["pushed", "fetched"]);
    let t = h.core.stats().release_times;
    assert_eq!(t.count(), 2);
    assert_eq!(t.sum(), (20 + 50 + 200 + 50 + 3) * SEC);
    //                            0.1 .5  1 2.5  5 10 30 60 120 300 600 1800 +Inf
    assert_eq!(cumulative(&t), [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2]);
    assert_eq!(t, h.waits_of_outcomes());
}

mod props;

/// A checkpoint's snapshot, made into the state file: events in submission order (the map
/// they live in has none), each with its identifier, repository, object ids, URLs, origin,
/// ref updates and times; expired ids sorted with their remaining refusal.
#[test]
fn a_snapshot_keeps_submission_order_and_every_field() {
    let mut h = Harness::new();
    // Enough events that the map's order is most unlikely to be the submission order.
    let ids: Vec<String> = (0..40).map(|i| format!("e{:02}", (i * 17) % 40)).collect();
    let submit_all = |h: &mut Harness| {
        for id in &ids {
            h.submit(
                id,
                "alice/r",
                "/srv/r",
                &[oid(1)],
                &["git://a/r"],
                Origin::User,
            );
        }
    };
    submit_all(&mut h);
    h.advance(10 * SEC);
    h.submit("gone", "bob/x", "/srv/x", &[oid(2)], &[], Origin::Sync);
    h.submit("old", "bob/x", "/srv/x", &[oid(2)], &[], Origin::Sync);
    h.advance(30 * 60 * SEC - 10 * SEC);
    h.advance(10 * SEC);
    assert_eq!(
        h.expired().len(),
        42,
        "all events expired: {:?}",
        h.outcomes
    );
    h.submit_refs(
        "refs",
        "/srv/t",
        &[oid(3), oid(4)],
        &[
            RefUpdate::oid("refs/heads/main", oid(3).to_string()),
            RefUpdate::symbolic("HEAD", "refs/heads/main"),
        ],
    );
    h.advance(2 * SEC);

    let file = h.core.snapshot(h.now(), 1_000_000).into_state_file();
    assert_eq!(file.written_at_ms, 1_000_000);
    assert_eq!(file.events.len(), 1);
    let e = &file.events[0];
    assert_eq!(
        (e.id.as_str(), e.identifier.as_str(), e.repo.as_path()),
        ("refs", "id", Path::new("/srv/t"))
    );
    assert_eq!(e.oids, [oid(3).to_string(), oid(4).to_string()]);
    assert_eq!(e.clone_urls, ["git://a/r"]);
    assert_eq!(e.origin, SavedOrigin::Sync);
    assert_eq!(e.ref_updates.len(), 2);
    assert_eq!(e.ref_updates[0].oid.as_deref(), Some(&*oid(3).to_string()));
    assert_eq!(
        e.ref_updates[1].symbolic.as_deref(),
        Some("refs/heads/main")
    );
    assert_eq!(
        (e.waited_ms, e.remaining_ms),
        (2_000, 30 * 60 * 1_000 - 2_000)
    );
    let expired: Vec<&str> = file.expired_ids.iter().map(|x| x.id.as_str()).collect();
    let mut sorted = expired.clone();
    sorted.sort_unstable();
    assert_eq!(expired, sorted);
    assert_eq!(expired.len(), 42);
    // The first 40 expired 10 s before the last two.
    let remaining = |id: &str| {
        file.expired_ids
            .iter()
            .find(|x| x.id == id)
            .unwrap()
            .remaining_ms
    };
    assert_eq!(remaining("old") - remaining("e00"), 10_000);

    // Submission order among many waiting events.
    let mut h = Harness::new();
    submit_all(&mut h);
    let file = h.core.snapshot(h.now(), 0).into_state_file();
    let saved: Vec<&str> = file.events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(saved, ids.iter().map(String::as_str).collect::<Vec<_>>());
}

// ---- a parked entry waits only for its busy domain's turn ----

/// A harness whose domain `busy.example` takes one fetch at a time, and whose other domains
/// are free; sync events are tried at once.
fn one_busy_domain() -> Harness {
    let mut cfg = Config {
        domain_limits: limits(5, 600_000, 1000),
        sync_delay: Duration::ZERO,
        ..Config::default()
    };
    cfg.domain_overrides
        .insert("busy.example".to_owned(), limits(1, 600_000, 1000));
    let mut h = Harness::with(cfg);
    // `hog` holds busy.example's only slot for as long as the test wants.
    h.submit(
        "hog",
        "hog",
        "/hog",
        &[oid(200)],
        &["https://busy.example/hog"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["hog"]);
    h
}

/// An identifier waiting for the busy host's slot gets a pull request whose clone URL is on a
/// free host: that URL is fetched at once (within the sync delay), not after the busy host
/// frees its slot.
#[test]
fn a_new_url_on_a_free_domain_is_fetched_while_the_entry_waits_for_a_busy_one() {
    let mut h = one_busy_domain();
    h.submit(
        "state",
        "id",
        "/r",
        &[oid(1)],
        &["https://busy.example/r"],
        Origin::Sync,
    );
    assert_eq!(
        h.running_identifiers(),
        ["hog"],
        "id waits for busy.example"
    );
    h.advance(5 * SEC);
    h.submit(
        "pr",
        "id",
        "/r",
        &[oid(2)],
        &["https://free.example/fork"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["hog", "id"]);
    let job = h
        .jobs
        .iter()
        .find(|j| j.request.identifier == "id")
        .unwrap();
    assert_eq!(job.request.url, "https://free.example/fork");
    // The free host had both objects: both events are released, and the busy host's queue no
    // longer counts the identifier.
    let job = h.jobs.remove(1);
    let now = h.now();
    h.core
        .job_done(job.id, FetchReport::new(vec![oid(1), oid(2)], None), now);
    h.pass();
    assert_eq!(h.released(), ["state", "pr"]);
    assert_eq!(h.core.stats().domains["busy.example"].queued_identifiers, 0);
}

/// An identifier whose free mirror lacked the commit waits for the busy host; its backoff
/// retries of the free mirror go on meanwhile, and find the commit once it is there.
#[test]
fn backoff_retries_of_free_mirrors_go_on_while_the_entry_waits_for_a_busy_one() {
    let mut h = one_busy_domain();
    h.submit(
        "e",
        "id",
        "/r",
        &[oid(1)],
        &["https://free.example/r", "https://busy.example/r"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["hog", "id"]);
    h.fail_ident("id", FailureKind::NotFound);
    assert_eq!(h.running_identifiers(), ["hog"], "busy.example is taken");
    // The backoff of 20 s brings the free mirror back, though the busy host never freed.
    let wait = h.time_to_next_job(60 * SEC).expect("retried");
    assert_eq!(wait, 20 * SEC);
    let job = h
        .jobs
        .iter()
        .find(|j| j.request.identifier == "id")
        .unwrap();
    assert_eq!(job.request.url, "https://free.example/r");
    h.finish_ident("id", &[oid(1)]);
    assert_eq!(h.released(), ["e"]);
    assert_eq!(h.core.stats().domains["busy.example"].queued_identifiers, 0);
}

/// Under a backlog on one popular host, identifiers whose data is elsewhere do not wait for
/// that host's queue, and the host still serves its queue round-robin when it frees.
#[test]
fn a_backlog_on_one_host_does_not_hold_up_identifiers_whose_data_is_elsewhere() {
    let mut h = one_busy_domain();
    for k in 0..5u8 {
        let id = format!("q{k}");
        h.submit(
            &id,
            &id,
            &format!("/q{k}"),
            &[oid(k)],
            &["https://busy.example/r"],
            Origin::Sync,
        );
    }
    // `elsewhere` lists the busy host first, then a free one.
    h.submit(
        "elsewhere",
        "elsewhere",
        "/e",
        &[oid(100)],
        &["https://busy.example/e", "https://free.example/e"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["hog", "elsewhere"]);
    h.finish_ident("elsewhere", &[oid(100)]);
    assert_eq!(h.released(), ["elsewhere"]);
    // q2, third in the busy host's queue, gets a pull request from a free host: fetched at
    // once, and q2 keeps its place in the busy host's queue for its own event.
    h.submit(
        "q2-pr",
        "q2",
        "/q2",
        &[oid(50)],
        &["https://free.example/q2-fork"],
        Origin::Sync,
    );
    assert_eq!(h.running_identifiers(), ["hog", "q2"]);
    h.finish_ident("q2", &[oid(50)]);
    assert_eq!(h.released(), ["elsewhere", "q2-pr"]);
    // The busy host serves its queue in order.
    let mut order = Vec::new();
    let mut current = "hog".to_owned();
    for _ in 0..5 {
        h.fail_ident(&current, FailureKind::NotFound);
        let next: Vec<String> = h.running_identifiers();
        assert_eq!(next.len(), 1, "{next:?}");
        current = next[0].clone();
        order.push(current.clone());
    }
    assert_eq!(order, ["q0", "q1", "q2", "q3", "q4"]);
}

impl Harness {
    /// Completes the running job of `identifier`, reporting `present` and no failure.
    fn finish_ident(&mut self, identifier: &str, present: &[ObjectId]) {
        let pos = self
            .jobs
            .iter()
            .position(|j| j.request.identifier == identifier)
            .unwrap_or_else(|| panic!("no job for {identifier}: {:?}", self.jobs));
        let job = self.jobs.remove(pos);
        let now = self.now();
        self.core
            .job_done(job.id, FetchReport::new(present.to_vec(), None), now);
        self.pass();
    }
}

/// The first round visits every URL once (what one connection can ask); the second probes
/// only the servers that may hold the rest unadvertised: one that advertised some of the
/// missing ids, one that allows no wants by id. One that allows ids and advertised none was
/// asked for the set on its visit already.
#[test]
fn an_attempt_visits_every_url_then_probes_only_where_the_rest_may_be() {
    let mut h = Harness::new();
    let urls = ["git://a/r", "git://b/r", "git://c/r", "git://d/r"];
    h.submit("e", "id", "/r", &[oid(1), oid(2)], &urls, Origin::Sync);
    h.advance(500 * MS);
    let mut first = Vec::new();
    let j = h.visit(&[oid(1)], &[oid(1)], &[oid(2)], true); // had 1, maybe 2 below it
    first.push((j.request.url, j.request.mode));
    let j = h.visit(&[], &[], &[oid(2)], true); // probed on its visit
    first.push((j.request.url, j.request.mode));
    let j = h.visit(&[], &[], &[oid(2)], false); // its branches may hold it
    first.push((j.request.url, j.request.mode));
    let j = h.finish(&[], Some(FailureKind::Protocol)); // never read an advertisement
    first.push((j.request.url, j.request.mode));
    let one = FetchMode::OneVisit;
    assert_eq!(
        first,
        urls.map(|u| (u.to_owned(), one)),
        "every URL once, in order"
    );
    let second: Vec<(String, FetchMode)> = (0..2)
        .map(|_| {
            let j = h.visit(&[], &[], &[oid(2)], true);
            (j.request.url, j.request.mode)
        })
        .collect();
    let all = FetchMode::Everything;
    assert_eq!(
        second,
        [("git://a/r".to_owned(), all), ("git://c/r".to_owned(), all)]
    );
    assert!(h.jobs.is_empty(), "two rounds, then the backoff");
    assert_eq!(h.time_to_next_job(Duration::from_secs(30)), Some(20 * SEC));
    assert_eq!(h.jobs[0].request.mode, one, "the next attempt starts over");
}

/// A server that advertised none of several ids and refused them asked for together is probed
/// again with the set split, but only when the attempt found the data is out there (some of it
/// arrived or was advertised): while nothing is pushed yet, a split would cost a request per
/// id every attempt.
#[test]
fn a_refused_set_is_split_only_when_the_data_is_known_to_be_out_there() {
    let ids = [oid(1), oid(2), oid(3)];
    // Nothing anywhere: no second round.
    let mut h = Harness::new();
    h.submit("e", "id", "/r", &ids, &["git://a/r"], Origin::Sync);
    h.advance(500 * MS);
    h.visit(&[], &[], &ids, true);
    assert!(h.jobs.is_empty(), "no probe without evidence");
    assert_eq!(h.time_to_next_job(Duration::from_secs(30)), Some(20 * SEC));

    // Another server had one of them: the first is probed again, split.
    let mut h = Harness::new();
    h.submit(
        "e",
        "id",
        "/r",
        &ids,
        &["git://a/r", "git://b/r"],
        Origin::Sync,
    );
    h.advance(500 * MS);
    h.visit(&[], &[], &ids, true);
    h.visit(&[oid(1)], &[oid(1)], &[oid(2), oid(3)], true);
    let j = h.jobs.first().expect("a second round");
    assert_eq!(
        (j.request.url.as_str(), j.request.mode),
        ("git://a/r", FetchMode::Everything)
    );
    assert_eq!(j.request.wanted, [oid(2), oid(3)]);
    // And b, which advertised one and may hold the others below it.
    h.visit(&[], &[], &[oid(2), oid(3)], true);
    assert_eq!(h.jobs[0].request.url, "git://b/r");
    h.visit(&[], &[], &[oid(2), oid(3)], true);
    assert!(h.jobs.is_empty());
}

/// The next attempt visits first the URLs whose server advertised an id still missing at the
/// last visit (its download failed), then the ones never visited, then those that had none.
#[test]
fn the_next_attempt_visits_first_the_urls_that_had_what_is_missing() {
    let mut h = Harness::new();
    let urls = ["git://a/r", "git://b/r", "git://c/r"];
    h.submit("e", "id", "/r", &[oid(1)], &urls, Origin::Sync);
    h.advance(500 * MS);
    h.visit(&[], &[], &[oid(1)], true);
    // b advertised it, but the download broke off.
    let j = h.jobs.remove(0);
    let mut report = FetchReport::new(
        Vec::new(),
        Some(FetchError::new(FailureKind::Protocol, "reset")),
    );
    report.advertised = vec![oid(1)];
    report.advertisement_read = true;
    report.ids_allowed = Some(true);
    let now = h.now();
    h.core.job_done(j.id, report, now);
    h.pass();
    // c is not reached this attempt: make it fail before reading anything.
    h.fail();
    assert!(h.jobs.is_empty());
    assert!(h.time_to_next_job(Duration::from_secs(30)).is_some());
    let order: Vec<String> = (0..3).map(|_| h.fail().request.url).collect();
    assert_eq!(order, ["git://b/r", "git://c/r", "git://a/r"]);
}

/// A domain with nothing in flight, queued or naughty leaves the statistics (and so the
/// metrics) after `domain_retention`, and not before its rate quota has refilled; the
/// engine's request total keeps what it did. A domain still queued, running or naughty stays.
#[test]
fn idle_domains_retire_after_the_retention_and_totals_keep_their_requests() {
    let mut h = Harness::with(Config {
        sync_delay: Duration::ZERO,
        domain_retention: Duration::from_secs(600),
        event_lifetime: Duration::from_secs(30),
        ..Config::default()
    });
    h.pass();
    h.submit(
        "a",
        "ia",
        "/ra",
        &[oid(1)],
        &["https://a.example/r"],
        Origin::Sync,
    );
    h.submit(
        "b",
        "ib",
        "/rb",
        &[oid(2)],
        &["https://b.example/r"],
        Origin::Sync,
    );
    h.submit(
        "d",
        "id",
        "/rd",
        &[oid(3)],
        &["https://dns.example/r"],
        Origin::Sync,
    );
    assert_eq!(h.jobs.len(), 3);
    let domains = |h: &Harness| -> Vec<String> { h.core.stats().domains.keys().cloned().collect() };
    // a: released at once; b: fails and waits (backoff); dns.example: a DNS failure, naughty.
    h.finish_ident("ia", &[oid(1)]);
    h.fail_ident("ib", FailureKind::ConnectionRefused);
    h.fail_ident("id", FailureKind::Dns);
    let requests = h.core.stats().requests;
    assert_eq!(requests, 3);
    h.advance(Duration::from_secs(599));
    assert_eq!(domains(&h), ["a.example", "b.example", "dns.example"]);
    // b's event expired at 30 s; nothing of a or b for 10 minutes; dns.example is naughty.
    h.advance(Duration::from_secs(2));
    let stats = h.core.stats();
    assert_eq!(domains(&h), ["dns.example"], "{:?}", stats.domains);
    assert_eq!(
        stats.requests, requests,
        "retired domains' requests still count"
    );
    // A retired domain comes back, counting from zero, when it is used again.
    h.submit(
        "a2",
        "ia2",
        "/ra2",
        &[oid(4)],
        &["https://a.example/r"],
        Origin::Sync,
    );
    assert_eq!(domains(&h), ["a.example", "dns.example"]);
    let a = &h.core.stats().domains["a.example"];
    assert_eq!((a.requests_started, a.in_flight), (1, 1));
}

/// A slow rate quota keeps its domain until it has refilled: a new limiter must not be more
/// generous than the one it replaces.
#[test]
fn a_domain_retires_only_once_its_rate_quota_has_refilled() {
    let mut limits = crate::config::DomainLimits::new(5, 1);
    limits.burst = 5;
    let mut h = Harness::with(Config {
        sync_delay: Duration::ZERO,
        domain_retention: Duration::from_secs(1),
        domain_limits: limits,
        ..Config::default()
    });
    h.pass();
    h.submit(
        "a",
        "ia",
        "/ra",
        &[oid(1)],
        &["https://slow.example/r"],
        Origin::Sync,
    );
    h.finish_ident("ia", &[oid(1)]);
    let present = |h: &Harness| h.core.stats().domains.contains_key("slow.example");
    // One request a minute, a burst of five: five minutes to refill.
    h.advance(Duration::from_secs(299));
    assert!(present(&h));
    h.advance(Duration::from_secs(2));
    assert!(!present(&h));
}

/// Each fetch's duration (dispatch to report) and bytes go into the statistics.
#[test]
fn fetch_durations_and_bytes_are_counted() {
    let mut h = Harness::with(Config {
        sync_delay: Duration::ZERO,
        ..Config::default()
    });
    h.pass();
    h.submit(
        "a",
        "ia",
        "/ra",
        &[oid(1)],
        &["https://a.example/r"],
        Origin::Sync,
    );
    h.clock.advance(Duration::from_secs(3));
    let job = h.jobs.remove(0);
    let mut report = FetchReport::new(vec![oid(1)], None);
    report.bytes_received = 12_345;
    let now = h.now();
    h.core.job_done(job.id, report, now);
    h.pass();
    let stats = h.core.stats();
    assert_eq!(stats.bytes_received, 12_345);
    assert_eq!(stats.domains["a.example"].bytes_received, 12_345);
    assert_eq!(stats.fetch_durations.count(), 1);
    assert_eq!(stats.fetch_durations.sum(), Duration::from_secs(3));
}
