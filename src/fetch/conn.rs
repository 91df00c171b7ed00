//! The sockets under every libgit2 fetch: hard limits enforced byte by byte.
//!
//! libgit2's own sockets only know a per-read timeout, and its progress callback fires every
//! 100 KB, so a server that drips one byte a second could hold a worker forever. The engine
//! therefore registers its own socket stream with libgit2 (the glue is in `crate::fetch::stream`);
//! libgit2 still speaks the git and HTTP protocols and does TLS on top of it, but every
//! connect, read and write goes through [`Conn`] here, which checks the fetch's wall-clock
//! deadline, the cancel flag, the byte cap and the idle timeout, and records precisely why it
//! gave up so that failures are classified from facts rather than from libgit2's messages.
//!
//! The limits come from a [`NetContext`] installed for the current thread by the fetcher. A
//! stream opened outside any fetch (a host using libgit2 for its own purposes) gets plain
//! sockets with the default timeouts.
//!
//! The context also counts the memory libgit2 holds for the fetch: the engine's allocator
//! (`crate::fetch::alloc`) asks [`may_allocate`] before every allocation libgit2 makes and
//! reports each block to [`allocated`]. A fetch may hold at most its budget at once, and once
//! its deadline has passed or the engine is shutting down, every large allocation is refused.
//! Resolving a pack's deltas happens inside libgit2 with no socket read, and allocates the
//! result of every delta it applies, so this is what bounds a pack crafted to expand (a "delta
//! bomb") in memory and in time.
//!
//! The context also carries the URL policy's last word ([`Guard`]): a fetch may only connect
//! to the host of its URL (libgit2 follows no redirect with our options, and `insteadOf`
//! rewrites are refused, but this makes it a guarantee), and, unless private addresses are
//! allowed, only to public addresses. Every address the host name resolves to is checked
//! before any connection is made, and the connection goes to an address that was checked, so
//! a name pointing at 127.0.0.1 or 10.x, or DNS rebinding, cannot reach a private address.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::framing::{Protocol, Watch};
use super::FailureKind;
use crate::config::net_defaults;
use crate::policy::{canonical_host, ip_allowed, Host};

/// Longest a single blocking socket call waits before the limits are checked again, so that
/// cancellation is noticed promptly even on a silent connection.
const SLICE: Duration = Duration::from_millis(200);

/// Allocations at least this large are refused once the fetch must stop: libgit2 applies a
/// delta into a block as large as its result, so a pack that keeps libgit2 busy without reading
/// the socket (deltas expanding to large objects) is stopped at its next delta.
const STOP_CHECKED_BLOCK: usize = 64 * 1024;

/// The limits of one fetch, shared by every connection it opens.
#[derive(Debug)]
pub(crate) struct NetContext {
    pub deadline: Instant,
    pub cancel: Arc<AtomicBool>,
    pub max_bytes: u64,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    guard: Option<Guard>,
    received: AtomicU64,
    failure: Mutex<Option<(FailureKind, String)>>,
    /// Most bytes libgit2 may hold for the fetch at once.
    memory_limit: usize,
    /// Bytes libgit2 holds for the fetch now: allocated on the fetch's thread while the context
    /// was current and not freed yet (blocks from before the fetch freed during it make it a
    /// little low, never high).
    memory_live: AtomicUsize,
    memory_peak: AtomicUsize,
    /// The memory all fetches hold together, shared by the engine's fetches.
    pool: Option<Arc<MemoryPool>>,
    /// Bytes taken from the pool for the allocation under way (`may_allocate`), settled by
    /// `allocated`.
    reserved: AtomicUsize,
    /// What the connections speak, for the limits on parts of the answer (`framing`).
    protocol: Protocol,
    max_advertisement: u64,
}

/// The memory libgit2 holds for all of an engine's fetches together, and its limit. What a
/// fetch still holds when it ends (libgit2 leaked it) stays counted.
#[derive(Debug)]
pub(crate) struct MemoryPool {
    limit: usize,
    live: AtomicUsize,
}

impl MemoryPool {
    pub fn new(limit: u64) -> Self {
        MemoryPool {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            live: AtomicUsize::new(0),
        }
    }
}

impl Drop for NetContext {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            self.settle(pool);
        }
    }
}

/// Adds `up` to `n` and takes `down` away, never below zero.
fn adjust(n: &AtomicUsize, up: usize, down: usize) {
    let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(up).saturating_sub(down))
    });
}

/// Where the connections of one fetch may go.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    /// The URL's host, canonical: the only host a connection may be opened to.
    host: Host,
    /// The URL's port: the only port a connection may be opened to (libgit2 follows a redirect
    /// to another port of the same host even with redirects off).
    port: Option<u16>,
    allow_private: bool,
}

impl Guard {
    /// Connections only to `host` (canonicalised; an invalid one allows no connection), and
    /// to private addresses only if `allow_private`.
    pub fn new(host: &str, allow_private: bool) -> Self {
        Guard {
            host: canonical_host(host).unwrap_or_else(|| Host::Name(String::new())),
            port: None,
            allow_private,
        }
    }

    /// Connections only to `port` as well.
    pub fn on_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
}

impl NetContext {
    pub fn new(
        deadline: Instant,
        cancel: Arc<AtomicBool>,
        max_bytes: u64,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Self {
        NetContext {
            deadline,
            cancel,
            max_bytes,
            connect_timeout,
            io_timeout,
            guard: None,
            received: AtomicU64::new(0),
            failure: Mutex::new(None),
            memory_limit: usize::MAX,
            memory_live: AtomicUsize::new(0),
            memory_peak: AtomicUsize::new(0),
            pool: None,
            reserved: AtomicUsize::new(0),
            protocol: Protocol::Opaque,
            max_advertisement: u64::MAX,
        }
    }

    /// The connections speak `protocol`; a ref advertisement may be `max_advertisement` bytes.
    pub fn with_framing(mut self, protocol: Protocol, max_advertisement: u64) -> Self {
        self.protocol = protocol;
        self.max_advertisement = max_advertisement;
        self
    }

    /// Limits the memory libgit2 may hold for the fetch at once to `bytes`.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = usize::try_from(bytes).unwrap_or(usize::MAX);
        self
    }

    /// Counts the fetch's memory in `pool` too, and holds it to the pool's limit.
    pub fn with_memory_pool(mut self, pool: Option<Arc<MemoryPool>>) -> Self {
        self.pool = pool;
        self
    }

    /// The memory libgit2 holds for the fetch now.
    pub fn memory_live(&self) -> u64 {
        self.memory_live.load(Ordering::Relaxed) as u64
    }

    /// The most memory libgit2 held for the fetch at once.
    pub fn memory_peak(&self) -> u64 {
        self.memory_peak.load(Ordering::Relaxed) as u64
    }

    /// Whether libgit2 may allocate a block of `len` bytes that adds `grow` bytes to what the
    /// fetch holds. A refusal records why, unless a reason is recorded already.
    fn may_allocate(&self, len: usize, grow: usize) -> bool {
        let live = self.memory_live.load(Ordering::Relaxed);
        if live.saturating_add(grow) > self.memory_limit {
            self.fail_first(
                FailureKind::MemoryCap,
                format!(
                    "the fetch needed more than its memory budget of {} bytes (it held {live} \
                     and asked for {len} more)",
                    self.memory_limit
                ),
            );
            return false;
        }
        if let Some(pool) = &self.pool {
            // Taken now, so that fetches allocating at once cannot pass the limit together.
            let taken = pool
                .live
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    let after = n.saturating_add(grow);
                    (after <= pool.limit).then_some(after)
                });
            self.settle(pool);
            if let Err(total) = taken {
                self.fail_first(
                    FailureKind::MemoryCap,
                    format!(
                        "the fetches together needed more than their memory budget of {} \
                         bytes (they held {total} and this one asked for {len} more)",
                        pool.limit
                    ),
                );
                return false;
            }
            self.reserved.store(grow, Ordering::Relaxed);
        }
        if len >= STOP_CHECKED_BLOCK {
            if self.cancel.load(Ordering::Relaxed) {
                self.fail_first(FailureKind::Cancelled, "the engine is shutting down".into());
                return false;
            }
            if Instant::now() >= self.deadline {
                self.fail_first(FailureKind::Deadline, "the fetch deadline passed".into());
                return false;
            }
        }
        true
    }

    fn allocated(&self, added: usize, removed: usize) {
        let before = self.memory_live.load(Ordering::Relaxed);
        let live = before.saturating_add(added).saturating_sub(removed);
        self.memory_live.store(live, Ordering::Relaxed);
        self.memory_peak.fetch_max(live, Ordering::Relaxed);
        if let Some(pool) = &self.pool {
            // The pool moves as the fetch's own count does (blocks from before the fetch,
            // freed during it, move neither), less what `may_allocate` took already.
            let reserved = self.reserved.swap(0, Ordering::Relaxed);
            let (up, down) = if live >= before {
                (live - before, 0)
            } else {
                (0, before - live)
            };
            adjust(&pool.live, up, down.saturating_add(reserved));
        }
    }

    /// Gives back to `pool` what an allocation that never happened took.
    fn settle(&self, pool: &MemoryPool) {
        let reserved = self.reserved.swap(0, Ordering::Relaxed);
        if reserved > 0 {
            adjust(&pool.live, 0, reserved);
        }
    }

    /// Restricts the fetch's connections to `guard`'s host and addresses.
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Bytes received over every connection of the fetch.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Why the last connection gave up, if it was the stream's decision. Taking it clears it,
    /// so that a later failure of the same fetch is not blamed on an earlier one.
    pub fn take_failure(&self) -> Option<(FailureKind, String)> {
        self.failure.lock().take()
    }

    fn fail(&self, kind: FailureKind, message: String) -> String {
        *self.failure.lock() = Some((kind, message.clone()));
        message
    }

    /// Records why the fetch failed unless a reason is recorded already: libgit2 may go on
    /// allocating after a refusal, and the first refusal is the cause.
    fn fail_first(&self, kind: FailureKind, message: String) {
        let mut failure = self.failure.lock();
        if failure.is_none() {
            *failure = Some((kind, message));
        }
    }

    fn check_limits(&self) -> Result<(), String> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(self.fail(FailureKind::Cancelled, "the engine is shutting down".into()));
        }
        if Instant::now() >= self.deadline {
            return Err(self.fail(FailureKind::Deadline, "the fetch deadline passed".into()));
        }
        Ok(())
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<NetContext>>> = const { RefCell::new(None) };
}

/// Whether libgit2 may allocate a block of `len` bytes that adds `grow` bytes to what it holds,
/// for the current thread's fetch; always outside a fetch. Called by the engine's allocator.
pub(crate) fn may_allocate(len: usize, grow: usize) -> bool {
    with_current(|ctx| ctx.may_allocate(len, grow)).unwrap_or(true)
}

/// libgit2 allocated `added` bytes and freed `removed` bytes on this thread. Called by the
/// engine's allocator for every block, inside a fetch or not.
pub(crate) fn allocated(added: usize, removed: usize) {
    with_current(|ctx| ctx.allocated(added, removed));
}

/// `f` of the current thread's fetch context, if there is one. Never panics: it runs inside
/// libgit2's allocator, also while the thread's locals are being torn down.
fn with_current<R>(f: impl FnOnce(&NetContext) -> R) -> Option<R> {
    CURRENT
        .try_with(|c| c.try_borrow().ok()?.as_deref().map(f))
        .ok()
        .flatten()
}

/// Runs `f` with `ctx` as the current thread's fetch limits.
pub(crate) fn with_context<R>(ctx: &Arc<NetContext>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<NetContext>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let previous = CURRENT.with(|c| c.borrow_mut().replace(ctx.clone()));
    let _reset = Reset(previous);
    f()
}

/// One TCP connection opened by libgit2.
#[derive(Debug)]
pub(crate) struct Conn {
    host: String,
    port: String,
    ctx: Option<Arc<NetContext>>,
    stream: Option<TcpStream>,
    watch: Watch,
}

impl Conn {
    pub fn new(host: &str, port: &str) -> Self {
        let ctx = CURRENT.with(|c| c.borrow().clone());
        let watch = match &ctx {
            Some(c) => Watch::new(c.protocol, c.max_advertisement),
            None => Watch::new(Protocol::Opaque, u64::MAX),
        };
        Conn {
            host: host.to_owned(),
            port: port.to_owned(),
            ctx,
            stream: None,
            watch,
        }
    }

    fn fail(&self, kind: FailureKind, message: String) -> String {
        match &self.ctx {
            Some(ctx) => ctx.fail(kind, message),
            None => message,
        }
    }

    fn check(&self) -> Result<(), String> {
        self.ctx.as_ref().map_or(Ok(()), |c| c.check_limits())
    }

    fn io_timeout(&self) -> Duration {
        self.ctx
            .as_ref()
            .map_or(net_defaults::IO_TIMEOUT, |c| c.io_timeout)
    }

    /// Time left until the deadline, or `cap` outside a fetch.
    fn left(&self, cap: Duration) -> Duration {
        match &self.ctx {
            Some(c) => c
                .deadline
                .saturating_duration_since(Instant::now())
                .min(cap),
            None => cap,
        }
    }

    pub fn connect(&mut self) -> Result<(), String> {
        self.check()?;
        let port: u16 = self
            .port
            .parse()
            .map_err(|_| self.fail(FailureKind::Protocol, format!("bad port {:?}", self.port)))?;
        let target = format!("{}:{}", self.host, port);
        let guard = self.ctx.as_ref().and_then(|c| c.guard.clone());
        if let Some(g) = &guard {
            // Checked before the name is even resolved.
            if canonical_host(&self.host).as_ref() != Some(&g.host) {
                return Err(self.fail(
                    FailureKind::Refused,
                    format!(
                        "refused to connect to {}: the fetch is for host {}",
                        self.host, g.host
                    ),
                ));
            }
            if let Some(expected) = g.port.filter(|p| *p != port) {
                return Err(self.fail(
                    FailureKind::Refused,
                    format!(
                        "refused to connect to {}:{port}: the fetch is for port {expected}",
                        self.host
                    ),
                ));
            }
        }
        // The host in a URL may be a bracketed IPv6 literal.
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| {
                self.fail(
                    FailureKind::Dns,
                    format!("could not resolve host {}: {e}", self.host),
                )
            })?
            .collect();
        if addrs.is_empty() {
            return Err(self.fail(
                FailureKind::Dns,
                format!("host {} has no address", self.host),
            ));
        }
        if let Some(g) = &guard {
            // Every address, not just the first: a name that also points at a private
            // address is not trusted with the others either.
            if let Some(bad) = addrs.iter().find(|a| !ip_allowed(a.ip(), g.allow_private)) {
                return Err(self.fail(
                    FailureKind::Refused,
                    format!(
                        "refused to connect to {}: it resolves to {}, a private or local address",
                        self.host,
                        bad.ip()
                    ),
                ));
            }
        }
        let connect_timeout = self
            .ctx
            .as_ref()
            .map_or(net_defaults::CONNECT_TIMEOUT, |c| c.connect_timeout);
        let mut last = None;
        for addr in addrs {
            self.check()?;
            let timeout = self.left(connect_timeout);
            if timeout.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.stream = Some(s);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        self.check()?;
        let e = last.map_or_else(|| "no time left to connect".to_owned(), |e| e.to_string());
        let kind = match &last_kind(&e) {
            Some(k) => *k,
            None => FailureKind::Network,
        };
        Err(self.fail(kind, format!("could not connect to {target}: {e}")))
    }

    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let idle_limit = self.io_timeout();
        let idle_since = Instant::now();
        loop {
            self.check()?;
            let slice = self.left(SLICE).max(Duration::from_millis(1));
            let stream = self.stream.as_mut().ok_or("read on a closed connection")?;
            let _ = stream.set_read_timeout(Some(slice));
            match stream.read(buf) {
                Ok(n) => {
                    if let Some(ctx) = &self.ctx {
                        let total = ctx.received.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        if total > ctx.max_bytes {
                            return Err(self.fail(
                                FailureKind::SizeCap,
                                format!("received more than the cap of {} bytes", ctx.max_bytes),
                            ));
                        }
                    }
                    if let Err(limit) = self.watch.on_read(&buf[..n]) {
                        return Err(self.fail(FailureKind::SizeCap, limit));
                    }
                    return Ok(n);
                }
                Err(e) if is_timeout(&e) => {
                    if idle_since.elapsed() >= idle_limit {
                        return Err(self.fail(
                            FailureKind::Timeout,
                            format!(
                                "no data from {}:{} for {idle_limit:?}",
                                self.host, self.port
                            ),
                        ));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(self.fail(
                        FailureKind::Network,
                        format!("reading from {}:{}: {e}", self.host, self.port),
                    ))
                }
            }
        }
    }

    pub fn write(&mut self, buf: &[u8]) -> Result<usize, String> {
        self.watch.on_write(buf);
        let idle_limit = self.io_timeout();
        let idle_since = Instant::now();
        loop {
            self.check()?;
            let slice = self.left(SLICE).max(Duration::from_millis(1));
            let stream = self.stream.as_mut().ok_or("write on a closed connection")?;
            let _ = stream.set_write_timeout(Some(slice));
            match stream.write(buf) {
                Ok(n) => return Ok(n),
                Err(e) if is_timeout(&e) => {
                    if idle_since.elapsed() >= idle_limit {
                        return Err(self.fail(
                            FailureKind::Timeout,
                            format!(
                                "{}:{} accepted no data for {idle_limit:?}",
                                self.host, self.port
                            ),
                        ));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(self.fail(
                        FailureKind::Network,
                        format!("writing to {}:{}: {e}", self.host, self.port),
                    ))
                }
            }
        }
    }

    pub fn close(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn last_kind(message: &str) -> Option<FailureKind> {
    let m = message.to_ascii_lowercase();
    if m.contains("refused") {
        Some(FailureKind::ConnectionRefused)
    } else if m.contains("timed out") || m.contains("no time left") {
        Some(FailureKind::Timeout)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn ctx(deadline: Duration, max_bytes: u64) -> Arc<NetContext> {
        Arc::new(NetContext::new(
            Instant::now() + deadline,
            Arc::new(AtomicBool::new(false)),
            max_bytes,
            Duration::from_secs(2),
            Duration::from_secs(2),
        ))
    }

    #[test]
    fn a_refused_connection_is_classified() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let c = ctx(Duration::from_secs(5), 1 << 20);
        let err = with_context(&c, || Conn::new("127.0.0.1", &port.to_string()).connect());
        assert!(err.is_err());
        assert_eq!(c.take_failure().unwrap().0, FailureKind::ConnectionRefused);
    }

    #[test]
    fn an_unresolvable_host_is_a_dns_failure() {
        let c = ctx(Duration::from_secs(5), 1 << 20);
        let err = with_context(&c, || Conn::new("no-such-host.invalid", "9418").connect());
        assert!(err.is_err());
        assert_eq!(c.take_failure().unwrap().0, FailureKind::Dns);
    }

    #[test]
    fn a_silent_server_ends_at_the_deadline_not_later() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = ctx(Duration::from_millis(600), 1 << 20);
        let start = Instant::now();
        let result = with_context(&c, || {
            let mut conn = Conn::new("127.0.0.1", &port.to_string());
            conn.connect().unwrap();
            conn.read(&mut [0u8; 16])
        });
        assert!(result.is_err());
        assert_eq!(c.take_failure().unwrap().0, FailureKind::Deadline);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        drop(l);
    }

    #[test]
    fn bytes_past_the_cap_fail_the_read() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(&[7u8; 4096]);
        });
        let c = ctx(Duration::from_secs(5), 1000);
        let result = with_context(&c, || {
            let mut conn = Conn::new("127.0.0.1", &port.to_string());
            conn.connect().unwrap();
            let mut buf = [0u8; 512];
            let mut total = 0;
            for _ in 0..16 {
                total += conn.read(&mut buf)?;
            }
            Ok::<usize, String>(total)
        });
        assert!(result.is_err(), "{result:?}");
        assert_eq!(c.take_failure().unwrap().0, FailureKind::SizeCap);
        server.join().unwrap();
    }

    fn guarded(host: &str, allow_private: bool) -> Arc<NetContext> {
        Arc::new(
            NetContext::new(
                Instant::now() + Duration::from_secs(5),
                Arc::new(AtomicBool::new(false)),
                1 << 20,
                Duration::from_secs(2),
                Duration::from_secs(2),
            )
            .with_guard(Guard::new(host, allow_private)),
        )
    }

    /// Whether `l` has a connection waiting, without blocking.
    fn connected(l: &TcpListener) -> bool {
        l.set_nonblocking(true).unwrap();
        let result = match l.accept() {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept: {e}"),
        };
        l.set_nonblocking(false).unwrap();
        result
    }

    #[test]
    fn private_addresses_are_refused_before_connecting() {
        let l = TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        let c = guarded("127.0.0.2", false);
        let err = with_context(&c, || Conn::new("127.0.0.2", &port).connect()).unwrap_err();
        let (kind, message) = c.take_failure().unwrap();
        assert_eq!(kind, FailureKind::Refused, "{message}");
        assert!(message.contains("resolves to 127.0.0.2"), "{message}");
        assert_eq!(err, message);
        assert!(!connected(&l), "no connection reached the server");
    }

    #[test]
    fn a_name_resolving_to_loopback_is_refused() {
        // `localhost` is refused by name at submit; here it stands for any name whose DNS
        // answer is private: the resolved address decides.
        let c = guarded("localhost", false);
        let err = with_context(&c, || Conn::new("localhost", "9").connect()).unwrap_err();
        assert!(err.contains("localhost: it resolves to"), "{err}");
        assert_eq!(c.take_failure().unwrap().0, FailureKind::Refused);
    }

    #[test]
    fn only_the_urls_host_may_be_connected_to() {
        let l = TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        for other in ["127.0.0.3", "[::ffff:127.0.0.2]", "localhost"] {
            let c = guarded(other, true);
            let err = with_context(&c, || Conn::new("127.0.0.2", &port).connect()).unwrap_err();
            assert!(err.contains("the fetch is for host"), "{other}: {err}");
            assert_eq!(c.take_failure().unwrap().0, FailureKind::Refused, "{other}");
            assert!(!connected(&l), "{other}: no connection reached the server");
        }
        // The URL's own host, spelled as a URL may spell it, is the same host.
        let c = guarded("127.0.0.2.", true);
        with_context(&c, || Conn::new("127.0.0.2", &port).connect()).unwrap();
        assert!(l.accept().is_ok(), "allowed: the connection arrived");
        let c = guarded("LocalHost.", true);
        with_context(&c, || Conn::new("localhost", "9").connect()).unwrap_err();
        let (kind, message) = c.take_failure().unwrap();
        assert_ne!(kind, FailureKind::Refused, "{message}");
    }

    #[test]
    fn outside_a_fetch_streams_are_plain() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello").unwrap();
        });
        let mut conn = Conn::new("127.0.0.1", &port.to_string());
        conn.connect().unwrap();
        let mut buf = [0u8; 5];
        assert_eq!(conn.read(&mut buf).unwrap(), 5);
        conn.close();
        server.join().unwrap();
    }
}
