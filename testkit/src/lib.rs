//! Test kit: loopback git servers, faulty and hostile servers, a pack builder and repository
//! fixtures (cargo feature `testkit`).
//!
//! Integration tests, examples and benches need real git servers and repositories with known
//! commits. This module provides:
//!
//! - [`GitDaemon`]: `git daemon` serving `git://` on a loopback address;
//! - [`HttpGitServer`]: `git http-backend` behind a small HTTP/1.1 server, with [`Fault`]s that
//!   can be switched on at run time (hang, drip, garbage, cut mid-pack, error status,
//!   redirect, a huge header line), optionally only for one phase of a fetch ([`FaultTarget`]);
//! - [`FaultyTcpServer`]: a `git://` proxy in front of a [`GitDaemon`] that misbehaves on
//!   demand ([`TcpFault`]);
//! - [`ScriptedGitServer`]: a hostile `git://` server with no repository behind it, saying
//!   what its [`Script`] says: any [`Advertisement`] (refs, a streamed flood of a million refs,
//!   an empty repository, an `ERR` line with terminal escapes), any capabilities, and an
//!   [`Answer`] to the client's wants (a [`Pack`] of bytes or streamed chunks, an `ERR` line);
//!   it keeps what each client asked for ([`Negotiation`]);
//! - [`DelayProxy`]: a wide-area stand-in, a TCP proxy in front of a [`GitDaemon`] or an
//!   [`HttpGitServer`] that delays every byte by a fixed time in each direction (50 ms each
//!   way for a 100 ms round trip) without limiting throughput, and can charge each new
//!   connection a round trip for its TCP handshake;
//! - [`PackBuilder`]: raw git packs written entry by entry, well-formed or crafted (delta
//!   bombs from [`delta_bomb`] and hand-written [`delta`]s, zlib bombs, lying object counts),
//!   with the object ids of what they hold ([`hash_object`], [`ObjectKind`]);
//! - a request log on the HTTP, faulty and scripted servers and the delay proxy
//!   ([`RequestRecord`], [`max_concurrent`]) to check per-host concurrency and rate limits
//!   afterwards;
//! - repositories built with libgit2 ([`init_bare`], [`served_repo`], [`served_repo_with`],
//!   [`commit`], [`commit_large`], [`push_all`], [`has_object`], [`refs_with_prefix`]);
//! - an engine builder for those servers ([`loopback_engine`]) and a bounded wait for the
//!   engine's stats ([`wait_for_stats`]).
//!
//! Commits are deterministic: the same sequence of [`commit`] calls yields the same object ids
//! in any repository, so one commit can be put on several mirrors.
//!
//! Different loopback addresses (`127.0.0.2`, `127.0.0.3`, …) are different domains to the
//! engine; Linux routes all of `127.0.0.0/8` to the loopback interface. Every server here
//! listens on the loopback address it is given and stops (threads joined, child processes
//! killed and waited for) when its handle is dropped. The servers are Unix only.
//!
//! Repository helpers panic with a message naming the path when libgit2 fails: they are test
//! fixtures, and a failed fixture should stop the test.
//!
//! ```no_run
//! use purgatory_sync_testkit::{self as testkit, Fault, FaultTarget, GitDaemon, HttpGitServer};
//! use std::net::Ipv4Addr;
//!
//! let dir = std::env::temp_dir().join("testkit-doc");
//! let mirror = dir.join("mirror");
//! let served = testkit::served_repo(&mirror, "alice/hello.git");
//! let tip = testkit::commit(&served, "main", &[("README", b"hello\n")], "first");
//! let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 2), &mirror)?;
//! println!("{tip} is at {}", daemon.url("alice/hello.git"));
//!
//! let http = HttpGitServer::start(Ipv4Addr::new(127, 0, 0, 3), &mirror)?;
//! // The ref advertisement works, the pack is cut after 100 bytes.
//! http.set_fault_on(FaultTarget::UploadPack, Fault::CloseMidPack { after_bytes: 100 });
//! println!("{tip} is almost at {}", http.url("alice/hello.git"));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

mod daemon;
mod delay;
pub mod fuzz;
mod http;
mod net;
mod pack;
mod record;
mod repos;
mod scripted;
mod tcp;

pub use daemon::GitDaemon;
pub use delay::DelayProxy;
pub use http::{Fault, FaultTarget, HttpGitServer};
pub use pack::{bombs, delta, delta_bomb, hash_object, ObjectKind, PackBuilder, RESOLVE_LIMIT};
pub use record::{max_concurrent, RequestRecord};
pub use repos::{
    commit, commit_large, has_object, init_bare, missing_objects, pseudo_random_bytes, push_all,
    refs_with_prefix, served_repo, served_repo_with, WantPolicy, AUTHOR_EMAIL, AUTHOR_NAME,
    COMMIT_TIME,
};
pub use scripted::{
    Advertisement, Answer, Negotiation, Pack, Script, ScriptedGitServer, DEFAULT_CAPABILITIES,
};
pub use tcp::{FaultyTcpServer, TcpFault};

/// The `log` target of the test kit's debug messages.
const LOG_TARGET: &str = "purgatory_sync_testkit";

/// Environment variables that would send the `git` command-line tool (through curl) to a
/// proxy instead of the loopback server under test.
const PROXY_VARIABLES: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "GIT_PROXY_COMMAND",
    "GIT_SSL_NO_VERIFY",
];

/// git's exec path (`git --exec-path`), where its helper programs live; computed once per
/// process. `None` when `git` is not installed.
fn exec_path() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("git")
            .arg("--exec-path")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!dir.is_empty()).then(|| PathBuf::from(dir))
    })
    .as_deref()
}

/// The helper program `name` (such as `git-daemon`) in git's exec path, if it is there.
///
/// The servers run the helpers directly rather than through the `git` wrapper: the wrapper
/// runs them as child processes and does not pass a kill on, so killing the wrapper would
/// leave the helper running.
fn git_program(name: &str) -> Option<PathBuf> {
    let program = exec_path()?.join(name);
    program.is_file().then_some(program)
}

/// The `git-daemon` program, computed once per process.
fn daemon_program() -> Option<&'static Path> {
    static PROGRAM: OnceLock<Option<PathBuf>> = OnceLock::new();
    PROGRAM.get_or_init(|| git_program("git-daemon")).as_deref()
}

/// The `git-http-backend` program, computed once per process.
fn http_backend_program() -> Option<&'static Path> {
    static PROGRAM: OnceLock<Option<PathBuf>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| git_program("git-http-backend"))
        .as_deref()
}

/// Whether the `git` command-line tool and its `git daemon` and `git http-backend`
/// sub-commands are installed.
///
/// Only the servers ([`GitDaemon`], [`HttpGitServer`], [`FaultyTcpServer`] in front of a
/// daemon) need them; the repository helpers use libgit2. The answer is computed once per
/// process.
pub fn git_available() -> bool {
    daemon_program().is_some() && http_backend_program().is_some()
}

/// Panics with an explanation unless [`git_available`]; call it first in tests that start a
/// server.
///
/// # Panics
/// When `git`, `git daemon` or `git http-backend` is not installed.
pub fn require_git() {
    assert!(
        git_available(),
        "these tests start `git daemon` and `git http-backend` on loopback addresses: install \
         the git command-line tool (with its `git daemon` sub-command, packaged as \
         `git-daemon` on some distributions) and make sure `git` is on PATH"
    );
}

/// A `git` command-line invocation isolated from the user's and the system's configuration
/// (`GIT_CONFIG_NOSYSTEM=1`, `GIT_CONFIG_GLOBAL=/dev/null`), that never prompts
/// (`GIT_TERMINAL_PROMPT=0`), speaks English (`LC_ALL=C`), names new default branches `main`
/// and ignores proxy settings from the environment, so that its requests reach the loopback
/// servers under test. Add arguments and run it like any [`Command`]; stdin is `/dev/null`.
pub fn git_command() -> Command {
    let mut command = Command::new("git");
    command
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("LC_ALL", "C")
        // Quiet `git init` and `git clone` about the default branch name.
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "init.defaultBranch")
        .env("GIT_CONFIG_VALUE_0", "main")
        .env("no_proxy", "*")
        .env("NO_PROXY", "*")
        .stdin(Stdio::null());
    for name in PROXY_VARIABLES {
        command.env_remove(name);
    }
    // Variables a surrounding git (a hook, `git rebase --exec`) may have set.
    for name in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PROTOCOL"] {
        command.env_remove(OsStr::new(name));
    }
    command
}

/// An engine builder for tests against the test kit's loopback servers: private addresses
/// allowed (the servers listen on 127.0.0.x) and per-domain limits that never bind (politeness
/// has tests of its own). Set the rest as each test needs.
pub fn loopback_engine() -> purgatory_sync::EngineBuilder {
    purgatory_sync::Engine::builder()
        .allow_private_addresses(true)
        .domain_limits(1024, 600_000)
        .domain_burst(100_000)
}

/// Polls `engine`'s [`Stats`](purgatory_sync::Stats) every 2 ms until `done` holds and returns them;
/// panics with the last stats when `within` passes first.
///
/// For integration tests that need the scheduler to have applied a command (say
/// `submitted == 1`) before they go on; tests of timing use a fake clock instead.
pub fn wait_for_stats(
    engine: &purgatory_sync::Engine,
    within: std::time::Duration,
    done: impl Fn(&purgatory_sync::Stats) -> bool,
) -> purgatory_sync::Stats {
    let start = std::time::Instant::now();
    loop {
        let stats = engine.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            start.elapsed() < within,
            "not reached within {within:?}: {stats:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
