//! `purgatory-sync demo`: a scenario on loopback git servers, synced live.
//!
//! The scenario, built in a temporary directory:
//!
//! | address    | server                     | role                                              |
//! |------------|----------------------------|---------------------------------------------------|
//! | 127.0.0.2  | `git daemon`               | full mirror: every commit of the popular repos    |
//! | 127.0.0.3  | `git http-backend`         | partial mirror: only the older commits            |
//! | 127.0.0.4  | `git://` proxy that hangs  | accepts, never answers: cut off by the io timeout |
//! | 127.0.0.5  | nothing listening          | connection refused                                |
//! | 127.0.0.6  | `git daemon`, rate-limited | small host: the only source of some repos         |
//!
//! Events: one repository state per repository (two commits, `refs/heads/main`, a tag and
//! `HEAD`), pull requests (`refs/nostr/<id>`), events a user pushes to the relay itself
//! (released by `git_data_arrived`, without a fetch), and one event whose commit nobody has
//! (it expires when its lifetime ends). The run passes when every event ends as expected, the
//! refs are written, the hanging and refusing hosts show the expected failures and the small
//! host's rate limit held.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use purgatory_sync::{
    Admission, DomainLimits, Engine, ExpiryReason, FailureKind, ObjectId, Origin, Outcome,
    PendingEvent, RefUpdate, Stats,
};
use purgatory_sync_testkit::{
    self as testkit, FaultyTcpServer, GitDaemon, HttpGitServer, TcpFault,
};
use sha2::{Digest, Sha256};

use crate::progress::{self, Progress};

const FULL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PARTIAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const HANG: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const REFUSE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const SMALL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// The small host's limits: one fetch at a time, one start every 10 s.
const SMALL_PER_MINUTE: u32 = 6;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// Options of `purgatory-sync demo`; the defaults finish in well under a minute.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Repositories in the scenario (the third and the sixth live only on the rate-limited host)
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(6..=2000), env = "PURGATORY_SYNC_REPOS")]
    repos: u32,
    /// Pull requests per repository
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100), env = "PURGATORY_SYNC_PRS")]
    prs: u32,
    /// Event lifetime: how long the event whose commit nobody has waits before it expires
    #[arg(long, default_value = "20s", value_parser = duration, env = "PURGATORY_SYNC_LIFETIME")]
    lifetime: Duration,
    /// Fetch worker threads
    #[arg(long, default_value_t = 8, env = "PURGATORY_SYNC_WORKERS")]
    workers: usize,
    /// Plain lines on stderr instead of a progress bar
    #[arg(long, env = "PURGATORY_SYNC_NO_PROGRESS")]
    no_progress: bool,
    /// Keep the scenario's directory (repositories and servers' data) and print its path
    #[arg(long, env = "PURGATORY_SYNC_KEEP")]
    keep: bool,
}

/// What an event is, for the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    State,
    PullRequest,
    UserPush,
    Unfindable,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::PullRequest => "pull request",
            Kind::UserPush => "user push",
            Kind::Unfindable => "unfindable",
        }
    }
}

/// One event of the scenario and what should become of it.
struct Planned {
    event: PendingEvent,
    kind: Kind,
    /// Refs the relay's repository must hold once the event is released.
    refs: Vec<(String, ObjectId)>,
    /// For user pushes: the repository the user pushes from.
    push_from: Option<PathBuf>,
}

/// The servers, kept alive until the scenario ends.
struct Servers {
    full: GitDaemon,
    partial: HttpGitServer,
    hang: FaultyTcpServer,
    refuse_port: u16,
    small: GitDaemon,
}

impl Servers {
    fn start(root: &Path) -> std::io::Result<Servers> {
        let full = GitDaemon::start(FULL, &root.join("full"))?;
        let partial = HttpGitServer::start(PARTIAL, &root.join("partial"))?;
        let hang = FaultyTcpServer::start(HANG, full.addr(), TcpFault::Hang)?;
        // A port that was free a moment ago: nothing listens there, so connections are refused.
        let refuse_port = TcpListener::bind((REFUSE, 0))?.local_addr()?.port();
        let small = GitDaemon::start(SMALL, &root.join("small"))?;
        Ok(Servers {
            full,
            partial,
            hang,
            refuse_port,
            small,
        })
    }

    fn role(&self, domain: &str) -> &'static str {
        match domain.parse::<Ipv4Addr>() {
            Ok(FULL) => "full mirror",
            Ok(PARTIAL) => "partial mirror",
            Ok(HANG) => "hangs",
            Ok(REFUSE) => "refuses",
            Ok(SMALL) => "small host, rate-limited",
            _ => "",
        }
    }

    fn refuse_url(&self, name: &str) -> String {
        format!("git://{REFUSE}:{}/{name}", self.refuse_port)
    }
}

/// A 64-hex event id, like a Nostr event's.
fn event_id(seed: &str) -> String {
    Sha256::digest(seed.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const USERS: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

/// Builds the repositories and the events.
fn build_scenario(root: &Path, servers: &Servers, args: &DemoArgs) -> Vec<Planned> {
    let mut plan = Vec::new();
    for i in 0..args.repos as usize {
        let name = format!("{}/project{i}.git", USERS[i % USERS.len()]);
        let identifier = name.trim_end_matches(".git").to_owned();
        let relay_repo = testkit::init_bare(&root.join("relay").join(&name));
        // Two repositories live only on the small host, however large the scenario.
        let only_small = i == 2 || i == 5;
        // Where the data lives, and the URLs the events name (tried in this order).
        let (sources, urls): (Vec<PathBuf>, Vec<String>) = if only_small {
            let small = testkit::served_repo(&root.join("small"), &name);
            (vec![small], vec![servers.small.url(&name)])
        } else {
            let full = testkit::served_repo(&root.join("full"), &name);
            let partial = testkit::served_repo(&root.join("partial"), &name);
            let first = match i % 3 {
                0 => servers.hang.url(&name),
                _ => servers.refuse_url(&name),
            };
            (
                vec![full, partial],
                vec![first, servers.partial.url(&name), servers.full.url(&name)],
            )
        };
        // The first commit is on every source; the second only on the first source.
        let mut first = None;
        for repo in &sources {
            first = Some(testkit::commit(
                repo,
                "main",
                &[("README.md", format!("# {identifier}\n").as_bytes())],
                "initial commit",
            ));
        }
        let first = first.expect("at least one source");
        let second = testkit::commit(
            &sources[0],
            "main",
            &[("src/lib.rs", format!("// {identifier}\n").as_bytes())],
            "add the library",
        );
        let state_id = event_id(&format!("state {identifier}"));
        plan.push(Planned {
            event: PendingEvent {
                id: state_id,
                identifier: identifier.clone(),
                repo: relay_repo.clone(),
                oids: vec![second.to_string(), first.to_string()],
                clone_urls: urls.clone(),
                origin: Origin::Sync,
                ref_updates: vec![
                    RefUpdate::oid("refs/heads/main", second.to_string()),
                    RefUpdate::oid("refs/tags/v0.1", first.to_string()),
                    RefUpdate::symbolic("HEAD", "refs/heads/main"),
                ],
                // The relay repository also gets users' pushes, which a complete set
                // written later would delete.
                replace_refs: false,
                created_at: None,
            },
            kind: Kind::State,
            refs: vec![
                ("refs/heads/main".into(), second),
                ("refs/tags/v0.1".into(), first),
            ],
            push_from: None,
        });
        for j in 0..args.prs {
            let tip = testkit::commit(
                &sources[0],
                &format!("pr/{j}"),
                &[(&format!("feature{j}.txt"), b"a feature\n" as &[u8])],
                &format!("feature {j}"),
            );
            let id = event_id(&format!("pr {identifier} {j}"));
            let nostr_ref = format!("refs/nostr/{id}");
            plan.push(Planned {
                event: PendingEvent {
                    id,
                    identifier: identifier.clone(),
                    repo: relay_repo.clone(),
                    oids: vec![tip.to_string()],
                    clone_urls: urls.clone(),
                    origin: Origin::Sync,
                    ref_updates: vec![RefUpdate::oid(&nostr_ref, tip.to_string())],
                    replace_refs: false,
                    created_at: None,
                },
                kind: Kind::PullRequest,
                refs: vec![(nostr_ref, tip)],
                push_from: None,
            });
        }
        if i % 3 == 1 {
            // A user publishes an event to this relay, then pushes the data to it.
            let workdir = testkit::init_bare(&root.join("users").join(&name));
            let pushed = testkit::commit(
                &workdir,
                "user",
                &[("NOTES.md", b"pushed by the user\n" as &[u8])],
                "user's work",
            );
            plan.push(Planned {
                event: PendingEvent {
                    id: event_id(&format!("push {identifier}")),
                    identifier: identifier.clone(),
                    repo: relay_repo.clone(),
                    oids: vec![pushed.to_string()],
                    clone_urls: vec![servers.full.url(&name)],
                    origin: Origin::User,
                    ref_updates: vec![],
                    replace_refs: false,
                    created_at: None,
                },
                kind: Kind::UserPush,
                refs: vec![],
                push_from: Some(workdir),
            });
        }
        if i == 0 {
            // A commit nobody has.
            let ghost = event_id("ghost")[..40].to_owned();
            plan.push(Planned {
                event: PendingEvent {
                    id: event_id(&format!("ghost {identifier}")),
                    identifier: identifier.clone(),
                    repo: relay_repo,
                    oids: vec![ghost],
                    clone_urls: vec![servers.partial.url(&name), servers.full.url(&name)],
                    origin: Origin::Sync,
                    ref_updates: vec![],
                    replace_refs: false,
                    created_at: None,
                },
                kind: Kind::Unfindable,
                refs: vec![],
                push_from: None,
            });
        }
    }
    plan
}

/// Runs the demo; exit status 0 when the scenario behaved as expected.
pub fn main(args: DemoArgs) -> ExitCode {
    match demo(&args) {
        Ok(problems) if problems.is_empty() => {
            println!("\nThe scenario behaved as expected.");
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            println!("\nThe scenario did not behave as expected:");
            for p in problems {
                println!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("purgatory-sync demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(args: &DemoArgs) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    if !testkit::git_available() {
        return Err("the demo starts `git daemon` and `git http-backend`: install git".into());
    }
    // The engine is the process's first libgit2 user: build it before the servers' threads.
    let io_timeout = Duration::from_secs(2);
    let engine = Engine::builder()
        .allow_private_addresses(true) // the servers listen on 127.0.0.x
        .workers(args.workers)
        .thread_name("demo")
        .tick(Duration::from_millis(100))
        .sync_delay(Duration::from_millis(300))
        .user_delay(Duration::from_secs(60)) // the user's push comes first
        .backoff_base(Duration::from_secs(1))
        .backoff_cap(Duration::from_secs(4))
        .event_lifetime(args.lifetime)
        .connect_timeout(Duration::from_secs(2))
        .io_timeout(io_timeout)
        .fetch_deadline(Duration::from_secs(10))
        // The mirrors are big hosts: 5 fetches at once, 10 starts a second. The small host
        // keeps to its own, much lower limit.
        .domain_limits(5, 600)
        .domain_override(
            &SMALL.to_string(),
            DomainLimits::new(1, SMALL_PER_MINUTE).burst(1),
        )
        .build()?;
    let outcomes = engine.outcomes();

    let dir = tempfile::Builder::new()
        .prefix("purgatory-demo-")
        .tempdir()?;
    let root = dir.path();
    let servers = Servers::start(root)?;
    println!("Scenario in {}:", root.display());
    for (ip, what) in [
        (FULL, format!("git daemon, {}", servers.full.url(""))),
        (
            PARTIAL,
            format!("git http-backend, {}", servers.partial.url("")),
        ),
        (
            HANG,
            format!("hanging git:// proxy, {}", servers.hang.url("")),
        ),
        (
            REFUSE,
            format!("nothing listening, port {}", servers.refuse_port),
        ),
        (
            SMALL,
            format!(
                "git daemon, {} (1 fetch at a time, {SMALL_PER_MINUTE} a minute)",
                servers.small.url("")
            ),
        ),
    ] {
        println!("  {ip:<10} {:<26} {what}", servers.role(&ip.to_string()));
    }
    let plan = build_scenario(root, &servers, args);
    let counts = |k: Kind| plan.iter().filter(|p| p.kind == k).count();
    println!(
        "{} events: {} repository states, {} pull requests, {} user pushes, {} unfindable",
        plan.len(),
        counts(Kind::State),
        counts(Kind::PullRequest),
        counts(Kind::UserPush),
        counts(Kind::Unfindable)
    );

    let label = |domain: &str| -> String {
        match servers.role(domain) {
            "" => domain.to_owned(),
            role => format!("{domain} ({role})"),
        }
    };
    let progress = Progress::new(plan.len() as u64, !args.no_progress);
    // The events' lines go to stderr, after a blank line; stdout's next blank line comes
    // before the tables, so a captured stdout has one, not two.
    progress.line("");
    let started = Instant::now();
    let mut results: HashMap<String, Outcome> = HashMap::new();
    for p in &plan {
        match engine.submit(p.event.clone())? {
            Admission::Pending { .. } => {}
            other => return Err(format!("event {} was not queued: {other:?}", p.event.id).into()),
        }
    }

    // The users push 2 s in.
    let push_at = started + Duration::from_secs(2);
    let mut pushed = false;
    let by_id: HashMap<&str, &Planned> = plan.iter().map(|p| (p.event.id.as_str(), p)).collect();
    let deadline = started + args.lifetime + Duration::from_secs(60);
    while results.len() < plan.len() && Instant::now() < deadline {
        if !pushed && Instant::now() >= push_at {
            pushed = true;
            for p in plan.iter().filter(|p| p.push_from.is_some()) {
                testkit::push_all(p.push_from.as_ref().expect("filtered"), &p.event.repo);
                progress.line(format!("push      {:<28} {}", short(p), p.event.identifier));
                engine.git_data_arrived(&p.event.identifier);
            }
        }
        if let Ok(outcome) = outcomes.recv_timeout(Duration::from_millis(100)) {
            let p = by_id[outcome.event_id()];
            progress.line(progress::outcome_line(&outcome, &short(p)));
            results.insert(outcome.event_id().to_owned(), outcome);
        }
        progress.update(&engine.stats(), results.len() as u64, &label);
    }
    progress.finish();
    let elapsed = started.elapsed();
    let stats = engine.stats();
    engine.shutdown()?;

    println!("\nPer domain:\n{}", progress::domain_table(&stats, &label));
    println!("Per event:\n{}", event_table(&plan, &results));
    println!(
        "{} released, {} expired in {} (engine: {} fetches: {} ok, {} partial, {} failed{}).",
        stats.released,
        stats.expired,
        progress::seconds(elapsed),
        stats.fetches_started,
        stats.fetches_succeeded,
        stats.fetches_partial,
        stats.fetches_failed,
        match stats.in_flight {
            0 => String::new(),
            n => format!(", {n} still running at the end"),
        }
    );
    let problems = check(&plan, &results, &stats, elapsed, io_timeout);
    if args.keep {
        let kept = dir.keep();
        println!("Kept the scenario in {}", kept.display());
    }
    drop(servers);
    Ok(problems)
}

fn short(p: &Planned) -> String {
    format!("{} {}…", p.kind.name(), progress::id_prefix(&p.event.id, 8))
}

fn event_table(plan: &[Planned], results: &HashMap<String, Outcome>) -> String {
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|p| {
            let (outcome, time) = match results.get(&p.event.id) {
                Some(Outcome::Released { waited, .. }) => {
                    ("released".to_owned(), progress::seconds(*waited))
                }
                Some(Outcome::Expired { reason, .. }) => (
                    format!("expired: {}", progress::reason_text(reason)),
                    "-".into(),
                ),
                Some(other) => (format!("{other:?}"), "-".into()),
                None => ("no outcome".to_owned(), "-".into()),
            };
            vec![
                format!("{}…", progress::id_prefix(&p.event.id, 12)),
                p.kind.name().to_owned(),
                p.event.identifier.clone(),
                outcome,
                time,
            ]
        })
        .collect();
    progress::table(
        &["event", "kind", "repository", "outcome", "time to release"],
        &rows,
    )
}

/// Everything that did not go as the scenario expects.
fn check(
    plan: &[Planned],
    results: &HashMap<String, Outcome>,
    stats: &Stats,
    elapsed: Duration,
    io_timeout: Duration,
) -> Vec<String> {
    let mut problems = Vec::new();
    for p in plan {
        let who = format!(
            "{} {} ({})",
            p.kind.name(),
            progress::id_prefix(&p.event.id, 12),
            p.event.identifier
        );
        match (p.kind, results.get(&p.event.id)) {
            (_, None) => problems.push(format!("{who}: no outcome")),
            (Kind::Unfindable, Some(Outcome::Expired { reason, .. })) => {
                if *reason != ExpiryReason::LifetimeEnded {
                    problems.push(format!("{who}: expired for {reason:?}, not its lifetime"));
                }
            }
            (Kind::Unfindable, Some(_)) => problems.push(format!("{who}: released")),
            (_, Some(Outcome::Released { .. })) => {
                for (name, want) in &p.refs {
                    match ref_target(&p.event.repo, name) {
                        Some(got) if got == *want => {}
                        got => problems.push(format!("{who}: {name} is {got:?}, not {want}")),
                    }
                }
            }
            (_, Some(Outcome::Expired { reason, .. })) => problems.push(format!(
                "{who}: expired ({}), expected released",
                progress::reason_text(reason)
            )),
            (_, Some(other)) => problems.push(format!("{who}: {other:?}")),
        }
    }
    let failed = |ip: Ipv4Addr| -> BTreeMap<FailureKind, u64> {
        stats
            .domains
            .get(&ip.to_string())
            .map(|d| d.failed.clone())
            .unwrap_or_default()
    };
    let hang = failed(HANG);
    if !hang.contains_key(&FailureKind::Timeout) && !hang.contains_key(&FailureKind::Deadline) {
        problems.push(format!(
            "the hanging host was not cut off by a timeout ({io_timeout:?}) or the deadline: {hang:?}"
        ));
    }
    if !failed(REFUSE).contains_key(&FailureKind::ConnectionRefused) {
        problems.push(format!(
            "the refusing host shows no refused connection: {:?}",
            failed(REFUSE)
        ));
    }
    // The small host's quota: one start at once, then one per 60/SMALL_PER_MINUTE seconds.
    if let Some(small) = stats.domains.get(&SMALL.to_string()) {
        let period = 60.0 / f64::from(SMALL_PER_MINUTE);
        let allowed = 1 + (elapsed.as_secs_f64() / period).floor() as u64;
        if small.requests > allowed {
            problems.push(format!(
                "the small host got {} requests in {}; its quota allows {allowed}",
                small.requests,
                progress::seconds(elapsed)
            ));
        }
    } else {
        problems.push("the small host was never fetched from".to_owned());
    }
    problems
}

fn ref_target(repo: &Path, name: &str) -> Option<ObjectId> {
    let repo = git2::Repository::open_bare(repo).ok()?;
    let oid = repo.refname_to_id(name).ok()?;
    oid.to_string().parse().ok()
}
