//! The test kit's servers work: `git http-backend` behind `HttpGitServer`, its faults, the
//! `git://` `FaultyTcpServer`, the `DelayProxy` in front of both, the request log, and the
//! fixtures they serve.
//!
//! Clients are the `git` command-line tool (protocol v2 by default, v0 with
//! `-c protocol.version=0`) and libgit2 through `git2` (protocol v0 only), with no engine in
//! between. Messages libgit2 gives for each failure are asserted loosely (a stable part of
//! the text) and printed, so that `--nocapture` shows them whole.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use purgatory_sync::ObjectId;
use purgatory_sync_testkit::{
    self as testkit, DelayProxy, Fault, FaultTarget, FaultyTcpServer, GitDaemon, HttpGitServer,
    RequestRecord, TcpFault, WantPolicy,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HOST_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const HOST_C: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const REPO: &str = "alice/hello.git";
/// How long a server may take to log the end of a request its client already saw end.
const SETTLE: Duration = Duration::from_secs(5);

/// A served repository with two commits on `main`: `first` (reachable, not a tip) and `tip`.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    served: PathBuf,
    first: ObjectId,
    tip: ObjectId,
}

fn fixture(policy: WantPolicy) -> Fixture {
    let _ = env_logger::builder().is_test(true).try_init();
    testkit::require_git();
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().join("served");
    let served = testkit::served_repo_with(&base, REPO, policy);
    let first = testkit::commit(&served, "main", &[("README", b"hello\n")], "first");
    let tip = testkit::commit(&served, "main", &[("README", b"hello again\n")], "second");
    Fixture {
        dir,
        base,
        served,
        first,
        tip,
    }
}

impl Fixture {
    /// A new empty bare repository to fetch into.
    fn target(&self, name: &str) -> PathBuf {
        testkit::init_bare(&self.dir.path().join("targets").join(name))
    }

    fn http(&self, ip: Ipv4Addr) -> HttpGitServer {
        HttpGitServer::start(ip, &self.base).unwrap_or_else(|e| panic!("http server on {ip}: {e}"))
    }
}

/// Runs `git` (isolated from the user's configuration) in `dir`.
fn git(dir: &Path, args: &[&str]) -> Output {
    testkit::git_command()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("git runs")
}

fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `git`, expects it to fail, and returns its error output.
fn git_fails(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "git {args:?} succeeded: {stderr}");
    eprintln!("git {args:?}: {stderr}");
    stderr
}

/// Fetches `specs` (object ids or refspecs) from `url` into the bare repository `target`
/// with libgit2.
fn git2_fetch(target: &Path, url: &str, specs: &[String]) -> Result<(), git2::Error> {
    let repo = git2::Repository::open_bare(target)?;
    let mut remote = repo.remote_anonymous(url)?;
    let mut options = git2::FetchOptions::new();
    options
        .download_tags(git2::AutotagOption::None)
        .update_fetchhead(false);
    remote.fetch(specs, Some(&mut options), None)
}

/// Like [`git2_fetch`], expecting an error; prints and returns it.
fn git2_fails(what: &str, target: &Path, url: &str, specs: &[String]) -> git2::Error {
    match git2_fetch(target, url, specs) {
        Ok(()) => panic!("{what}: the fetch from {url} succeeded"),
        Err(e) => {
            eprintln!(
                "{what}: libgit2 class {:?}, code {:?}: {}",
                e.class(),
                e.code(),
                e.message()
            );
            e
        }
    }
}

/// Sends a raw HTTP/1.1 GET and returns the whole response (the server closes after it).
fn http_get(server: &HttpGitServer, path: &str) -> String {
    let mut stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: raw\r\n\r\n",
        server.addr()
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("a whole response");
    String::from_utf8_lossy(&response).into_owned()
}

fn info_refs(repo: &str) -> String {
    format!("/{repo}/info/refs?service=git-upload-pack")
}

/// The logged requests to `path_prefix`.
fn logged(records: &[RequestRecord], path_prefix: &str) -> Vec<RequestRecord> {
    records
        .iter()
        .filter(|r| r.path.starts_with(path_prefix))
        .cloned()
        .collect()
}

/// Kills a child if it is still running after `within`; true if it was still running.
fn still_running_after(child: &mut Child, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

#[test]
fn git_cli_clones_and_fetches_over_http_with_protocol_v2_and_v0() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    assert!(url.starts_with("http://127.0.0.2:") && url.ends_with("/alice/hello.git"));
    let work = fx.dir.path();

    for (version, dest) in [("2", "v2.git"), ("0", "v0.git")] {
        server.clear_requests();
        let protocol = format!("protocol.version={version}");
        git_ok(work, &["-c", &protocol, "clone", "--bare", &url, dest]);
        let clone = work.join(dest);
        assert!(testkit::has_object(&clone, fx.tip) && testkit::has_object(&clone, fx.first));

        // A new commit arrives with `git fetch`.
        let next = testkit::commit(
            &fx.served,
            "main",
            &[("f", version.as_bytes())],
            &format!("for v{version}"),
        );
        git_ok(
            &clone,
            &["-c", &protocol, "fetch", &url, "+refs/heads/*:refs/heads/*"],
        );
        assert!(testkit::has_object(&clone, next));

        assert!(server.wait_idle(SETTLE));
        let records = server.requests();
        let gets = logged(&records, &info_refs(REPO));
        let posts = logged(&records, &format!("/{REPO}/git-upload-pack"));
        assert_eq!(gets.len(), 2, "{records:#?}");
        assert!(posts.len() >= 2, "{records:#?}");
        for r in gets.iter().chain(&posts) {
            assert_eq!(r.host, server.addr().to_string());
            assert_eq!(r.status, 200);
            assert!(
                r.finished && r.bytes_sent > 0 && r.started <= r.ended,
                "{r:?}"
            );
        }
        assert!(gets.iter().all(|r| r.method == "GET"));
        assert!(posts.iter().all(|r| r.method == "POST"));
        assert!(gets[0].ended <= posts[0].started);
    }

    // An unknown repository is a 404.
    let missing = server.url("nobody/nothing.git");
    let stderr = git_fails(work, &["ls-remote", &missing]);
    assert!(stderr.contains("not found"), "{stderr}");
    assert!(server.wait_idle(SETTLE));
    let last = server.requests().pop().unwrap();
    assert_eq!(
        (last.status, last.path),
        (404, info_refs("nobody/nothing.git"))
    );
}

#[test]
fn want_policies_decide_fetches_by_id() {
    // A commit no ref reaches: only `Any` gives it out.
    let make_dangling = |served: &Path| -> ObjectId {
        let id = testkit::commit(served, "tmp", &[("dangling", b"x")], "dangling");
        let repo = git2::Repository::open_bare(served).unwrap();
        repo.find_reference("refs/heads/tmp")
            .unwrap()
            .delete()
            .unwrap();
        id
    };
    let fx = fixture(WantPolicy::None);
    let server = fx.http(HOST_A);
    let daemon = GitDaemon::start(HOST_B, &fx.base).expect("git daemon");
    let dangling = make_dangling(&fx.served);
    let work = fx.dir.path();
    let http_url = server.url(REPO);
    let git_url = daemon.url(REPO);
    for policy in WantPolicy::ALL {
        testkit::served_repo_with(&fx.base, REPO, policy);
        for (name, oid) in [
            ("tip", fx.tip),
            ("reachable", fx.first),
            ("dangling", dangling),
        ] {
            // Over HTTP, upload-pack is stateless: it cannot know what it advertised, so with
            // `Tip` it accepts any want reachable from a tip, like `Reachable`.
            let allowed_over_http = match name {
                "tip" => true,
                "reachable" => policy != WantPolicy::None,
                _ => policy == WantPolicy::Any,
            };
            let allowed_over_git = match name {
                "tip" => true,
                "reachable" => matches!(policy, WantPolicy::Reachable | WantPolicy::Any),
                _ => policy == WantPolicy::Any,
            };
            // The git CLI, protocol v0, over HTTP.
            let target = fx.target(&format!("{policy:?}-{name}-cli.git"));
            let target_s = target.to_str().unwrap();
            let oid_s = oid.to_string();
            let args = [
                "-c",
                "protocol.version=0",
                "--git-dir",
                target_s,
                "fetch",
                &http_url,
                &oid_s,
            ];
            if allowed_over_http {
                git_ok(work, &args);
                assert!(testkit::has_object(&target, oid), "{policy:?} {name}");
            } else {
                let stderr = git_fails(work, &args);
                assert!(
                    stderr.contains("not our ref")
                        || stderr.contains("does not allow request for unadvertised object"),
                    "{policy:?} {name}: {stderr}"
                );
            }
            // libgit2 over HTTP and over git://.
            // libgit2 asks for an object by id only if the server advertises one of the
            // settings, even for an advertised tip.
            for (transport, url, allowed) in [
                (
                    "http",
                    &http_url,
                    allowed_over_http && policy != WantPolicy::None,
                ),
                (
                    "git",
                    &git_url,
                    allowed_over_git && policy != WantPolicy::None,
                ),
            ] {
                let target = fx.target(&format!("{policy:?}-{name}-{transport}.git"));
                let what = format!("{transport}://, {policy:?}, {name}");
                if allowed {
                    git2_fetch(&target, url, std::slice::from_ref(&oid_s))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(testkit::has_object(&target, oid), "{what}");
                } else {
                    let e = git2_fails(&what, &target, url, std::slice::from_ref(&oid_s));
                    if policy == WantPolicy::None {
                        // libgit2 refuses before asking.
                        assert!(
                            e.message().contains("cannot fetch a specific object"),
                            "{e}"
                        );
                    }
                }
            }
        }
    }

    // Protocol v2 ignores the policy: even a dangling commit comes.
    testkit::served_repo_with(&fx.base, REPO, WantPolicy::None);
    let target = fx.target("v2-dangling.git");
    let target_s = target.to_str().unwrap();
    git_ok(
        work,
        &[
            "--git-dir",
            target_s,
            "fetch",
            &http_url,
            &dangling.to_string(),
        ],
    );
    assert!(testkit::has_object(&target, dangling));
}

#[test]
fn git2_fetches_by_id_over_http_only_when_the_server_allows_it() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    let target = fx.target("reachable.git");
    git2_fetch(&target, &url, &[fx.first.to_string()]).expect("fetch a reachable commit by id");
    assert!(testkit::has_object(&target, fx.first) && !testkit::has_object(&target, fx.tip));

    // An object the server lacks.
    let unknown = "1111111111111111111111111111111111111111".to_owned();
    let e = git2_fails("http, object missing", &target, &url, &[unknown]);
    assert_ne!(e.message(), "");

    // The same over git://.
    let daemon = GitDaemon::start(HOST_B, &fx.base).expect("git daemon");
    let e = git2_fails(
        "git://, object missing",
        &target,
        &daemon.url(REPO),
        &["1111111111111111111111111111111111111111".to_owned()],
    );
    assert_ne!(e.message(), "");

    // Tip only: over HTTP the stateless server still gives out what the tips reach.
    testkit::served_repo_with(&fx.base, REPO, WantPolicy::Tip);
    let target = fx.target("tip.git");
    git2_fetch(&target, &url, &[fx.first.to_string()]).expect("a reachable commit, Tip, http");
    git2_fetch(&target, &url, &[fx.tip.to_string()]).expect("a tip by id");

    // Nothing allowed: libgit2 refuses before asking.
    testkit::served_repo_with(&fx.base, REPO, WantPolicy::None);
    let target = fx.target("none.git");
    let e = git2_fails("http, None", &target, &url, &[fx.first.to_string()]);
    assert!(
        e.message().contains("cannot fetch a specific object"),
        "{e}"
    );
}

#[test]
fn status_faults_answer_that_status() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    let work = fx.dir.path();
    let target = fx.target("t.git");
    for code in [500u16, 404, 503] {
        server.set_fault(Fault::Status(code));
        assert_eq!(server.fault(FaultTarget::InfoRefs), Fault::Status(code));
        let response = http_get(&server, &info_refs(REPO));
        assert!(
            response.starts_with(&format!("HTTP/1.1 {code} ")),
            "{response}"
        );
        let stderr = git_fails(work, &["ls-remote", &url]);
        assert!(
            stderr.contains(&code.to_string()) || stderr.contains("not found"),
            "{stderr}"
        );
        let e = git2_fails(
            &format!("http, status {code}"),
            &target,
            &url,
            &[fx.tip.to_string()],
        );
        assert_ne!(e.message(), "");
        assert!(server.wait_idle(SETTLE));
        let records = server.requests();
        assert!(
            records.iter().rev().take(3).all(|r| r.status == code),
            "{records:#?}"
        );
    }
    // Only the pack phase fails.
    server.set_fault(Fault::None);
    server.set_fault_on(FaultTarget::UploadPack, Fault::Status(500));
    assert_eq!(server.fault(FaultTarget::InfoRefs), Fault::None);
    // (Protocol v2 lists refs with a POST too.)
    git_ok(work, &["-c", "protocol.version=0", "ls-remote", &url]);
    git_fails(work, &["ls-remote", &url]);
    server.clear_requests();
    let e = git2_fails(
        "http, status 500 on upload-pack",
        &target,
        &url,
        &[fx.tip.to_string()],
    );
    assert_ne!(e.message(), "");
    assert!(server.wait_idle(SETTLE));
    let statuses: Vec<(String, u16)> = server
        .requests()
        .into_iter()
        .map(|r| (r.method, r.status))
        .collect();
    assert_eq!(
        statuses,
        [("GET".to_owned(), 200), ("POST".to_owned(), 500)]
    );
    // Healed.
    server.set_fault(Fault::None);
    git2_fetch(&target, &url, &[fx.tip.to_string()]).expect("healed");
}

#[test]
fn redirect_fault_sends_clients_to_another_host() {
    let fx = fixture(WantPolicy::Reachable);
    let moved = fx.http(HOST_A);
    let home = fx.http(HOST_B);
    moved.set_fault(Fault::RedirectTo(home.url("")));
    let response = http_get(&moved, &info_refs(REPO));
    let expected = format!("Location: {}", home.url(&info_refs(REPO)[1..]));
    assert!(response.starts_with("HTTP/1.1 302 Found\r\n"), "{response}");
    assert!(response.contains(&expected), "{response}");

    // The git CLI follows the initial redirect.
    let work = fx.dir.path();
    let url = moved.url(REPO);
    let out = git_ok(work, &["ls-remote", &url]);
    assert!(out.contains(&fx.tip.to_string()), "{out}");
    // libgit2 too: it follows redirects of the first request by default.
    let target = fx.target("t.git");
    git2_fetch(&target, &url, &[fx.first.to_string()]).expect("libgit2 follows the redirect");
    assert!(testkit::has_object(&target, fx.first));
    assert!(moved.wait_idle(SETTLE) && home.wait_idle(SETTLE));
    let from = moved.requests();
    assert!(from.iter().all(|r| r.status == 302), "{from:#?}");

    // A redirect of the pack request (not the first request) is not followed by libgit2.
    moved.set_fault(Fault::None);
    moved.set_fault_on(FaultTarget::UploadPack, Fault::RedirectTo(home.url("")));
    let target = fx.target("later.git");
    let e = git2_fails(
        "http, redirect of upload-pack",
        &target,
        &url,
        &[fx.tip.to_string()],
    );
    assert!(e.message().contains("redirect"), "{e}");
    let to = home.requests();
    assert!(
        to.iter()
            .any(|r| r.host == home.addr().to_string() && r.status == 200),
        "{to:#?}"
    );
}

#[test]
fn hang_fault_keeps_clients_waiting_until_they_give_up_or_the_server_goes() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    server.set_fault(Fault::Hang);
    let url = server.url(REPO);
    let work = fx.dir.path();

    // curl's low-speed limit stands in for a client timeout.
    let began = Instant::now();
    let stderr = git_fails(
        work,
        &[
            "-c",
            "http.lowSpeedLimit=1000",
            "-c",
            "http.lowSpeedTime=1",
            "ls-remote",
            &url,
        ],
    );
    assert!(began.elapsed() < Duration::from_secs(8), "{stderr}");
    // Once the client closed, the request is over, without a status.
    assert!(server.wait_idle(SETTLE));
    let record = server.requests().pop().expect("logged");
    assert!(record.finished, "{record:?}");
    assert_eq!((record.status, record.bytes_sent), (0, 0));
    assert!(
        record.duration() >= Duration::from_millis(900),
        "{record:?}"
    );

    // libgit2 (no timeout set here) waits until the server is dropped.
    let target = fx.target("t.git");
    let fetch = {
        let url = url.clone();
        let target = target.clone();
        let spec = fx.tip.to_string();
        std::thread::spawn(move || git2_fetch(&target, &url, &[spec]))
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!fetch.is_finished());
    let in_progress = server.requests().pop().unwrap();
    assert!(
        !in_progress.finished && in_progress.status == 0,
        "{in_progress:?}"
    );
    let dropped = Instant::now();
    drop(server);
    assert!(dropped.elapsed() < Duration::from_secs(5));
    let e = fetch.join().unwrap().expect_err("the hung fetch fails");
    eprintln!(
        "libgit2 when a hanging http server goes away: class {:?}, code {:?}: {}",
        e.class(),
        e.code(),
        e.message()
    );
}

#[test]
fn drip_fault_serves_slowly() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    let work = fx.dir.path();

    // One byte a second is too slow for a client that wants 1000.
    server.set_fault(Fault::Drip { bytes_per_sec: 1 });
    let stderr = git_fails(
        work,
        &[
            "-c",
            "http.lowSpeedLimit=1000",
            "-c",
            "http.lowSpeedTime=1",
            "ls-remote",
            &url,
        ],
    );
    assert!(!stderr.is_empty());
    assert!(server.wait_idle(SETTLE));
    let slow = server.requests().pop().unwrap();
    // A few bytes of a response of several hundred.
    assert!(slow.bytes_sent <= 10, "{slow:?}");

    // 4000 bytes a second: a whole fetch works, at that speed.
    server.clear_requests();
    server.set_fault(Fault::Drip {
        bytes_per_sec: 4000,
    });
    let target = fx.target("t.git");
    git2_fetch(&target, &url, &[fx.first.to_string()]).expect("a slow fetch");
    assert!(testkit::has_object(&target, fx.first));
    assert!(server.wait_idle(SETTLE));
    for r in server.requests() {
        // The first byte goes at once, the rest at the rate.
        let floor = Duration::from_secs_f64((r.bytes_sent as f64 - 200.0).max(0.0) / 4000.0);
        assert!(r.status == 200 && r.duration() >= floor, "{r:?}");
    }
}

#[test]
fn garbage_fault_breaks_both_phases() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    let work = fx.dir.path();
    let target = fx.target("t.git");

    server.set_fault(Fault::Garbage);
    let response = http_get(&server, &info_refs(REPO));
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("Content-Type: application/x-git-upload-pack-advertisement"));
    git_fails(work, &["ls-remote", &url]);
    git2_fails("http, garbage refs", &target, &url, &[fx.tip.to_string()]);

    server.set_fault(Fault::None);
    server.set_fault_on(FaultTarget::UploadPack, Fault::Garbage);
    git_ok(work, &["-c", "protocol.version=0", "ls-remote", &url]);
    git2_fails("http, garbage pack", &target, &url, &[fx.tip.to_string()]);
    assert!(!testkit::has_object(&target, fx.tip));
}

#[test]
fn close_mid_pack_fault_cuts_the_pack() {
    let fx = fixture(WantPolicy::Reachable);
    let big = testkit::commit_large(&fx.served, "main", 200_000, 1);
    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    let work = fx.dir.path();
    server.set_fault_on(
        FaultTarget::UploadPack,
        Fault::CloseMidPack { after_bytes: 1000 },
    );
    // The ref advertisement is whole.
    git_ok(work, &["-c", "protocol.version=0", "ls-remote", &url]);
    git_fails(
        work,
        &[
            "-c",
            "protocol.version=0",
            "clone",
            "--bare",
            &url,
            "cli.git",
        ],
    );
    let target = fx.target("t.git");
    server.clear_requests();
    git2_fails("http, cut mid-pack", &target, &url, &[big.to_string()]);
    assert!(!testkit::has_object(&target, big));
    assert!(server.wait_idle(SETTLE));
    let records = server.requests();
    let post = logged(&records, &format!("/{REPO}/git-upload-pack"));
    assert_eq!(post.len(), 1, "{records:#?}");
    assert_eq!(post[0].status, 200);
    // Headers plus 1000 bytes of body.
    assert!(
        post[0].bytes_sent > 1000 && post[0].bytes_sent < 1500,
        "{:?}",
        post[0]
    );

    // Healed, the whole pack comes, about as large as the incompressible blob.
    server.set_fault(Fault::None);
    server.clear_requests();
    git2_fetch(&target, &url, &[big.to_string()]).expect("whole pack");
    assert!(testkit::has_object(&target, big));
    assert!(server.wait_idle(SETTLE));
    let post = logged(&server.requests(), &format!("/{REPO}/git-upload-pack"));
    assert!(post[0].bytes_sent > 200_000, "{:?}", post[0]);
}

#[test]
fn request_log_measures_concurrency() {
    let fx = fixture(WantPolicy::Reachable);
    let server = fx.http(HOST_A);
    // About 0.35 s per answer. Both requests are sent before either answer is read, so
    // they overlap however the threads are scheduled.
    server.set_fault(Fault::Drip {
        bytes_per_sec: 1000,
    });
    let path = info_refs(REPO);
    let mut connections: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
                server.addr()
            )
            .unwrap();
            stream
        })
        .collect();
    let both: Vec<String> = connections
        .iter_mut()
        .map(|stream| {
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .collect();
    assert!(both.iter().all(|r| r.starts_with("HTTP/1.1 200 OK")));
    assert!(server.wait_idle(SETTLE));
    let records = server.requests();
    assert_eq!(records.len(), 2);
    assert_eq!(server.max_concurrent_requests(), 2, "{records:#?}");
    for r in &records {
        assert!(
            r.finished && r.duration() >= Duration::from_millis(150),
            "{r:?}"
        );
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", path.as_str()));
    }

    // One after the other: never more than one.
    server.clear_requests();
    server.set_fault(Fault::None);
    http_get(&server, &path);
    assert!(server.wait_idle(SETTLE));
    http_get(&server, &path);
    assert!(server.wait_idle(SETTLE));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(server.max_concurrent_requests(), 1);
    let records = server.requests();
    assert!(records[0].ended <= records[1].started);
    assert_eq!(testkit::max_concurrent(&records[..1]), 1);
}

#[test]
fn faulty_tcp_server_relays_and_misbehaves() {
    let fx = fixture(WantPolicy::Reachable);
    let big = testkit::commit_large(&fx.served, "main", 100_000, 2);
    let daemon = GitDaemon::start(HOST_A, &fx.base).expect("git daemon");
    let proxy = FaultyTcpServer::start(HOST_C, daemon.addr(), TcpFault::None).expect("proxy");
    assert_eq!(proxy.upstream(), daemon.addr());
    let url = proxy.url(REPO);
    assert!(url.starts_with("git://127.0.0.4:"), "{url}");

    // Faithful.
    let target = fx.target("none.git");
    git2_fetch(&target, &url, &[fx.first.to_string()]).expect("through the proxy");
    assert!(testkit::has_object(&target, fx.first));
    assert!(proxy.wait_idle(SETTLE));
    let record = proxy.requests().pop().unwrap();
    assert_eq!(record.method, "git-upload-pack");
    assert_eq!(record.path, format!("/{REPO}"));
    // libgit2 names the host without the port in `git://` requests.
    assert_eq!(record.host, proxy.addr().ip().to_string());
    assert!(record.finished && record.bytes_sent > 0 && record.status == 0);

    // Garbage.
    proxy.set_fault(TcpFault::Garbage);
    git2_fails("git://, garbage", &target, &url, &[fx.tip.to_string()]);

    // Cut after the advertisement.
    proxy.set_fault(TcpFault::CloseMidPack { after_bytes: 500 });
    proxy.clear_requests();
    git2_fails("git://, cut mid-pack", &target, &url, &[big.to_string()]);
    assert!(!testkit::has_object(&target, big));
    assert!(proxy.wait_idle(SETTLE));
    let cut = proxy.requests().pop().unwrap();
    assert!(cut.bytes_sent > 500 && cut.bytes_sent < 5000, "{cut:?}");

    // Drip: the advertisement alone takes a while.
    proxy.set_fault(TcpFault::Drip { bytes_per_sec: 40 });
    let mut raw = TcpStream::connect(proxy.addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("git-upload-pack /{REPO}\0host={}\0", proxy.addr());
    write!(raw, "{:04x}{request}", request.len() + 4).unwrap();
    let began = Instant::now();
    let mut first = [0u8; 20];
    raw.read_exact(&mut first).unwrap();
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(350), "{took:?}");
    assert!(std::str::from_utf8(&first[..4]).is_ok_and(|h| u16::from_str_radix(h, 16).is_ok()));
    drop(raw);

    // Hang: a raw client times out; libgit2 waits until the server goes.
    proxy.set_fault(TcpFault::Hang);
    let mut raw = TcpStream::connect(proxy.addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    write!(raw, "{:04x}{request}", request.len() + 4).unwrap();
    let mut byte = [0u8; 1];
    let e = raw.read(&mut byte).expect_err("no answer");
    assert!(matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    drop(raw);
    let mut cli = testkit::git_command()
        .args(["ls-remote", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(still_running_after(&mut cli, Duration::from_millis(500)));
    let fetch = {
        let (url, target, spec) = (url.clone(), target.clone(), fx.tip.to_string());
        std::thread::spawn(move || git2_fetch(&target, &url, &[spec]))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!fetch.is_finished());
    drop(proxy);
    let e = fetch.join().unwrap().expect_err("the hung fetch fails");
    eprintln!(
        "libgit2 when a hanging git:// server goes away: class {:?}, code {:?}: {}",
        e.class(),
        e.code(),
        e.message()
    );
}

#[test]
fn fetches_through_a_delay_proxy_work_over_git_and_http_and_pay_the_round_trips() {
    let fx = fixture(WantPolicy::Reachable);
    let big = testkit::commit_large(&fx.served, "main", 300_000, 3);
    let daemon = GitDaemon::start(HOST_A, &fx.base).expect("git daemon");
    let http = fx.http(HOST_B);
    let one_way = Duration::from_millis(50);
    let rtt = 2 * one_way;
    let git_proxy = DelayProxy::start(HOST_C, daemon.addr(), one_way).expect("proxy");
    let http_proxy = DelayProxy::start(HOST_C, http.addr(), one_way).expect("proxy");
    let git_url = git_proxy.url(REPO);
    let http_url = http_proxy.http_url(REPO);
    assert!(git_url.starts_with("git://127.0.0.4:"), "{git_url}");
    assert!(http_url.starts_with("http://127.0.0.4:"), "{http_url}");

    // libgit2 over git://: the request and its advertisement, then the wants and the pack;
    // over HTTP: GET info/refs, then POST git-upload-pack.
    for (proxy, url) in [(&git_proxy, &git_url), (&http_proxy, &http_url)] {
        for handshake in [false, true] {
            proxy.set_handshake(handshake);
            proxy.clear_requests();
            let target = fx.target(&format!("libgit2-{}-{handshake}.git", proxy.addr().port()));
            let began = Instant::now();
            git2_fetch(&target, url, &[fx.first.to_string(), big.to_string()])
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let took = began.elapsed();
            assert!(testkit::has_object(&target, fx.first) && testkit::has_object(&target, big));
            // A handshake costs a round trip per connection: one over git://, two over HTTP.
            let connections = if proxy.upstream() == daemon.addr() {
                1
            } else {
                2
            };
            let least = if handshake {
                (2 + connections) * rtt
            } else {
                2 * rtt
            };
            eprintln!("libgit2 through {url}, handshake {handshake}: {took:?}");
            assert!(took >= least, "{url}: {took:?}");
            assert!(proxy.wait_idle(SETTLE));
            let records = proxy.requests();
            assert!(records.iter().all(|r| r.finished && r.status == 0));
            if proxy.upstream() == daemon.addr() {
                assert_eq!(records.len(), 1, "{records:#?}");
                assert_eq!(records[0].method, "git-upload-pack");
                assert_eq!(records[0].path, format!("/{REPO}"));
                assert!(records[0].bytes_sent > 300_000, "{records:#?}");
            } else {
                let methods: Vec<&str> = records.iter().map(|r| r.method.as_str()).collect();
                assert_eq!(methods, ["GET", "POST"], "{records:#?}");
                assert_eq!(records[0].path, info_refs(REPO));
                assert_eq!(records[1].path, format!("/{REPO}/git-upload-pack"));
                assert_eq!(records[0].host, http_proxy.addr().to_string());
            }
        }
        proxy.set_handshake(false);
    }
    // The HTTP server behind the proxy logged the same requests.
    assert!(http.wait_idle(SETTLE));
    assert_eq!(http.requests().len(), 4);

    // The git command-line tool, protocol v2, both ways.
    for url in [&git_url, &http_url] {
        let dest = format!("cli-{}.git", url.split(':').next().unwrap_or_default());
        let began = Instant::now();
        git_ok(fx.dir.path(), &["clone", "--bare", url, &dest]);
        eprintln!("git clone through {url}: {:?}", began.elapsed());
        assert!(began.elapsed() >= 2 * rtt);
        assert!(testkit::has_object(&fx.dir.path().join(&dest), big));
    }
    drop((git_proxy, http_proxy));
}

#[test]
fn git_cli_large_requests_are_gzipped_or_chunked_and_still_served() {
    const BRANCHES: usize = 1400;
    let fx = fixture(WantPolicy::Reachable);
    // One distinct commit per branch: a v0 clone wants each of them, 50 bytes a want. Over
    // 1 KiB git gzips the request body; over http.postBuffer (at least 64 KiB) it streams
    // it chunked. Creating files is slow on some disks, so the commits go into one pack
    // (`git fast-import`) and the branches into one `packed-refs` file.
    let mut stream = String::new();
    for i in 0..BRANCHES {
        let from = if i == 0 {
            fx.tip.to_string()
        } else {
            format!(":{i}")
        };
        let message = format!("c{i}");
        stream.push_str(&format!(
            "commit refs/heads/chain\nmark :{}\ncommitter a <a@b.c> 1700000000 +0000\n\
             data {}\n{message}\nfrom {from}\n\n",
            i + 1,
            message.len()
        ));
    }
    let marks = fx.dir.path().join("marks");
    let mut import = testkit::git_command()
        .arg("--git-dir")
        .arg(&fx.served)
        .args(["fast-import", "--quiet"])
        .arg(format!("--export-marks={}", marks.display()))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = import.stdin.take().unwrap();
    input.write_all(stream.as_bytes()).unwrap();
    drop(input);
    assert!(import.wait().unwrap().success());
    let mut refs: Vec<String> = std::fs::read_to_string(&marks)
        .unwrap()
        .lines()
        .map(|line| {
            let (mark, id) = line.split_once(' ').unwrap();
            format!("{id} refs/heads/b{}\n", mark.trim_start_matches(':'))
        })
        .collect();
    assert_eq!(refs.len(), BRANCHES);
    let last: ObjectId = refs[BRANCHES - 1][..40].parse().unwrap();
    refs.sort_by(|a, b| a[41..].cmp(&b[41..]));
    let packed = format!(
        "# pack-refs with: peeled fully-peeled sorted \n{}",
        refs.concat()
    );
    std::fs::write(fx.served.join("packed-refs"), packed).unwrap();

    let server = fx.http(HOST_A);
    let url = server.url(REPO);
    let work = fx.dir.path();
    for (buffer, dest) in [("1m", "gzip.git"), ("65520", "chunked.git")] {
        server.clear_requests();
        let post_buffer = format!("http.postBuffer={buffer}");
        git_ok(
            work,
            &[
                "-c",
                "protocol.version=0",
                "-c",
                &post_buffer,
                "clone",
                "--bare",
                &url,
                dest,
            ],
        );
        assert!(testkit::has_object(&work.join(dest), last));
        assert!(server.wait_idle(SETTLE));
        let posts: Vec<u16> = server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.status)
            .collect();
        // The chunked request is preceded by a small probe.
        assert!(
            !posts.is_empty() && posts.iter().all(|s| *s == 200),
            "{posts:?}"
        );
    }
}
