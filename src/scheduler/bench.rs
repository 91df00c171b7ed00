//! A window onto the scheduler core for the criterion benches; not part of the stable API.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{Action, Command, Core, ValidEvent};
use crate::config::Config;
use crate::{ObjectId, Origin};

/// A scheduler core filled with queued identifiers, some of them ready.
pub struct QueueBench {
    core: Core,
    now: Instant,
}

impl QueueBench {
    /// `queued` identifiers, each with one event waiting for one object on one URL, of which
    /// `ready` are due now and the rest in the future; `workers` bounds the dispatches a pass
    /// may make.
    pub fn new(queued: usize, ready: usize, workers: usize) -> Self {
        let cfg = Config {
            workers,
            // The bench measures decisions, not politeness: no domain limit binds.
            domain_limits: crate::config::DomainLimits::new(1024, 600_000).burst(100_000),
            ..Config::default()
        };
        let delay = cfg.user_delay;
        let mut core = Core::new(Arc::new(cfg), Arc::new(AtomicUsize::new(queued)));
        let start = Instant::now();
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
                urls: vec![crate::policy::CloneUrl {
                    url: Arc::from(format!("https://git{}.example.com/{i}.git", i % 50)),
                    domain: Arc::from(format!("git{}.example.com", i % 50)),
                }],
                refs: Arc::from([]),
                origin: Origin::User,
                submitted,
                restored: None,
            };
            core.command(Command::Submit(ev), start + delay);
        }
        QueueBench {
            core,
            now: start + delay,
        }
    }

    /// One decision pass; returns how many fetches it dispatched.
    pub fn pass(&mut self) -> usize {
        self.core.pass(self.now);
        self.core
            .take_actions()
            .iter()
            .filter(|a| matches!(a, Action::Dispatch(_)))
            .count()
    }

    /// Moves the bench's notion of now forward.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }
}
