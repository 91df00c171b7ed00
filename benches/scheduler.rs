//! One scheduler decision pass at growing queue sizes.
//!
//! - `decision_pass_1pct_ready`: 1 % of the queue ready, each ready entry dispatched as a fetch
//!   (domain limits do not bind). The queue is built anew for every measured pass (the build
//!   is not measured), which is too slow at a million entries;
//! - `decision_pass_1pct_ready_reused`: the same pass on one queue per size, put back between
//!   passes (the dispatched fetches are reported as failed and the clock moves on by the
//!   backoff, so the same entries are ready again; not measured). Up to a million entries;
//! - `decision_pass_none_ready`: a pass when nothing is ready, the cost of waking on a tick
//!   with a full queue;
//! - `decision_pass_parked`: every entry ready on one domain whose 5 slots are taken, so all
//!   but 5 wait in the domain's queue: a pass that can dispatch nothing;
//! - `stats_parked`: the core's part of `Engine::stats()` with those parked entries;
//! - `checkpoint_under_lock`: the part of a state-file checkpoint done under the core's lock,
//!   with every entry waiting; `checkpoint_state_file`: the whole checkpoint but the write.
//!
//! - `submit_command`: one host submit applied by the core (an event with 64 clone URLs and 64
//!   objects of its own) to an identifier that already holds 0, 1 000 or 10 000 such events:
//!   its cost must not grow with what the identifier holds;
//! - `scheduler_turn`: 1 024 such submits queued at once onto an identifier holding 1 000 such
//!   events, and the one scheduler turn that takes them under the core's lock: it stops at
//!   `COMMAND_TURN` (2 ms), leaving the rest for later turns, so the lock is never held longer
//!   than that plus one command. The bench prints how many commands the turn applied.
//!
//! The queue keeps an index ordered by next attempt, so a pass reads only the ready front: its
//! cost should follow the number of ready entries, not the queue size.
//!
//! Run with `cargo bench --bench scheduler`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use purgatory_sync::internals::bench::{CommandBench, QueueBench};

const SIZES: [usize; 4] = [1_000, 10_000, 100_000, 1_000_000];

/// The queue sizes to measure, up to `largest`. Without `--bench` (`cargo test --benches`
/// runs each bench once, as a test) only the smallest, so that the test stays quick.
fn sizes(largest: usize) -> impl Iterator<Item = usize> {
    let full = std::env::args().any(|a| a == "--bench");
    SIZES
        .into_iter()
        .filter(move |&n| n <= largest && (full || n == SIZES[0]))
}

fn decision_pass(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision_pass_1pct_ready");
    group.sample_size(20);
    for queued in sizes(100_000) {
        let ready = queued / 100;
        group.throughput(Throughput::Elements(ready as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(queued),
            &queued,
            |b, &queued| {
                b.iter_batched_ref(
                    || QueueBench::new(queued, ready, ready.max(1)),
                    |q| {
                        let dispatched = q.pass();
                        assert_eq!(dispatched, ready);
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();

    let mut reused = c.benchmark_group("decision_pass_1pct_ready_reused");
    reused.sample_size(20);
    reused.measurement_time(Duration::from_secs(10));
    for queued in sizes(usize::MAX) {
        let ready = queued / 100;
        // Built at the first call, so that a filtered-out size costs nothing.
        let mut q = None;
        reused.throughput(Throughput::Elements(ready as u64));
        reused.bench_with_input(BenchmarkId::from_parameter(queued), &queued, |b, _| {
            let q = q.get_or_insert_with(|| QueueBench::new(queued, ready, ready));
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    q.reset();
                    let start = Instant::now();
                    let dispatched = q.pass();
                    measured += start.elapsed();
                    assert_eq!(dispatched, ready);
                }
                measured
            })
        });
    }
    reused.finish();

    per_size(
        c,
        "decision_pass_none_ready",
        |queued| QueueBench::new(queued, 0, 8),
        |q, _| assert_eq!(q.pass(), 0),
    );
    per_size(c, "decision_pass_parked", parked, |q, _| {
        assert_eq!(q.pass(), 0)
    });
    // `Engine::stats` with the same parked queues: it counts each domain's waiting entries.
    per_size(c, "stats_parked", parked, |q, queued| {
        assert_eq!(q.stats(), queued - 5)
    });
    // A checkpoint: what it does under the core's lock, and all of it but the file write.
    let waiting = |queued| QueueBench::new(queued, 0, 8);
    let mut group = c.benchmark_group("checkpoint_under_lock");
    group.sample_size(20);
    for queued in sizes(usize::MAX) {
        let mut q = None;
        group.bench_with_input(BenchmarkId::from_parameter(queued), &queued, |b, _| {
            let q = q.get_or_insert_with(|| waiting(queued));
            // The snapshot is dropped after the lock, so out of the measurement.
            b.iter_with_large_drop(|| q.snapshot())
        });
    }
    group.finish();
    per_size(c, "checkpoint_state_file", waiting, |q, queued| {
        assert_eq!(q.state_file(), queued)
    });
}

/// Every entry ready on one domain; the first pass took the domain's 5 slots and parked the
/// rest.
fn parked(queued: usize) -> QueueBench {
    let mut q = QueueBench::parked(queued, 1);
    assert_eq!(q.pass(), 5);
    q
}

/// A group that measures `measure` on one queue per size, built by `build` at its first use
/// (so that a filtered-out size costs nothing).
fn per_size(
    c: &mut Criterion,
    name: &str,
    build: impl Fn(usize) -> QueueBench,
    measure: impl Fn(&mut QueueBench, usize),
) {
    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    for queued in sizes(usize::MAX) {
        let mut q = None;
        group.bench_with_input(BenchmarkId::from_parameter(queued), &queued, |b, _| {
            let q = q.get_or_insert_with(|| build(queued));
            b.iter(|| measure(q, queued))
        });
    }
    group.finish();
}

fn commands(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let mut group = c.benchmark_group("submit_command");
    group.sample_size(20);
    for held in [0usize, 1_000, 10_000] {
        if !full && held > 0 {
            continue;
        }
        let mut bench = None;
        group.bench_with_input(BenchmarkId::from_parameter(held), &held, |b, &held| {
            let bench = bench.get_or_insert_with(|| CommandBench::new(held, 64));
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let command = bench.prepare();
                    let start = Instant::now();
                    bench.submit(command);
                    measured += start.elapsed();
                }
                measured
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("scheduler_turn");
    group.sample_size(10);
    let mut bench = CommandBench::new(if full { 1_000 } else { 100 }, 64);
    let mut most_applied = 0;
    let mut longest = Duration::ZERO;
    group.bench_function("1024_submits_queued", |b| {
        b.iter_custom(|iters| {
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                let (applied, took) = bench.turn(1024);
                most_applied = most_applied.max(applied);
                longest = longest.max(took);
                measured += took;
            }
            measured
        })
    });
    group.finish();
    println!(
        "scheduler_turn: at most {most_applied} of 1024 queued commands applied in one turn; \
         longest turn {longest:?}"
    );
}

criterion_group!(benches, decision_pass, commands);
criterion_main!(benches);
