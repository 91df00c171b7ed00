//! The engine handle: what the host holds.
//!
//! Every method validates on the caller's thread, sends a command to the scheduler and
//! returns; nothing here waits for a fetch. The handle owns the threads and joins them on
//! [`Engine::shutdown`] or drop.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::{BuildError, ShutdownError, SubmitError};
use crate::event::{Admission, Outcome, PendingEvent};
use crate::fetch::Fetcher;
use crate::scheduler::ids::{self, EventIds, IdState, IdentifierUrls};
use crate::scheduler::queue::{Command, Queue, ValidEvent};
use crate::scheduler::{join_all, start_workers, Scheduler};
use crate::stats::Stats;
use crate::{validate, EngineBuilder};

/// Counters kept on the host's side of the channel.
#[derive(Default)]
struct HandleCounters {
    already_satisfied: AtomicU64,
    refused: AtomicU64,
}

/// The purgatory sync engine: a scheduler thread and a pool of fetch workers.
///
/// `Engine` is `Send + Sync`; share it with `Arc` and call it from any thread. Dropping it shuts
/// it down like [`shutdown`](Engine::shutdown), ignoring errors.
///
/// ```no_run
/// use purgatory_sync::{Engine, Origin, Outcome, PendingEvent};
///
/// let engine = Engine::builder().build()?;
/// let outcomes = engine.outcomes();
/// engine.submit(PendingEvent {
///     id: "event-1".into(),
///     identifier: "alice/project".into(),
///     repo: "/srv/git/alice/project.git".into(),
///     oids: vec!["e92758a50bbf13ea1fe986bbe254a709b0bf741c".into()],
///     clone_urls: vec!["https://git.example.com/alice/project.git".into()],
///     origin: Origin::Sync,
///     ..Default::default()
/// })?;
/// match outcomes.recv()? {
///     Outcome::Released { event_id, .. } => println!("{event_id} can be served"),
///     Outcome::Expired { event_id, .. } => println!("{event_id} gave up"),
///     _ => {}
/// }
/// engine.shutdown()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Engine {
    cfg: Arc<Config>,
    clock: Arc<dyn Clock>,
    fetcher: Arc<dyn Fetcher>,
    /// The fetcher is the built-in `GitFetcher`, whose `present` opens the repository as a
    /// bare one: `submit` then need not open it once more to check that.
    fetcher_checks_bare: bool,
    core: Arc<Mutex<Queue>>,
    /// The core's index of waiting and expired event ids: `submit` reads it instead of taking
    /// the core's lock.
    ids: Arc<EventIds>,
    /// The core's index of each identifier's distinct clone URLs: `submit` reserves an event's
    /// URLs there, within `max_urls_per_identifier`.
    identifier_urls: Arc<IdentifierUrls>,
    /// Commands sent and not yet applied by the scheduler (`Stats::commands_pending`).
    unapplied: Arc<AtomicUsize>,
    admitted: Arc<AtomicUsize>,
    counters: HandleCounters,
    commands: Option<Sender<Command>>,
    outcomes: Receiver<Outcome>,
    scheduler: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    workers_exited: Receiver<()>,
    /// The outcome of the state file's final write, set by the scheduler as it stops.
    final_write: Arc<Mutex<Option<std::io::Error>>>,
    /// Fetches the scheduler left running when it stopped.
    stuck: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.cfg.workers)
            .field("running", &self.scheduler.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder with every default; see [`EngineBuilder`].
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    pub(crate) fn start(
        cfg: Config,
        clock: Arc<dyn Clock>,
        fetcher: Arc<dyn Fetcher>,
        fetcher_checks_bare: bool,
    ) -> Result<Engine, BuildError> {
        let cfg = Arc::new(cfg);
        // Taken before the state file is read, so that two engines never both restore it, and
        // handed to the scheduler thread, which drops it after its final write.
        let state_lock = crate::persist::lock(&cfg)?;
        let admitted = Arc::new(AtomicUsize::new(0));
        let mut restored = Queue::new(cfg.clone(), admitted.clone());
        if let Some(file) = crate::persist::load(&cfg, clock.wall())? {
            // Every saved event is checked before the core is touched, so a refused file
            // leaves the engine empty.
            let result = crate::persist::restore(
                &mut restored,
                file,
                &cfg,
                fetcher.as_ref(),
                clock.now(),
                clock.wall(),
            );
            match result {
                Ok(()) => {}
                Err(BuildError::StateFile { path, error }) if cfg.move_unreadable_state_aside => {
                    crate::persist::move_aside(&path, clock.wall(), &error)?;
                }
                Err(e) => return Err(e),
            }
        }
        let ids = restored.ids();
        let identifier_urls = restored.identifier_urls();
        let core = Arc::new(Mutex::new(restored));
        let final_write = Arc::new(Mutex::new(None));
        let stuck = Arc::new(AtomicUsize::new(0));
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let unapplied = Arc::new(AtomicUsize::new(0));
        let (out_tx, out_rx) = crossbeam_channel::unbounded();
        let (results_tx, results_rx) = crossbeam_channel::unbounded();
        let (drops_tx, drops_rx) = crossbeam_channel::unbounded();
        let workers = start_workers(&cfg.thread_name, cfg.workers).map_err(BuildError::Spawn)?;
        let scheduler = Scheduler {
            cfg: cfg.clone(),
            clock: clock.clone(),
            fetcher: fetcher.clone(),
            core: core.clone(),
            commands: cmd_rx,
            unapplied: unapplied.clone(),
            outcomes: out_tx,
            pool: workers.pool,
            cancel: Arc::new(AtomicBool::new(false)),
            wake: clock.subscribe().unwrap_or_else(crossbeam_channel::never),
            results_tx,
            results_rx,
            drops_tx,
            drops_rx,
            final_write: final_write.clone(),
            state_lock,
            stuck: stuck.clone(),
            memory: Arc::new(crate::fetch::conn::MemoryPool::new(
                cfg.max_total_fetch_memory,
            )),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("{}-sched", cfg.thread_name))
            .spawn(move || scheduler.run());
        let scheduler = match spawned {
            Ok(h) => h,
            Err(e) => {
                // The closure, and with it the pool, is dropped: the workers exit.
                join_all(workers.handles, &workers.exited, cfg.shutdown_timeout);
                return Err(BuildError::Spawn(e));
            }
        };
        Ok(Engine {
            cfg,
            clock,
            fetcher,
            fetcher_checks_bare,
            core,
            ids,
            identifier_urls,
            unapplied,
            admitted,
            counters: HandleCounters::default(),
            commands: Some(cmd_tx),
            outcomes: out_rx,
            scheduler: Some(scheduler),
            workers: workers.handles,
            workers_exited: workers.exited,
            final_write,
            stuck,
        })
    }

    /// Hands an event to purgatory.
    ///
    /// Validates the event on the calling thread (ids, identifier, URLs, ref updates, that the
    /// repository is a bare git repository) and checks which objects the repository already
    /// holds; if it holds all of them and the event has no ref updates, the answer is
    /// [`Admission::AlreadySatisfied`] and nothing is queued. Otherwise the event is queued and
    /// an [`Outcome`] follows on [`outcomes`](Engine::outcomes): an event with ref updates
    /// whose objects are all present is released by the scheduler thread once it has written
    /// the refs (this thread never writes to the repository). Object ids are normalised to
    /// lower case and de-duplicated.
    ///
    /// Each clone URL is checked against the URL policy ([`UrlPolicy`](crate::UrlPolicy), from
    /// the builder's `allowed_schemes`, `allow_private_addresses` and `our_domain`). A refused
    /// URL is not an error: it is left out, never fetched, and listed with its index and reason
    /// in [`Admission::Pending`]'s `refused_urls`. The event waits even when every URL is
    /// refused, since a push may still bring its data. A URL that is not even a string a URL
    /// could be (empty, over 2048 bytes, with whitespace) is a
    /// [`SubmitError::InvalidCloneUrl`].
    ///
    /// **The same id again.** Calls from one thread take effect in the order they were made:
    /// a submit right after a [`cancel`](Engine::cancel) of the same id queues the event anew,
    /// and a submit of an id that still waits when the scheduler comes to it is a
    /// re-submission, answered `Pending` and changing nothing, except that a synced event
    /// ([`Origin::Sync`](crate::Origin::Sync)) re-published by a user
    /// ([`Origin::User`](crate::Origin::User)) becomes a user event, as the reference relay
    /// has it: its lifetime starts again from this submit, its backoff starts over and its
    /// next attempt moves to the user delay after it if that is earlier, never later. Either
    /// way the one event gets one outcome. Two limits meant for new events are not applied to
    /// an id that waits: such a submit is never refused with [`SubmitError::QueueFull`] nor
    /// [`SubmitError::TooManyIdentifierUrls`] (what it counts is given back when it turns out
    /// a re-submission).
    ///
    /// **An expired id.** After an event expires, its id is remembered for
    /// [`expired_memory`](crate::EngineBuilder::expired_memory) (default 7 days). Within that
    /// time a synced event with that id whose objects are still missing is refused with
    /// [`SubmitError::PreviouslyExpired`], so that a re-broadcast cannot keep it in purgatory
    /// for ever; a user event with that id waits again, and one whose objects have all arrived
    /// is answered like any other (`AlreadySatisfied`, or `Pending` until its refs are
    /// written).
    ///
    /// # Errors
    /// A [`SubmitError`] naming the field at fault; a refused event changes nothing.
    pub fn submit(&self, event: PendingEvent) -> Result<Admission, SubmitError> {
        let result = self.try_submit(event);
        if result.is_err() {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn try_submit(&self, event: PendingEvent) -> Result<Admission, SubmitError> {
        let checked = validate::event(&event, &self.cfg)?;
        // A custom fetcher may not check what the repository is, so the engine does; the
        // built-in one's presence check below opens it as a bare repository and fails the same
        // way (opening it twice was a fifth of the time a submit took).
        let repo = if self.fetcher_checks_bare {
            validate::existing_path(&event.repo)?
        } else {
            validate::repository(&event.repo)?
        };
        let present = self.fetcher.present(&repo, &checked.oids).map_err(|e| {
            SubmitError::InvalidRepository {
                path: event.repo.clone(),
                reason: e.message,
            }
        })?;
        let missing: Vec<_> = checked
            .oids
            .iter()
            .copied()
            .filter(|o| !present.contains(o))
            .collect();
        // Whatever the id's state: present data answers the question, as the reference relay's
        // presence check does before it looks at the id.
        if missing.is_empty() && checked.refs.is_empty() {
            self.counters
                .already_satisfied
                .fetch_add(1, Ordering::Relaxed);
            if self.ids.get(&event.id) == Some(IdState::Waiting) {
                // The event still waits, though its data is here (pushed, or fetched for
                // another event): re-check now, so that it is released at once rather than at
                // its next attempt.
                let _ = self.send(Command::GitDataArrived(event.identifier));
            }
            return Ok(Admission::AlreadySatisfied);
        }
        // Without the core's lock, which a pass, a checkpoint or a growing table can hold for
        // long: the id index is kept in step with the core.
        let now = self.clock.now();
        let known = self.ids.get(&event.id);
        // An id that looks waiting is sent without the limits' checks even when a cancel of it,
        // applied first, makes it a new event: it then takes the place the cancelled one gave
        // back.
        let again = match ids::submit_as(known, event.origin, !missing.is_empty(), now) {
            ids::SubmitAs::Refused(refused_for) => {
                return Err(SubmitError::PreviouslyExpired {
                    event_id: event.id,
                    refused_for,
                })
            }
            ids::SubmitAs::Again => true,
            ids::SubmitAs::New => false,
        };
        let max = self.cfg.max_events;
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= max && !again {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { max_events: max });
        }
        let identifier: Arc<str> = event.identifier.into();
        if again {
            self.identifier_urls
                .reserve_uncapped(&identifier, &checked.urls);
        } else if let Err(full) = self.identifier_urls.reserve(&identifier, &checked.urls) {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::TooManyIdentifierUrls {
                identifier: identifier.to_string(),
                distinct: full.distinct,
                new: full.new,
                max: full.max,
            });
        }
        let valid = ValidEvent {
            id: event.id.into(),
            identifier: identifier.clone(),
            repo: Arc::from(repo.as_path()),
            oids: checked.oids,
            missing,
            urls: checked.urls,
            refs: checked.refs.into(),
            replace_refs: event.replace_refs,
            created_at: event.created_at,
            origin: event.origin,
            submitted: now,
            restored: None,
        };
        let urls = valid.urls.clone();
        self.send(Command::Submit(valid)).inspect_err(|_| {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            self.identifier_urls.release(&identifier, &urls);
        })?;
        Ok(Admission::pending_with(checked.refused))
    }

    /// Tells the engine that git data for `identifier` arrived by other means (a push to the
    /// host): its waiting events are re-checked against their repository at once, without a
    /// fetch, and those now satisfied are released within milliseconds.
    pub fn git_data_arrived(&self, identifier: &str) {
        let _ = self.send(Command::GitDataArrived(identifier.to_owned()));
    }

    /// Forgets a waiting event; no outcome will be sent for it. Unknown ids are ignored. A
    /// submit of the same id made after this call waits anew.
    pub fn cancel(&self, event_id: &str) {
        let _ = self.send(Command::Cancel(event_id.to_owned()));
    }

    /// The channel on which [`Outcome`]s arrive. Every call returns a handle to the same
    /// channel (each outcome goes to one receiver); it stays readable after shutdown until
    /// drained.
    pub fn outcomes(&self) -> Receiver<Outcome> {
        self.outcomes.clone()
    }

    /// A snapshot of the queue and the counters.
    pub fn stats(&self) -> Stats {
        let core = self.core.lock();
        let mut s = core.stats_at(self.clock.now(), self.clock.wall());
        // Under the core's lock, where the scheduler counts a command out as it applies it:
        // every command is either in this snapshot's figures or in `commands_pending`.
        s.commands_pending = self.commands_pending();
        drop(core);
        s.already_satisfied = self.counters.already_satisfied.load(Ordering::Relaxed);
        s.refused = self.counters.refused.load(Ordering::Relaxed);
        s
    }

    /// Stops the engine: no new fetch starts, fetches in flight are cancelled and waited for up
    /// to the shutdown timeout, and every thread is joined. Outcomes decided before the stop
    /// stay readable on [`outcomes`](Engine::outcomes).
    ///
    /// # Errors
    /// [`ShutdownError::WorkersStillRunning`] if a fetch did not stop in time (its thread is left
    /// to finish on its own); [`ShutdownError::SchedulerPanicked`] if the scheduler died.
    pub fn shutdown(mut self) -> Result<(), ShutdownError> {
        self.stop()
    }

    /// Commands sent and not applied yet, including one the scheduler has taken from the
    /// channel and is about to apply.
    fn commands_pending(&self) -> usize {
        self.unapplied.load(Ordering::SeqCst)
    }

    fn send(&self, cmd: Command) -> Result<(), SubmitError> {
        let Some(tx) = &self.commands else {
            return Err(SubmitError::ShuttingDown);
        };
        // Counted before it is sent, so that it is never applied and not yet counted.
        self.unapplied.fetch_add(1, Ordering::SeqCst);
        tx.send(cmd).map_err(|_| {
            self.unapplied.fetch_sub(1, Ordering::SeqCst);
            SubmitError::ShuttingDown
        })
    }

    fn stop(&mut self) -> Result<(), ShutdownError> {
        let Some(scheduler) = self.scheduler.take() else {
            return Ok(());
        };
        let started = Instant::now();
        // Disconnection is the stop signal: the scheduler's loop ends when no sender is left.
        drop(self.commands.take());
        let scheduled = scheduler.join().map_err(|p| {
            ShutdownError::SchedulerPanicked(crate::scheduler::panic_message(p.as_ref()))
        });
        let left = self.cfg.shutdown_timeout.saturating_sub(started.elapsed());
        let stuck = join_all(
            std::mem::take(&mut self.workers),
            &self.workers_exited,
            left + std::time::Duration::from_millis(500),
        );
        scheduled?;
        if let Some(e) = self.final_write.lock().take() {
            return Err(ShutdownError::StateFile(e));
        }
        if stuck > 0 {
            // Threads still running are the stuck fetches' and, until the last of those ends,
            // every idle thread of the pool: count the fetches.
            let count = self.stuck.load(Ordering::SeqCst).clamp(1, stuck);
            return Err(ShutdownError::WorkersStillRunning { count });
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("engine shutdown: {e}");
        }
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Engine>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FakeClock, ObjectId};
    use std::path::Path;
    use std::time::Duration;

    /// An engine that never fetches on its own (hour-long tick and user delay) on `clock`, and
    /// a bare repository for its events.
    fn idle_engine(
        name: &str,
        clock: &FakeClock,
    ) -> (tempfile::TempDir, std::path::PathBuf, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r.git");
        git2::Repository::init_bare(&repo).unwrap();
        let engine = Engine::builder()
            .allow_private_addresses(true)
            .thread_name(name)
            .clock(clock.clone())
            .tick(Duration::from_secs(3600))
            .user_delay(Duration::from_secs(3600))
            .event_lifetime(Duration::from_secs(60))
            .build()
            .unwrap();
        (dir, repo, engine)
    }

    /// A user event `id` in `repo` waiting for object `[byte; 20]`.
    fn event(repo: &Path, id: &str, byte: u8) -> PendingEvent {
        PendingEvent {
            id: id.into(),
            identifier: format!("ident-{id}"),
            repo: repo.to_path_buf(),
            oids: vec![ObjectId::from_bytes([byte; 20]).to_string()],
            clone_urls: vec!["git://127.0.0.1:9/r.git".into()],
            origin: crate::Origin::User,
            ..Default::default()
        }
    }

    /// Polls `done` every millisecond for at most `limit`; its last answer.
    fn wait(done: impl Fn() -> bool, limit: Duration) -> bool {
        let start = Instant::now();
        while !done() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
        done()
    }

    /// `submit` answers a duplicate, a recently expired id and a new event while the core's
    /// lock is held (as it is during a pass, a checkpoint snapshot or a table growing), instead
    /// of waiting for it.
    #[test]
    fn submit_never_waits_for_the_core_lock() {
        let clock = FakeClock::new();
        let (_dir, repo, engine) = idle_engine("nolock", &clock);
        let outcomes = engine.outcomes();
        let event = |id: &str, byte: u8| event(&repo, id, byte);
        assert!(engine.submit(event("old", 1)).unwrap().is_pending());
        clock.advance(Duration::from_secs(61));
        let expired = outcomes.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(expired.event_id(), "old");
        assert!(engine.submit(event("waiting", 2)).unwrap().is_pending());
        // The scheduler applies the submit; then the core is ours.
        assert!(wait(
            || engine.stats().submitted == 2,
            Duration::from_secs(10)
        ));
        let held = engine.core.lock();
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::scope(|s| {
            s.spawn(|| {
                for (id, byte) in [("waiting", 2), ("old", 1), ("new", 3)] {
                    // A synced re-broadcast of the expired one, which is refused.
                    let origin = if id == "old" {
                        crate::Origin::Sync
                    } else {
                        crate::Origin::User
                    };
                    let _ = tx.send((id, engine.submit(event(id, byte).origin(origin))));
                }
            });
            let mut answers = Vec::new();
            for _ in 0..3 {
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(answer) => answers.push(answer),
                    Err(_) => break,
                }
            }
            // Release the lock whatever happened, so that a blocked submit ends too.
            drop(held);
            assert_eq!(
                answers.len(),
                3,
                "answered with the core locked: {answers:?}"
            );
            assert!(
                matches!(&answers[0], ("waiting", Ok(a)) if a.is_pending()),
                "{answers:?}"
            );
            assert!(
                matches!(&answers[1], ("old", Err(SubmitError::PreviouslyExpired { refused_for, .. })) if *refused_for > Duration::ZERO),
                "{answers:?}"
            );
            assert!(
                matches!(&answers[2], ("new", Ok(a)) if a.is_pending()),
                "{answers:?}"
            );
        });
        engine.shutdown().unwrap();
    }

    /// A command the scheduler has taken from the channel but not applied yet (it waits for
    /// the core's lock) still counts as pending: `stats` never shows a command in neither
    /// `commands_pending` nor the other figures.
    #[test]
    fn a_command_taken_but_not_applied_is_still_pending() {
        let (_dir, repo, engine) = idle_engine("pending", &FakeClock::new());
        // Borrowed, not cloned: a sender left alive would keep the scheduler from stopping.
        let channel = engine.commands.as_ref().unwrap();
        // The scheduler must be waiting for a command when the lock is taken; if it was at the
        // head of its loop instead (it takes the lock there too), let it go and try again.
        let mut seen = false;
        for k in 1..=50u8 {
            let held = engine.core.lock();
            assert!(engine
                .submit(event(&repo, &format!("e{k}"), k))
                .unwrap()
                .is_pending());
            if wait(|| channel.is_empty(), Duration::from_millis(200)) {
                // Taken from the channel, waiting for the lock we hold: not applied yet.
                assert_eq!(engine.commands_pending(), 1, "taken, not applied");
                seen = true;
            }
            drop(held);
            assert!(wait(
                || engine.stats().commands_pending == 0,
                Duration::from_secs(10)
            ));
            let s = engine.stats();
            assert_eq!(
                (s.submitted, s.waiting_events),
                (u64::from(k), usize::from(k))
            );
            if seen {
                break;
            }
        }
        assert!(
            seen,
            "the scheduler never took a command while the lock was held"
        );
        engine.shutdown().unwrap();
    }
}
