//! [`GitDaemon`]: `git daemon` on a loopback address.

use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{daemon_program, served_repo, LOG_TARGET};

/// How long [`GitDaemon::start`] waits for one daemon to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a [`GitDaemon`] waits for it to stop before killing its watchdog.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many ports [`GitDaemon::start`] tries before giving up.
const START_ATTEMPTS: u32 = 5;
/// The line `git daemon --verbose` logs once it listens.
const READY_LINE: &str = "Ready to rumble";

/// A `git daemon` serving the bare repositories under one directory over `git://` on a
/// loopback address, read-only (`upload-pack` only). Unix only.
///
/// The daemon runs with an environment isolated from the user's and the system's git
/// configuration, under a small `/bin/sh` watchdog that kills it as soon as the pipe from this
/// process closes: when the handle is dropped, and also when the test process dies without
/// running destructors (killed, aborted), so no daemon outlives its test run. Dropping the
/// handle stops the daemon and waits for it. Its log (`--verbose`) goes to the [`log`] crate at
/// debug level, target `purgatory_sync_testkit`.
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
                    log::debug!(target: LOG_TARGET, "git daemon {addr}: {line}");
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{commit, has_object, init_bare, require_git};

    fn open(path: &Path) -> git2::Repository {
        git2::Repository::open_bare(path).unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("purgatory-testkit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
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
