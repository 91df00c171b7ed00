//! The example hosts in C (`capi/examples/c/host.c`) and Python (`capi/examples/python/host.py`)
//! against a real `git daemon` on a loopback address, through the C API's shared and static
//! libraries as `install.sh` installs them (SONAME, pkg-config file, the static library's hidden
//! symbols).
//!
//! Cargo builds the crate's `cdylib` and `staticlib` for integration tests because they are
//! listed in `crate-type`; the tests find them next to their own executable (in
//! `target/<profile>/deps/`, or in `target/<profile>/` after a `cargo build`) and install them once
//! into a temporary prefix with `install.sh --no-build`. The C host is compiled with `cc` and
//! the flags `pkg-config` gives; the Python host runs with `python3`, and the C host under
//! `valgrind` (`.ci/run` installs both, and `pkg-config`; the tests skip, with a message, when
//! one is missing). Every child process is killed when it outlives its time limit.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use purgatory_sync_testkit::{self as testkit, GitDaemon};
use serde_json::json;

const HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Time limits for child processes: compiler, host, host under valgrind.
const COMPILE_LIMIT: Duration = Duration::from_secs(60);
const HOST_LIMIT: Duration = Duration::from_secs(60);
const VALGRIND_LIMIT: Duration = Duration::from_secs(120);

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

/// The C library as `install.sh` installs it, from the files cargo built for this test run
/// (in `target/<profile>/`, found from the test executable's own path), into a temporary
/// prefix shared by the tests of this file.
struct Installed {
    prefix: PathBuf,
}

impl Installed {
    fn get() -> &'static Installed {
        static INSTALLED: OnceLock<(tempfile::TempDir, Installed)> = OnceLock::new();
        let (_, installed) = INSTALLED.get_or_init(|| {
            // `cargo test` leaves the libraries in `deps/` (a `cargo build` also copies them
            // up to the profile's folder).
            let exe = std::env::current_exe().expect("test executable path");
            let deps = exe.parent().expect("target/<profile>/deps/<test>");
            let profile = [deps, deps.parent().expect("target/<profile>")]
                .into_iter()
                .find(|dir| {
                    ["libpurgatory_sync_capi.so", "libpurgatory_sync_capi.a"]
                        .iter()
                        .all(|f| dir.join(f).is_file())
                })
                .unwrap_or_else(|| {
                    panic!(
                        "the C libraries are neither in {} nor above it",
                        deps.display()
                    )
                });
            let dir = tempfile::tempdir().expect("temporary directory");
            let prefix = dir.path().join("usr");
            let out = run_bounded(
                Command::new("bash")
                    .arg(manifest_dir().join("install.sh"))
                    .arg("--no-build")
                    .arg("--from")
                    .arg(profile)
                    .arg("--prefix")
                    .arg(&prefix),
                COMPILE_LIMIT,
            );
            assert!(
                out.status.success(),
                "install.sh failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (dir, Installed { prefix })
        });
        installed
    }

    fn lib(&self) -> PathBuf {
        self.prefix.join("lib")
    }

    /// `pkg-config <args> purgatory_sync` against this prefix, split into arguments.
    fn pkg_config(&self, args: &[&str]) -> Vec<String> {
        let out = run_bounded(
            Command::new("pkg-config")
                .env("PKG_CONFIG_PATH", self.lib().join("pkgconfig"))
                .args(args)
                .arg("purgatory_sync"),
            COMPILE_LIMIT,
        );
        assert!(
            out.status.success(),
            "pkg-config {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}

/// The symbols `file` (an ELF object, library or archive) defines globally, from `readelf`
/// (`--dyn-syms` for a shared library's exported symbols).
fn global_symbols(file: &Path, dynamic: bool) -> Vec<String> {
    let out = run_bounded(
        Command::new("readelf")
            .arg("-W")
            .arg(if dynamic { "--dyn-syms" } else { "--syms" })
            .arg(file),
        COMPILE_LIMIT,
    );
    assert!(out.status.success(), "readelf {}", file.display());
    let mut symbols: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Num: Value Size Type Bind Vis Ndx Name
            (f.len() >= 8 && f[4] == "GLOBAL" && f[6] != "UND").then(|| f[7].to_owned())
        })
        .collect();
    symbols.sort();
    symbols.dedup();
    symbols
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

/// Compiles `examples/c/host.c` into `dir` with the flags `pkg-config` gives for the installed
/// library: linked against the static library, or the shared one (with an rpath to it).
fn compile_c_host(dir: &Path, static_link: bool) -> PathBuf {
    let installed = Installed::get();
    let exe = dir.join(if static_link {
        "host-static"
    } else {
        "host-shared"
    });
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(installed.pkg_config(&["--cflags"]))
        .arg(manifest_dir().join("examples/c/host.c"))
        .arg("-o")
        .arg(&exe);
    if static_link {
        // The archive itself, then what it needs (`Libs.private`); not `-lpurgatory_sync`,
        // which would find the shared library first.
        cc.arg(installed.lib().join("libpurgatory_sync.a")).args(
            installed
                .pkg_config(&["--static", "--libs-only-l"])
                .into_iter()
                .filter(|a| a != "-lpurgatory_sync"),
        );
    } else {
        cc.args(installed.pkg_config(&["--libs"]))
            .arg(format!("-Wl,-rpath,{}", installed.lib().display()));
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
            .env(
                "PSYNC_LIB",
                Installed::get().lib().join("libpurgatory_sync.so"),
            )
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

/// The installed shared library carries its SONAME and exports the C ABI only; a host linked
/// against it asks for the SONAME, not the development link.
#[test]
fn the_shared_library_has_a_soname_and_exports_the_c_abi_only() {
    let installed = Installed::get();
    let lib = installed.lib().join("libpurgatory_sync.so");
    let dynamic = |file: &Path| {
        let out = run_bounded(Command::new("readelf").arg("-d").arg(file), COMPILE_LIMIT);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let version = env!("CARGO_PKG_VERSION_MINOR");
    let soname = format!("libpurgatory_sync.so.0.{version}");
    assert!(
        dynamic(&lib).contains(&format!("Library soname: [{soname}]")),
        "{}",
        dynamic(&lib)
    );
    assert!(installed.lib().join(&soname).exists());
    let exported = global_symbols(&lib, true);
    let others: Vec<&String> = exported
        .iter()
        .filter(|s| !s.starts_with("psync_"))
        .collect();
    assert!(others.is_empty(), "exported besides psync_*: {others:?}");
    assert!(exported.len() >= 17, "{exported:?}");

    let dir = tempfile::tempdir().expect("temporary directory");
    let exe = compile_c_host(dir.path(), false);
    assert!(
        dynamic(&exe).contains(&format!("Shared library: [{soname}]")),
        "{}",
        dynamic(&exe)
    );
}

/// The static library defines the C ABI's symbols only: a host that links another libgit2 (or
/// defines a `git_*` symbol of its own, as here) links beside it, and each side calls its own.
#[test]
fn the_static_library_hides_libgit2_and_links_beside_another_one() {
    let installed = Installed::get();
    let archive = installed.lib().join("libpurgatory_sync.a");
    let defined = global_symbols(&archive, false);
    let others: Vec<&String> = defined
        .iter()
        .filter(|s| !s.starts_with("psync_"))
        .collect();
    assert!(others.is_empty(), "defined besides psync_*: {others:?}");

    let dir = tempfile::tempdir().expect("temporary directory");
    let source = dir.path().join("other_libgit2.c");
    std::fs::write(
        &source,
        r#"#include <stdio.h>
#include <string.h>
#include "purgatory_sync.h"
/* Stands in for another libgit2 linked into the host (git2go): the same symbol name. */
int git_libgit2_init(void) { return 4242; }
int main(void) {
    const char *v = psync_version();
    if (git_libgit2_init() != 4242 || v == NULL || strlen(v) == 0) return 1;
    printf("%s\n", v);
    return 0;
}
"#,
    )
    .expect("write the C source");
    let exe = dir.path().join("other_libgit2");
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Werror"])
        .args(installed.pkg_config(&["--cflags"]))
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .arg(&archive)
        .args(
            installed
                .pkg_config(&["--static", "--libs-only-l"])
                .into_iter()
                .filter(|a| a != "-lpurgatory_sync"),
        );
    let out = run_bounded(&mut cc, COMPILE_LIMIT);
    assert!(
        out.status.success(),
        "a host with its own git_libgit2_init does not link: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_bounded(&mut Command::new(&exe), HOST_LIMIT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        env!("CARGO_PKG_VERSION")
    );
}
