#!/usr/bin/env python3
"""A minimal Python host for purgatory_sync's C API, with ctypes only.

Usage: PSYNC_LIB=/path/to/libpurgatory_sync.so python3 host.py <config_json> <event_json>...
   or: python3 host.py --lib /path/to/libpurgatory_sync.so <config_json> <event_json>...

Starts an engine with the configuration JSON, submits every event JSON, polls (200 ms per
call, 30 s in all) until every event admitted as pending has an outcome, printing one line per
outcome ("released <event_id> <identifier>" or "expired <event_id> <identifier> <json>"),
prints the statistics JSON, shuts the engine down and frees it. Exits 0 only when every event
was released; on an error prints psync_last_error_message() to stderr and exits 1.
"""

import ctypes
import os
import sys
import time

PSYNC_OK = 0
PSYNC_TIMEOUT = 7
PSYNC_ADMISSION_PENDING = 0
PSYNC_OUTCOME_RELEASED = 0
POLL_MS = 200
TOTAL_S = 30.0


class Engine(ctypes.Structure):
    """Opaque psync_engine."""


class Outcome(ctypes.Structure):
    """Opaque psync_outcome."""


EngineP = ctypes.POINTER(Engine)
OutcomeP = ctypes.POINTER(Outcome)
# Strings the library hands out and we must free: kept as raw pointers (c_void_p), not c_char_p,
# which ctypes would convert to bytes and lose the pointer.
OwnedString = ctypes.c_void_p


def load(path):
    lib = ctypes.CDLL(path)
    sig = {
        "psync_version": (ctypes.c_char_p, []),
        "psync_last_error_message": (ctypes.c_char_p, []),
        "psync_engine_new": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(EngineP)]),
        "psync_engine_submit": (
            ctypes.c_int,
            [EngineP, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(OwnedString)],
        ),
        "psync_engine_poll": (ctypes.c_int, [EngineP, ctypes.c_uint32, ctypes.POINTER(OutcomeP)]),
        "psync_outcome_kind": (ctypes.c_int, [OutcomeP]),
        "psync_outcome_event_id": (ctypes.c_char_p, [OutcomeP]),
        "psync_outcome_identifier": (ctypes.c_char_p, [OutcomeP]),
        "psync_outcome_json": (ctypes.c_char_p, [OutcomeP]),
        "psync_outcome_free": (None, [OutcomeP]),
        "psync_engine_stats_json": (ctypes.c_int, [EngineP, ctypes.POINTER(OwnedString)]),
        "psync_string_free": (None, [OwnedString]),
        "psync_engine_shutdown": (ctypes.c_int, [EngineP]),
        "psync_engine_free": (None, [EngineP]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class PsyncError(Exception):
    pass


def check(lib, what, status):
    if status != PSYNC_OK:
        message = lib.psync_last_error_message()
        text = message.decode("utf-8", "replace") if message else "(no message)"
        raise PsyncError(f"{what} failed (status {status}): {text}")


def take_string(lib, ptr):
    """Copy an owned string out of the library and free it."""
    if not ptr.value:
        return None
    try:
        return ctypes.string_at(ptr.value).decode("utf-8")
    finally:
        lib.psync_string_free(ptr)


def text(b):
    return b.decode("utf-8", "replace") if b is not None else "(null)"


def run(lib, config, events):
    print(f"purgatory_sync {text(lib.psync_version())}", flush=True)
    engine = EngineP()
    check(lib, "psync_engine_new", lib.psync_engine_new(config.encode(), ctypes.byref(engine)))
    try:
        pending = 0
        for event in events:
            admission = ctypes.c_int(PSYNC_ADMISSION_PENDING)
            refused = OwnedString()
            status = lib.psync_engine_submit(
                engine, event.encode(), ctypes.byref(admission), ctypes.byref(refused)
            )
            try:
                # Read the error message before any other psync_ call replaces it.
                check(lib, "psync_engine_submit", status)
            finally:
                refused_json = take_string(lib, refused)
            is_pending = admission.value == PSYNC_ADMISSION_PENDING
            state = "pending" if is_pending else "already_satisfied"
            print(f"submitted {state} refused_urls {refused_json or '[]'}", flush=True)
            pending += is_pending

        outcomes = released = 0
        deadline = time.monotonic() + TOTAL_S
        while outcomes < pending and time.monotonic() < deadline:
            outcome = OutcomeP()
            status = lib.psync_engine_poll(engine, POLL_MS, ctypes.byref(outcome))
            if status == PSYNC_TIMEOUT:
                continue
            check(lib, "psync_engine_poll", status)
            try:
                outcomes += 1
                event_id = text(lib.psync_outcome_event_id(outcome))
                identifier = text(lib.psync_outcome_identifier(outcome))
                if lib.psync_outcome_kind(outcome) == PSYNC_OUTCOME_RELEASED:
                    released += 1
                    print(f"released {event_id} {identifier}", flush=True)
                else:
                    whole = text(lib.psync_outcome_json(outcome))
                    print(f"expired {event_id} {identifier} {whole}", flush=True)
            finally:
                lib.psync_outcome_free(outcome)

        stats = OwnedString()
        check(lib, "psync_engine_stats_json",
              lib.psync_engine_stats_json(engine, ctypes.byref(stats)))
        print(f"stats {take_string(lib, stats)}", flush=True)

        check(lib, "psync_engine_shutdown", lib.psync_engine_shutdown(engine))
        if outcomes < pending:
            print(f"host.py: only {outcomes} of {pending} outcomes within {TOTAL_S} s",
                  file=sys.stderr)
            return 3
        return 0 if released == pending else 2
    finally:
        lib.psync_engine_free(engine)


def main(argv):
    args = argv[1:]
    path = os.environ.get("PSYNC_LIB")
    if len(args) >= 2 and args[0] == "--lib":
        path, args = args[1], args[2:]
    if not path or not args:
        print("usage: PSYNC_LIB=libpurgatory_sync.so host.py <config_json> <event_json>...\n"
              "   or: host.py --lib <libpurgatory_sync.so> <config_json> <event_json>...",
              file=sys.stderr)
        return 64
    lib = load(path)
    try:
        return run(lib, args[0], args[1:])
    except PsyncError as e:
        print(f"host.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
