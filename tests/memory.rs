//! What a fetch may cost in memory and time once the last byte has arrived, against packs
//! crafted to expand when libgit2 resolves their deltas.
//!
//! A pack of 80 KB can hold a 64 KiB blob and a delta whose copy instructions repeat it a
//! gigabyte long; a few deltas more make it many gigabytes and minutes of work, all inside
//! libgit2 with no socket read. The servers here are real `git://` servers on loopback
//! ([`ScriptedGitServer`]) sending such packs; the evidence is the process's own peak resident
//! memory (`VmHWM`, reset through `/proc/self/clear_refs` before each case), which is why this
//! file holds one test that runs its cases one after another: tests running beside it would
//! blur the figures.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use purgatory_sync::{
    FailureKind, FetchControl, FetchReport, FetchRequest, Fetcher, GitFetcher, NaughtyCategory,
    ObjectId, PendingEvent, UrlPolicy,
};
use purgatory_sync_testkit::{self as testkit, bombs, ObjectKind, Script, ScriptedGitServer};

const MIB: u64 = 1 << 20;
/// The engine's defaults, which these cases hold the engine to.
const MAX_FETCH_MEMORY: u64 = 512 * MIB;
const MAX_OBJECT_SIZE: u64 = 100 * MIB;
/// All fetches together (`max_total_fetch_memory`).
const MAX_TOTAL_FETCH_MEMORY: u64 = 4096 * MIB;
/// More attackers at once than the total lets each take its whole budget: 12 × 512 MiB is
/// 6 GiB. The default 32 workers run them all at once.
const ATTACKERS: u64 = 12;

/// Resident memory of this process, in bytes: (now, peak since the last reset).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"));
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("a number of kB");
        kb * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak to the current resident memory and returns that.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    rss().0
}

/// How much the peak rose above `baseline`.
fn peak_growth(baseline: u64) -> u64 {
    rss().1.saturating_sub(baseline)
}

/// An id nobody has: what each server advertises and the fetch wants.
fn wanted() -> ObjectId {
    testkit::hash_object(ObjectKind::Commit, b"the commit no pack holds")
}

fn server(ip: Ipv4Addr, pack: Vec<u8>) -> ScriptedGitServer {
    let refs = vec![(wanted(), "refs/heads/main".to_owned())];
    ScriptedGitServer::start(ip, Script::serving(refs, pack)).expect("scripted server")
}

/// One fetch of [`wanted`] from `server` with the fetcher, a deadline and the default limits.
fn fetch(server: &ScriptedGitServer, deadline: Duration) -> (FetchReport, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let request = FetchRequest::new("id", &repo, server.url("r.git"), vec![wanted()]);
    let control = FetchControl::new(Instant::now() + deadline, Arc::new(AtomicBool::new(false)))
        .with_url_policy(UrlPolicy::new().allow_private_addresses(true));
    let start = Instant::now();
    let report = GitFetcher::new().fetch(&request, &control);
    let took = start.elapsed();
    assert_no_pack_left(&repo);
    (report, took)
}

/// A fetch that brought nothing wanted leaves nothing in the repository.
fn assert_no_pack_left(repo: &Path) {
    let packs: Vec<_> = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(packs.is_empty(), "{packs:?}");
}

#[test]
fn crafted_packs_cost_bounded_memory_and_time() {
    testkit::require_git();
    // The first fetcher sets libgit2's process-wide limits: the defaults.
    let _ = GitFetcher::new();
    // A margin for what is not libgit2's: the test harness, buffers, thread stacks.
    let margin = 64 * MIB;

    // One delta expanding 64 KiB to 1 GiB: refused before anything is allocated.
    let s = server(Ipv4Addr::new(127, 0, 0, 61), bombs::one(1 << 30, 1));
    let base = reset_peak();
    let (report, took) = fetch(&s, Duration::from_secs(20));
    let grown = peak_growth(base);
    eprintln!("1 GiB delta: +{} MiB peak, {took:?}", grown / MIB);
    let error = report.error.expect("the bomb fails the fetch");
    assert_eq!(error.kind, FailureKind::SizeCap, "{error}");
    assert!(
        grown < margin,
        "1 GiB bomb: the peak grew by {} MiB",
        grown / MIB
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The chain: the first delta is already too large.
    s.set_script(Script::serving(
        vec![(wanted(), "refs/heads/main".to_owned())],
        bombs::chained(2),
    ));
    let base = reset_peak();
    let (report, took) = fetch(&s, Duration::from_secs(20));
    let grown = peak_growth(base);
    eprintln!("chained 2 x 1 GiB: +{} MiB peak, {took:?}", grown / MIB);
    assert_eq!(report.error.unwrap().kind, FailureKind::SizeCap);
    assert!(
        grown < margin,
        "chained bomb: the peak grew by {} MiB",
        grown / MIB
    );

    // Sixty deltas just under the object size limit, each a distinct object: about 20 s of
    // resolving with no byte read. The deadline stops it at the next delta.
    s.set_script(Script::serving(
        vec![(wanted(), "refs/heads/main".to_owned())],
        bombs::many(60, MAX_OBJECT_SIZE, true, 3),
    ));
    let base = reset_peak();
    let deadline = Duration::from_secs(3);
    let (report, took) = fetch(&s, deadline);
    let grown = peak_growth(base);
    eprintln!(
        "60 distinct 100 MiB deltas, 3 s deadline: +{} MiB peak ({} MiB counted), {took:?}",
        grown / MIB,
        report.memory_peak / MIB
    );
    let error = report.error.expect("the deadline ends the fetch");
    assert_eq!(error.kind, FailureKind::Deadline, "{error}");
    assert!(took < deadline + Duration::from_secs(2), "{took:?}");
    assert!(
        grown < 3 * MAX_OBJECT_SIZE + margin,
        "deltas of 100 MiB: the peak grew by {} MiB",
        grown / MIB
    );
    assert!(
        report.memory_peak <= MAX_FETCH_MEMORY,
        "{}",
        report.memory_peak
    );

    // Twenty deltas with the same result: libgit2 1.9 leaks each duplicate's object. The
    // budget stops the fetch, and the report says what libgit2 kept.
    s.set_script(Script::serving(
        vec![(wanted(), "refs/heads/main".to_owned())],
        bombs::many(20, MAX_OBJECT_SIZE, false, 3),
    ));
    let base = reset_peak();
    let (report, took) = fetch(&s, Duration::from_secs(60));
    let grown = peak_growth(base);
    eprintln!(
        "20 duplicate 100 MiB deltas: +{} MiB peak ({} MiB counted, {} MiB lost), {took:?}",
        grown / MIB,
        report.memory_peak / MIB,
        report.memory_leaked / MIB
    );
    let error = report.error.expect("the budget ends the fetch");
    assert_eq!(error.kind, FailureKind::MemoryCap, "{error}");
    assert!(
        grown < MAX_FETCH_MEMORY + margin,
        "duplicates: the peak grew by {} MiB",
        grown / MIB
    );
    assert!(
        report.memory_peak <= MAX_FETCH_MEMORY,
        "{}",
        report.memory_peak
    );
    assert!(
        report.memory_leaked >= MAX_OBJECT_SIZE,
        "libgit2 lost at least one object: {}",
        report.memory_leaked
    );
    drop(s);

    fetches_under_attack_stay_within_the_documented_bound(margin);
}

/// An engine with the default settings (32 workers, 512 MiB a fetch, 4 GiB for all) whose
/// twelve fetches all hit a pack that makes libgit2 hold and lose as much as it can: the
/// process stays within `max_total_fetch_memory` (4 GiB), what libgit2 lost is counted in
/// that total, and the endpoints of the servers that made it lose memory are skipped.
fn fetches_under_attack_stay_within_the_documented_bound(margin: u64) {
    let dir = tempfile::tempdir().unwrap();
    let pack = bombs::many(20, MAX_OBJECT_SIZE, false, 3);
    let servers: Vec<ScriptedGitServer> = (0..ATTACKERS as u8)
        .map(|i| server(Ipv4Addr::new(127, 0, 0, 62 + i), pack.clone()))
        .collect();
    let engine = purgatory_sync::Engine::builder()
        .allow_private_addresses(true)
        .thread_name("mem8")
        .build()
        .expect("engine");
    let outcomes = engine.outcomes();
    let base = reset_peak();
    for (i, s) in servers.iter().enumerate() {
        let repo = testkit::init_bare(&dir.path().join(format!("r{i}.git")));
        let event = PendingEvent::new(format!("e{i}"), format!("victim/{i}"), &repo)
            .oid(wanted().to_string())
            .clone_url(s.url("r.git"));
        engine.submit(event).expect("submit");
    }
    let stats = testkit::wait_for_stats(&engine, Duration::from_secs(120), |s| {
        s.fetches_started >= ATTACKERS && s.in_flight == 0
    });
    let grown = peak_growth(base);
    eprintln!(
        "{ATTACKERS} fetches at once, duplicates: +{} MiB peak, {} MiB lost",
        grown / MIB,
        stats.memory_leaked / MIB
    );
    assert!(
        grown <= MAX_TOTAL_FETCH_MEMORY + margin,
        "{ATTACKERS} fetches under attack: the peak grew by {} MiB",
        grown / MIB
    );
    assert!(
        grown > 8 * MAX_OBJECT_SIZE,
        "the attack did reach the bound: +{} MiB",
        grown / MIB
    );
    assert_eq!(
        stats.failures.get(&FailureKind::MemoryCap),
        Some(&ATTACKERS),
        "{:?}",
        stats.failures
    );
    assert!(
        stats.memory_leaked >= 8 * MAX_OBJECT_SIZE && stats.memory_leaked <= MAX_TOTAL_FETCH_MEMORY,
        "{}",
        stats.memory_leaked
    );
    let hostile: Vec<_> = stats
        .naughty
        .iter()
        .filter(|n| n.category == NaughtyCategory::Hostile)
        .collect();
    assert!(
        hostile.len() >= 8 && hostile.len() <= ATTACKERS as usize,
        "{:?}",
        stats.naughty
    );
    assert!(hostile.iter().all(|n| n.scheme.as_deref() == Some("git")));
    // No event was released, none expired yet.
    assert!(outcomes.try_recv().is_err());
    engine.shutdown().expect("clean shutdown");
}
