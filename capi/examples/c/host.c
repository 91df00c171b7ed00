/*
 * A minimal C host for purgatory_sync's C API (capi/include/purgatory_sync.h).
 *
 * Usage: host <config_json> <event_json>...
 *
 * Sends the engine's log (info and above) to stderr through a log callback, starts an engine
 * with the configuration JSON, submits every event JSON, then waits on the engine's readiness
 * descriptor with poll(2) (30 s in all) and takes the outcomes without blocking until every
 * event admitted as Pending has one, printing one line per outcome:
 *
 *     released <event_id> <identifier>
 *     expired <event_id> <identifier> <outcome json>
 *
 * then prints the engine's statistics as JSON, shuts the engine down and frees it. Exits 0 only
 * when every event was released (or already satisfied); on an error it prints the call's
 * psync_error to stderr and exits 1; an event that expired gives exit status 2. Every call
 * that can fail is an `_err` variant: its error is an object of its own, not a per-thread
 * message.
 *
 * Build, after installing the library (`capi/install.sh --prefix "$HOME/.local"`):
 *     export PKG_CONFIG_PATH="$HOME/.local/lib/pkgconfig"
 *     cc -std=c11 -Wall -Wextra -Werror capi/examples/c/host.c -o host \
 *        $(pkg-config --cflags --libs purgatory_sync) -Wl,-rpath,"$HOME/.local/lib"
 */
#define _POSIX_C_SOURCE 200809L

#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "purgatory_sync.h"

#define WAIT_MS 200
#define TOTAL_MS 30000.0

static const char *LEVELS[] = {"off", "error", "warn", "info", "debug", "trace"};

/* Called on the engine's threads: stderr is safe to write from any thread. */
static void log_line(void *user_data, psync_log_level level, const char *target,
                     const char *message) {
    (void)user_data;
    fprintf(stderr, "log %s %s: %s\n", LEVELS[level], target, message);
}

/* Prints the call's error, frees it and returns the exit status for a failure. */
static int fail(const char *what, psync_error *error) {
    const char *message = psync_error_message(error);
    fprintf(stderr, "host: %s failed (status %d): %s\n", what, (int)psync_error_status(error),
            message != NULL ? message : "(no message)");
    psync_error_free(error);
    return 1;
}

static double now_ms(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <config_json> <event_json>...\n", argv[0]);
        return 64;
    }
    printf("purgatory_sync %s\n", psync_version());

    psync_error *error = NULL;
    if (psync_log_to_callback(PSYNC_LOG_INFO, log_line, NULL, &error) != PSYNC_OK) {
        return fail("psync_log_to_callback", error);
    }
    psync_engine *engine = NULL;
    if (psync_engine_new_err(argv[1], &engine, &error) != PSYNC_OK) {
        return fail("psync_engine_new_err", error);
    }

    int exit_code = 0;
    int pending = 0;
    for (int i = 2; i < argc; i++) {
        psync_admission admission = PSYNC_ADMISSION_PENDING;
        char *refused = NULL;
        if (psync_engine_submit_err(engine, argv[i], &admission, &refused, &error) != PSYNC_OK) {
            exit_code = fail("psync_engine_submit_err", error);
            goto done;
        }
        printf("submitted %s refused_urls %s\n",
               admission == PSYNC_ADMISSION_PENDING ? "pending" : "already_satisfied",
               refused != NULL ? refused : "[]");
        psync_string_free(refused);
        if (admission == PSYNC_ADMISSION_PENDING) {
            pending++;
        }
    }

    int fd = -1;
    if (psync_engine_ready_fd(engine, &fd, &error) != PSYNC_OK) {
        exit_code = fail("psync_engine_ready_fd", error);
        goto done;
    }
    int released = 0;
    int outcomes = 0;
    double deadline = now_ms() + TOTAL_MS;
    while (outcomes < pending && now_ms() < deadline) {
        struct pollfd ready = {.fd = fd, .events = POLLIN, .revents = 0};
        if (poll(&ready, 1, WAIT_MS) <= 0) {
            continue; /* nothing yet (or EINTR): wait again */
        }
        for (;;) {
            psync_outcome *outcome = NULL;
            psync_status status = psync_engine_poll_err(engine, 0, &outcome, &error);
            if (status == PSYNC_TIMEOUT) {
                psync_error_free(error); /* drained: wait on the descriptor again */
                error = NULL;
                break;
            }
            if (status != PSYNC_OK) {
                exit_code = fail("psync_engine_poll_err", error);
                goto done;
            }
            outcomes++;
            if (psync_outcome_kind(outcome) == PSYNC_OUTCOME_RELEASED) {
                released++;
                printf("released %s %s\n", psync_outcome_event_id(outcome),
                       psync_outcome_identifier(outcome));
            } else {
                printf("expired %s %s %s\n", psync_outcome_event_id(outcome),
                       psync_outcome_identifier(outcome), psync_outcome_json(outcome));
            }
            psync_outcome_free(outcome);
        }
    }
    if (outcomes < pending) {
        fprintf(stderr, "host: only %d of %d outcomes within %.0f ms\n", outcomes, pending,
                TOTAL_MS);
        exit_code = 3;
    } else if (released < pending) {
        exit_code = 2;
    }

    char *stats = NULL;
    if (psync_engine_stats_json_err(engine, &stats, &error) != PSYNC_OK) {
        exit_code = fail("psync_engine_stats_json_err", error);
        goto done;
    }
    printf("stats %s\n", stats);
    psync_string_free(stats);

done:
    if (psync_engine_shutdown_err(engine, &error) != PSYNC_OK && exit_code == 0) {
        exit_code = fail("psync_engine_shutdown_err", error);
    } else {
        psync_error_free(error);
    }
    psync_engine_free(engine);
    psync_log_to_callback(PSYNC_LOG_OFF, log_line, NULL, NULL);
    fflush(stdout);
    return exit_code;
}
