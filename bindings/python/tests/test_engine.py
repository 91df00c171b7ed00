"""The Python package against a real `git daemon` on a loopback address (127.0.0.2)."""

import logging
import os
import socket
import subprocess
import threading
import time

import pytest

import purgatory_sync
from purgatory_sync import Engine, Event, RefUpdate

HOST = "127.0.0.2"
CLOSED = "git://127.0.0.1:1/nowhere.git"  # nothing listens there


def git(cwd, *args):
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(cwd),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def served(base, name, content):
    """base/<name>: a bare repository with one commit; returns the commit's id."""
    work = base / ("work-" + name.replace("/", "-"))
    work.mkdir(parents=True)
    git(work, "init", "-q", "-b", "main")
    (work / "README").write_text(content)
    git(work, "add", "README")
    git(work, "commit", "-q", "-m", content)
    tip = git(work, "rev-parse", "HEAD")
    bare = base / name
    git(base, "clone", "-q", "--bare", str(work), str(bare))
    git(bare, "config", "uploadpack.allowReachableSHA1InWant", "true")
    return tip


@pytest.fixture
def daemon(tmp_path):
    """A git daemon serving tmp_path/served on 127.0.0.2; yields (base, port)."""
    base = tmp_path / "served"
    base.mkdir()
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", f"--base-path={base}",
                             "--export-all", f"--listen={HOST}", f"--port={port}",
                             "--enable=upload-pack", str(base)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)
    yield base, port
    proc.kill()
    proc.wait()


def bare_repo(tmp_path, name="relay.git"):
    path = tmp_path / name
    git(tmp_path, "init", "-q", "--bare", str(path))
    return str(path)


def engine(**settings):
    settings.setdefault("allow_private_addresses", True)
    settings.setdefault("sync_delay", 0)
    settings.setdefault("tick", 0.02)
    return Engine(**settings)


def test_an_event_is_released_from_a_git_daemon(tmp_path, daemon):
    base, port = daemon
    tip = served(base, "alice/hello.git", "hello")
    repo = bare_repo(tmp_path)
    with engine() as e:
        adm = e.submit(Event(id="ev1", identifier="alice/hello", repo=repo, oids=[tip],
                             clone_urls=[f"git://{HOST}:{port}/alice/hello.git"],
                             ref_updates=[RefUpdate("refs/heads/main", oid=tip)]))
        assert not adm.already_satisfied and adm.refused_urls == []
        # The first outcome, then nothing more: not a wait for the whole timeout.
        outcomes = [next(e.outcomes(timeout=30)), e.poll(0)]
        assert [(o.event_id, o.released, o.refs) for o in outcomes[:1]] == [("ev1", True, "written")]
        assert outcomes[1] is None
        assert git(tmp_path, "--git-dir", repo, "rev-parse", "refs/heads/main") == tip
        stats = e.stats()
        assert stats["released"] == 1 and stats["requests"] >= 1
        assert "purgatory_sync_released_total 1" in e.metrics()


def test_each_refusal_has_its_own_exception(tmp_path):
    repo = bare_repo(tmp_path)
    with engine(sync_delay=3600) as e:
        with pytest.raises(purgatory_sync.InvalidObjectId) as bad:
            e.submit(Event(id="x", identifier="i", repo=repo, oids=["abc"]))
        assert bad.value.status == 24 and "abc" in bad.value.message
        assert isinstance(bad.value, purgatory_sync.SubmitRefused)
        with pytest.raises(purgatory_sync.NoObjectIds):
            e.submit(Event(id="x", identifier="i", repo=repo))
        with pytest.raises(purgatory_sync.InvalidRepository):
            e.submit(Event(id="x", identifier="i", repo=str(tmp_path / "nope"), oids=["a" * 40]))
        with pytest.raises(purgatory_sync.ReplaceRefsWithoutRefUpdates):
            e.submit(Event(id="x", identifier="i", repo=repo, oids=["a" * 40], replace_refs=True))
        refused = e.submit(Event(id="y", identifier="i", repo=repo, oids=["b" * 40],
                                 clone_urls=["ftp://example.com/x.git", CLOSED]))
        assert [(r.index, r.url) for r in refused.refused_urls] == [(0, "ftp://example.com/x.git")]
    with pytest.raises(purgatory_sync.InvalidConfig):
        Engine(workers=5000)
    with pytest.raises(purgatory_sync.InvalidJson):
        Engine(no_such_setting=1)
    e = engine()
    e.close()
    with pytest.raises(purgatory_sync.EngineShutDown):
        e.cancel("x")
    e.close()  # idempotent


def test_waiting_for_outcomes_releases_the_gil(tmp_path):
    """While one thread waits 1.5 s in outcomes(), another thread runs Python code."""
    with engine(sync_delay=3600) as e:
        ticks = []
        stop = threading.Event()

        def count():
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.001)

        t = threading.Thread(target=count)
        t.start()
        started = time.monotonic()
        assert list(e.outcomes(timeout=1.5)) == []
        waited = time.monotonic() - started
        stop.set()
        t.join()
        assert waited >= 1.4
        assert len(ticks) > 100, f"the other thread ran {len(ticks)} times in {waited:.1f} s"


def test_outcomes_end_when_the_engine_is_shut_down_and_drained(tmp_path):
    repo = bare_repo(tmp_path)
    with engine(event_lifetime=0.3) as e:
        e.submit(Event(id="gone", identifier="i", repo=repo, oids=["c" * 40], clone_urls=[CLOSED]))
        first = e.poll(30)
        assert first is not None and first.event_id == "gone" and not first.released
        assert first.reason == "lifetime_ended" and first.missing == ["c" * 40]
        e.shutdown()
        assert list(e.outcomes()) == []  # ends without a timeout: the engine is drained


def test_the_logs_of_a_failed_fetch_reach_the_logging_module(tmp_path, caplog):
    repo = bare_repo(tmp_path)
    caplog.set_level(logging.INFO, logger="purgatory_sync")
    purgatory_sync.log_to_logging(logging.INFO)
    try:
        with engine(event_lifetime=2) as e:
            e.submit(Event(id="l", identifier="i", repo=repo, oids=["d" * 40], clone_urls=[CLOSED]))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    CLOSED in r.getMessage() and "failed" in r.getMessage() for r in caplog.records):
                time.sleep(0.05)
    finally:
        purgatory_sync.log_off()
    matching = [r for r in caplog.records if CLOSED in r.getMessage()]
    assert matching, [r.getMessage() for r in caplog.records]
    assert all(r.name.startswith("purgatory_sync.purgatory_sync") for r in matching)
