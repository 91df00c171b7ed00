//! The example hosts in C (`examples/c/host.c`) and Python (`examples/python/host.py`) against
//! a real `git daemon` on a loopback address, through the C API's shared and static libraries.
//!
//! Cargo builds the crate's `cdylib` and `staticlib` for integration tests because they are
//! listed in `crate-type`; the tests find them next to their own executable (the test binary is
//! in `target/<profile>/deps/`, the libraries in `target/<profile>/` or in `deps/`). The C host
//! is compiled with `cc`; the Python host runs with `python3` (skipped, with a message, when
//! `python3` is missing) and the C host runs under `valgrind` (skipped, with a message, when
//! `valgrind` is missing). Every child process is killed when it outlives its time limit.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use purgatory_sync_testkit::{self as testkit, GitDaemon};
use serde_json::json;

const HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Time limits for child processes: compiler, host, host under valgrind.
const COMPILE_LIMIT: Duration = Duration::from_secs(60);
const HOST_LIMIT: Duration = Duration::from_secs(60);
const VALGRIND_LIMIT: Duration = Duration::from_secs(120);

/// Libraries the static library needs besides itself on Linux (from
/// `cargo rustc --lib --crate-type staticlib -- --print native-static-libs`).
const NATIVE_STATIC_LIBS: &[&str] = &[
    "-lssl",
    "-lcrypto",
    "-lz",
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Served repositories, a running daemon, target repositories and the hosts' arguments.
struct Fixture {
    dir: tempfile::TempDir,
    _daemon: GitDaemon,
    config: String,
    events: Vec<String>,
    /// `(event id, identifier)` of every event, all expected to be released.
    expected: Vec<(String, String)>,
}

fn fixture() -> Fixture {
    testkit::require_git();
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().join("mirror");
    let mut events = Vec::new();
    let mut expected = Vec::new();
    let mut repos = Vec::new();
    for (name, identifier) in [
        ("alice/hello.git", "alice/hello"),
        ("bob/world.git", "bob/world"),
    ] {
        let served = testkit::served_repo(&base, name);
        testkit::commit(&served, "main", &[("README", b"hello\n")], "first");
        let tip = testkit::commit(&served, "main", &[("README", name.as_bytes())], "second");
        let target = testkit::init_bare(&dir.path().join("relay").join(name));
        repos.push((name, identifier, tip, target));
    }
    let daemon = GitDaemon::start(HOST, &base).unwrap_or_else(|e| panic!("git daemon: {e}"));
    for (i, (name, identifier, tip, target)) in repos.into_iter().enumerate() {
        let id = format!("event-{i}");
        events.push(
            json!({
                "id": id,
                "identifier": identifier,
                "repo": target,
                "oids": [tip.to_string()],
                "clone_urls": [daemon.url(name)],
                "origin": "sync",
            })
            .to_string(),
        );
        expected.push((id, identifier.to_owned()));
    }
    let config = json!({
        "allow_private_addresses": true, // the daemon listens on 127.0.0.2
        "sync_delay_ms": 0,
        "tick_ms": 50,
        "backoff_base_ms": 100,
        "backoff_cap_ms": 400,
    })
    .to_string();
    Fixture {
        dir,
        _daemon: daemon,
        config,
        events,
        expected,
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The library file `name` built by cargo for this test run: in `target/<profile>/` or in
/// `target/<profile>/deps/` (where `cargo test` leaves them; preferred), found from the test
/// executable's own path.
fn built_library(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    let profile = deps.parent().expect("profile directory");
    [deps, profile]
        .iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is neither in {} nor in {}: is `crate-type` in Cargo.toml \
                 [\"rlib\", \"cdylib\", \"staticlib\"]?",
                profile.display(),
                deps.display()
            )
        })
}

/// Runs `command` with stdout and stderr captured, killing it after `limit`.
fn run_bounded(command: &mut Command, limit: Duration) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
            let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("{what} still running after {limit:?}: killed\n{stdout}\n{stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Compiles `examples/c/host.c` into `dir`, linked against the static library, or the shared
/// one (with an rpath to its directory).
fn compile_c_host(dir: &Path, static_link: bool) -> PathBuf {
    let root = manifest_dir();
    let exe = dir.join(if static_link {
        "host-static"
    } else {
        "host-shared"
    });
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(root.join("include"))
        .arg(root.join("examples/c/host.c"))
        .arg("-o")
        .arg(&exe);
    if static_link {
        cc.arg(built_library("libpurgatory_sync.a"))
            .args(NATIVE_STATIC_LIBS);
    } else {
        let lib = built_library("libpurgatory_sync.so");
        let lib_dir = lib.parent().expect("library directory");
        cc.arg("-L")
            .arg(lib_dir)
            .arg("-lpurgatory_sync")
            .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    }
    let out = run_bounded(&mut cc, COMPILE_LIMIT);
    assert!(
        out.status.success(),
        "cc failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Checks that the host exited 0 and printed `released <id> <identifier>` for every event.
fn check_host_output(what: &str, out: &Output, fixture: &Fixture) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for (id, identifier) in &fixture.expected {
        let line = format!("released {id} {identifier}");
        assert!(
            stdout.lines().any(|l| l == line),
            "{what} did not print `{line}`\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    assert!(
        !stdout.lines().any(|l| l.starts_with("expired ")),
        "{what}: an event expired\nstdout:\n{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("stats {")),
        "{what} printed no stats\nstdout:\n{stdout}"
    );
}

fn found(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn c_host_releases_every_event_static_and_shared() {
    for static_link in [true, false] {
        // Fresh target repositories: after one run they hold the objects already.
        let fixture = fixture();
        let exe = compile_c_host(fixture.dir.path(), static_link);
        let out = run_bounded(
            Command::new(&exe)
                .arg(&fixture.config)
                .args(&fixture.events),
            HOST_LIMIT,
        );
        check_host_output(&format!("{}", exe.display()), &out, &fixture);
    }
}

#[test]
fn python_host_releases_every_event() {
    if !found("python3") {
        eprintln!("SKIPPED python_host_releases_every_event: python3 is not installed");
        return;
    }
    let fixture = fixture();
    let out = run_bounded(
        Command::new("python3")
            .arg(manifest_dir().join("examples/python/host.py"))
            .env("PSYNC_LIB", built_library("libpurgatory_sync.so"))
            .arg(&fixture.config)
            .args(&fixture.events),
        HOST_LIMIT,
    );
    check_host_output("host.py", &out, &fixture);
}

#[test]
fn c_host_is_clean_under_valgrind() {
    if !found("valgrind") {
        eprintln!("SKIPPED c_host_is_clean_under_valgrind: valgrind is not installed");
        return;
    }
    let fixture = fixture();
    let exe = compile_c_host(fixture.dir.path(), true);
    let out = run_bounded(
        Command::new("valgrind")
            // Definitely, indirectly and possibly lost blocks are errors (valgrind's default);
            // examples/c/valgrind.supp explains the two per-thread blocks it suppresses.
            .args(["--leak-check=full", "--error-exitcode=1"])
            .arg(format!(
                "--suppressions={}",
                manifest_dir().join("examples/c/valgrind.supp").display()
            ))
            .arg(&exe)
            .arg(&fixture.config)
            .args(&fixture.events),
        VALGRIND_LIMIT,
    );
    // Valgrind's summary, for the record (visible with `--nocapture`).
    let report = String::from_utf8_lossy(&out.stderr);
    for line in report.lines().filter(|l| {
        [
            "ERROR SUMMARY",
            "definitely lost",
            "indirectly lost",
            "possibly lost",
            "still reachable",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        eprintln!("{line}");
    }
    check_host_output("host.c under valgrind", &out, &fixture);
}
