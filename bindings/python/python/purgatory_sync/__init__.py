"""Fetches the missing git data of events waiting in a GRASP relay's purgatory.

The engine (Rust, with libgit2) runs on its own threads; this module is its typed Python face::

    from purgatory_sync import Engine, Event

    with Engine(workers=8) as engine:
        admission = engine.submit(Event(id=event_id, identifier="alice/hello",
                                        repo="/srv/git/alice/hello.git", oids=[oid],
                                        clone_urls=["https://git.example.com/alice/hello.git"]))
        for outcome in engine.outcomes(timeout=1800):
            print(outcome.event_id, "released" if outcome.released else outcome.missing)

Every call that waits releases the GIL. Failures raise a subclass of :class:`PurgatorySyncError`
named after the C ABI's status (``InvalidObjectId``, ``QueueFull``, ...).
"""

from __future__ import annotations

import atexit
import json
import weakref
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import _native

__all__ = [
    "Admission", "Engine", "Event", "Outcome", "RefUpdate", "RefusedUrl",
    "PurgatorySyncError", "log_off", "log_to_stderr", "log_to_logging", "version",
]
__version__ = _native.version()


def version() -> str:
    """The version of the engine linked in."""
    return _native.version()


# --- Exceptions -----------------------------------------------------------------------------

class PurgatorySyncError(Exception):
    """A failed call. ``status`` is the C ABI's ``psync_status``, ``message`` says why."""

    status: int = -1

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BuildError(PurgatorySyncError):
    """The engine could not be built."""


class SubmitRefused(PurgatorySyncError):
    """The event was refused; nothing was queued."""


def _error(name: str, base: type, status: int, doc: str) -> type:
    return type(name, (base,), {"status": status, "__doc__": doc})


# One class per status of purgatory_sync.h (the values are the header's).
_STATUSES: Dict[int, type] = {}
for _name, _base, _status, _doc in [
    ("NullArgument", PurgatorySyncError, 1, "A required argument was missing."),
    ("InvalidUtf8", PurgatorySyncError, 2, "A string was not UTF-8."),
    ("InvalidJson", PurgatorySyncError, 3, "The configuration or event had unknown or ill-typed fields."),
    ("InvalidConfig", BuildError, 4, "A configuration setting is out of range."),
    ("StateFileError", BuildError, 5, "The state file could not be read or written at start."),
    ("SpawnFailed", BuildError, 6, "The engine's threads could not be spawned."),
    ("Panic", PurgatorySyncError, 9, "A Rust panic was caught at the boundary."),
    ("ShutdownError", PurgatorySyncError, 10, "Shutdown did not end cleanly."),
    ("EngineShutDown", PurgatorySyncError, 11, "The engine is shut down or closed."),
    ("StateFileLocked", BuildError, 12, "Another engine holds the state file."),
    ("OtherError", PurgatorySyncError, 13, "A failure without a status of its own."),
    ("LoggerUnavailable", PurgatorySyncError, 14, "Another logger is installed in the process."),
    ("InvalidEventId", SubmitRefused, 20, "The event id is empty, too long or has control characters."),
    ("InvalidIdentifier", SubmitRefused, 21, "The identifier is empty, too long or has control characters."),
    ("NoObjectIds", SubmitRefused, 22, "The event lists no object id."),
    ("TooManyObjectIds", SubmitRefused, 23, "The event lists more object ids than allowed."),
    ("InvalidObjectId", SubmitRefused, 24, "An object id is not 40 hex digits."),
    ("TooManyCloneUrls", SubmitRefused, 25, "The event lists more clone URLs than allowed."),
    ("InvalidCloneUrl", SubmitRefused, 26, "A clone URL is empty, too long or has bad characters."),
    ("InvalidRepository", SubmitRefused, 27, "The repository is not an existing bare git repository."),
    ("PreviouslyExpired", SubmitRefused, 28, "A synced event with this id expired recently."),
    ("QueueFull", SubmitRefused, 29, "The engine holds as many waiting events as it accepts."),
    ("ShuttingDown", SubmitRefused, 30, "The engine is shutting down."),
    ("TooManyRefUpdates", SubmitRefused, 31, "The event lists more ref updates than allowed."),
    ("InvalidRefUpdate", SubmitRefused, 32, "A ref update is invalid."),
    ("TooManyIdentifierUrls", SubmitRefused, 33, "The identifier's waiting events list too many URLs."),
    ("ReplaceRefsWithoutRefUpdates", SubmitRefused, 34, "replace_refs without any ref update."),
    ("OtherSubmitError", SubmitRefused, 39, "A refusal without a status of its own."),
]:
    _cls = _error(_name, _base, _status, _doc)
    globals()[_name] = _cls
    __all__.append(_name)
    _STATUSES[_status] = _cls
__all__ += ["BuildError", "SubmitRefused"]

_DISCONNECTED = 8


def _raise(error: "_native.NativeError") -> None:
    status, message = error.args
    cls = _STATUSES.get(status, PurgatorySyncError)
    raise cls(message, status) from None


# --- Values ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefUpdate:
    """A ref written when the event is released: exactly one of ``oid``, ``symbolic`` and
    ``delete``."""

    name: str
    oid: Optional[str] = None
    symbolic: Optional[str] = None
    delete: bool = False

    def _json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name}
        if self.oid is not None:
            out["oid"] = self.oid
        if self.symbolic is not None:
            out["symbolic"] = self.symbolic
        if self.delete:
            out["delete"] = True
        return out


@dataclass(frozen=True)
class Event:
    """An event waiting in purgatory. ``origin`` is ``"sync"`` (received from another relay)
    or ``"user"`` (published here; a push is expected first)."""

    id: str
    identifier: str
    repo: str
    oids: List[str] = field(default_factory=list)
    clone_urls: List[str] = field(default_factory=list)
    origin: str = "sync"
    ref_updates: List[RefUpdate] = field(default_factory=list)
    replace_refs: bool = False
    created_at: Optional[int] = None

    def _json(self) -> str:
        return json.dumps({
            "id": self.id, "identifier": self.identifier, "repo": str(self.repo),
            "oids": list(self.oids), "clone_urls": list(self.clone_urls), "origin": self.origin,
            "ref_updates": [r._json() for r in self.ref_updates],
            "replace_refs": self.replace_refs, "created_at": self.created_at,
        })


@dataclass(frozen=True)
class RefusedUrl:
    """A clone URL the engine's URL policy refused."""

    index: int
    url: str
    reason: str


@dataclass(frozen=True)
class Admission:
    """How :meth:`Engine.submit` took an event."""

    already_satisfied: bool
    refused_urls: List[RefusedUrl]


@dataclass(frozen=True)
class Outcome:
    """What finally happened to an event."""

    kind: str
    event_id: str
    identifier: str
    repo: str
    waited_ms: int = 0
    refs: Optional[str] = None
    newer_created_at: Optional[int] = None
    missing: List[str] = field(default_factory=list)
    reason: Optional[str] = None
    message: Optional[str] = None

    @property
    def released(self) -> bool:
        return self.kind == "released"

    @classmethod
    def _from_json(cls, text: str) -> "Outcome":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- The engine -----------------------------------------------------------------------------

_SECONDS = {
    "tick", "user_delay", "sync_delay", "backoff_base", "backoff_cap", "event_lifetime",
    "expired_memory", "fetch_deadline", "connect_timeout", "io_timeout", "shutdown_timeout",
    "checkpoint_interval", "naughty_duration",
}

# Engines still open, closed at exit; weak, so that an engine nobody holds is freed.
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


class Engine:
    """A running engine. Settings are keyword arguments named as in the C ABI's configuration
    (``workers=8``, ``allow_private_addresses=True``, ``domain_limits={"max_concurrent": 5,
    "per_minute": 30}``); durations are in seconds (``sync_delay=0.5``, ``event_lifetime=1800``).
    Unknown settings raise :class:`InvalidJson`, values out of range :class:`InvalidConfig`.

    Every method may be called from any thread. Use it as a context manager, or call
    :meth:`close`.
    """

    def __init__(self, **settings: Any) -> None:
        config: Dict[str, Any] = {}
        for key, value in settings.items():
            if key in _SECONDS and value is not None:
                config[key + "_ms"] = int(round(float(value) * 1000))
            else:
                config[key] = value
        try:
            self._native = _native.Engine(json.dumps(config))
        except _native.NativeError as e:
            _raise(e)
        _ENGINES.add(self)

    def submit(self, event: Event) -> Admission:
        """Submits an event; returns at once (validation and a presence check only)."""
        try:
            satisfied, refused = self._native.submit(event._json())
        except _native.NativeError as e:
            _raise(e)
        return Admission(satisfied, [RefusedUrl(**r) for r in json.loads(refused or "[]")])

    def cancel(self, event_id: str) -> None:
        """Forgets a waiting event: no outcome follows for it."""
        self._call(self._native.cancel, event_id)

    def git_data_arrived(self, identifier: str) -> None:
        """A push arrived for ``identifier``: its repositories are re-checked at once."""
        self._call(self._native.git_data_arrived, identifier)

    def poll(self, timeout: float = 0.0) -> Optional[Outcome]:
        """The next outcome, waiting up to ``timeout`` seconds (GIL released); None if none
        came, or once the engine is shut down and every outcome was taken."""
        return self._next(timeout)[0]

    def outcomes(self, timeout: Optional[float] = None) -> Iterator[Outcome]:
        """Iterates over outcomes as they come. It ends when ``timeout`` seconds pass without
        one (never, with None), or when the engine is shut down and drained."""
        while True:
            outcome, drained = self._next(3600.0 if timeout is None else timeout)
            if outcome is not None:
                yield outcome
            elif drained or timeout is not None:
                return

    def _next(self, timeout: float) -> "Tuple[Optional[Outcome], bool]":
        """The next outcome within ``timeout`` seconds, and whether the engine is shut down
        and drained (no outcome will ever come)."""
        remaining = max(0.0, float(timeout))
        while True:
            # The C ABI takes whole milliseconds, at most 2^32 - 1 of them at a time.
            step = min(remaining, 3600.0)
            try:
                text = self._native.poll(int(math.ceil(step * 1000)))
            except _native.NativeError as e:
                if e.args[0] == _DISCONNECTED:
                    return None, True
                _raise(e)
            if text is not None:
                return Outcome._from_json(text), False
            remaining -= step
            if remaining <= 0:
                return None, False

    def stats(self) -> Dict[str, Any]:
        """The engine's state and counters (the C ABI's statistics JSON, as a dict)."""
        return json.loads(self._call(self._native.stats_json))

    def metrics(self) -> str:
        """The state and counters in the Prometheus text format 0.0.4."""
        return self._call(self._native.metrics)

    def shutdown(self) -> None:
        """Stops the engine and joins its threads; remaining outcomes can still be polled."""
        self._call(self._native.shutdown)

    def close(self) -> None:
        """Shuts down if needed and frees the engine. Idempotent."""
        self._native.close()
        _ENGINES.discard(self)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _call(method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except _native.NativeError as e:
            _raise(e)


# --- Logs -----------------------------------------------------------------------------------

_LEVELS = {0: logging.NOTSET, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO,
           4: logging.DEBUG, 5: logging.DEBUG}


def _native_level(level: int) -> int:
    """A ``logging`` level as the engine's (0 off .. 5 trace)."""
    if level <= logging.NOTSET:
        return 5
    if level <= logging.DEBUG:
        return 4
    if level <= logging.INFO:
        return 3
    if level <= logging.WARNING:
        return 2
    return 1


def log_to_logging(level: int = logging.INFO, logger: str = "purgatory_sync") -> None:
    """Sends the engine's log records (at ``level`` and above) to the ``logging`` logger
    ``logger`` (each record's name is ``logger.<module>``). Called on the engine's threads."""
    base = logging.getLogger(logger)

    def handler(native_level: int, target: str, message: str) -> None:
        base.getChild(target.replace("::", ".")).log(_LEVELS.get(native_level, logging.DEBUG),
                                                     message)

    try:
        _native.set_log_handler(_native_level(level), handler)
    except _native.NativeError as e:
        _raise(e)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Writes the engine's log records (at ``level`` and above) to stderr."""
    try:
        _native.log_to_stderr(_native_level(level))
    except _native.NativeError as e:
        _raise(e)


def log_off() -> None:
    """Stops the engine's log, wherever it went."""
    try:
        _native.set_log_handler(0, None)
    except _native.NativeError as e:
        _raise(e)


@atexit.register
def _at_exit() -> None:
    # No engine thread may call into the interpreter once it is finalising.
    try:
        _native.set_log_handler(0, None)
    except _native.NativeError:
        pass
    for engine in list(_ENGINES):
        engine.close()
