//! What one hostile server can cost the engine: each of these answers is something a stranger
//! can arrange by publishing one event with a clone URL on a server of theirs, and each must
//! cost one bounded attempt — in time, in bytes and memory, in what it leaves in the repository
//! — and nothing more.
//!
//! The servers are real ones on loopback: `git daemon`, `git http-backend` behind the test kit's
//! HTTP server, and the test kit's scripted `git://` server for answers no real server gives.
//! Each test drives the built-in [`GitFetcher`] directly, as a worker does.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use purgatory_sync::{
    FailureKind, FetchControl, FetchReport, FetchRequest, Fetcher, GitFetcher, ObjectId, UrlPolicy,
};
use purgatory_sync_testkit::{
    self as testkit, Advertisement, Fault, FaultTarget, GitDaemon, HttpGitServer, ObjectKind,
    PackBuilder, Script, ScriptedGitServer,
};

const MIB: u64 = 1 << 20;
/// Slack over a deadline for the attempt to wind down.
const SLACK: Duration = Duration::from_secs(2);

fn control(deadline: Duration) -> FetchControl {
    FetchControl::new(Instant::now() + deadline, Arc::new(AtomicBool::new(false)))
        .with_url_policy(UrlPolicy::new().allow_private_addresses(true))
}

fn fetch(repo: &Path, url: &str, wanted: Vec<ObjectId>, control: &FetchControl) -> FetchReport {
    let request = FetchRequest::new("id", repo, url, wanted);
    GitFetcher::new().fetch(&request, control)
}

/// An id no server here has.
fn nowhere(seed: &str) -> ObjectId {
    testkit::hash_object(ObjectKind::Commit, seed.as_bytes())
}

/// Every file under `dir` whose name ends in `.lock` or is one of libgit2's temporary packs,
/// every quarantine directory, and every ref under `refs/purgatory-sync/`.
fn leftovers(repo: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![repo.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("incoming-psync-") {
                found.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".lock") || name.starts_with("pack_git2_") {
                found.push(p);
            }
        }
    }
    found.extend(
        testkit::refs_with_prefix(repo, "refs/purgatory-sync/")
            .into_iter()
            .map(PathBuf::from),
    );
    found
}

/// Bytes of every file under the repository's object store.
fn object_store_bytes(repo: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![repo.join("objects")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// A server advertising 90 000 branches and refusing wants by id makes the fallback fetch
/// branches: it must write no ref (it used to write a scratch ref per branch and delete them
/// one by one), end within its deadline, and leave nothing behind.
#[test]
fn a_flood_of_branches_costs_one_bounded_attempt_and_writes_no_ref() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    // Every branch points at a blob the pack holds, so that a client that writes the
    // branches' refs can write them all.
    let mut pack = PackBuilder::new();
    let blob = pack.blob(b"the tip of every branch");
    let tip = pack.object_id(blob).unwrap();
    let script = Script {
        advertisement: Advertisement::Flood {
            refs: Vec::new(),
            oid: tip,
            // The scripted server reads at most 100 000 negotiation lines: one want per branch.
            count: 90_000,
        },
        answer: testkit::Answer::Pack(pack.build().into()),
        ..Script::default()
    }
    .without_capabilities(&["allow-tip-sha1-in-want", "allow-reachable-sha1-in-want"]);
    let server = ScriptedGitServer::start(Ipv4Addr::new(127, 0, 0, 41), script).unwrap();
    // The advertisement twice (the visit, then the fallback's own connection) and 90 000
    // wants take about 3 s here, more beside other tests on 2 cores; before, 21 s.
    let deadline = Duration::from_secs(8);
    let start = Instant::now();
    let report = fetch(
        &repo,
        &server.url("r.git"),
        vec![nowhere("wanted")],
        &control(deadline),
    );
    let took = start.elapsed();
    assert!(took < deadline + SLACK, "{took:?}");
    assert!(report.error.is_some(), "{report:?}");
    assert_eq!(leftovers(&repo), Vec::<PathBuf>::new());
    // The fallback asked for the branches: the flood was read, not skipped.
    let asked = server.wants();
    assert!(
        asked.contains(&tip),
        "{} wants, {report:?}, {:?}",
        asked.len(),
        server.requests()
    );
}

/// A million refs (about 65 MB of advertisement) are cut off at the advertisement limit, with
/// little memory, and the failure says why.
#[test]
fn an_advertisement_past_its_limit_is_cut_off() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let script = Script {
        advertisement: Advertisement::Flood {
            refs: Vec::new(),
            oid: nowhere("flood tip"),
            count: 1_000_000,
        },
        ..Script::default()
    };
    let server = ScriptedGitServer::start(Ipv4Addr::new(127, 0, 0, 42), script).unwrap();
    let control = control(Duration::from_secs(30)).with_max_advertisement(4 * MIB);
    let report = fetch(&repo, &server.url("r.git"), vec![nowhere("w")], &control);
    let error = report.error.expect("cut off");
    assert_eq!(error.kind, FailureKind::SizeCap, "{error}");
    assert!(error.message.contains("advertisement"), "{error}");
    assert!(report.bytes_received < 5 * MIB, "{}", report.bytes_received);
    assert!(
        report.memory_peak < 32 * MIB,
        "libgit2 held {} MiB",
        report.memory_peak / MIB
    );
}

/// A 512 MiB HTTP header line is cut off after 8 KiB: libgit2 never holds it.
#[test]
fn a_huge_http_header_line_is_cut_off() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let served = testkit::served_repo(&base, "r.git");
    let tip = testkit::commit(&served, "main", &[("f", b"x")], "one");
    let http = HttpGitServer::start(Ipv4Addr::new(127, 0, 0, 43), &base).unwrap();
    http.set_fault_on(FaultTarget::All, Fault::HugeHeader { bytes: 512 << 20 });
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let start = Instant::now();
    let report = fetch(
        &repo,
        &http.url("r.git"),
        vec![tip],
        &control(Duration::from_secs(30)),
    );
    let error = report.error.expect("cut off");
    assert_eq!(error.kind, FailureKind::SizeCap, "{error}");
    assert!(error.message.contains("header line"), "{error}");
    assert!(report.bytes_received < MIB, "{}", report.bytes_received);
    assert!(report.memory_peak < 8 * MIB, "{}", report.memory_peak);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// A server that answers with 4 MiB of objects nobody asked for, three times: the repository
/// does not grow (they used to add 4, 8, 12 MiB).
#[test]
fn objects_nobody_asked_for_are_not_kept() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let wanted = nowhere("wanted");
    let mut pack = PackBuilder::new();
    for i in 0..4 {
        pack.blob(&testkit::pseudo_random_bytes(1 << 20, 100 + i));
    }
    let script = Script::serving(vec![(wanted, "refs/heads/main".to_owned())], pack.build());
    let server = ScriptedGitServer::start(Ipv4Addr::new(127, 0, 0, 44), script).unwrap();
    let before = object_store_bytes(&repo);
    for attempt in 0..3 {
        let report = fetch(
            &repo,
            &server.url("r.git"),
            vec![wanted],
            &control(Duration::from_secs(20)),
        );
        assert!(
            report.bytes_received > 4 * MIB,
            "attempt {attempt}: {report:?}"
        );
        assert_eq!(report.missing, [wanted]);
        assert_eq!(
            object_store_bytes(&repo),
            before,
            "attempt {attempt} left objects behind"
        );
    }
    assert_eq!(leftovers(&repo), Vec::<PathBuf>::new());
}

/// What arrived with a wanted object stays: a pack is kept whole when it brought one.
#[test]
fn a_pack_with_a_wanted_object_is_kept() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let served = testkit::served_repo(&base, "r.git");
    let tip = testkit::commit(&served, "main", &[("f", b"kept")], "one");
    let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 45), &base).unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let report = fetch(
        &repo,
        &daemon.url("r.git"),
        vec![tip, nowhere("lacking")],
        &control(Duration::from_secs(20)),
    );
    assert_eq!(report.present, [tip]);
    assert!(testkit::has_object(&repo, tip));
    // The pin is the only ref left, and no quarantine or lock file.
    assert_eq!(
        leftovers(&repo),
        vec![PathBuf::from(format!("refs/purgatory-sync/{tip}"))]
    );
}

/// Two hundred thousand wanted ids end at the deadline (they held a worker 35 s against 5).
#[test]
fn two_hundred_thousand_wanted_ids_end_at_the_deadline() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let served = testkit::served_repo(&base, "r.git");
    let tip = testkit::commit(&served, "main", &[("f", b"y")], "one");
    let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 46), &base).unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let mut wanted: Vec<ObjectId> = (0..200_000)
        .map(|i| nowhere(&format!("id {i}")))
        .chain([tip])
        .collect();
    wanted.sort_unstable();
    let deadline = Duration::from_secs(5);
    let start = Instant::now();
    let report = fetch(&repo, &daemon.url("r.git"), wanted, &control(deadline));
    let took = start.elapsed();
    assert!(took < deadline + SLACK, "{took:?}");
    assert_eq!(report.present.len() + report.missing.len(), 200_001);
}

/// A redirect to another port of the same host is not followed (libgit2 follows those even
/// with redirects off): the connection to the other port is refused before it is made.
#[test]
fn a_redirect_to_another_port_of_the_same_host_is_not_followed() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let served = testkit::served_repo(&base, "r.git");
    let tip = testkit::commit(&served, "main", &[("f", b"z")], "one");
    let ip = Ipv4Addr::new(127, 0, 0, 47);
    let target = HttpGitServer::start(ip, &base).unwrap();
    let redirecting = HttpGitServer::start(ip, &base).unwrap();
    redirecting.set_fault(Fault::RedirectTo(format!("http://{}", target.addr())));
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let report = fetch(
        &repo,
        &redirecting.url("r.git"),
        vec![tip],
        &control(Duration::from_secs(20)),
    );
    let error = report.error.expect("not followed");
    assert!(!testkit::has_object(&repo, tip));
    assert!(target.requests().is_empty(), "{:?}", target.requests());
    assert!(!redirecting.requests().is_empty());
    assert_ne!(error.kind, FailureKind::Cancelled, "{error}");
}

/// A server's `ERR` text with terminal escapes and line breaks reaches neither the error
/// message nor, through it, logs and stats as such.
#[test]
fn server_error_text_is_stripped_of_control_characters() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    let text = b"\x1b[2J\x1b[31mrepository gone\r\nfake: log line\x07\x00\xe2\x80\xaebidi".to_vec();
    let script = Script {
        advertisement: Advertisement::Err(text),
        ..Script::default()
    };
    let server = ScriptedGitServer::start(Ipv4Addr::new(127, 0, 0, 48), script).unwrap();
    let report = fetch(
        &repo,
        &server.url("r.git"),
        vec![nowhere("w")],
        &control(Duration::from_secs(20)),
    );
    let error = report.error.expect("refused");
    assert!(error.message.contains("repository gone"), "{error}");
    assert!(
        !error
            .message
            .chars()
            .any(|c| c.is_control() || ('\u{202A}'..='\u{202E}').contains(&c)),
        "{:?}",
        error.message
    );
}

/// What a process that died mid-fetch left in a repository — a fetch quarantine, and the
/// scratch refs versions before 0.2 wrote — is removed by the next fetch into it; what a
/// running process (this one) has there is left alone.
#[test]
fn leftovers_of_dead_processes_are_removed_by_the_next_fetch() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let served = testkit::served_repo(&base, "r.git");
    let tip = testkit::commit(&served, "main", &[("f", b"w")], "one");
    let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 49), &base).unwrap();
    let repo = testkit::init_bare(&dir.path().join("r.git"));
    // No process has this id on Linux (pid_max is at most 2^22).
    let dead = u32::MAX - 7;
    let ours = std::process::id();
    let git = git2::Repository::open_bare(&repo).unwrap();
    let blob = git.blob(b"kept by a scratch ref").unwrap();
    for (pid, n) in [(dead, 0), (dead, 1), (ours, 0)] {
        for branch in ["main", "dev"] {
            let name = format!("refs/purgatory-sync/scratch/{pid}-{n}/heads/{branch}");
            git.reference(&name, blob, true, "left behind").unwrap();
        }
    }
    let quarantine = repo.join(format!("objects/incoming-psync-{dead}-3/pack"));
    std::fs::create_dir_all(&quarantine).unwrap();
    std::fs::write(quarantine.join("pack-x.pack"), b"half a pack").unwrap();
    let report = fetch(
        &repo,
        &daemon.url("r.git"),
        vec![tip],
        &control(Duration::from_secs(20)),
    );
    assert_eq!(report.present, [tip]);
    let mut left = testkit::refs_with_prefix(&repo, "refs/purgatory-sync/scratch/");
    left.sort();
    assert_eq!(
        left,
        [
            format!("refs/purgatory-sync/scratch/{ours}-0/heads/dev"),
            format!("refs/purgatory-sync/scratch/{ours}-0/heads/main"),
        ]
    );
    assert!(!repo
        .join(format!("objects/incoming-psync-{dead}-3"))
        .exists());
}
