//! The scheduler thread: a thin loop around [`Queue`].
//!
//! It wakes on a command, a job result, a fake-clock advance or the tick, lets the core decide,
//! and carries out the core's actions outside the lock: fetch jobs go to the worker pool,
//! outcomes to the host, repository checks, ref updates and ref clean-ups run here (they are
//! local and quick). Workers only fetch and report.

pub(crate) mod domains;
pub(crate) mod ids;
pub(crate) mod queue;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use parking_lot::Mutex;

use self::queue::{Action, Command, Job, JobId, Queue};
use crate::clock::Clock;
use crate::config::Config;
use crate::event::Outcome;
use crate::fetch::{FailureKind, FetchControl, FetchError, FetchReport, Fetcher};
use crate::ObjectId;

/// Most commands taken in one go before the core runs a pass, so that a burst of submits costs
/// one pass, not one each, while results still get their turn.
const COMMAND_BATCH: usize = 1024;

/// Longest the scheduler goes on applying commands under the core's lock in one turn: what
/// a burst of commands can hold up a `stats` call, a fetch's result or the next pass, however
/// the commands are shaped. A command's own cost is bounded by the per-event limits and does
/// not grow with what the engine already holds.
pub(crate) const COMMAND_TURN: Duration = Duration::from_millis(2);

/// Applies `first`, then the commands waiting in `commands`, until `COMMAND_BATCH` of them or
/// `COMMAND_TURN` has passed. Returns how many it applied.
pub(crate) fn apply_commands(
    core: &mut Queue,
    first: Command,
    commands: &Receiver<Command>,
    clock: &dyn Clock,
    unapplied: &AtomicUsize,
) -> usize {
    let until = Instant::now() + COMMAND_TURN;
    core.command(first, clock.now());
    unapplied.fetch_sub(1, Ordering::SeqCst);
    let mut applied = 1;
    while applied < COMMAND_BATCH && Instant::now() < until {
        let Ok(cmd) = commands.try_recv() else {
            break;
        };
        core.command(cmd, clock.now());
        unapplied.fetch_sub(1, Ordering::SeqCst);
        applied += 1;
    }
    applied
}

/// Everything the scheduler thread owns.
pub(crate) struct Scheduler {
    pub cfg: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub fetcher: Arc<dyn Fetcher>,
    pub core: Arc<Mutex<Queue>>,
    pub commands: Receiver<Command>,
    /// Commands sent and not applied yet: the handle counts one up before sending, the loop
    /// counts it down when the core has applied it, under the core's lock.
    pub unapplied: Arc<AtomicUsize>,
    pub outcomes: Sender<Outcome>,
    pub pool: rayon::ThreadPool,
    pub cancel: Arc<AtomicBool>,
    /// Wakes when a fake clock is advanced; subscribed before the thread starts so that no
    /// advance is missed.
    pub wake: Receiver<()>,
    pub results_tx: Sender<(JobId, FetchReport)>,
    pub results_rx: Receiver<(JobId, FetchReport)>,
    /// Repositories whose temporary refs a worker has dropped (`Action::DropRefs`).
    pub drops_tx: Sender<Arc<Path>>,
    pub drops_rx: Receiver<Arc<Path>>,
    /// Where the final state-file write reports a failure to the handle.
    pub final_write: Arc<Mutex<Option<std::io::Error>>>,
    /// The state file's lock, held by the thread that writes the file: it is dropped after the
    /// final write in [`Scheduler::stop`] (or as a panic unwinds the thread), and so before
    /// `Engine::shutdown`, which joins this thread, returns: a new engine can then take the
    /// file.
    pub state_lock: Option<crate::persist::StateLock>,
    /// How many fetches had not reported back when the scheduler gave up waiting at shutdown.
    /// Rayon keeps its idle threads until every spawned job has ended, so the threads still
    /// running are not the count of stuck fetches: this is.
    pub stuck: Arc<AtomicUsize>,
    /// The memory libgit2 holds for all fetches together (`max_total_fetch_memory`).
    pub memory: Arc<crate::fetch::conn::MemoryPool>,
}

impl Scheduler {
    /// Runs until every command sender is gone, then cancels fetches in flight, waits for them
    /// up to the shutdown timeout and returns, dropping the pool.
    pub fn run(self) {
        let wake = self.wake.clone();
        // Outcomes decided by a restore (expired or satisfied while the engine was down) go out
        // at once.
        self.core.lock().pass(self.clock.now());
        self.carry_out(false);
        let mut next_checkpoint = self.clock.now() + self.cfg.checkpoint_interval;
        loop {
            // Sleep until the tick, or earlier when a delay, backoff, expiry or rate-quota
            // refill falls due before it.
            let now = self.clock.now();
            let wait = self
                .core
                .lock()
                .next_wake(now)
                .map_or(self.cfg.tick, |t| t.saturating_duration_since(now))
                .min(self.cfg.tick)
                .min(next_checkpoint.saturating_duration_since(now));
            select! {
                recv(self.commands) -> cmd => match cmd {
                    Ok(cmd) => self.take_commands(cmd),
                    Err(_) => break,
                },
                recv(self.results_rx) -> r => {
                    let (job, report) = r.expect("the scheduler holds a results sender");
                    self.core.lock().job_done(job, report, self.clock.now());
                },
                recv(self.drops_rx) -> r => {
                    let repo = r.expect("the scheduler holds a drops sender");
                    self.core.lock().refs_dropped(&repo);
                },
                recv(wake) -> _ => {},
                default(wait) => {},
            }
            // Every fetch that has ended is taken before the pass, whichever branch ran: one
            // result per turn would leave workers idle behind a stream of host commands.
            self.take_results();
            self.core.lock().pass(self.clock.now());
            self.carry_out(false);
            if self.cfg.state_file.is_some() && self.clock.now() >= next_checkpoint {
                if let Err(e) = self.checkpoint() {
                    log::warn!("state file checkpoint failed: {e}");
                }
                next_checkpoint = self.clock.now() + self.cfg.checkpoint_interval;
            }
        }
        self.stop();
    }

    /// Hands the core every job result already sent.
    fn take_results(&self) {
        let mut core = self.core.lock();
        for (job, report) in self.results_rx.try_iter() {
            core.job_done(job, report, self.clock.now());
        }
        for repo in self.drops_rx.try_iter() {
            core.refs_dropped(&repo);
        }
    }

    fn take_commands(&self, first: Command) {
        let mut core = self.core.lock();
        apply_commands(
            &mut core,
            first,
            &self.commands,
            self.clock.as_ref(),
            &self.unapplied,
        );
    }

    /// Carries out the core's actions until it has none left (a check can release events,
    /// which can free a repository for ref clean-up). Temporary refs are dropped by a worker,
    /// off this thread (the core keeps their repository busy until it reports), unless
    /// `inline_drops` (at shutdown, when nothing may be left running).
    fn carry_out(&self, inline_drops: bool) {
        loop {
            let actions = self.core.lock().take_actions();
            if actions.is_empty() {
                return;
            }
            for action in actions {
                match action {
                    Action::Dispatch(job) => self.spawn(job),
                    Action::Emit(outcome) => {
                        log::debug!("{outcome:?}");
                        // The host may have dropped its receivers; outcomes are then unwanted.
                        let _ = self.outcomes.send(outcome);
                    }
                    Action::Check { entry, repo, oids } => {
                        let result = self.fetcher.present(&repo, &oids);
                        self.core.lock().checked(entry, result, self.clock.now());
                    }
                    Action::ApplyRefs {
                        event_id,
                        repo,
                        updates,
                        replace_refs,
                    } => {
                        // A custom fetcher's panic must not take the scheduler down: it counts
                        // as a failed write, retried like one.
                        let result = catch_unwind(AssertUnwindSafe(|| {
                            self.fetcher.apply_refs(&repo, &updates, replace_refs)
                        }))
                        .unwrap_or_else(|panic| {
                            Err(FetchError::new(
                                FailureKind::Panicked,
                                format!("ref update panicked: {}", panic_message(panic.as_ref())),
                            ))
                        });
                        self.core
                            .lock()
                            .refs_applied(&event_id, result, self.clock.now());
                    }
                    Action::DropRefs { repo, oids } if inline_drops => {
                        drop_refs(self.fetcher.as_ref(), &repo, &oids);
                        self.core.lock().refs_dropped(&repo);
                    }
                    Action::DropRefs { repo, oids } => {
                        let fetcher = self.fetcher.clone();
                        let done = self.drops_tx.clone();
                        self.pool.spawn(move || {
                            drop_refs(fetcher.as_ref(), &repo, &oids);
                            // The scheduler may be gone at shutdown: nothing waits then.
                            let _ = done.send(repo);
                        });
                    }
                }
            }
        }
    }

    fn spawn(&self, job: Job) {
        let fetcher = self.fetcher.clone();
        let results = self.results_tx.clone();
        let control = FetchControl::new(
            Instant::now() + self.cfg.fetch_deadline,
            self.cancel.clone(),
        )
        .with_max_bytes(self.cfg.max_fetch_bytes)
        // Each fetch within `max_fetch_memory`; all of them within the pool
        // (`max_total_fetch_memory`), where what libgit2 lost stays counted.
        .with_max_memory(self.cfg.max_fetch_memory)
        .with_memory_pool(self.memory.clone())
        .with_gate(job.gate.clone(), self.clock.clone())
        .with_max_advertisement(self.cfg.max_advertisement_bytes)
        .with_depth(self.cfg.fetch_depth)
        .with_timeouts(self.cfg.connect_timeout, self.cfg.io_timeout)
        .with_url_policy(self.cfg.url_policy.clone())
        .with_hide_temp_refs(self.cfg.hide_temp_refs);
        log::debug!(
            "fetch {} of {} from {}",
            job.request.wanted.len(),
            job.request.identifier,
            job.request.url
        );
        self.pool.spawn(move || {
            let report = catch_unwind(AssertUnwindSafe(|| fetcher.fetch(&job.request, &control)))
                .unwrap_or_else(|panic| {
                    FetchReport::failed(FetchError::new(
                        FailureKind::Panicked,
                        format!("fetcher panicked: {}", panic_message(panic.as_ref())),
                    ))
                });
            if let Some(e) = &report.error {
                log::info!("fetch from {} failed: {e}", job.request.url);
            }
            // The scheduler keeps a receiver until every job it dispatched has reported or the
            // shutdown timeout has passed; a late report has nobody to go to.
            let _ = results.send((job.id, report));
        });
    }

    fn stop(self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.core.lock().stop_dispatching();
        let deadline = Instant::now() + self.cfg.shutdown_timeout;
        while self.core.lock().in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results_rx.recv_timeout(left) {
                Ok((job, report)) => {
                    let mut core = self.core.lock();
                    core.job_done(job, report, self.clock.now());
                    core.pass(self.clock.now());
                }
                Err(_) => {
                    let stuck = self.core.lock().in_flight();
                    log::warn!("{stuck} fetch(es) still running at shutdown");
                    self.stuck.store(stuck, Ordering::SeqCst);
                    break;
                }
            }
            self.carry_out(true);
        }
        // A last pass: expiries due now, and ref clean-ups of repositories just freed.
        self.core.lock().pass(self.clock.now());
        self.carry_out(true);
        if self.cfg.state_file.is_some() {
            if let Err(e) = self.checkpoint() {
                log::warn!("final state file write failed: {e}");
                *self.final_write.lock() = Some(e);
            }
        }
        // Only now: nothing writes the state file after this.
        drop(self.state_lock);
    }

    /// Writes the state file: a snapshot under the lock, the write outside it.
    fn checkpoint(&self) -> std::io::Result<()> {
        let Some(path) = &self.cfg.state_file else {
            return Ok(());
        };
        let wall_ms = crate::persist::unix_ms(self.clock.wall());
        let snapshot = self.core.lock().snapshot(self.clock.now(), wall_ms);
        crate::state_file::write(path, &snapshot.into_state_file())
    }
}

/// The text of a panic's payload; callers say who panicked.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string payload".to_owned()
    }
}

/// A worker pool whose threads can be joined: rayon does not join its threads on drop, so the
/// pool hands out their handles and signals each thread's exit.
pub(crate) struct Workers {
    pub pool: rayon::ThreadPool,
    pub handles: Vec<JoinHandle<()>>,
    pub exited: Receiver<()>,
}

pub(crate) fn start_workers(name: &str, n: usize) -> std::io::Result<Workers> {
    let handles = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let (exit_tx, exited) = crossbeam_channel::unbounded();
    let spawned = handles.clone();
    let prefix = name.to_owned();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(move |i| format!("{prefix}-w{i}"))
        .exit_handler(move |_| {
            let _ = exit_tx.send(());
        })
        .spawn_handler(move |thread| {
            let mut b = std::thread::Builder::new();
            if let Some(name) = thread.name() {
                b = b.name(name.to_owned());
            }
            let handle = b.spawn(|| thread.run())?;
            spawned.lock().push(handle);
            Ok(())
        })
        .build();
    let pool = match pool {
        Ok(p) => p,
        Err(e) => {
            // Threads already spawned exit once the half-built pool is gone.
            let handles = std::mem::take(&mut *handles.lock());
            join_all(handles, &exited, Duration::from_secs(5));
            return Err(std::io::Error::other(e.to_string()));
        }
    };
    let handles = std::mem::take(&mut *handles.lock());
    Ok(Workers {
        pool,
        handles,
        exited,
    })
}

/// Waits up to `timeout` for the threads to exit and joins those that did. Returns how many
/// are still running (they are left detached).
pub(crate) fn join_all(
    handles: Vec<JoinHandle<()>>,
    exited: &Receiver<()>,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut exits = 0;
    while exits < handles.len() {
        match exited.recv_deadline(deadline) {
            Ok(()) => exits += 1,
            Err(_) => break,
        }
    }
    if exits == handles.len() {
        // Each thread's exit handler is its last step: these joins return at once.
        for h in handles {
            let _ = h.join();
        }
        return 0;
    }
    let mut still_running = 0;
    for h in handles {
        if h.is_finished() {
            let _ = h.join();
        } else {
            still_running += 1;
        }
    }
    still_running
}

/// Removes the temporary refs `oids` of `repo`; a failure is logged, a custom fetcher's panic
/// too (the refs stay, which costs nothing but their names).
fn drop_refs(fetcher: &dyn Fetcher, repo: &Path, oids: &[ObjectId]) {
    match catch_unwind(AssertUnwindSafe(|| fetcher.drop_temp_refs(repo, oids))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("could not remove temporary refs in {}: {e}", repo.display()),
        Err(_) => log::warn!("removing temporary refs in {} panicked", repo.display()),
    }
}
