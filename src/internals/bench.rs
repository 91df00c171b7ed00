//! Windows onto the scheduler core and the state file for the criterion benches; not part of
//! the API.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, DomainLimits};
use crate::fetch::{FailureKind, FetchError, FetchReport};
use crate::scheduler::queue::{Action, Command, JobId, Queue, ValidEvent};
use crate::{ObjectId, Origin};

pub use crate::state_file::StateBench;

/// How long entries that are not ready wait for their first attempt: long enough for
/// [`QueueBench::reset`] (one second each) to be called 86 million times before they fall due;
/// criterion calls it up to a few million times at the smallest queue.
const NOT_READY_FOR: Duration = Duration::from_secs(1000 * 24 * 60 * 60);

/// The backoff after a failed attempt, and the step [`QueueBench::reset`] moves the clock.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A checkpoint's snapshot, taken by [`QueueBench::snapshot`].
pub struct CheckpointSnapshot(#[allow(dead_code)] crate::persist::Snapshot);

/// A scheduler core filled with queued identifiers, some of them ready.
pub struct QueueBench {
    core: Queue,
    now: Instant,
    /// Fetches dispatched by the passes so far and not reported back yet.
    running: Vec<JobId>,
    /// When the entries that were not ready at the start fall due.
    not_ready_at: Instant,
}

impl QueueBench {
    /// `queued` identifiers, each with one event waiting for one object on one URL (spread
    /// over 50 domains), of which `ready` are due now and the rest a day later; `workers`
    /// bounds the dispatches a pass may make. No domain limit binds: the bench measures
    /// decisions, not politeness.
    pub fn new(queued: usize, ready: usize, workers: usize) -> Self {
        let limits = DomainLimits::new(1024, 600_000).burst(100_000);
        Self::build(queued, ready, workers, 50, limits)
    }

    /// `queued` identifiers, all ready, on `domains` domains with the default per-domain
    /// limits (5 in flight, 30 a minute, burst 5) and 8 workers (fewer than the default 32, so
    /// that the figures compare with earlier runs). With fewer than 2 domains the
    /// workers outnumber the domains' slots, so the first pass dispatches 5 fetches per domain
    /// and parks every other entry in its domain's queue, where later passes find it.
    pub fn parked(queued: usize, domains: usize) -> Self {
        Self::build(queued, queued, 8, domains, DomainLimits::default())
    }

    fn build(
        queued: usize,
        ready: usize,
        workers: usize,
        domains: usize,
        limits: DomainLimits,
    ) -> Self {
        let cfg = Config {
            workers,
            domain_limits: limits,
            user_delay: NOT_READY_FOR,
            backoff_base: RETRY_AFTER,
            backoff_cap: RETRY_AFTER,
            // Nothing expires while the bench runs.
            event_lifetime: 30 * NOT_READY_FOR,
            ..Config::default()
        };
        let delay = cfg.user_delay;
        let mut core = Queue::new(Arc::new(cfg), Arc::new(AtomicUsize::new(queued)));
        let start = Instant::now();
        let domains = domains.max(1);
        for i in 0..queued {
            let mut bytes = [0u8; 20];
            bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
            // Ready entries were submitted long enough ago; the others just now.
            let submitted = if i < ready { start } else { start + delay };
            let ev = ValidEvent {
                id: format!("event-{i}").into(),
                identifier: format!("identifier-{i}").into(),
                repo: Arc::from(PathBuf::from(format!("/srv/git/{i}.git")).as_path()),
                oids: vec![ObjectId::from_bytes(bytes)],
                missing: vec![ObjectId::from_bytes(bytes)],
                urls: vec![crate::policy::UrlPolicy::new()
                    .check(&format!("https://git{}.example.com/{i}.git", i % domains))
                    .expect("the bench's URLs pass the policy")],
                refs: Arc::from([]),
                replace_refs: false,
                created_at: None,
                origin: Origin::User,
                submitted,
                restored: None,
            };
            core.command(Command::Submit(ev), start + delay);
        }
        QueueBench {
            core,
            now: start + delay,
            running: Vec::new(),
            not_ready_at: start + 2 * delay,
        }
    }

    /// One decision pass; returns how many fetches it dispatched.
    pub fn pass(&mut self) -> usize {
        self.core.pass(self.now);
        let before = self.running.len();
        for action in self.core.take_actions() {
            if let Action::Dispatch(job) = action {
                self.running.push(job.id);
            }
        }
        self.running.len() - before
    }

    /// Reports every dispatched fetch as failed (the object was not found) and moves the
    /// bench's clock on by the backoff: the entries those fetches were for are ready again,
    /// the others still wait. So a pass can be measured again on the same queue without
    /// building it anew.
    pub fn reset(&mut self) {
        for job in std::mem::take(&mut self.running) {
            let report = FetchReport::failed(FetchError::new(FailureKind::NotFound, "bench"));
            self.core.job_done(job, report, self.now);
        }
        self.core.take_actions();
        self.now += RETRY_AFTER;
        assert!(
            self.now < self.not_ready_at,
            "the entries meant to wait are due: the queue would no longer be 1 % ready"
        );
    }

    /// What a checkpoint does while it holds the core's lock: takes the snapshot of the
    /// durable state. Dropping it, which a checkpoint does after the lock, is up to the caller
    /// (criterion's `iter_with_large_drop` leaves it out of the measurement).
    pub fn snapshot(&self) -> CheckpointSnapshot {
        CheckpointSnapshot(self.core.snapshot(self.now, 0))
    }

    /// The whole checkpoint but the file write: the snapshot and the state file's contents
    /// made from it. Returns the number of events in it.
    pub fn state_file(&self) -> usize {
        self.core
            .snapshot(self.now, 0)
            .into_state_file()
            .events
            .len()
    }

    /// What [`Engine::stats`](crate::Engine::stats) asks the core for; returns the number of
    /// identifiers waiting in domain queues.
    pub fn stats(&self) -> usize {
        self.core
            .stats_at(self.now, std::time::SystemTime::now())
            .domains
            .values()
            .map(|d| d.queued_identifiers)
            .sum()
    }
}

/// One popular identifier already holding waiting events, and the scheduler's command
/// channel: what a host command costs under the core's lock, and how long one scheduler turn
/// holds it.
pub struct CommandBench {
    core: Queue,
    now: Instant,
    next: usize,
    urls_per_event: usize,
    tx: crossbeam_channel::Sender<Command>,
    rx: crossbeam_channel::Receiver<Command>,
    unapplied: AtomicUsize,
}

impl CommandBench {
    /// An identifier with `events` waiting events, each listing `urls_per_event` clone URLs of
    /// its own and waiting for 64 objects (the commands go straight to the core, so the
    /// per-identifier URL cap does not apply).
    pub fn new(events: usize, urls_per_event: usize) -> Self {
        let cfg = Config {
            user_delay: NOT_READY_FOR,
            event_lifetime: 30 * NOT_READY_FOR,
            ..Config::default()
        };
        let now = Instant::now();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut bench = CommandBench {
            core: Queue::new(Arc::new(cfg), Arc::new(AtomicUsize::new(events))),
            now,
            next: 0,
            urls_per_event,
            tx,
            rx,
            unapplied: AtomicUsize::new(0),
        };
        for _ in 0..events {
            let ev = bench.event();
            bench.core.command(Command::Submit(ev), now);
        }
        bench
    }

    /// The next event: new id, new URLs, 64 new objects, on the popular identifier.
    fn event(&mut self) -> ValidEvent {
        let i = self.next;
        self.next += 1;
        let oids: Vec<ObjectId> = (0..64u64)
            .map(|k| {
                let mut bytes = [0u8; 20];
                bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
                bytes[8..16].copy_from_slice(&k.to_be_bytes());
                ObjectId::from_bytes(bytes)
            })
            .collect();
        let policy = crate::policy::UrlPolicy::new();
        ValidEvent {
            id: format!("event-{i}").into(),
            identifier: "popular".into(),
            repo: Arc::from(PathBuf::from("/srv/git/popular.git").as_path()),
            missing: oids.clone(),
            oids,
            urls: (0..self.urls_per_event)
                .map(|u| {
                    policy
                        .check(&format!("https://m{u}.example.com/e{i}.git"))
                        .expect("the bench's URLs pass the policy")
                })
                .collect(),
            refs: Arc::from([]),
            replace_refs: false,
            created_at: None,
            origin: Origin::User,
            submitted: self.now,
            restored: None,
        }
    }

    /// Applies one more submit to the core (the event is built outside the measurement by the
    /// caller's setup: see [`prepare`](Self::prepare)).
    pub fn submit(&mut self, command: PreparedCommand) {
        self.core.command(command.0, self.now);
    }

    /// The next submit command, built but not applied.
    pub fn prepare(&mut self) -> PreparedCommand {
        PreparedCommand(Command::Submit(self.event()))
    }

    /// Queues `n` submits, then runs one scheduler turn as the scheduler thread does under the
    /// core's lock. Returns how many commands it applied and how long it took; the rest stay
    /// queued for later turns.
    pub fn turn(&mut self, n: usize) -> (usize, Duration) {
        for _ in 0..n {
            let ev = self.event();
            self.unapplied
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.tx
                .send(Command::Submit(ev))
                .expect("the bench holds the receiver");
        }
        let first = self.rx.try_recv().expect("a command is queued");
        let clock = crate::clock::SystemClock;
        let start = Instant::now();
        let applied = crate::scheduler::apply_commands(
            &mut self.core,
            first,
            &self.rx,
            &clock,
            &self.unapplied,
        );
        let took = start.elapsed();
        // Empty the channel outside the measurement.
        for cmd in self.rx.try_iter() {
            self.core.command(cmd, self.now);
        }
        (applied, took)
    }
}

/// A command built for [`CommandBench::submit`].
pub struct PreparedCommand(Command);
