/*
 * A minimal C host for purgatory_sync's C API (capi/include/purgatory_sync.h).
 *
 * Usage: host <config_json> <event_json>...
 *
 * Starts an engine with the configuration JSON, submits every event JSON, then polls (200 ms
 * per call, 30 s in all) until every event admitted as Pending has an outcome, printing one
 * line per outcome:
 *
 *     released <event_id> <identifier>
 *     expired <event_id> <identifier> <outcome json>
 *
 * then prints the engine's statistics as JSON, shuts the engine down and frees it. Exits 0 only
 * when every event was released (or already satisfied); on an error it prints
 * psync_last_error_message() to stderr and exits 1; an event that expired gives exit status 2.
 *
 * Build, after installing the library (`capi/install.sh --prefix "$HOME/.local"`):
 *     export PKG_CONFIG_PATH="$HOME/.local/lib/pkgconfig"
 *     cc -std=c11 -Wall -Wextra -Werror capi/examples/c/host.c -o host \
 *        $(pkg-config --cflags --libs purgatory_sync) -Wl,-rpath,"$HOME/.local/lib"
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "purgatory_sync.h"

#define POLL_MS 200u
#define TOTAL_MS 30000.0

static int fail(const char *what, psync_status status) {
    const char *message = psync_last_error_message();
    fprintf(stderr, "host: %s failed (status %d): %s\n", what, (int)status,
            message != NULL ? message : "(no message)");
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

    psync_engine *engine = NULL;
    psync_status status = psync_engine_new(argv[1], &engine);
    if (status != PSYNC_OK) {
        return fail("psync_engine_new", status);
    }

    int exit_code = 0;
    int pending = 0;
    for (int i = 2; i < argc; i++) {
        psync_admission admission = PSYNC_ADMISSION_PENDING;
        char *refused = NULL;
        status = psync_engine_submit(engine, argv[i], &admission, &refused);
        if (status != PSYNC_OK) {
            exit_code = fail("psync_engine_submit", status);
            psync_string_free(refused);
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

    int released = 0;
    int outcomes = 0;
    double deadline = now_ms() + TOTAL_MS;
    while (outcomes < pending && now_ms() < deadline) {
        psync_outcome *outcome = NULL;
        status = psync_engine_poll(engine, POLL_MS, &outcome);
        if (status == PSYNC_TIMEOUT) {
            continue;
        }
        if (status != PSYNC_OK) {
            exit_code = fail("psync_engine_poll", status);
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
    if (outcomes < pending) {
        fprintf(stderr, "host: only %d of %d outcomes within %.0f ms\n", outcomes, pending,
                TOTAL_MS);
        exit_code = 3;
    } else if (released < pending) {
        exit_code = 2;
    }

    char *stats = NULL;
    status = psync_engine_stats_json(engine, &stats);
    if (status != PSYNC_OK) {
        exit_code = fail("psync_engine_stats_json", status);
        goto done;
    }
    printf("stats %s\n", stats);
    psync_string_free(stats);

done:
    status = psync_engine_shutdown(engine);
    if (status != PSYNC_OK && exit_code == 0) {
        exit_code = fail("psync_engine_shutdown", status);
    }
    psync_engine_free(engine);
    fflush(stdout);
    return exit_code;
}
