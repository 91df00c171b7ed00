//! The state file under abuse: a process killed with SIGKILL at random instants while it
//! checkpoints in a loop always leaves a complete file, and a file the engine cannot use is
//! refused (left as it is) or moved aside on request, never silently overwritten.
//!
//! The crash test re-executes this test binary to run [`crash_child`], an ignored test that does
//! nothing unless the parent sets its environment variables.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use purgatory_sync::{
    check_state_file, BuildError, Engine, EngineBuilder, FailureKind, FakeClock, FetchControl,
    FetchError, FetchReport, FetchRequest, Fetcher, ObjectId, Origin, PendingEvent, RefUpdate,
    StateFileError,
};
use purgatory_sync_testkit::init_bare;

/// Tells [`crash_child`] where the state file is; without it the child does nothing.
const CHILD_STATE_ENV: &str = "PSYNC_CRASH_CHILD_STATE";
/// Where [`crash_child`] finds its bare repositories.
const CHILD_REPOS_ENV: &str = "PSYNC_CRASH_CHILD_REPOS";
/// Seeds the crash test's PRNG, to replay a run (the seed is printed on failure).
const SEED_ENV: &str = "PSYNC_CRASH_SEED";
/// The line [`crash_child`] prints once the state file holds every event and it has written
/// the file itself at least once.
const READY: &str = "PSYNC-CRASH-CHILD-READY";

/// Events the child keeps waiting.
const EVENTS: usize = 1000;
const REPOS: usize = 3;
const IDENTIFIERS: usize = 40;
/// Kills at a random instant after the child's first checkpoint.
const KILLS_WHILE_CHECKPOINTING: usize = 100;
/// Extra kills at a random instant during start-up (restore, submits, first checkpoints).
const KILLS_DURING_START: usize = 12;
/// Longest the child waits for anything, and longest it lives.
const CHILD_PATIENCE: Duration = Duration::from_secs(30);
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

/// Finds nothing, and answers `present` without touching the disk.
struct FindsNothing;

impl Fetcher for FindsNothing {
    fn fetch(&self, _: &FetchRequest, _: &FetchControl) -> FetchReport {
        FetchReport::failed(FetchError::new(FailureKind::NotFound, "nothing here"))
    }

    fn present(&self, _: &Path, _: &[ObjectId]) -> Result<Vec<ObjectId>, FetchError> {
        Ok(Vec::new())
    }
}

/// The `i`-th event of the crash test: two absent objects, one clone URL per identifier, a ref
/// update on every third event.
fn crash_event(i: usize, repos: &Path) -> PendingEvent {
    let ident = i % IDENTIFIERS;
    let a = format!("{:040x}", 2 * i + 1);
    let mut ev = PendingEvent::new(
        format!("crash-event-{i:05}"),
        format!("crash/ident-{ident}"),
        repos.join(format!("r{}.git", i % REPOS)),
    )
    .oid(&a)
    .oid(format!("{:040x}", 2 * i + 2))
    .clone_url(format!("http://127.0.0.2:9/ident-{ident}.git"))
    .origin(if i % 2 == 0 {
        Origin::User
    } else {
        Origin::Sync
    });
    if i % 3 == 0 {
        ev = ev.ref_update(RefUpdate::oid(format!("refs/nostr/crash-{i}"), a));
    }
    ev
}

/// Engines of the crash test: nothing is fetched for an hour.
fn crash_builder(state: &Path) -> EngineBuilder {
    Engine::builder()
        .thread_name("crash")
        .state_file(state)
        .checkpoint_interval(Duration::from_millis(1))
        .fetcher(FindsNothing)
        .allow_private_addresses(true)
        .user_delay(Duration::from_secs(3600))
        .sync_delay(Duration::from_secs(3600))
}

/// The child: restores the state file if there is one, else submits every event, waits until
/// the file holds them all and has been written by this process, says so, then sleeps while
/// the scheduler checkpoints every millisecond, until it is killed.
#[test]
#[ignore = "the child process of checkpoints_survive_sigkill_at_random_instants"]
fn crash_child() {
    let (Some(state), Some(repos)) = (
        std::env::var_os(CHILD_STATE_ENV),
        std::env::var_os(CHILD_REPOS_ENV),
    ) else {
        return;
    };
    let (state, repos) = (PathBuf::from(state), PathBuf::from(repos));
    let engine = crash_builder(&state).build().expect("child: build");
    let restored = engine.stats().waiting_events;
    if restored == 0 {
        for i in 0..EVENTS {
            let admission = engine
                .submit(crash_event(i, &repos))
                .expect("child: submit");
            assert!(admission.is_pending(), "{admission:?}");
        }
    } else {
        assert_eq!(restored, EVENTS, "child: restored");
    }
    let deadline = Instant::now() + CHILD_PATIENCE;
    while engine.stats().commands_pending > 0 {
        assert!(
            Instant::now() < deadline,
            "child: the scheduler never took the submits"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.stats().waiting_events, EVENTS);
    let settled = SystemTime::now();
    loop {
        let written = std::fs::metadata(&state)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > settled);
        if written && check_state_file(&state).ok() == Some(EVENTS) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "child: no checkpoint with every event"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // On its own line: libtest has printed "test crash_child ... " without a newline.
    println!("\n{READY}");
    let started = Instant::now();
    while started.elapsed() < CHILD_LIFETIME {
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.shutdown().expect("child: shutdown");
}

/// xorshift64*: enough randomness for kill instants, no dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> (Rng, u64) {
        let seed = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
            });
        (Rng(seed | 1), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..=max`.
    fn below_or(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }
}

/// A running child with its output collected by two threads.
struct Running {
    child: Child,
    ready: mpsc::Receiver<()>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn spawn(state: &Path, repos: &Path) -> Running {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_STATE_ENV, state)
            .env(CHILD_REPOS_ENV, repos)
            .env_remove(SEED_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let (tx, ready) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.trim_end().ends_with(READY) {
                    let _ = tx.send(());
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            seen
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut seen = String::new();
            let _ = err.read_to_string(&mut seen);
            seen
        });
        Running {
            child,
            ready,
            stdout,
            stderr,
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap, then the child's output.
    fn kill(mut self) -> (String, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.stdout.join().unwrap(), self.stderr.join().unwrap())
    }
}

/// The temporary files of `state` in its directory.
fn temporaries(state: &Path) -> Vec<String> {
    let prefix = format!(".{}.tmp", state.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(state.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn checkpoints_survive_sigkill_at_random_instants() {
    let dir = tempfile::tempdir().unwrap();
    let repos = dir.path().join("repos");
    for r in 0..REPOS {
        init_bare(&repos.join(format!("r{r}.git")));
    }
    let state = dir.path().join("state.json");
    let (mut rng, seed) = Rng::seeded();
    let context = |what: &str| format!("{what} (replay with {SEED_ENV}={seed})");

    let started = Instant::now();
    let (mut while_checkpointing, mut during_start) = (0, 0);
    let mut kills_leaving_a_temporary = 0;
    // Bounded: every round kills once.
    for round in 0..KILLS_WHILE_CHECKPOINTING + KILLS_DURING_START {
        // The first round creates the file; then every ninth kill lands during start-up.
        let at_start = round > 0 && round % 9 == 0 && during_start < KILLS_DURING_START;
        let at_start = at_start || while_checkpointing == KILLS_WHILE_CHECKPOINTING;
        let running = Running::spawn(&state, &repos);
        let delay = if at_start {
            let delay = Duration::from_millis(rng.below_or(150));
            std::thread::sleep(delay);
            during_start += 1;
            delay
        } else {
            if running.ready.recv_timeout(CHILD_PATIENCE).is_err() {
                let (out, err) = running.kill();
                panic!(
                    "{}\nchild stdout:\n{out}\nchild stderr:\n{err}",
                    context(&format!("round {round}: the child never got ready"))
                );
            }
            let delay = Duration::from_millis(rng.below_or(40));
            std::thread::sleep(delay);
            while_checkpointing += 1;
            delay
        };
        let (out, err) = running.kill();
        let what = |msg: &str| {
            context(&format!(
                "round {round}, killed {delay:?} after {}: {msg}\nchild stdout:\n{out}\nchild stderr:\n{err}",
                if at_start { "spawn" } else { "ready" }
            ))
        };
        match check_state_file(&state) {
            Ok(n) => assert_eq!(n, EVENTS, "{}", what("events lost")),
            Err(e) => panic!("{}", what(&format!("the state file {e}"))),
        }
        let temps = temporaries(&state);
        assert!(temps.len() <= 1, "{}", what(&format!("{temps:?}")));
        kills_leaving_a_temporary += temps.len();
    }
    assert_eq!(while_checkpointing, KILLS_WHILE_CHECKPOINTING);
    assert_eq!(during_start, KILLS_DURING_START);

    // The file restores in this process too, and the next write clears the last temporary.
    let engine = crash_builder(&state).build().unwrap();
    assert_eq!(engine.stats().waiting_events, EVENTS);
    engine.shutdown().unwrap();
    assert_eq!(check_state_file(&state).unwrap(), EVENTS);
    assert_eq!(temporaries(&state), Vec::<String>::new());
    eprintln!(
        "{} kills in {:?}; {kills_leaving_a_temporary} left a temporary file (seed {seed})",
        while_checkpointing + during_start,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Files the engine cannot use.

/// A wall clock far from the real one, so that the moved-aside name is known.
const WALL_SECS: u64 = 1_900_000_000;

fn fake_clock() -> FakeClock {
    FakeClock::with_wall(UNIX_EPOCH + Duration::from_secs(WALL_SECS))
}

fn builder(state: &Path, clock: &FakeClock) -> EngineBuilder {
    Engine::builder()
        .thread_name("badfile")
        .clock(clock.clone())
        .tick(Duration::from_secs(3600))
        .fetcher(FindsNothing)
        .allow_private_addresses(true)
        .state_file(state)
}

fn simple_event(i: usize, repo: &Path) -> PendingEvent {
    PendingEvent::new(format!("ev-{i}"), "alice/project", repo)
        .oid(format!("{:040x}", i + 1))
        .clone_url("http://127.0.0.2:9/alice/project.git")
        .origin(Origin::User)
}

/// A valid state file with three waiting events, written by an engine.
fn valid_file(state: &Path, repo: &Path) -> Vec<u8> {
    let clock = fake_clock();
    let engine = builder(state, &clock).build().unwrap();
    for i in 0..3 {
        engine.submit(simple_event(i, repo)).unwrap();
    }
    engine.shutdown().unwrap();
    assert_eq!(check_state_file(state).unwrap(), 3);
    std::fs::read(state).unwrap()
}

/// What a bad file does: `check_state_file` and `build` give the same variant, and the
/// message says the reason in these words.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Corrupt,
    Version(u32),
    /// Not a regular file, but what the string says.
    NotARegularFile(&'static str),
}

impl Expect {
    fn matches(self, e: &StateFileError) -> bool {
        match (self, e) {
            (Expect::Corrupt, StateFileError::Corrupt(_)) => true,
            (Expect::Version(v), StateFileError::UnknownVersion(n)) => v == *n,
            (Expect::NotARegularFile(want), StateFileError::NotARegularFile { kind }) => {
                want == *kind
            }
            _ => false,
        }
    }

    fn words(self) -> String {
        match self {
            Expect::Corrupt => "is corrupt: ".into(),
            Expect::Version(v) => format!("has format version {v}, this build reads version 1"),
            Expect::NotARegularFile(kind) => format!("is not a regular file: it is {kind}"),
        }
    }
}

/// Each kind of bad file: its name, how to make it from a valid file's bytes (`None`: a
/// directory instead of a file), and what it must give.
#[allow(clippy::type_complexity)]
fn bad_files() -> Vec<(&'static str, Box<dyn Fn(&[u8]) -> Option<Vec<u8>>>, Expect)> {
    fn replaced(valid: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = String::from_utf8(valid.to_vec()).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        text.replacen(from, to, 1).into_bytes()
    }
    vec![
        (
            "truncated",
            Box::new(|v: &[u8]| Some(v[..v.len() / 2].to_vec())),
            Expect::Corrupt,
        ),
        (
            "cut before the last brace",
            Box::new(|v: &[u8]| Some(v[..v.len() - 2].to_vec())),
            Expect::Corrupt,
        ),
        (
            "empty",
            Box::new(|_: &[u8]| Some(Vec::new())),
            Expect::Corrupt,
        ),
        (
            "not JSON",
            Box::new(|_: &[u8]| Some(b"\x00\x01garbage\xff".to_vec())),
            Expect::Corrupt,
        ),
        (
            "wrong shape",
            Box::new(|_: &[u8]| Some(br#"{"version":1,"events":{}}"#.to_vec())),
            Expect::Corrupt,
        ),
        (
            "unknown field",
            Box::new(|v: &[u8]| Some(replaced(v, r#""version":1,"#, r#""version":1,"x":0,"#))),
            Expect::Corrupt,
        ),
        (
            "an event that no longer validates",
            Box::new(|v: &[u8]| {
                Some(replaced(
                    v,
                    &format!("{:040x}", 1),
                    "not-an-object-id-zzzzzzzzzzzzzzzzzzzzzzz",
                ))
            }),
            Expect::Corrupt,
        ),
        (
            "version 2",
            Box::new(|v: &[u8]| Some(replaced(v, r#""version":1"#, r#""version":2"#))),
            Expect::Version(2),
        ),
        (
            "version 0",
            Box::new(|v: &[u8]| Some(replaced(v, r#""version":1"#, r#""version":0"#))),
            Expect::Version(0),
        ),
        (
            "a directory",
            Box::new(|_: &[u8]| None),
            Expect::NotARegularFile("a directory"),
        ),
    ]
}

/// Puts the bad file in place; returns its bytes (`None` for the directory).
fn make_bad(
    state: &Path,
    valid: &[u8],
    make: &dyn Fn(&[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    std::fs::remove_file(state).unwrap();
    match make(valid) {
        Some(bytes) => {
            std::fs::write(state, &bytes).unwrap();
            Some(bytes)
        }
        None => {
            std::fs::create_dir(state).unwrap();
            std::fs::write(state.join("inside"), b"keep me").unwrap();
            None
        }
    }
}

/// `path` is still exactly the bad file.
fn assert_same(path: &Path, bytes: &Option<Vec<u8>>, name: &str) {
    match bytes {
        Some(b) => assert_eq!(&std::fs::read(path).unwrap(), b, "{name}: bytes changed"),
        None => {
            assert!(path.is_dir(), "{name}");
            assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"keep me");
            assert_eq!(std::fs::read_dir(path).unwrap().count(), 1, "{name}");
        }
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_bad_state_file_fails_the_build_and_is_left_as_it_is() {
    for (name, make, expect) in bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let repo = init_bare(&dir.path().join("repo.git"));
        let state = dir.path().join("state.json");
        let valid = valid_file(&state, &repo);
        let bad = make_bad(&state, &valid, &*make);
        let before = listing(dir.path());

        // What the file is, read on its own. An event that no longer validates is only
        // found by the engine's restore.
        if name != "an event that no longer validates" {
            let e = check_state_file(&state).unwrap_err();
            assert!(expect.matches(&e), "{name}: {e:?}");
        }

        let clock = fake_clock();
        for attempt in 0..2 {
            let err = match builder(&state, &clock).build() {
                Ok(_) => panic!("{name}: the engine started"),
                Err(e) => e,
            };
            let shown = err.to_string();
            match &err {
                BuildError::StateFile { path, error } => {
                    assert_eq!(path, &state, "{name}");
                    assert!(expect.matches(error), "{name}: {error:?}");
                    assert!(std::error::Error::source(&err).is_some(), "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
            assert!(
                shown.starts_with(&format!("state file {} ", state.display())),
                "{name}: {shown}"
            );
            assert!(shown.contains(&expect.words()), "{name}: {shown}");
            if name == "an event that no longer validates" {
                assert!(shown.contains("not-an-object-id"), "{name}: {shown}");
            }
            // Unchanged, nothing beside it, and the same again on a second try.
            assert_same(&state, &bad, name);
            assert_eq!(listing(dir.path()), before, "{name}, attempt {attempt}");
        }
    }
}

#[test]
fn a_bad_state_file_is_moved_aside_on_request_and_replaced_at_shutdown() {
    for (name, make, _) in bad_files() {
        if name == "an event that no longer validates" {
            // See `an_event_that_no_longer_validates_is_moved_aside_on_request`.
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = init_bare(&dir.path().join("repo.git"));
        let state = dir.path().join("state.json");
        let valid = valid_file(&state, &repo);
        let bad = make_bad(&state, &valid, &*make);

        let clock = fake_clock();
        let engine = builder(&state, &clock)
            .move_unreadable_state_aside(true)
            .build()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let stats = engine.stats();
        assert_eq!(
            (stats.waiting_events, stats.expired_ids_remembered),
            (0, 0),
            "{name}: the engine starts empty"
        );
        let aside = dir
            .path()
            .join(format!("state.json.unreadable-{WALL_SECS}"));
        assert!(!state.exists(), "{name}");
        assert_same(&aside, &bad, name);
        assert_eq!(
            listing(dir.path()),
            [
                "repo.git",
                "state.json.lock",
                &format!("state.json.unreadable-{WALL_SECS}")
            ],
            "{name}"
        );

        // A fresh file at shutdown; the moved file is kept as it was.
        engine.submit(simple_event(7, &repo)).unwrap();
        engine.shutdown().unwrap();
        assert_eq!(check_state_file(&state).unwrap(), 1, "{name}");
        assert_same(&aside, &bad, name);
        assert_eq!(
            listing(dir.path()),
            [
                "repo.git",
                "state.json",
                "state.json.lock",
                &format!("state.json.unreadable-{WALL_SECS}")
            ],
            "{name}"
        );
    }
}

/// A file that reads well but holds an event the engine's checks refuse (edited by hand, or
/// a limit lowered since) is as unusable as a corrupt one.
#[test]
fn an_event_that_no_longer_validates_is_moved_aside_on_request() {
    let (name, make, _) = bad_files()
        .into_iter()
        .find(|(n, _, _)| *n == "an event that no longer validates")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("repo.git"));
    let state = dir.path().join("state.json");
    let valid = valid_file(&state, &repo);
    let bad = make_bad(&state, &valid, &*make);
    let clock = fake_clock();
    let engine = builder(&state, &clock)
        .move_unreadable_state_aside(true)
        .build()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(engine.stats().waiting_events, 0);
    assert_same(
        &dir.path()
            .join(format!("state.json.unreadable-{WALL_SECS}")),
        &bad,
        name,
    );
    engine.shutdown().unwrap();
    assert_eq!(check_state_file(&state).unwrap(), 0);
}

#[test]
fn a_missing_state_file_is_a_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("repo.git"));
    let state = dir.path().join("state.json");
    let clock = fake_clock();
    let engine = builder(&state, &clock).build().unwrap();
    assert_eq!(engine.stats().waiting_events, 0);
    assert!(!state.exists());
    engine.submit(simple_event(1, &repo)).unwrap();
    engine.shutdown().unwrap();
    assert_eq!(check_state_file(&state).unwrap(), 1);
    assert_eq!(
        listing(dir.path()),
        ["repo.git", "state.json", "state.json.lock"]
    );
}

/// The events of one entry may name more URLs together than one event may: each event is
/// saved with its own URLs, so a restart does not refuse its own file.
#[test]
fn a_restart_keeps_an_entry_whose_events_name_many_urls_together() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("repo.git"));
    let state = dir.path().join("state.json");
    let clock = fake_clock();
    let engine = builder(&state, &clock).build().unwrap();
    for i in 0..100 {
        let ev = PendingEvent::new(format!("ev-{i}"), "alice/project", &repo)
            .oid(format!("{:040x}", i + 1))
            .clone_url(format!("http://127.0.0.2:9/mirror-{i}.git"))
            .origin(Origin::User);
        engine.submit(ev).unwrap();
    }
    engine.shutdown().unwrap();
    assert_eq!(check_state_file(&state).unwrap(), 100);
    let engine = builder(&state, &clock).build().unwrap();
    assert_eq!(engine.stats().waiting_events, 100);
    engine.shutdown().unwrap();
}

/// A state file that is not a regular file is refused at once, naming what it is. A FIFO is
/// never opened to read in blocking mode, which would hold `build` until some process wrote to
/// it. The build runs on a thread so that a hang fails the test instead of hanging it.
#[cfg(unix)]
#[test]
fn a_state_file_that_is_not_a_regular_file_is_refused_without_waiting() {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.json");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let folder = dir.path().join("folder.json");
    std::fs::create_dir(&folder).unwrap();
    for (state, kind) in [(&fifo, "a FIFO"), (&folder, "a directory")] {
        let (tx, rx) = mpsc::channel();
        let path = state.clone();
        std::thread::spawn(move || {
            let _ = tx.send(builder(&path, &fake_clock()).build());
        });
        let Ok(built) = rx.recv_timeout(Duration::from_secs(5)) else {
            // A writer that comes and goes lets a blocked open return, so that the thread ends.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(state);
            panic!("build with {kind} as its state file did not return within 5 s");
        };
        let err = match built {
            Err(e) => e,
            Ok(_) => panic!("{kind}: the engine started"),
        };
        match &err {
            BuildError::StateFile {
                path,
                error: StateFileError::NotARegularFile { kind: found },
            } => {
                assert_eq!(path, state);
                assert_eq!(*found, kind);
            }
            other => panic!("{kind}: {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "state file {} is not a regular file: it is {kind}",
                state.display()
            )
        );
        assert!(
            matches!(
                check_state_file(state),
                Err(StateFileError::NotARegularFile { kind: found }) if found == kind
            ),
            "{kind}"
        );
    }
    // Both are left as they were.
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(folder.is_dir());
}

/// Two engines on one state file would overwrite each other's checkpoints: a second `build`
/// is refused while the first runs (in the same process too), changes nothing, and succeeds
/// once the first is shut down or dropped, which writes its final state first.
#[test]
fn a_second_engine_on_the_same_state_file_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_bare(&dir.path().join("repo.git"));
    let state = dir.path().join("state.json");
    let clock = fake_clock();
    let first = builder(&state, &clock).build().unwrap();
    first.submit(simple_event(1, &repo)).unwrap();
    for attempt in 0..2 {
        let err = match builder(&state, &clock).build() {
            Err(e) => e,
            Ok(_) => panic!("attempt {attempt}: a second engine started on the state file"),
        };
        match &err {
            BuildError::StateFileLocked { path, lock_file } => {
                assert_eq!(path, &state);
                assert_eq!(lock_file, &dir.path().join("state.json.lock"));
            }
            other => panic!("attempt {attempt}: {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "state file {} is in use: another engine holds its lock file {}",
                state.display(),
                dir.path().join("state.json.lock").display()
            )
        );
    }
    // The first engine runs on and writes its final state at shutdown.
    first.submit(simple_event(2, &repo)).unwrap();
    first.shutdown().unwrap();
    assert_eq!(check_state_file(&state).unwrap(), 2);

    // Free after a shutdown, and after a drop.
    let second = builder(&state, &clock).build().unwrap();
    assert_eq!(second.stats().waiting_events, 2);
    drop(second);
    let third = builder(&state, &clock).build().unwrap();
    assert_eq!(third.stats().waiting_events, 2);
    third.shutdown().unwrap();
    // The lock file stays: removing it could let two engines lock two different files.
    assert_eq!(
        listing(dir.path()),
        ["repo.git", "state.json", "state.json.lock"]
    );
}

/// The lock is the kernel's: an engine in another process holds the state file, and the
/// process's death (SIGKILL, no shutdown) releases it.
#[cfg(unix)]
#[test]
fn an_engine_in_another_process_holds_the_state_file_until_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let repos = dir.path().join("repos");
    for r in 0..REPOS {
        init_bare(&repos.join(format!("r{r}.git")));
    }
    let state = dir.path().join("state.json");
    let running = Running::spawn(&state, &repos);
    if running.ready.recv_timeout(CHILD_PATIENCE).is_err() {
        let (out, err) = running.kill();
        panic!("the child never got ready\nchild stdout:\n{out}\nchild stderr:\n{err}");
    }
    match crash_builder(&state).build() {
        Err(BuildError::StateFileLocked { path, .. }) => assert_eq!(path, state),
        Err(e) => panic!("{e:?}"),
        Ok(_) => {
            running.kill();
            panic!("an engine started on the state file another process uses");
        }
    }
    running.kill();
    let engine = crash_builder(&state).build().unwrap();
    assert_eq!(engine.stats().waiting_events, EVENTS);
    engine.shutdown().unwrap();
}
