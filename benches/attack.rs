//! The engine's memory under attack, with the default settings: 32 workers, 512 MiB a fetch,
//! 4 GiB for all fetches together, objects built from deltas up to 100 MiB.
//!
//! Eight scripted `git://` servers on eight loopback addresses (eight domains) each send a pack
//! crafted to expand when libgit2 resolves its deltas, and eight identifiers each wait for an
//! object on one of them, so eight workers fetch a bomb at once. For each kind of pack a
//! new engine is built; the figure is the process's peak resident memory above what it held
//! before the submits (`VmHWM`, reset through `/proc/self/clear_refs`), beside the documented
//! bound of the fetches' memory, `max_total_fetch_memory` = 4 GiB (eight budgets of 512 MiB
//! add up to it; `tests/memory.rs` runs twelve at once, whose budgets do not).
//!
//! - `1 GiB delta`: a 64 KiB blob and one delta repeating it 1 GiB long (80 KB on the wire);
//! - `2 x 1 GiB chain`: a second delta repeating that result 1 GiB long again (131 KB);
//! - `24 distinct 100 MiB deltas`: deltas just under the object size limit, each its own
//!   object: work without end but for the deadline, each delta held once;
//! - `20 duplicate 100 MiB deltas`: the same object twenty times, which libgit2 1.9 leaks once
//!   per duplicate: each fetch runs into its 512 MiB budget and what libgit2 lost stays lost
//!   (last, since it spends the engine's budget).
//!
//! Run with `cargo bench --bench attack` (about a minute). Without `--bench` it runs only the
//! first kind, with two servers.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use purgatory_sync::{Engine, PendingEvent, Stats};
use purgatory_sync_testkit::{self as testkit, bombs, ObjectKind, Script, ScriptedGitServer};

const MIB: u64 = 1 << 20;
const WORKERS: u64 = 8;
const MAX_FETCH_MEMORY: u64 = 512 * MIB;
const MAX_OBJECT_SIZE: u64 = 100 * MIB;

fn status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .expect("the field");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("kB");
    kb * 1024
}

struct Row {
    name: &'static str,
    wall: Duration,
    peak: u64,
    stats: Stats,
}

fn attack(name: &'static str, pack: Vec<u8>, servers: u8) -> Row {
    let wanted = testkit::hash_object(ObjectKind::Commit, b"nobody has this commit");
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<ScriptedGitServer> = (0..servers)
        .map(|i| {
            let script = Script::serving(vec![(wanted, "refs/heads/main".into())], pack.clone());
            ScriptedGitServer::start(Ipv4Addr::new(127, 0, 0, 150 + i), script).unwrap()
        })
        .collect();
    let engine = Engine::builder()
        .allow_private_addresses(true)
        .thread_name("attack")
        .build()
        .unwrap();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak");
    let before = status("VmRSS:");
    let start = Instant::now();
    for (i, s) in servers.iter().enumerate() {
        let repo = testkit::init_bare(&dir.path().join(format!("r{i}.git")));
        let event = PendingEvent::new(format!("e{i}"), format!("victim/{i}"), &repo)
            .oid(wanted.to_string())
            .clone_url(s.url("r.git"));
        engine.submit(event).unwrap();
    }
    let n = servers.len() as u64;
    let stats = testkit::wait_for_stats(&engine, Duration::from_secs(600), |s| {
        s.fetches_started >= n && s.in_flight == 0
    });
    let wall = start.elapsed();
    let peak = status("VmHWM:").saturating_sub(before);
    engine.shutdown().unwrap();
    Row {
        name,
        wall,
        peak,
        stats,
    }
}

fn main() {
    testkit::require_git();
    let full = std::env::args().any(|a| a == "--bench");
    let servers = if full { WORKERS as u8 } else { 2 };
    let mut rows = vec![attack("1 GiB delta", bombs::one(1 << 30, 1), servers)];
    if full {
        rows.push(attack("2 x 1 GiB chain", bombs::chained(2), servers));
        rows.push(attack(
            "24 distinct 100 MiB deltas",
            bombs::many(24, MAX_OBJECT_SIZE, true, 3),
            servers,
        ));
        rows.push(attack(
            "20 duplicate 100 MiB deltas",
            bombs::many(20, MAX_OBJECT_SIZE, false, 3),
            servers,
        ));
    }
    let bound = u64::from(servers) * MAX_FETCH_MEMORY;
    println!(
        "{servers} fetches at once, default settings; bound {} MiB; load {}",
        bound / MIB,
        common::loadavg()
    );
    println!(
        "{:<28} {:>10} {:>12} {:>8} {:>12}  failures",
        "pack", "wall", "peak RSS +", "÷ bound", "lost by git2"
    );
    for r in rows {
        let failures: Vec<String> = r
            .stats
            .failures
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        println!(
            "{:<28} {:>9.1}s {:>8} MiB {:>8.3} {:>8} MiB  {}",
            r.name,
            r.wall.as_secs_f64(),
            r.peak / MIB,
            r.peak as f64 / bound as f64,
            r.stats.memory_leaked / MIB,
            failures.join(", ")
        );
    }
}
