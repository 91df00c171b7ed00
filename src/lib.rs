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
//! | what | default | knob |
//! |---|---|---|
//! | scheduler tick (and an immediate wake on every command) | 1 s | [`EngineBuilder::tick`] |
//! | first attempt after a user-submitted event | 180 s | [`EngineBuilder::user_delay`] |
//! | first attempt after a sync-received event | 500 ms | [`EngineBuilder::sync_delay`] |
//! | backoff after an incomplete attempt | 20 s, 40 s, 80 s, then 120 s | [`EngineBuilder::backoff_base`], [`EngineBuilder::backoff_cap`] |
//! | event lifetime in purgatory | 30 min | [`EngineBuilder::event_lifetime`] |
//! | expired event id remembered: a synced re-submission whose data is still missing is refused | 7 days | [`EngineBuilder::expired_memory`] |
//! | worker threads (fetches in flight) | 32 | [`EngineBuilder::workers`] |
//! | hard limit on one fetch | 120 s | [`EngineBuilder::fetch_deadline`] |
//! | most bytes one fetch may receive | 1 GiB | [`EngineBuilder::max_fetch_bytes`] |
//! | most memory libgit2 may hold for one fetch | 512 MiB | [`EngineBuilder::max_fetch_memory`] |
//! | most memory libgit2 may hold for all fetches together | 4 GiB | [`EngineBuilder::max_total_fetch_memory`] |
//! | largest object a delta may build (process-wide) | 100 MiB | [`EngineBuilder::max_object_size`] |
//! | largest ref advertisement | 32 MiB | [`EngineBuilder::max_advertisement_bytes`] |
//! | most distinct clone URLs of one identifier's waiting events | 256 | [`EngineBuilder::max_urls_per_identifier`] |
//! | connect timeout / longest silence on a connection | 10 s / 30 s | [`EngineBuilder::connect_timeout`], [`EngineBuilder::io_timeout`] |
//! | shallow fetch | off | [`EngineBuilder::fetch_depth`] |
//! | the relay's own domain, never fetched from: `host` (every port) or `host:port` (that authority only) | none | [`EngineBuilder::our_domain`] |
//! | temporary refs hidden from the relay's clients (`transfer.hideRefs`) | yes | [`EngineBuilder::hide_temp_refs`] |
//!
//! An attempt tries the identifier's clone URLs one after another, each fetch asking for the
//! objects still missing, until every waiting event is satisfied or every URL was tried; objects
//! may come from different URLs. A new event for a queued identifier resets the backoff and
//! moves the next attempt earlier, never later. At most one fetch runs per identifier and per
//! repository. Fetched objects are kept reachable under [`TEMP_REF_PREFIX`] until their event
//! leaves purgatory; those refs are hidden from the relay's clients (`transfer.hideRefs` in the
//! repository's configuration, see [`EngineBuilder::hide_temp_refs`]). An event's [`RefUpdate`]s are written in one transaction, all or none,
//! before its [`Outcome::Released`] is sent; a ref update may delete its ref
//! ([`RefTarget::Delete`]), and a repository state's updates are its complete set of branches
//! and tags ([`PendingEvent::replace_refs`]): the others are deleted in the same transaction.
//! Of two such states of one repository the newest ([`PendingEvent::created_at`]) wins: an
//! older one released after a newer one was written is not written, and its outcome says so
//! ([`RefsOutcome::SkippedOlderState`]).
//!
//! A host's calls from one thread take effect in the order it made them: a submit right after
//! a cancel of the same id queues the event anew, and a submit of an id that still waits is a
//! re-submission (one event, one outcome), which changes nothing unless a user re-publishes a
//! synced event: it then becomes a user event whose lifetime starts again. An expired id is
//! refused only as a synced event whose objects are still missing, for
//! [`EngineBuilder::expired_memory`]. See [`Engine::submit`].
//!
//! Each fetch is bounded: the engine registers its own socket stream with libgit2, so the
//! deadline, the byte cap, the idle timeout and shutdown are checked on every read and write,
//! and every failure is classified ([`FailureKind`]). It also installs an allocator for
//! libgit2 that holds each fetch to its memory budget and stops delta resolution, which reads
//! no socket, at the deadline; the engine's fetches together never hold more than
//! `max_total_fetch_memory` (4 GiB). A fetch's packs are quarantined and kept only
//! when they brought a wanted object. See [`GitFetcher`] for how the objects to
//! ask for are chosen when a server does not allow fetching by id.
//!
//! # Threads and libgit2
//!
//! [`EngineBuilder::build`] (or [`GitFetcher::new`]) makes the process's first libgit2 call
//! (which sets environment variables for OpenSSL), sets libgit2's process-wide socket timeouts
//! and largest object size, replaces libgit2's allocator (with `malloc`, `realloc` and `free`
//! that count a fetch's memory, and do nothing else outside one) and registers the engine's
//! socket stream as libgit2's standard stream for the whole process. Outside an engine's fetch that stream behaves as a plain socket (10 s connect,
//! 30 s idle timeouts), so a host's own libgit2 use keeps working. Build the first engine
//! early, before the host starts other threads that use libgit2 or the environment.

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

/// What the fuzz targets and benches need of the inside. Not part of the API: may change at
/// any time.
#[doc(hidden)]
pub mod internals;
