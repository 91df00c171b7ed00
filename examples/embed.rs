//! Embedding the engine in a synchronous Rust host: `cargo run --release --example embed`.
//!
//! The example plays a GRASP relay. It starts two `git daemon` mirrors on loopback addresses
//! (127.0.0.2 and 127.0.0.3, two different "domains") through the crate's test kit, creates
//! the relay's own bare repositories, and then puts events in purgatory:
//!
//! * `state-alice`: a repository state (kind 30618) synced from another relay, pointing at two
//!   commits; mirror 1 has only one of them, mirror 2 has both. The engine gathers them.
//! * `pr-bob`: a pull request synced from another relay; its commit is only on mirror 2,
//!   although mirror 1 is listed first.
//! * `push-carol`: published by a user to this relay, so the engine waits for a `git push`
//!   (default 180 s) instead of fetching. The example receives the push and calls
//!   `git_data_arrived`, which releases the event at once.
//! * `gone-dave`: an event for a commit nobody has, which the host cancels.
//! * a re-submission of data the relay already holds: `AlreadySatisfied`.
//!
//! Every outcome is printed on one line, then the statistics. The process exits with an error
//! if an event that should be released is not, within a bounded wait. `RUST_LOG=debug` shows
//! the engine's decisions and the daemons' logs.

use std::collections::BTreeSet;
use std::error::Error;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use purgatory_sync::{Admission, Engine, Origin, Outcome, PendingEvent};
use purgatory_sync_testkit::{self as testkit, GitDaemon};

/// Upper bound on the whole run: the expected outcomes take well under a few seconds.
const WAIT: Duration = Duration::from_secs(30);

fn main() -> Result<(), Box<dyn Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if !testkit::git_available() {
        return Err("this example starts `git daemon`: install git and put it on PATH".into());
    }

    // Build the engine first: it is the process's first libgit2 user (see the crate docs).
    let engine = Engine::builder()
        .allow_private_addresses(true) // the test servers listen on 127.0.0.x
        .workers(4)
        .thread_name("embed")
        .tick(Duration::from_millis(100))
        .sync_delay(Duration::from_millis(200)) // debounce bursts of synced events
        .user_delay(Duration::from_secs(180)) // the default: give the user's push time
        .backoff_base(Duration::from_millis(500))
        .backoff_cap(Duration::from_secs(5))
        .event_lifetime(Duration::from_secs(60))
        .fetch_deadline(Duration::from_secs(20))
        .build()?;
    let outcomes = engine.outcomes();

    let dir = tempfile::tempdir()?;
    let root = dir.path();

    // Two mirrors on two loopback "domains".
    let (base1, base2) = (root.join("mirror1"), root.join("mirror2"));
    let alice1 = testkit::served_repo(&base1, "alice/hello.git");
    let alice2 = testkit::served_repo(&base2, "alice/hello.git");
    let bob1 = testkit::served_repo(&base1, "bob/tools.git");
    let bob2 = testkit::served_repo(&base2, "bob/tools.git");
    // Commits are deterministic: the same calls give the same ids on both mirrors.
    let mut first = None;
    for repo in [&alice1, &alice2] {
        first = Some(testkit::commit(
            repo,
            "main",
            &[("README.md", b"# hello\n")],
            "initial commit",
        ));
    }
    let first = first.expect("two mirrors");
    // The second commit reached mirror 2 only.
    let second = testkit::commit(
        &alice2,
        "main",
        &[("src/main.rs", b"fn main() {}\n")],
        "code",
    );
    testkit::commit(&bob1, "main", &[("tool.sh", b"echo hi\n")], "tools");
    testkit::push_all(&bob1, &bob2);
    let pr_tip = testkit::commit(&bob2, "pr/42", &[("tool.sh", b"echo hello\n")], "better");
    let mirror1 = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 2), &base1)?;
    let mirror2 = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 3), &base2)?;
    println!("mirror 1 at {}", mirror1.url(""));
    println!("mirror 2 at {}", mirror2.url(""));

    // The relay's own repositories.
    let relay = root.join("relay");
    let alice = testkit::init_bare(&relay.join("alice/hello.git"));
    let bob = testkit::init_bare(&relay.join("bob/tools.git"));
    let carol = testkit::init_bare(&relay.join("carol/notes.git"));
    let dave = testkit::init_bare(&relay.join("dave/gone.git"));

    let mut expected = BTreeSet::new();
    let submit = |ev: PendingEvent| -> Result<Admission, Box<dyn Error>> {
        let id = ev.id.clone();
        let admission = engine.submit(ev)?;
        println!("submit   {id:<12} -> {admission:?}");
        Ok(admission)
    };

    let state = PendingEvent::new("state-alice", "alice/hello", &alice)
        .oid(first.to_string())
        .oid(second.to_string())
        .clone_url(mirror1.url("alice/hello.git"))
        .clone_url(mirror2.url("alice/hello.git"))
        .origin(Origin::Sync);
    expect(submit(state)? == Admission::pending(), "state-alice waits")?;
    expected.insert("state-alice");

    let pr = PendingEvent {
        id: "pr-bob".into(),
        identifier: "bob/tools".into(),
        repo: bob.clone(),
        oids: vec![pr_tip.to_string()],
        clone_urls: vec![mirror1.url("bob/tools.git"), mirror2.url("bob/tools.git")],
        origin: Origin::Sync,
        ..Default::default()
    };
    expect(submit(pr)? == Admission::pending(), "pr-bob waits")?;
    expected.insert("pr-bob");

    // Carol publishes an event to this relay and is about to push its commit here.
    let carol_clone = testkit::init_bare(&root.join("carol-laptop/notes.git"));
    let pushed = testkit::commit(&carol_clone, "main", &[("notes.md", b"- todo\n")], "notes");
    let push_event = PendingEvent::new("push-carol", "carol/notes", &carol)
        .oid(pushed.to_string())
        .clone_url(mirror1.url("carol/notes.git"))
        .origin(Origin::User);
    expect(
        submit(push_event)? == Admission::pending(),
        "push-carol waits",
    )?;
    expected.insert("push-carol");

    let gone = PendingEvent::new("gone-dave", "dave/gone", &dave)
        .oid("0123456789abcdef0123456789abcdef01234567")
        .clone_url(mirror1.url("dave/gone.git"))
        .origin(Origin::User);
    expect(submit(gone)? == Admission::pending(), "gone-dave waits")?;

    // Dave's event is withdrawn: no outcome will come for it.
    engine.cancel("gone-dave");
    // The host received Carol's `git push`: the data is in the repository; tell the engine.
    testkit::push_all(&carol_clone, &carol);
    engine.git_data_arrived("carol/notes");

    let started = Instant::now();
    let deadline = started + WAIT;
    while !expected.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = match outcomes.recv_timeout(left) {
            Ok(o) => o,
            Err(_) => {
                return Err(format!("still waiting after {WAIT:?} for {expected:?}").into());
            }
        };
        match &outcome {
            Outcome::Released {
                event_id,
                identifier,
                waited,
                ..
            } => println!("released {event_id:<12} {identifier:<12} after {waited:?}"),
            Outcome::Expired {
                event_id, missing, ..
            } => println!("expired  {event_id:<12} missing {missing:?}"),
            other => println!("outcome  {other:?}"),
        }
        if !outcome.is_released() || !expected.remove(outcome.event_id()) {
            return Err(format!("unexpected outcome {outcome:?}").into());
        }
    }
    println!("all released in {:?}", started.elapsed());

    for (repo, oid) in [
        (&alice, first),
        (&alice, second),
        (&bob, pr_tip),
        (&carol, pushed),
    ] {
        expect(
            testkit::has_object(repo, oid),
            &format!("{oid} is in {}", short(repo, &relay)),
        )?;
    }
    // The data is here now: submitting again is answered at once, nothing is queued.
    let again = PendingEvent::new("pr-bob-again", "bob/tools", &bob).oid(pr_tip.to_string());
    expect(
        submit(again)? == Admission::AlreadySatisfied,
        "pr-bob-again is already satisfied",
    )?;

    let stats = engine.stats();
    println!("{stats:#?}");
    expect(stats.released == 3, "three events released")?;
    expect(stats.cancelled == 1, "one event cancelled")?;
    expect(stats.waiting_events == 0, "nothing waits")?;
    expect(stats.already_satisfied == 1, "one already satisfied")?;

    engine.shutdown()?;
    if let Ok(late) = outcomes.try_recv() {
        return Err(format!("unexpected outcome after shutdown: {late:?}").into());
    }
    println!("engine shut down cleanly");
    Ok(())
}

fn expect(condition: bool, what: &str) -> Result<(), Box<dyn Error>> {
    if condition {
        Ok(())
    } else {
        Err(format!("expected: {what}").into())
    }
}

fn short(repo: &Path, relay: &Path) -> String {
    repo.strip_prefix(relay)
        .unwrap_or(repo)
        .display()
        .to_string()
}
