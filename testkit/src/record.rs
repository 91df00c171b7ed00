//! The request log of the test servers.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// One request served by an [`HttpGitServer`](super::HttpGitServer), or one connection
/// relayed by a [`FaultyTcpServer`](super::FaultyTcpServer) or a
/// [`DelayProxy`](super::DelayProxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The `Host` header (`127.0.0.2:40123`), or for `git://` the `host=` parameter of the
    /// client's request; empty if the client sent none.
    pub host: String,
    /// The HTTP method (`GET`, `POST`), or for `git://` the service (`git-upload-pack`);
    /// empty if the connection closed before a request arrived.
    pub method: String,
    /// The request path with its query (`/alice/hello.git/info/refs?service=git-upload-pack`),
    /// or for `git://` the repository path (`/alice/hello.git`).
    pub path: String,
    /// The HTTP status sent; `0` when no status line was sent (a [`Hang`](super::Fault::Hang),
    /// a broken request), for every `git://` connection and for every connection through a
    /// [`DelayProxy`](super::DelayProxy).
    pub status: u16,
    /// When the request line (for `git://`: the first pkt-line) had arrived; for a
    /// [`DelayProxy`](super::DelayProxy), when the connection was accepted.
    pub started: Instant,
    /// When the last byte was written and the connection closed for writing; for a request
    /// still in progress, the moment the snapshot was taken.
    pub ended: Instant,
    /// Whether the request was over when the snapshot was taken.
    pub finished: bool,
    /// Bytes written to the client so far: status line, headers and body.
    pub bytes_sent: u64,
}

impl RequestRecord {
    /// How long the request took (so far, if not [`finished`](Self::finished)).
    pub fn duration(&self) -> std::time::Duration {
        self.ended.saturating_duration_since(self.started)
    }
}

/// The largest number of `records` whose `[started, ended]` intervals overlap at one instant.
/// Intervals that touch (one ends at the instant the other starts) count as overlapping, so
/// the answer never understates concurrency. Filter the records first to count, say, one
/// host or one path.
pub fn max_concurrent(records: &[RequestRecord]) -> usize {
    // Starts sort before ends at the same instant (false < true).
    let mut edges: Vec<(Instant, bool)> = records
        .iter()
        .flat_map(|r| [(r.started, false), (r.ended.max(r.started), true)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0usize, 0usize);
    for (_, is_end) in edges {
        if is_end {
            now = now.saturating_sub(1);
        } else {
            now += 1;
            most = most.max(now);
        }
    }
    most
}

/// A request in the log; `ended` is `None` while it runs.
#[derive(Debug)]
struct Slot {
    id: u64,
    record: RequestRecord,
    ended: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    slots: Vec<Slot>,
}

/// The shared request log of one server.
#[derive(Debug, Default, Clone)]
pub(super) struct RequestLog {
    inner: Arc<Mutex<Inner>>,
}

impl RequestLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking connection thread leaves the log consistent: every update is one field.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs a request that started at `started`; the entry updates it and finishes it when
    /// dropped.
    pub(super) fn begin(&self, started: Instant, method: &str, path: &str) -> Entry {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.slots.push(Slot {
            id,
            record: RequestRecord {
                host: String::new(),
                method: method.to_owned(),
                path: path.to_owned(),
                status: 0,
                started,
                ended: started,
                finished: false,
                bytes_sent: 0,
            },
            ended: None,
        });
        Entry {
            log: self.clone(),
            id,
            done: false,
        }
    }

    /// A snapshot, oldest request first.
    pub(super) fn snapshot(&self) -> Vec<RequestRecord> {
        let now = Instant::now();
        self.lock()
            .slots
            .iter()
            .map(|slot| {
                let mut record = slot.record.clone();
                record.finished = slot.ended.is_some();
                record.ended = slot.ended.unwrap_or(now).max(record.started);
                record
            })
            .collect()
    }

    /// Waits until no request is in progress, up to `timeout`; true if none is.
    pub(super) fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lock().slots.iter().all(|s| s.ended.is_some()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Forgets every request, also those in progress (their later updates are dropped).
    pub(super) fn clear(&self) {
        self.lock().slots.clear();
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut Slot)) {
        let mut inner = self.lock();
        // Recent requests are at the end.
        if let Some(slot) = inner.slots.iter_mut().rev().find(|s| s.id == id) {
            change(slot);
        }
    }
}

/// A request in progress; dropping it marks the request finished (now).
#[derive(Debug)]
pub(super) struct Entry {
    log: RequestLog,
    id: u64,
    done: bool,
}

impl Entry {
    /// A sequence number, unique within the server (used to seed garbage).
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn set_host(&self, host: &str) {
        self.log
            .update(self.id, |s| host.clone_into(&mut s.record.host));
    }

    pub(super) fn set_request(&self, method: &str, path: &str) {
        self.log.update(self.id, |s| {
            method.clone_into(&mut s.record.method);
            path.clone_into(&mut s.record.path);
        });
    }

    pub(super) fn set_status(&self, status: u16) {
        self.log.update(self.id, |s| s.record.status = status);
    }

    pub(super) fn add_bytes(&self, n: usize) {
        if n > 0 {
            self.log
                .update(self.id, |s| s.record.bytes_sent += n as u64);
        }
    }

    /// Marks the request finished now.
    pub(super) fn finish(&mut self) {
        if !self.done {
            self.done = true;
            let now = Instant::now();
            self.log.update(self.id, |s| s.ended = Some(now));
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(start_ms: u64, end_ms: u64, base: Instant) -> RequestRecord {
        RequestRecord {
            host: "h".into(),
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            started: base + Duration::from_millis(start_ms),
            ended: base + Duration::from_millis(end_ms),
            finished: true,
            bytes_sent: 0,
        }
    }

    #[test]
    fn max_concurrent_counts_overlapping_intervals() {
        let t = Instant::now();
        assert_eq!(max_concurrent(&[]), 0);
        assert_eq!(max_concurrent(&[record(0, 10, t)]), 1);
        // Disjoint.
        assert_eq!(max_concurrent(&[record(0, 10, t), record(11, 20, t)]), 1);
        // Touching counts as overlapping.
        assert_eq!(max_concurrent(&[record(0, 10, t), record(10, 20, t)]), 2);
        // Nested and chained: at most two at once, then three.
        let rs = [
            record(0, 100, t),
            record(10, 20, t),
            record(30, 40, t),
            record(50, 60, t),
        ];
        assert_eq!(max_concurrent(&rs), 2);
        let rs = [
            record(0, 100, t),
            record(10, 60, t),
            record(50, 70, t),
            record(65, 80, t),
        ];
        assert_eq!(max_concurrent(&rs), 3);
        // Order does not matter; an instant request still counts.
        let rs = [record(50, 50, t), record(0, 100, t)];
        assert_eq!(max_concurrent(&rs), 2);
    }

    #[test]
    fn log_entries_update_finish_and_clear() {
        let log = RequestLog::default();
        let start = Instant::now();
        let mut a = log.begin(start, "GET", "/a");
        let b = log.begin(start, "", "");
        assert_ne!(a.id(), b.id());
        a.set_host("127.0.0.2:1");
        a.set_status(404);
        a.add_bytes(10);
        a.add_bytes(5);
        b.set_request("git-upload-pack", "/b.git");
        let snap = log.snapshot();
        assert_eq!(snap.len(), 2);
        assert!(!snap[0].finished && !snap[1].finished);
        assert_eq!(
            (snap[0].host.as_str(), snap[0].status, snap[0].bytes_sent),
            ("127.0.0.2:1", 404, 15)
        );
        assert_eq!(snap[1].path, "/b.git");
        a.finish();
        let ended = log.snapshot()[0].ended;
        std::thread::sleep(Duration::from_millis(5));
        let snap = log.snapshot();
        assert!(snap[0].finished && snap[0].ended == ended);
        // An unfinished request ends "now" in every snapshot.
        assert!(snap[1].ended > ended);
        drop(b);
        assert!(log.snapshot()[1].finished);
        log.clear();
        assert!(log.snapshot().is_empty());
        // Updates of cleared requests are dropped.
        a.set_status(200);
        assert!(log.snapshot().is_empty());
    }
}
