//! Fetches the missing git data of events waiting in a GRASP relay's purgatory.
//!
//! A GRASP relay (a Nostr relay that also hosts git repositories) holds events that point at
//! git objects it does not have yet. This crate is a **synchronous thread-pool engine** that
//! hunts those objects down on the git servers named in the events and tells the host when each
//! event is [released](Outcome::Released) (all its objects are in its repository) or
//! [expired](Outcome::Expired). There is no async runtime: one scheduler thread decides, a
//! bounded pool of workers runs blocking libgit2 fetches, and results travel over
//! `crossbeam-channel`.
//!
//! # Tutorial
//!
//! Build an [`Engine`] with [`Engine::builder`], [`submit`](Engine::submit) a
//! [`PendingEvent`] for every event the host puts in purgatory, and read [`Outcome`]s from
//! [`outcomes`](Engine::outcomes). When the host receives the data itself (a `git push`), it
//! calls [`git_data_arrived`](Engine::git_data_arrived) and the engine re-checks at once.
//!
//! The example below runs without a network: a custom [`Fetcher`] stands in for a git server
//! by writing the wanted object into the repository, and a [`FakeClock`] replaces waiting.
//!
//! ```
//! use purgatory_sync::{
//!     Admission, Engine, FakeClock, FetchControl, FetchReport, FetchRequest, Fetcher, Origin,
//!     Outcome, PendingEvent,
//! };
//! use std::time::Duration;
//!
//! /// A "server" that always has the blob `hello`.
//! struct Hello;
//! impl Fetcher for Hello {
//!     fn fetch(&self, req: &FetchRequest, _: &FetchControl) -> FetchReport {
//!         let repo = git2::Repository::open_bare(&req.repo).unwrap();
//!         repo.blob(b"hello").unwrap();
//!         FetchReport::new(self.present(&req.repo, &req.wanted).unwrap(), None)
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! git2::Repository::init_bare(dir.path())?;
//! let hello = git2::Oid::hash_object(git2::ObjectType::Blob, b"hello")?.to_string();
//!
//! let clock = FakeClock::new();
//! let engine = Engine::builder().clock(clock.clone()).fetcher(Hello).build()?;
//! let outcomes = engine.outcomes();
//!
//! let event = PendingEvent::new("ev1", "alice/hello", dir.path())
//!     .oid(&hello)
//!     .clone_url("https://git.example.com/alice/hello.git")
//!     .origin(Origin::Sync);
//! assert_eq!(engine.submit(event)?, Admission::pending());
//!
//! // Sync-received events are first tried after 500 ms; advancing the fake clock wakes the
//! // scheduler at once.
//! clock.advance(Duration::from_millis(500));
//! match outcomes.recv_timeout(Duration::from_secs(10))? {
//!     Outcome::Released { event_id, .. } => assert_eq!(event_id, "ev1"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert_eq!(engine.stats().released, 1);
//! engine.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Behaviour
//!
//! Every setting is a method of [`EngineBuilder`], whose documentation gives its default. An
//! attempt tries an identifier's clone URLs one after another until every waiting event has its
//! objects; at most one fetch runs per identifier and per repository; each fetch is bounded in
//! time, bytes and memory ([`FailureKind`] says why one failed), and the requests to each domain
//! are rate-limited. `docs/behaviour.md` in the repository tabulates the settings and explains
//! the scheduling, how a fetch chooses what to ask for ([`GitFetcher`]), politeness toward
//! remote hosts, and what a stranger's URL can cost; `docs/state-file.md` the state file.
//!
//! # Threads and libgit2
//!
//! [`EngineBuilder::build`] (or [`GitFetcher::new`]) makes the process's first libgit2 call
//! (which sets environment variables for OpenSSL), sets libgit2's process-wide socket timeouts
//! and largest object size, replaces libgit2's allocator (with `malloc`, `realloc` and `free`
//! that count a fetch's memory, and do nothing else outside one) and registers the engine's
//! socket stream as libgit2's standard stream for the whole process. Outside an engine's fetch
//! that stream behaves as a plain socket (10 s connect, 30 s idle timeouts), so a host's own
//! libgit2 use keeps working. The allocator and the stream copy C layouts of libgit2 1.9 and
//! are registered only when that series is linked in. Build the first engine early, before the
//! host starts other threads that use libgit2 or the environment.

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![warn(rust_2018_idioms)]

mod clock;
mod config;
mod engine;
mod error;
mod event;
mod fetch;
pub mod metrics;
pub mod nip34;
mod oid;
mod persist;
mod policy;
mod scheduler;
mod state_file;
mod stats;
mod validate;

pub use clock::{Clock, FakeClock, SystemClock};
pub use config::{DomainLimits, EngineBuilder};
pub use engine::Engine;
pub use error::{BuildError, ShutdownError, SubmitError};
pub use event::{
    Admission, ExpiryReason, Origin, Outcome, PendingEvent, RefTarget, RefUpdate, RefsOutcome,
    RefusedUrl, UrlRefusal,
};
pub use fetch::{
    FailureKind, FetchControl, FetchError, FetchMode, FetchReport, FetchRequest, Fetcher,
    GitFetcher, StopReason, TEMP_REF_PREFIX,
};
pub use oid::{ObjectId, ParseObjectIdError};
pub use policy::{domain_of, UrlPolicy};
pub use state_file::{check_state_file, StateFileError, STATE_VERSION};
pub use stats::{
    DomainStats, FailureRecord, NaughtyCategory, NaughtyEntry, ReleaseHistogram, Stats,
};

/// The README's examples compile as doc-tests, so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// So do those of the documentation in `docs/`.
#[cfg(doctest)]
#[doc = include_str!("../docs/state-file.md")]
#[doc = include_str!("../docs/behaviour.md")]
#[doc = include_str!("../docs/cli.md")]
struct DocsDoctests;

/// What the fuzz targets and benches need of the inside. Not part of the API: may change at
/// any time.
#[doc(hidden)]
pub mod internals;
