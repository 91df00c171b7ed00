//! Test kit: loopback git servers and repository fixtures (cargo feature `testkit`).
//!
//! Integration tests, examples and benches need real git servers and repositories with known
//! commits. This module starts `git daemon` on a loopback address ([`GitDaemon`]) and builds
//! repositories with libgit2 ([`init_bare`], [`served_repo`], [`commit`], [`push_all`]).
//! Commits are deterministic: the same sequence of [`commit`] calls yields the same object ids
//! in any repository, so one commit can be put on several mirrors.
//!
//! Different loopback addresses (`127.0.0.2`, `127.0.0.3`, …) are different domains to the
//! engine; Linux routes all of `127.0.0.0/8` to the loopback interface.
//!
//! Repository helpers panic with a message naming the path when libgit2 fails: they are test
//! fixtures, and a failed fixture should stop the test.
//!
//! ```no_run
//! use purgatory_sync::testkit::{self, GitDaemon};
//! use std::net::Ipv4Addr;
//!
//! let dir = std::env::temp_dir().join("testkit-doc");
//! let mirror = dir.join("mirror");
//! let served = testkit::served_repo(&mirror, "alice/hello.git");
//! let tip = testkit::commit(&served, "main", &[("README", b"hello\n")], "first");
//! let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, 2), &mirror)?;
//! println!("{tip} is at {}", daemon.url("alice/hello.git"));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use git2::{FileMode, Repository, Signature, Time};

use crate::ObjectId;

/// How long [`GitDaemon::start`] waits for one daemon to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a [`GitDaemon`] waits for it to stop before killing its watchdog.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many ports [`GitDaemon::start`] tries before giving up.
const START_ATTEMPTS: u32 = 5;
/// The line `git daemon --verbose` logs once it listens.
const READY_LINE: &str = "Ready to rumble";

/// Author and committer name of every [`commit`].
pub const AUTHOR_NAME: &str = "Purgatory Test";
/// Author and committer e-mail of every [`commit`].
pub const AUTHOR_EMAIL: &str = "test@purgatory-sync.invalid";
/// Author and committer time of every [`commit`] (seconds since the epoch, UTC).
pub const COMMIT_TIME: i64 = 1_700_000_000;

/// Whether the `git` command-line tool and its `git daemon` sub-command are installed.
///
/// Only [`GitDaemon`] needs them; the repository helpers use libgit2. The answer is computed
/// once per process.
pub fn git_available() -> bool {
    daemon_program().is_some()
}

/// The `git-daemon` program in git's exec path. [`GitDaemon`] runs it directly rather than
/// through `git daemon`: the `git` wrapper runs it as a child process and does not pass a
/// kill on, so killing the wrapper would leave the daemon listening.
fn daemon_program() -> Option<&'static Path> {
    static PROGRAM: OnceLock<Option<PathBuf>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| {
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
            let program = Path::new(&dir).join("git-daemon");
            program.is_file().then_some(program)
        })
        .as_deref()
}

/// Panics with an explanation unless [`git_available`]; call it first in tests that start a
/// [`GitDaemon`].
///
/// # Panics
/// When `git` or `git daemon` is not installed.
pub fn require_git() {
    assert!(
        git_available(),
        "these tests start `git daemon` on loopback addresses: install the git command-line \
         tool (with its `git daemon` sub-command, packaged as `git-daemon` on some \
         distributions) and make sure `git` is on PATH"
    );
}

/// A `git daemon` serving the bare repositories under one directory over `git://` on a
/// loopback address, read-only (`upload-pack` only). Unix only.
///
/// The daemon runs with an environment isolated from the user's and the system's git
/// configuration, under a small `/bin/sh` watchdog that kills it as soon as the pipe from this
/// process closes: when the handle is dropped, and also when the test process dies without
/// running destructors (killed, aborted), so no daemon outlives its test run. Dropping the
/// handle stops the daemon and waits for it. Its log (`--verbose`) goes to the [`log`] crate at
/// debug level, target `purgatory_sync::testkit`.
#[derive(Debug)]
pub struct GitDaemon {
    /// The watchdog shell; the daemon is its child.
    child: Child,
    /// Closing it tells the watchdog to kill the daemon.
    lifeline: Option<ChildStdin>,
    addr: SocketAddrV4,
    base_dir: PathBuf,
}

/// Runs the daemon (`$0 "$@"`) in the background and kills it once stdin reaches end of file.
/// The background job's stdin is `/dev/null`, so only the watchdog reads the lifeline.
const WATCHDOG: &str = r#""$0" "$@" </dev/null &
pid=$!
read -r _ignored
kill "$pid" 2>/dev/null
wait "$pid"
"#;

impl GitDaemon {
    /// Starts `git daemon` on `ip` and a free port, serving every repository under `base_dir`
    /// (created if missing) as `git://ip:port/<path relative to base_dir>`.
    ///
    /// Returns once the daemon accepts connections (at most about 10 s per try). If another
    /// process takes the chosen port first, it retries with a new port, up to 5 times. Several
    /// daemons may be started concurrently, on the same or on different addresses.
    ///
    /// # Errors
    /// `git` is missing ([`io::ErrorKind::NotFound`]), `base_dir` cannot be created, no port
    /// could be bound, or the daemon did not become ready in time; the message includes the
    /// daemon's own error output.
    pub fn start(ip: Ipv4Addr, base_dir: &Path) -> io::Result<GitDaemon> {
        let Some(program) = daemon_program() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "`git daemon` is not available: install git and put it on PATH",
            ));
        };
        std::fs::create_dir_all(base_dir)?;
        // The daemon's whitelist compares resolved paths.
        let base_dir = std::fs::canonicalize(base_dir)?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = TcpListener::bind((ip, 0))?.local_addr()?.port();
            let addr = SocketAddrV4::new(ip, port);
            match Self::try_start(program, addr, &base_dir) {
                Ok(daemon) => return Ok(daemon),
                Err(Start::PortTaken(e)) => last_error = Some(e),
                Err(Start::Failed(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("git daemon did not start")))
    }

    fn try_start(program: &Path, addr: SocketAddrV4, base_dir: &Path) -> Result<GitDaemon, Start> {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg(program)
            .arg("--verbose")
            .arg("--reuseaddr")
            .arg(format!("--base-path={}", base_dir.display()))
            .arg("--export-all")
            .arg(format!("--listen={}", addr.ip()))
            .arg(format!("--port={}", addr.port()))
            .arg("--enable=upload-pack")
            .arg(base_dir)
            .env_clear()
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", base_dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        let mut child = command.spawn().map_err(Start::Failed)?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let lifeline = child.stdin.take();
        // From here on, dropping `daemon` stops the watchdog and the daemon.
        let mut daemon = GitDaemon {
            child,
            lifeline,
            addr,
            base_dir: base_dir.to_path_buf(),
        };
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        std::thread::Builder::new()
            .name("git-daemon-log".to_owned())
            .spawn(move || {
                // Forwards the daemon's log until it exits (end of file). Every line goes to
                // the starter, which stops listening once the daemon is ready, and to `log`.
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log::debug!(target: "purgatory_sync::testkit", "git daemon {addr}: {line}");
                    let _ = tx.send(line);
                }
            })
            .map_err(Start::Failed)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut output = Vec::new();
        loop {
            let failed = match rx.recv_deadline(deadline) {
                Ok(line) => {
                    let ready = line.contains(READY_LINE);
                    let fatal = line.contains("fatal:") || line.contains("unable to allocate");
                    output.push(line);
                    if ready {
                        break;
                    }
                    if !fatal {
                        continue;
                    }
                    format!("failed: {}", output.join(" | "))
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    let status = daemon.stop();
                    format!("exited ({status}): {}", output.join(" | "))
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(Start::Failed(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "git daemon on {addr} not ready after {START_TIMEOUT:?}: {}",
                            output.join(" | ")
                        ),
                    )));
                }
            };
            let e = io::Error::other(format!("git daemon on {addr} {failed}"));
            let taken = output
                .iter()
                .any(|l| l.contains("unable to allocate") || l.contains("Address already in use"));
            return Err(if taken {
                Start::PortTaken(e)
            } else {
                Start::Failed(e)
            });
        }
        // It listens now; make sure the address really answers.
        TcpStream::connect_timeout(&SocketAddr::V4(addr), START_TIMEOUT).map_err(Start::Failed)?;
        Ok(daemon)
    }

    /// Closes the lifeline so that the watchdog kills the daemon, and waits for both (bounded;
    /// the watchdog itself is killed if it does not finish). Returns how the watchdog ended.
    fn stop(&mut self) -> String {
        drop(self.lifeline.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => break,
            }
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => format!("{status}, after a kill"),
            Err(e) => format!("wait failed: {e}"),
        }
    }

    /// The `git://` URL of the repository at `repo_name` (a path relative to the base
    /// directory, such as `alice/hello.git`).
    pub fn url(&self, repo_name: &str) -> String {
        format!(
            "git://{}:{}/{}",
            self.addr.ip(),
            self.addr.port(),
            repo_name.trim_start_matches('/')
        )
    }

    /// The address the daemon listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The directory whose repositories the daemon serves (canonicalised).
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Creates (or opens) the served bare repository `name` under the base directory; see
    /// [`served_repo`].
    pub fn repo(&self, name: &str) -> PathBuf {
        served_repo(&self.base_dir, name)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Start {
    /// Someone else bound the port between our probe and the daemon: try another port.
    PortTaken(io::Error),
    Failed(io::Error),
}

/// Creates a bare repository at `path` (and its parent directories), or opens the one that is
/// there, and returns `path`. This is the kind of repository the engine fetches into.
///
/// # Panics
/// When libgit2 cannot create or open it.
pub fn init_bare(path: &Path) -> PathBuf {
    if let Err(e) = Repository::init_bare(path) {
        panic!(
            "testkit: cannot create bare repository {}: {e}",
            path.display()
        );
    }
    path.to_path_buf()
}

/// Creates a bare repository `name` (a relative path such as `alice/hello.git`) under
/// `base_dir` to be served by a [`GitDaemon`], and returns its path.
///
/// Its configuration lets clients fetch any commit by id
/// (`uploadpack.allowReachableSHA1InWant` and `uploadpack.allowTipSHA1InWant`), as the
/// engine does, and a `git-daemon-export-ok` file marks it as exported even without
/// `--export-all`.
///
/// # Panics
/// When libgit2 cannot create the repository or write its configuration.
pub fn served_repo(base_dir: &Path, name: &str) -> PathBuf {
    let path = base_dir.join(name.trim_start_matches('/'));
    init_bare(&path);
    let repo = open(&path);
    let mut config = repo
        .config()
        .and_then(|c| c.open_level(git2::ConfigLevel::Local))
        .unwrap_or_else(|e| panic!("testkit: config of {}: {e}", path.display()));
    for key in [
        "uploadpack.allowReachableSHA1InWant",
        "uploadpack.allowTipSHA1InWant",
    ] {
        if let Err(e) = config.set_bool(key, true) {
            panic!("testkit: cannot set {key} in {}: {e}", path.display());
        }
    }
    if let Err(e) = std::fs::write(path.join("git-daemon-export-ok"), b"") {
        panic!("testkit: cannot mark {} as exported: {e}", path.display());
    }
    path
}

fn open(path: &Path) -> Repository {
    Repository::open_bare(path).unwrap_or_else(|e| {
        panic!(
            "testkit: cannot open bare repository {}: {e}",
            path.display()
        )
    })
}

fn fixed_signature() -> Signature<'static> {
    Signature::new(AUTHOR_NAME, AUTHOR_EMAIL, &Time::new(COMMIT_TIME, 0))
        .expect("the fixed signature is valid")
}

fn oid(o: git2::Oid) -> ObjectId {
    let mut b = [0u8; 20];
    b.copy_from_slice(&o.as_bytes()[..20]);
    ObjectId::from_bytes(b)
}

/// Creates a commit on `branch` (`refs/heads/<branch>`) of the repository at `repo`: its tree
/// is the branch tip's tree (empty for a new branch) with `files` written in (paths may contain
/// `/`; data replaces a file of the same path), its parent is the tip, and author, committer
/// and time are fixed ([`AUTHOR_NAME`], [`AUTHOR_EMAIL`], [`COMMIT_TIME`]).
///
/// Because nothing depends on the wall clock, the same sequence of calls gives the same commit
/// ids in any repository: to put one commit on two mirrors, make the same calls on both (or
/// copy it with [`push_all`]).
///
/// # Panics
/// When libgit2 fails, or a path is empty.
pub fn commit(repo: &Path, branch: &str, files: &[(&str, &[u8])], message: &str) -> ObjectId {
    let fail = |what: &str, e: git2::Error| -> ! {
        panic!(
            "testkit: cannot {what} in {} (branch {branch}): {e}",
            repo.display()
        )
    };
    let r = open(repo);
    let refname = format!("refs/heads/{branch}");
    let parent = match r.find_reference(&refname) {
        Ok(reference) => Some(
            reference
                .peel_to_commit()
                .unwrap_or_else(|e| fail("read the branch tip", e)),
        ),
        Err(e) if e.code() == git2::ErrorCode::NotFound => None,
        Err(e) => fail("read the branch", e),
    };
    let baseline = match &parent {
        Some(c) => c.tree().unwrap_or_else(|e| fail("read the tip's tree", e)),
        None => {
            let empty = r
                .treebuilder(None)
                .and_then(|b| b.write())
                .unwrap_or_else(|e| fail("write the empty tree", e));
            r.find_tree(empty)
                .unwrap_or_else(|e| fail("read the empty tree", e))
        }
    };
    let mut update = git2::build::TreeUpdateBuilder::new();
    for (path, data) in files {
        assert!(!path.is_empty(), "testkit: empty file path");
        let blob = r.blob(data).unwrap_or_else(|e| fail("write a blob", e));
        update.upsert(*path, blob, FileMode::Blob);
    }
    let tree_id = update
        .create_updated(&r, &baseline)
        .unwrap_or_else(|e| fail("write the tree", e));
    let tree = r
        .find_tree(tree_id)
        .unwrap_or_else(|e| fail("read the tree", e));
    let sig = fixed_signature();
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let id = r
        .commit(Some(&refname), &sig, &sig, message, &tree, &parents)
        .unwrap_or_else(|e| fail("write the commit", e));
    oid(id)
}

/// Copies every ref of the repository at `from` (`+refs/*:refs/*`), with the objects they
/// reach, into the repository at `to`, through libgit2's local transport. This is how a test
/// simulates a `git push` to the host or seeds a second mirror.
///
/// # Panics
/// When either repository cannot be opened or the fetch fails.
pub fn push_all(from: &Path, to: &Path) {
    let target = open(to);
    let source = std::fs::canonicalize(from)
        .unwrap_or_else(|e| panic!("testkit: cannot resolve {}: {e}", from.display()));
    let url = source
        .to_str()
        .unwrap_or_else(|| panic!("testkit: path {} is not UTF-8", source.display()));
    let result = target.remote_anonymous(url).and_then(|mut remote| {
        let mut options = git2::FetchOptions::new();
        options
            .download_tags(git2::AutotagOption::None)
            .update_fetchhead(false);
        remote.fetch(&["+refs/*:refs/*"], Some(&mut options), None)
    });
    if let Err(e) = result {
        panic!(
            "testkit: cannot copy refs of {} into {}: {e}",
            from.display(),
            to.display()
        );
    }
}

/// Whether the object `oid` is in the object database of the repository at `repo`.
///
/// # Panics
/// When the repository cannot be opened.
pub fn has_object(repo: &Path, oid: ObjectId) -> bool {
    let r = open(repo);
    let odb = r
        .odb()
        .unwrap_or_else(|e| panic!("testkit: object database of {}: {e}", repo.display()));
    let git = git2::Oid::from_bytes(oid.as_bytes()).expect("20 bytes is a valid oid");
    odb.exists(git)
}

/// The names of the refs of the repository at `repo` that start with `prefix` (such as
/// [`TEMP_REF_PREFIX`](crate::TEMP_REF_PREFIX)), sorted.
///
/// # Panics
/// When the repository cannot be opened or its refs read.
pub fn refs_with_prefix(repo: &Path, prefix: &str) -> Vec<String> {
    let r = open(repo);
    let refs = r
        .references()
        .unwrap_or_else(|e| panic!("testkit: refs of {}: {e}", repo.display()));
    let mut names: Vec<String> = refs
        .filter_map(|reference| reference.ok()?.name().ok().map(str::to_owned))
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("purgatory-testkit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    #[test]
    fn commits_are_deterministic_across_repositories() {
        let dir = scratch("determinism");
        let a = init_bare(&dir.join("a.git"));
        let b = served_repo(&dir.join("served"), "b.git");
        let make = |repo: &Path| {
            let one = commit(repo, "main", &[("README", b"one\n")], "one");
            let two = commit(repo, "main", &[("src/lib.rs", b"two\n")], "two");
            let side = commit(repo, "side", &[("x", b"x")], "side");
            (one, two, side)
        };
        let ids_a = make(&a);
        assert_eq!(ids_a, make(&b));
        assert_ne!(ids_a.0, ids_a.1);
        assert!(has_object(&a, ids_a.1));

        // The second commit keeps the first one's file and has it as parent.
        let r = open(&a);
        let two = r
            .find_commit(git2::Oid::from_bytes(ids_a.1.as_bytes()).unwrap())
            .unwrap();
        assert_eq!(two.parent_count(), 1);
        assert!(two.tree().unwrap().get_path(Path::new("README")).is_ok());
        assert!(two
            .tree()
            .unwrap()
            .get_path(Path::new("src/lib.rs"))
            .is_ok());

        // Copying brings every ref and object.
        let c = init_bare(&dir.join("c.git"));
        assert!(!has_object(&c, ids_a.2));
        push_all(&a, &c);
        assert!(has_object(&c, ids_a.0) && has_object(&c, ids_a.2));
        assert_eq!(
            refs_with_prefix(&c, "refs/heads/"),
            ["refs/heads/main", "refs/heads/side"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn daemons_serve_commits_by_id_on_several_addresses() {
        require_git();
        let dir = scratch("daemon");
        let mut daemons = Vec::new();
        for host in [2u8, 2, 3] {
            let base = dir.join(format!("m{}", daemons.len()));
            let served = served_repo(&base, "x/repo.git");
            let first = commit(&served, "main", &[("f", b"1")], "first");
            let tip = commit(&served, "main", &[("f", b"2")], "second");
            let daemon = GitDaemon::start(Ipv4Addr::new(127, 0, 0, host), &base).expect("start");
            assert_eq!(daemon.addr().ip(), &Ipv4Addr::new(127, 0, 0, host));
            daemons.push((daemon, first, tip));
        }
        // Two daemons on one address get different ports.
        assert_ne!(daemons[0].0.addr(), daemons[1].0.addr());

        for (i, (daemon, first, tip)) in daemons.iter().enumerate() {
            let target = init_bare(&dir.join(format!("t{i}.git")));
            let r = open(&target);
            let url = daemon.url("x/repo.git");
            assert!(url.starts_with("git://127.0.0."), "{url}");
            let mut remote = r.remote_anonymous(&url).unwrap();
            // A non-tip commit, by id: needs allowReachableSHA1InWant.
            remote.fetch(&[first.to_string()], None, None).unwrap();
            assert!(has_object(&target, *first));
            assert!(!has_object(&target, *tip));
            // An id the server lacks is refused.
            let unknown = "1111111111111111111111111111111111111111";
            assert!(remote.fetch(&[unknown], None, None).is_err());
        }

        // A port someone else listens on is reported as taken (start() then tries another).
        let taken = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 3), 0)).unwrap();
        let Ok(SocketAddr::V4(addr)) = taken.local_addr() else {
            panic!("an IPv4 listener")
        };
        let program = daemon_program().unwrap();
        match GitDaemon::try_start(program, addr, &dir) {
            Err(Start::PortTaken(e)) => assert!(e.to_string().contains("unable"), "{e}"),
            Err(Start::Failed(e)) => panic!("expected PortTaken, got {e}"),
            Ok(d) => panic!("started on a taken port: {d:?}"),
        }

        // Dropping a daemon kills it: its port stops answering.
        let (daemon, _, _) = daemons.pop().unwrap();
        let addr = daemon.addr();
        drop(daemon);
        assert!(TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)).is_err());
        drop(daemons);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
