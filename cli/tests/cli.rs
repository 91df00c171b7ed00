//! The `purgatory-sync` binary: `demo` end to end, and `run` over manifests of real-looking
//! NIP-34 events against loopback git servers, with its exit statuses, JSON lines, metrics
//! endpoint, manifest errors and state-file resume.
//!
//! Every child process runs under a deadline and is killed if it overstays it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use purgatory_sync::nip34::NostrEvent;
use purgatory_sync::ObjectId;
use purgatory_sync_testkit::{self as testkit, GitDaemon, HttpGitServer};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_purgatory-sync");

/// A child process with its stdout and stderr collected line by line on threads.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    out: Vec<String>,
    err: Vec<String>,
}

/// What a finished run printed, and its exit status.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Finished {
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line {l:?}: {e}")))
            .collect()
    }

    fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }
}

fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn start(args: &[&str]) -> Running {
    testkit::require_git();
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start purgatory-sync");
    let stdout = lines(child.stdout.take().expect("piped"));
    let stderr = lines(child.stderr.take().expect("piped"));
    Running {
        child,
        stdout,
        stderr,
        out: Vec::new(),
        err: Vec::new(),
    }
}

impl Running {
    fn pump(&mut self) {
        self.out.extend(self.stdout.try_iter());
        self.err.extend(self.stderr.try_iter());
    }

    /// Waits (bounded) for a stderr line containing `needle` and returns it.
    fn wait_stderr(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.err.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            match self.stderr.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.err.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the process ended before printing {needle:?}: {:?}",
                        self.err
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr within {limit:?}: {:?}",
                self.err
            );
        }
    }

    /// Waits for the process to exit, killing it after `limit`.
    fn finish(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.pump();
                panic!(
                    "purgatory-sync did not exit within {limit:?}\nstdout: {:?}\nstderr: {:?}",
                    self.out, self.err
                );
            }
            self.pump();
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close when the process exits; collect what is left.
        self.out.extend(self.stdout.iter());
        self.err.extend(self.stderr.iter());
        Finished {
            code: status.code(),
            stdout: self.out,
            stderr: self.err,
        }
    }
}

fn run_to_end(args: &[&str], limit: Duration) -> Finished {
    start(args).finish(limit)
}

#[test]
fn demo_releases_events_across_several_hosts_within_a_minute() {
    let started = Instant::now();
    let done = run_to_end(&["demo", "--no-progress"], Duration::from_secs(120));
    let out = done.stdout.join("\n");
    assert_eq!(done.code, Some(0), "{out}\n{}", done.stderr_text());
    assert!(out.contains("The scenario behaved as expected."), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        started.elapsed()
    );
    // The per-domain table lists the five hosts, each asked at least once.
    for role in [
        "full mirror",
        "partial mirror",
        "hangs",
        "refuses",
        "small host",
    ] {
        let row = done
            .stdout
            .iter()
            .find(|l| l.starts_with("127.0.0.") && l.contains(role))
            .unwrap_or_else(|| panic!("no table row for the {role}: {out}"));
        let requests: u64 = row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no request count in {row:?}"));
        assert!(requests > 0, "{row}");
    }
    // Progress went to stderr: one line per outcome (no bar without a terminal).
    let released = done
        .stderr
        .iter()
        .filter(|l| l.starts_with("released"))
        .count();
    assert_eq!(released, 14, "{}", done.stderr_text());
}

// ---------------------------------------------------------------------------------------------
// `run`: a small relay's worth of NIP-34 events.

const ALICE: &str = "a1ce000000000000000000000000000000000000000000000000000000000001";
const BOB: &str = "b0b0000000000000000000000000000000000000000000000000000000000002";
const MAINTAINER: &str = "c0de000000000000000000000000000000000000000000000000000000000003";

/// A Nostr event with a correct id. Signatures are not checked by the tool (the relay checked
/// them before the event entered purgatory), so `sig` is only well-formed.
fn nostr(pubkey: &str, kind: u32, created_at: u64, tags: Vec<Vec<&str>>) -> Value {
    let mut event = NostrEvent {
        id: String::new(),
        pubkey: pubkey.to_owned(),
        created_at,
        kind,
        tags: tags
            .into_iter()
            .map(|t| t.into_iter().map(str::to_owned).collect())
            .collect(),
        content: String::new(),
        sig: "5a".repeat(64),
    };
    event.id = event.computed_id();
    serde_json::to_value(&event).expect("serialise")
}

/// Two mirrors of `alice/hello.git` and what is on them.
struct Upstream {
    _dir: tempfile::TempDir,
    full: GitDaemon,
    partial: HttpGitServer,
    first: ObjectId,
    second: ObjectId,
    feature: ObjectId,
    notes: ObjectId,
}

fn upstream(full_ip: Ipv4Addr, partial_ip: Ipv4Addr) -> Upstream {
    testkit::require_git();
    let dir = tempfile::tempdir().expect("tempdir");
    let full_repo = testkit::served_repo(&dir.path().join("full"), "alice/hello.git");
    let partial_repo = testkit::served_repo(&dir.path().join("partial"), "alice/hello.git");
    let mut first = None;
    for repo in [&full_repo, &partial_repo] {
        first = Some(testkit::commit(
            repo,
            "main",
            &[("README", b"hello\n")],
            "first",
        ));
    }
    let second = testkit::commit(&full_repo, "main", &[("lib.rs", b"// lib\n")], "second");
    let feature = testkit::commit(&full_repo, "feature", &[("f.txt", b"f\n")], "feature");
    let notes_repo = testkit::served_repo(&dir.path().join("full"), "carol/notes.git");
    let notes = testkit::commit(&notes_repo, "main", &[("n.md", b"notes\n")], "notes");
    Upstream {
        full: GitDaemon::start(full_ip, &dir.path().join("full")).expect("git daemon"),
        partial: HttpGitServer::start(partial_ip, &dir.path().join("partial")).expect("http"),
        _dir: dir,
        first: first.expect("two mirrors"),
        second,
        feature,
        notes,
    }
}

fn write_manifest(dir: &Path, lines: &[Value]) -> PathBuf {
    let path = dir.join("manifest.jsonl");
    let mut f = std::fs::File::create(&path).expect("manifest");
    writeln!(f, "# written by tests/cli.rs").expect("write");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
    path
}

fn fast_flags() -> Vec<&'static str> {
    vec![
        "--no-progress",
        "--allow-private-addresses",
        "--tick",
        "50ms",
        "--sync-delay",
        "0s",
        "--backoff-base",
        "100ms",
        "--backoff-cap",
        "400ms",
        "--fetch-deadline",
        "30s",
        "--thread-name",
        "clitest",
    ]
}

fn ref_of(repo: &Path, name: &str) -> Option<String> {
    let r = git2::Repository::open_bare(repo).ok()?;
    Some(r.refname_to_id(name).ok()?.to_string())
}

fn by_event(lines: &[Value]) -> std::collections::HashMap<String, Value> {
    lines
        .iter()
        .map(|v| {
            (
                v["event_id"].as_str().expect("event_id").to_owned(),
                v.clone(),
            )
        })
        .collect()
}

#[test]
fn run_syncs_a_manifest_of_nip34_events_and_exits_0() {
    let up = upstream(Ipv4Addr::new(127, 0, 0, 31), Ipv4Addr::new(127, 0, 0, 32));
    let work = tempfile::tempdir().expect("tempdir");
    let hello_url_partial = up.partial.url("alice/hello.git");
    let hello_url_full = up.full.url("alice/hello.git");
    let (first, second, feature) = (
        up.first.to_string(),
        up.second.to_string(),
        up.feature.to_string(),
    );
    let announcement = nostr(
        ALICE,
        30617,
        1_700_000_000,
        vec![
            vec!["d", "hello"],
            vec!["name", "hello"],
            vec!["clone", &hello_url_partial, &hello_url_full],
            vec!["maintainers", MAINTAINER],
            vec!["relays", "wss://relay.example.com"],
        ],
    );
    // The maintainer publishes the state; the URLs come from alice's announcement.
    let state = nostr(
        MAINTAINER,
        30618,
        1_700_000_100,
        vec![
            vec!["d", "hello"],
            vec!["refs/heads/main", &second],
            vec!["refs/tags/v1.0", &first],
            vec!["HEAD", "ref: refs/heads/main"],
        ],
    );
    // An older state of the same repository, whose data comes with the newer one's: it is
    // released without being written.
    let older_state = nostr(
        MAINTAINER,
        30618,
        1_700_000_050,
        vec![vec!["d", "hello"], vec!["refs/heads/main", &second]],
    );
    let a_tag = format!("30617:{ALICE}:hello");
    let pr = nostr(
        BOB,
        1618,
        1_700_000_200,
        vec![
            vec!["a", &a_tag],
            vec!["p", ALICE],
            vec!["subject", "a feature"],
            vec!["c", &feature],
            vec!["clone", &hello_url_full],
            vec!["branch-name", "feature"],
        ],
    );
    let notes = up.notes.to_string();
    let plain = json!({"event": {
        "id": "notes-1",
        "identifier": "carol/notes",
        "repo": "relay/carol/notes.git",
        "oids": [notes],
        "clone_urls": [up.full.url("carol/notes.git")],
        "ref_updates": [
            {"name": "refs/heads/main", "oid": notes},
            {"name": "refs/heads/stale", "delete": true},
        ],
    }});
    let manifest = write_manifest(
        work.path(),
        &[
            // The state comes before the announcement: order does not matter.
            json!({"nostr": state, "origin": "sync"}),
            json!({"nostr": older_state}),
            json!({"repository": {"identifier": "hello", "owner": ALICE, "path": "relay/alice/hello.git"}}),
            json!({"repository": {"identifier": "carol/notes", "path": "relay/carol/notes.git"}}),
            json!({"nostr": announcement}),
            json!({"nostr": pr}),
            plain,
        ],
    );
    let mut args = vec![
        "run",
        "--manifest",
        manifest.to_str().unwrap(),
        "--create-repos",
    ];
    args.extend(fast_flags());
    let done = run_to_end(&args, Duration::from_secs(90));
    assert_eq!(
        done.code,
        Some(0),
        "{:?}\n{}",
        done.stdout,
        done.stderr_text()
    );

    let lines = done.json_lines();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines.iter().all(|l| l["kind"] == "released"), "{lines:?}");
    let events = by_event(&lines);
    let state_id = state["id"].as_str().unwrap();
    let older_id = older_state["id"].as_str().unwrap();
    let pr_id = pr["id"].as_str().unwrap();
    assert!(
        events.contains_key(state_id)
            && events.contains_key(pr_id)
            && events.contains_key("notes-1")
    );
    assert!(events[state_id]["waited_ms"].is_u64());
    assert_eq!(events[state_id]["refs"], "written");
    assert_eq!(events[older_id]["refs"], "skipped_older_state");
    assert_eq!(events[older_id]["newer_created_at"], 1_700_000_100u64);

    let hello = work.path().join("relay/alice/hello.git");
    assert_eq!(
        ref_of(&hello, "refs/heads/main").as_deref(),
        Some(second.as_str())
    );
    assert_eq!(
        ref_of(&hello, "refs/tags/v1.0").as_deref(),
        Some(first.as_str())
    );
    assert_eq!(
        ref_of(&hello, &format!("refs/nostr/{pr_id}")).as_deref(),
        Some(feature.as_str())
    );
    let relay = git2::Repository::open_bare(&hello).unwrap();
    let head = relay.find_reference("HEAD").unwrap();
    assert_eq!(
        head.symbolic_target().ok().flatten(),
        Some("refs/heads/main")
    );
    let notes_repo = work.path().join("relay/carol/notes.git");
    assert_eq!(
        ref_of(&notes_repo, "refs/heads/main").as_deref(),
        Some(notes.as_str())
    );

    // Branches the relay got meanwhile: the state, a complete set, deletes the one it does not
    // list; the plain event deletes the one it names and leaves the others.
    for repo in [&hello, &notes_repo] {
        let r = git2::Repository::open_bare(repo).unwrap();
        let at = r.refname_to_id("refs/heads/main").unwrap();
        for name in ["refs/heads/stale", "refs/heads/other"] {
            r.reference(name, at, false, "test").unwrap();
        }
    }

    // Running the same manifest again: the objects are there, so the events are released
    // (their refs rewritten) without a single fetch: no domain appears in the summary.
    let again = run_to_end(&args, Duration::from_secs(60));
    assert_eq!(again.code, Some(0), "{}", again.stderr_text());
    let lines = again.json_lines();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines.iter().all(|l| l["kind"] == "released"), "{lines:?}");
    let events = by_event(&lines);
    assert_eq!(events[older_id]["refs"], "skipped_older_state", "{lines:?}");
    assert!(
        !again.stderr_text().contains("127.0.0.31"),
        "{}",
        again.stderr_text()
    );
    let heads = |repo: &Path| testkit::refs_with_prefix(repo, "refs/heads/");
    assert_eq!(
        heads(&hello),
        ["refs/heads/main"],
        "the state's branches only"
    );
    assert_eq!(heads(&notes_repo), ["refs/heads/main", "refs/heads/other"]);
}

/// Scrapes `http://addr/metrics` and parses it as Prometheus text.
fn scrape(addr: &str) -> (String, prometheus_parse::Scrape) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a header and a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the body parses as Prometheus text");
    (body.to_owned(), scrape)
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no {name} in the scrape"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} is {other:?}"),
    }
}

#[test]
fn run_exits_5_when_an_event_expires_and_serves_metrics_meanwhile() {
    let up = upstream(Ipv4Addr::new(127, 0, 0, 33), Ipv4Addr::new(127, 0, 0, 34));
    let work = tempfile::tempdir().expect("tempdir");
    let notes = up.notes.to_string();
    let event = |id: &str, oid: &str| {
        json!({"event": {
            "id": id, "identifier": "carol/notes", "repo": "relay/notes.git",
            "oids": [oid], "clone_urls": [up.full.url("carol/notes.git")],
        }})
    };
    let manifest = write_manifest(
        work.path(),
        &[
            json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
            event("found", &notes),
            event("nowhere", "0123456789abcdef0123456789abcdef01234567"),
        ],
    );
    let mut args = vec![
        "run",
        "--manifest",
        manifest.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
        "--event-lifetime",
        "4s",
    ];
    args.extend(fast_flags());
    let mut running = start(&args);
    let line = running.wait_stderr("metrics at http://", Duration::from_secs(30));
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    // While the unfindable event waits, the found one is released: scrape until it shows
    // (bounded), then check the families a scraper relies on.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (body, scrape) = loop {
        let (body, scrape) = scrape(&addr);
        if metric(&scrape, "purgatory_sync_released_total") >= 1.0 || Instant::now() > deadline {
            break (body, scrape);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        metric(&scrape, "purgatory_sync_released_total"),
        1.0,
        "{body}"
    );
    assert_eq!(
        metric(&scrape, "purgatory_sync_submitted_total"),
        2.0,
        "{body}"
    );
    assert_eq!(
        metric(&scrape, "purgatory_sync_waiting_events"),
        1.0,
        "{body}"
    );
    assert!(
        body.contains("# TYPE purgatory_sync_time_to_release_seconds histogram"),
        "{body}"
    );

    let done = running.finish(Duration::from_secs(60));
    assert_eq!(
        done.code,
        Some(5),
        "{:?}\n{}",
        done.stdout,
        done.stderr_text()
    );
    let events = by_event(&done.json_lines());
    assert_eq!(events["found"]["kind"], "released");
    assert_eq!(events["nowhere"]["kind"], "expired");
    assert_eq!(events["nowhere"]["reason"], "lifetime_ended");
    assert_eq!(
        events["nowhere"]["missing"],
        json!(["0123456789abcdef0123456789abcdef01234567"])
    );
}

#[test]
fn a_bad_manifest_is_reported_with_file_line_and_field_and_nothing_starts() {
    let work = tempfile::tempdir().expect("tempdir");
    let path = work.path().join("bad.jsonl");
    let state_missing_d = nostr(
        ALICE,
        30618,
        1,
        vec![vec![
            "refs/heads/main",
            "e92758a50bbf13ea1fe986bbe254a709b0bf741c",
        ]],
    );
    let mut tampered = nostr(ALICE, 30617, 1, vec![vec!["d", "x"]]);
    tampered["content"] = json!("changed after signing");
    std::fs::write(
        &path,
        format!(
            "{}\n{{\"event\": {{\"id\": \"e\", \"identifier\": \"i\", \"repo\": \"r.git\", \"oids\": [7]}}}}\nnot json\n{}\n{}\n{}\n",
            json!({"repository": {"identifier": "i", "path": "missing.git"}}),
            json!({"nostr": state_missing_d}),
            json!({"nostr": tampered}),
            json!({"repository": {"identifier": "j", "path": "new.git", "create": true}}),
        ),
    )
    .unwrap();
    let done = run_to_end(
        &["run", "--manifest", path.to_str().unwrap(), "--no-progress"],
        Duration::from_secs(30),
    );
    assert_eq!(done.code, Some(3), "{}", done.stderr_text());
    assert!(done.stdout.is_empty(), "{:?}", done.stdout);
    let err = done.stderr_text();
    let file = path.display().to_string();
    for expected in [
        format!("{file}:1: `repository.path`: "),
        format!("{file}:2: `event.oids[0]`: expected a string, found a number"),
        format!("{file}:3: not JSON"),
        format!("{file}:4: `nostr`: "),
        format!("{file}:5: `nostr.id`: "),
    ] {
        assert!(err.contains(&expected), "no {expected:?} in:\n{err}");
    }
    assert!(err.contains("`d`"), "the missing tag is named:\n{err}");
    assert!(err.contains("5 problem(s); nothing was started"), "{err}");
    assert!(
        !work.path().join("new.git").exists(),
        "a bad manifest creates no repository"
    );

    let missing = run_to_end(
        &["run", "--manifest", "/nonexistent/manifest.jsonl"],
        Duration::from_secs(30),
    );
    assert_eq!(missing.code, Some(3));
    assert!(
        missing
            .stderr_text()
            .contains("/nonexistent/manifest.jsonl: cannot read"),
        "{}",
        missing.stderr_text()
    );
}

#[test]
fn an_interrupted_run_saves_its_state_and_the_next_run_resumes() {
    let up = upstream(Ipv4Addr::new(127, 0, 0, 35), Ipv4Addr::new(127, 0, 0, 36));
    let work = tempfile::tempdir().expect("tempdir");
    let notes = up.notes.to_string();
    // A user's event: the engine waits for the user's push (an hour here) instead of fetching.
    let manifest = write_manifest(
        work.path(),
        &[
            json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
            json!({"event": {
                "id": "pushed-later", "identifier": "carol/notes", "repo": "relay/notes.git",
                "oids": [notes], "origin": "user",
            }}),
        ],
    );
    let state = work.path().join("state.json");
    let mut args = vec![
        "run",
        "--manifest",
        manifest.to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
        "--user-delay",
        "1h",
    ];
    args.extend(fast_flags());
    let mut running = start(&args);
    running.wait_stderr("1 event", Duration::from_secs(30));
    let pid = running.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let done = running.finish(Duration::from_secs(30));
    assert_eq!(done.code, Some(143), "{}", done.stderr_text());
    assert!(done.stdout.is_empty(), "{:?}", done.stdout);
    assert!(
        done.stderr_text().contains("saved in the state file"),
        "{}",
        done.stderr_text()
    );
    assert!(state.exists());

    // The user pushes while the tool is not running; the next run finds the data.
    testkit::push_all(
        &up.full.repo("carol/notes.git"),
        &work.path().join("relay/notes.git"),
    );
    let resumed = run_to_end(&args, Duration::from_secs(60));
    assert_eq!(resumed.code, Some(0), "{}", resumed.stderr_text());
    assert!(
        resumed
            .stderr_text()
            .contains("1 event restored from the state file"),
        "{}",
        resumed.stderr_text()
    );
    let lines = resumed.json_lines();
    assert_eq!(
        lines.len(),
        1,
        "one line per event, even when restored and listed: {lines:?}"
    );
    assert_eq!(lines[0]["event_id"], "pushed-later");
}

#[test]
fn every_engine_setting_is_a_flag_of_run() {
    let help = run_to_end(&["run", "--help"], Duration::from_secs(30));
    assert_eq!(help.code, Some(0));
    let text = help.stdout.join("\n");
    for flag in [
        "--workers",
        "--tick",
        "--user-delay",
        "--sync-delay",
        "--backoff-base",
        "--backoff-cap",
        "--event-lifetime",
        "--expired-memory",
        "--fetch-deadline",
        "--connect-timeout",
        "--io-timeout",
        "--shutdown-timeout",
        "--max-fetch-bytes",
        "--fetch-depth",
        "--thread-name",
        "--domain-concurrency",
        "--domain-per-minute",
        "--domain-burst",
        "--domain ",
        "--our-domain",
        "--naughty-duration",
        "--allow-private-addresses",
        "--allowed-schemes",
        "--max-events",
        "--max-oids-per-event",
        "--max-urls-per-event",
        "--max-ref-updates-per-event",
        "--state-file",
        "--checkpoint-interval",
        "--move-unreadable-state-aside",
        "--no-hide-temp-refs",
        "--metrics",
        "--manifest",
    ] {
        assert!(text.contains(flag), "`run --help` has no {flag}:\n{text}");
    }
    // A bad value is refused before anything starts, naming the flag.
    let bad = run_to_end(
        &["run", "--manifest", "m.jsonl", "--tick", "soon"],
        Duration::from_secs(30),
    );
    assert_eq!(
        bad.code,
        Some(2),
        "a usage error is an error, not \"expired\""
    );
    assert!(
        bad.stderr_text().contains("--tick"),
        "{}",
        bad.stderr_text()
    );
}

/// An event id with multibyte characters is shortened for the progress line on a character
/// boundary: `run` reports the event instead of panicking.
#[test]
fn run_reports_an_event_whose_id_is_multibyte() {
    let work = tempfile::tempdir().expect("tempdir");
    // 1 + 3 × 6 bytes: byte 12 falls inside a `€`.
    let id = "a€€€€€€";
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let manifest = write_manifest(
        work.path(),
        &[
            json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
            json!({"event": {
                "id": id, "identifier": "carol/notes", "repo": "relay/notes.git",
                "oids": [missing],
            }}),
        ],
    );
    let mut args = vec![
        "run",
        "--manifest",
        manifest.to_str().unwrap(),
        "--event-lifetime",
        "300ms",
    ];
    args.extend(fast_flags());
    let done = run_to_end(&args, Duration::from_secs(30));
    assert_eq!(
        done.code,
        Some(5),
        "{:?}\n{}",
        done.stdout,
        done.stderr_text()
    );
    let lines = done.json_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event_id"], id);
    assert_eq!(lines[0]["kind"], "expired");
}

/// A one-event manifest in `dir` waiting for a missing object from `url`.
fn one_event(dir: &Path, id: &str, oid: &str, url: &str) -> PathBuf {
    write_manifest(
        dir,
        &[
            json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
            json!({"event": {"id": id, "identifier": "carol/notes", "repo": "relay/notes.git",
                             "oids": [oid], "clone_urls": [url]}}),
        ],
    )
}

const MISSING: &str = "0123456789abcdef0123456789abcdef01234567";

/// Usage errors exit 2 (clap's convention); `--help` lists the exit codes, `RUST_LOG` and the
/// environment variable of every flag, and the variables set the flags.
#[test]
fn usage_errors_exit_2_and_help_lists_exit_codes_and_environment() {
    let bad = run_to_end(&["run", "--no-such-flag"], Duration::from_secs(30));
    assert_eq!(bad.code, Some(2), "{}", bad.stderr_text());
    let missing_manifest = run_to_end(&["run"], Duration::from_secs(30));
    assert_eq!(missing_manifest.code, Some(2));
    let help = run_to_end(&["run", "--help"], Duration::from_secs(30));
    assert_eq!(help.code, Some(0));
    let text = help.stdout.join("\n");
    for needle in [
        "Exit status:",
        "3    the manifest has problems",
        "4    some events were refused",
        "5    some events expired",
        "130  interrupted by SIGINT (143: SIGTERM)",
        "RUST_LOG",
        "[env: PURGATORY_SYNC_MANIFEST=]",
        "[env: PURGATORY_SYNC_WORKERS=]",
        "[env: PURGATORY_SYNC_DOMAIN_RETENTION=]",
        "[env: PURGATORY_SYNC_FAIL_FAST=]",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    // A bad value from the environment is a usage error too, naming the variable's flag.
    let work = tempfile::tempdir().expect("tempdir");
    let manifest = one_event(work.path(), "e", MISSING, "git://127.0.0.1:1/x.git");
    let env_bad = Command::new(BIN)
        .args(["run", "--manifest", manifest.to_str().unwrap()])
        .env("PURGATORY_SYNC_TICK", "soon")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(env_bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&env_bad.stderr).contains("--tick"));
}

/// A bad object id in an `event` line is found before anything starts (exit 3, nothing on
/// stdout), as a bad `nostr` line is: the good line before it is not run.
#[test]
fn every_event_line_is_checked_before_anything_starts() {
    let work = tempfile::tempdir().expect("tempdir");
    let manifest = write_manifest(
        work.path(),
        &[
            json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
            json!({"event": {"id": "good", "identifier": "carol/notes", "repo": "relay/notes.git",
                             "oids": [MISSING], "clone_urls": ["git://127.0.0.1:1/x.git"]}}),
            json!({"event": {"id": "bad", "identifier": "carol/notes", "repo": "relay/notes.git",
                             "oids": ["abc"]}}),
        ],
    );
    let mut args = vec!["run", "--manifest", manifest.to_str().unwrap()];
    args.extend(fast_flags());
    let done = run_to_end(&args, Duration::from_secs(30));
    assert_eq!(done.code, Some(3), "{}", done.stderr_text());
    assert!(done.stdout.is_empty(), "{:?}", done.stdout);
    let err = done.stderr_text();
    assert!(
        err.contains(":4: event bad:") && err.contains("abc"),
        "{err}"
    );
    assert!(err.contains("nothing was started"), "{err}");
}

/// An event whose every clone URL is refused (loopback without --allow-private-addresses) is
/// reported when it is submitted, on stdout (`kind` first) and stderr with the flag that would
/// allow it; `--fail-fast` stops there with exit 4, otherwise it waits and expires (exit 5).
#[test]
fn an_event_with_no_usable_url_is_reported_at_once_and_fail_fast_stops() {
    let work = tempfile::tempdir().expect("tempdir");
    let manifest = one_event(work.path(), "lo", MISSING, "git://127.0.0.1:1/x.git");
    let path = manifest.to_str().unwrap();
    let started = Instant::now();
    let fast = run_to_end(
        &["run", "--manifest", path, "--no-progress", "--fail-fast"],
        Duration::from_secs(30),
    );
    assert_eq!(fast.code, Some(4), "{}", fast.stderr_text());
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(fast.stdout.len(), 1, "{:?}", fast.stdout);
    assert!(
        fast.stdout[0].starts_with(r#"{"kind":"no_usable_url","event_id":"lo","#),
        "{}",
        fast.stdout[0]
    );
    let line = &fast.json_lines()[0];
    assert_eq!(line["refused_urls"][0]["url"], "git://127.0.0.1:1/x.git");
    assert!(fast.stderr_text().contains("--allow-private-addresses"));

    let slow = run_to_end(
        &[
            "run",
            "--manifest",
            path,
            "--no-progress",
            "--event-lifetime",
            "300ms",
            "--tick",
            "50ms",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(slow.code, Some(5), "{}", slow.stderr_text());
    let kinds: Vec<String> = slow
        .json_lines()
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["no_usable_url", "expired"]);
    // Every JSON line starts with its kind.
    assert!(
        slow.stdout.iter().all(|l| l.starts_with(r#"{"kind":"#)),
        "{:?}",
        slow.stdout
    );
}

/// `--manifest -` reads standard input; its relative paths resolve against the working
/// directory.
#[test]
fn the_manifest_can_come_from_standard_input() {
    let work = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{}\n{}\n",
        json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
        json!({"event": {"id": "in", "identifier": "carol/notes", "repo": "relay/notes.git",
                         "oids": [MISSING], "clone_urls": ["git://127.0.0.1:1/x.git"]}})
    );
    let mut child = Command::new(BIN)
        .args(["run", "--manifest", "-", "--event-lifetime", "300ms"])
        .args(fast_flags())
        .current_dir(work.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the manifest");
    let out = child.wait_with_output().expect("run ends");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(work.path().join("relay/notes.git").is_dir());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(r#""event_id":"in""#), "{stdout}");
}

/// SIGINT ends a run with 130 (SIGTERM: 143, in
/// `an_interrupted_run_saves_its_state_and_the_next_run_resumes`).
#[test]
fn sigint_exits_130() {
    let work = tempfile::tempdir().expect("tempdir");
    let manifest = one_event(work.path(), "wait", MISSING, "git://127.0.0.1:1/x.git");
    let mut args = vec!["run", "--manifest", manifest.to_str().unwrap()];
    args.extend(fast_flags());
    let mut running = start(&args);
    running.wait_stderr("manifest.jsonl: 1 event", Duration::from_secs(30));
    let status = Command::new("kill")
        .args(["-INT", &running.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let done = running.finish(Duration::from_secs(30));
    assert_eq!(done.code, Some(130), "{}", done.stderr_text());
}

/// `completions SHELL` and `man` print what shells and `man` read.
#[test]
fn completions_and_the_manual_page() {
    let bash = run_to_end(&["completions", "bash"], Duration::from_secs(30));
    assert_eq!(bash.code, Some(0));
    let script = bash.stdout.join("\n");
    assert!(script.contains("_purgatory__sync()"), "{script}");
    assert!(script.contains("--fail-fast"), "{script}");
    let fish = run_to_end(&["completions", "fish"], Duration::from_secs(30));
    assert!(fish
        .stdout
        .join("\n")
        .contains("complete -c purgatory-sync"));
    let man = run_to_end(&["man"], Duration::from_secs(30));
    assert_eq!(man.code, Some(0));
    let page = man.stdout.join("\n");
    assert!(
        page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH"),
        "{page}"
    );
    assert!(page.contains("purgatory\\-sync"), "{page}");
    let bad = run_to_end(&["completions", "tcsh"], Duration::from_secs(30));
    assert_eq!(bad.code, Some(2));
}

/// Runs `purgatory-sync` with `args` in a detached tmux session (a real terminal, 120 × 40,
/// stdout and stderr on it) and returns the screen once the command has ended. `None` when tmux
/// is not installed (`.ci/run` installs it).
fn screen_of(args: &[&str], dir: &Path) -> Option<String> {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed");
        return None;
    }
    let session = format!("psync-{}", std::process::id());
    let socket = dir.join("tmux.sock");
    let tmux = |extra: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(extra)
            .output()
            .expect("tmux")
    };
    let done = dir.join("done");
    let command = format!(
        "{} {}; touch {}; sleep 60",
        BIN,
        args.join(" "),
        done.display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "40",
        "-c",
        dir.to_str().unwrap(),
        &command,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.exists() {
        assert!(
            Instant::now() < deadline,
            "the run did not end within a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let screen = tmux(&["capture-pane", "-p", "-t", &session]);
    tmux(&["kill-session", "-t", &session]);
    Some(String::from_utf8_lossy(&screen.stdout).into_owned())
}

/// With stdout and stderr on one terminal, the JSON lines are printed through the bar: the
/// screen ends with the lines and the summary, and no frame of the bar is left behind (nor was
/// one drawn with a total of 0).
#[test]
fn the_progress_bar_leaves_no_stale_frames_on_a_terminal() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut lines = vec![
        json!({"repository": {"identifier": "carol/notes", "path": "relay/notes.git", "create": true}}),
    ];
    for i in 0..6 {
        lines.push(
            json!({"event": {"id": format!("ev{i}"), "identifier": "carol/notes",
                                    "repo": "relay/notes.git",
                                    "oids": [format!("{:040x}", i + 1)],
                                    "clone_urls": ["git://127.0.0.1:1/x.git"]}}),
        );
    }
    write_manifest(work.path(), &lines);
    let Some(screen) = screen_of(
        &[
            "run",
            "--manifest",
            "manifest.jsonl",
            "--allow-private-addresses",
            "--event-lifetime",
            "1500ms",
            "--tick",
            "50ms",
        ],
        work.path(),
    ) else {
        return;
    };
    let outcomes = screen
        .lines()
        .filter(|l| l.starts_with(r#"{"kind":"expired""#))
        .count();
    assert_eq!(outcomes, 6, "{screen}");
    let frame = regex_like_frame;
    let frames: Vec<&str> = screen.lines().filter(|l| frame(l)).collect();
    assert!(
        frames.is_empty(),
        "stale frames of the bar:\n{}\n---\n{screen}",
        frames.join("\n")
    );
    assert!(
        screen.contains("0 released, 0 already satisfied, 6 expired, 0 refused"),
        "{screen}"
    );
}

/// A line that is a frame of the bar: `{elapsed} [{bar}] {pos}/{len} …`.
fn regex_like_frame(line: &str) -> bool {
    let Some(open) = line.find(" [") else {
        return false;
    };
    let Some(close) = line[open..].find("] ") else {
        return false;
    };
    let rest = &line[open + close + 2..];
    let counts: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '/')
        .collect();
    counts.contains('/') && line[..open].trim().ends_with('s')
}
