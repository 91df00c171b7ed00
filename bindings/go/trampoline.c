// The C side of the log callback: libpurgatory_sync calls a C function pointer with a
// `void *user_data`; this forwards to the exported Go function with the handle as an integer
// (a cgo.Handle), so that no Go pointer ever crosses into C.
#include <stdint.h>

#include "purgatory_sync.h"
#include "_cgo_export.h"

static void psync_go_log_trampoline(void *user_data, psync_log_level level, const char *target,
                                    const char *message) {
    psyncGoLog((uintptr_t)user_data, (int)level, (char *)target, (char *)message);
}

psync_status psync_go_log_to(psync_log_level level, uintptr_t handle, psync_error **error) {
    return psync_log_to_callback(level, psync_go_log_trampoline, (void *)handle, error);
}
