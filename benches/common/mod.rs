//! Helpers shared by the benches that print their own reports (`e2e`, `latency`, `memory`).

/// The 1, 5 and 15-minute load averages from `/proc/loadavg` ("?" where it cannot be read):
/// every report gives them, since other work on the machine skews absolute times.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}
