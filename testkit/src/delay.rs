//! [`DelayProxy`]: a wide-area stand-in, a TCP proxy that delays every byte each way.
//!
//! Loopback has no latency, so it hides what round trips cost on real networks. `netem` needs
//! privileges these machines do not grant; a userspace proxy does not. Each direction of each
//! connection is a delay line: one thread reads and timestamps chunks as they arrive, another
//! releases each chunk when its time comes, so a stream of bytes arrives late but as fast as it
//! was sent. Sleeping once per read instead would cap a transfer at one read per delay.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::net::{Listener, Stopper, HANG_LIMIT};
use super::record::{Entry, RequestLog, RequestRecord};
use super::tcp::parse_request;
use super::{max_concurrent, LOG_TARGET};

/// How long the proxy waits for the upstream server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a side that does not read may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most one read takes from a socket.
const CHUNK: usize = 32 * 1024;
/// Chunks in flight per direction: with [`CHUNK`], at most 64 MiB held per direction, and
/// the reader waits (the sender feels TCP back-pressure) when the line is full.
const LINE_CHUNKS: usize = 2048;
/// The most of a connection's first bytes read to name its request in the log.
const SNIFF_LIMIT: usize = 8 * 1024;

/// What the connection threads share.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddrV4,
    one_way: Duration,
    handshake: AtomicBool,
    log: RequestLog,
    stopper: Arc<Stopper>,
}

/// A TCP proxy on a loopback address that forwards every connection to an upstream server
/// and delays every byte by a fixed one-way time in each direction: a stand-in for a wide-area
/// network in front of a [`GitDaemon`](super::GitDaemon) (`git://`, [`url`](Self::url)) or an
/// [`HttpGitServer`](super::HttpGitServer) (`http://`, [`http_url`](Self::http_url)). A
/// one-way delay of 50 ms makes a 100 ms round trip. Unix only.
///
/// Throughput is not limited: each direction is a delay line (chunks are timestamped when
/// read and each is released when its time comes), so a large pack arrives one delay late,
/// not one delay per read. Up to 64 MiB per direction are in flight; beyond that the proxy
/// stops reading until the line drains. A half-close travels like data: the end of one
/// side's stream reaches the other side one delay after the bytes before it, and the other
/// direction goes on. A reset, an error or a side that stays silent for 10 minutes closes
/// both sides.
///
/// TCP's own handshake costs nothing here, since the kernel accepts loopback connections at
/// once. [`set_handshake`](Self::set_handshake) charges it: a connection's bytes then wait
/// one round trip after it was accepted before they are delayed as any others, so a new
/// connection costs a round trip more than a reused one, as over a real network. Slow start
/// and loss are not modelled.
///
/// Each connection is served by four threads (a reader and a writer per direction), at most
/// 64 connections at once. Every connection is logged ([`requests`](Self::requests)): its
/// first bytes name the request (a `git://` request: the service as method, the repository
/// path as path, the `host=` parameter as host; an HTTP request: its method, target and `Host`
/// header); status is always 0 and the bytes sent are those delivered to the client. Dropping
/// the proxy closes every connection (both sides) and joins every thread.
#[derive(Debug)]
pub struct DelayProxy {
    listener: Listener,
    shared: Arc<Shared>,
}

impl DelayProxy {
    /// Starts listening on `ip` and a free port, forwarding each connection to `upstream`
    /// (such as [`GitDaemon::addr`](super::GitDaemon::addr) or
    /// [`HttpGitServer::addr`](super::HttpGitServer::addr)) with `one_way` delay in each
    /// direction. The proxy accepts connections when this returns; `upstream` is only
    /// contacted per connection (when it refuses, the client's connection is closed).
    ///
    /// # Errors
    /// No port could be bound on `ip`.
    pub fn start(ip: Ipv4Addr, upstream: SocketAddrV4, one_way: Duration) -> io::Result<Self> {
        let stopper = Arc::new(Stopper::default());
        let shared = Arc::new(Shared {
            upstream,
            one_way,
            handshake: AtomicBool::new(false),
            log: RequestLog::default(),
            stopper: Arc::clone(&stopper),
        });
        let listener = {
            let shared = Arc::clone(&shared);
            Listener::start(ip, "delay-proxy", stopper, move |stream, peer| {
                serve_connection(stream, peer, &shared);
            })?
        };
        Ok(DelayProxy { listener, shared })
    }

    /// Whether connections accepted from now on pay one round trip (twice the one-way delay)
    /// before their first byte, as a TCP handshake does on a real network. Off at start.
    pub fn set_handshake(&self, on: bool) {
        self.shared.handshake.store(on, Ordering::SeqCst);
    }

    /// Whether new connections pay for a handshake; see [`set_handshake`](Self::set_handshake).
    pub fn handshake(&self) -> bool {
        self.shared.handshake.load(Ordering::SeqCst)
    }

    /// The `git://` URL of the repository `repo_name` (such as `alice/hello.git`) through this
    /// proxy, for a proxy in front of a [`GitDaemon`](super::GitDaemon).
    pub fn url(&self, repo_name: &str) -> String {
        self.url_with("git", repo_name)
    }

    /// The `http://` URL of the repository `repo_name` through this proxy, for a proxy in
    /// front of an [`HttpGitServer`](super::HttpGitServer). `http_url("")` is the root.
    pub fn http_url(&self, repo_name: &str) -> String {
        self.url_with("http", repo_name)
    }

    fn url_with(&self, scheme: &str, repo_name: &str) -> String {
        let addr = self.listener.addr();
        format!(
            "{scheme}://{}:{}/{}",
            addr.ip(),
            addr.port(),
            repo_name.trim_start_matches('/')
        )
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.listener.addr()
    }

    /// The server it forwards to.
    pub fn upstream(&self) -> SocketAddrV4 {
        self.shared.upstream
    }

    /// The delay each byte gets in each direction.
    pub fn one_way(&self) -> Duration {
        self.shared.one_way
    }

    /// A snapshot of the connection log, oldest first, including connections in progress.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.snapshot()
    }

    /// Empties the connection log.
    pub fn clear_requests(&self) {
        self.shared.log.clear();
    }

    /// Waits until no logged connection is in progress, up to `timeout`; true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.shared.log.wait_idle(timeout)
    }

    /// The most logged connections that were open at one instant; see [`max_concurrent`].
    pub fn max_concurrent_requests(&self) -> usize {
        max_concurrent(&self.requests())
    }
}

fn serve_connection(client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let accepted = Instant::now();
    let Ok(_client_watch) = shared.stopper.watch(&client) else {
        return;
    };
    let mut entry = shared.log.begin(accepted, "", "");
    let upstream = match TcpStream::connect_timeout(
        &SocketAddr::V4(shared.upstream),
        CONNECT_TIMEOUT,
    ) {
        Ok(upstream) => upstream,
        Err(e) => {
            log::debug!(target: LOG_TARGET, "delay proxy: {} refused {peer}: {e}", shared.upstream);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let Ok(_upstream_watch) = shared.stopper.watch(&upstream) else {
        return;
    };
    for socket in [&client, &upstream] {
        let _ = socket.set_nodelay(true);
        // A side silent this long ends the connection: every relay is bounded.
        let _ = socket.set_read_timeout(Some(HANG_LIMIT));
        let _ = socket.set_write_timeout(Some(WRITE_TIMEOUT));
    }
    let not_before = if shared.handshake.load(Ordering::SeqCst) {
        accepted + 2 * shared.one_way
    } else {
        accepted
    };
    log::debug!(target: LOG_TARGET, "delay proxy: {peer} to {}", shared.upstream);
    let lines = (|| -> io::Result<()> {
        let up = Line {
            from: client.try_clone()?,
            to: upstream.try_clone()?,
            not_before,
            sniff: true,
        };
        let down = Line {
            from: upstream.try_clone()?,
            to: client.try_clone()?,
            not_before,
            sniff: false,
        };
        std::thread::scope(|scope| -> io::Result<()> {
            let entry = &entry;
            let upward = std::thread::Builder::new()
                .name("delay-proxy-up".to_owned())
                .spawn_scoped(scope, move || up.run(shared, entry))?;
            down.run(shared, entry);
            let _ = upward.join();
            Ok(())
        })
    })();
    if let Err(e) = lines {
        log::debug!(target: LOG_TARGET, "delay proxy: {peer}: {e}");
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    entry.finish();
}

/// What travels on a delay line, with the instant it was read.
enum Item {
    Data(Vec<u8>, Instant),
    /// The sending side closed its end.
    End(Instant),
    /// Reading failed (a reset, or silence for [`HANG_LIMIT`]): the connection is broken.
    Broken(Instant),
}

/// One direction of a connection.
struct Line {
    from: TcpStream,
    to: TcpStream,
    /// Nothing is released before this instant plus the delay (the handshake's round trip).
    not_before: Instant,
    /// Whether this is the client's direction, whose first bytes name the request.
    sniff: bool,
}

impl Line {
    /// Relays until the sending side's end has been passed on, or the connection breaks or
    /// the proxy stops: a reader thread timestamps chunks, this thread releases them.
    fn run(self, shared: &Shared, entry: &Entry) {
        let (tx, rx) = crossbeam_channel::bounded(LINE_CHUNKS);
        let Line {
            from,
            mut to,
            not_before,
            sniff,
        } = self;
        let Ok(reader_socket) = from.try_clone() else {
            return;
        };
        std::thread::scope(|scope| {
            let reader = std::thread::Builder::new()
                .name("delay-proxy-read".to_owned())
                .spawn_scoped(scope, move || {
                    let mut socket = reader_socket;
                    read_into(&mut socket, &tx, &shared.stopper, sniff.then_some(entry));
                });
            if reader.is_err() {
                return;
            }
            let clean = release(&rx, &mut to, not_before, shared, (!sniff).then_some(entry));
            if !clean {
                // Wakes the reader if it is blocked on a read; a full line wakes it when
                // `rx` is dropped at the end of this scope.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
            }
            drop(rx);
        });
    }
}

/// Reads `from` until its end, an error or the stop, sending each chunk down the line with the
/// instant it was read. With `sniff`, names the entry's request from the first bytes.
fn read_into(from: &mut TcpStream, tx: &Sender<Item>, stopper: &Stopper, sniff: Option<&Entry>) {
    let mut sniffer = sniff.map(|entry| (entry, Sniffer::default()));
    let mut buf = vec![0u8; CHUNK];
    // Each round reads at least one byte or ends; a silent side ends it after HANG_LIMIT.
    while !stopper.is_stopped() {
        let item = match from.read(&mut buf) {
            Ok(0) => Item::End(Instant::now()),
            Ok(n) => {
                let data = buf[..n].to_vec();
                if let Some((entry, head)) = sniffer.as_mut() {
                    if let Some(request) = head.feed(&data) {
                        entry.set_request(&request.method, &request.path);
                        entry.set_host(&request.host);
                    }
                    if head.done {
                        sniffer = None;
                    }
                }
                Item::Data(data, Instant::now())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Reset, or silent for HANG_LIMIT (a timeout).
            Err(_) => Item::Broken(Instant::now()),
        };
        let last = !matches!(item, Item::Data(..));
        if tx.send(item).is_err() || last {
            return;
        }
    }
}

/// Writes each chunk to `to` once it is due: read instant (or `not_before`, if later) plus the
/// delay. Returns true when the end of the stream was passed on (`to` closed for writing),
/// false when the connection broke or the proxy stopped.
fn release(
    rx: &Receiver<Item>,
    to: &mut TcpStream,
    not_before: Instant,
    shared: &Shared,
    count: Option<&Entry>,
) -> bool {
    // Ends when the reader sends its last item or goes away; each item is written once.
    for item in rx {
        let read_at = match &item {
            Item::Data(_, at) | Item::End(at) | Item::Broken(at) => *at,
        };
        let due = read_at.max(not_before) + shared.one_way;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            if shared.stopper.sleep(wait) {
                return false;
            }
        }
        match item {
            Item::Data(data, _) => {
                if to.write_all(&data).is_err() {
                    return false;
                }
                if let Some(entry) = count {
                    entry.add_bytes(data.len());
                }
            }
            Item::End(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return true;
            }
            Item::Broken(_) => return false,
        }
    }
    false
}

/// A request named from a connection's first bytes.
#[derive(Debug, PartialEq, Eq)]
struct Sniffed {
    method: String,
    path: String,
    host: String,
}

/// Collects a connection's first bytes until they name its request: one `git://` request
/// pkt-line, or an HTTP request line and headers.
#[derive(Debug, Default)]
struct Sniffer {
    head: Vec<u8>,
    done: bool,
}

impl Sniffer {
    /// Feeds the next bytes; returns the request once its head is complete (then `done`).
    /// Gives up (`done`, `None`) after [`SNIFF_LIMIT`] bytes or on bytes that are neither.
    fn feed(&mut self, data: &[u8]) -> Option<Sniffed> {
        if self.done {
            return None;
        }
        let room = SNIFF_LIMIT.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
        let found = self.parse();
        if found.is_some() || self.done || self.head.len() >= SNIFF_LIMIT {
            self.done = true;
            self.head = Vec::new();
        }
        found
    }

    fn parse(&mut self) -> Option<Sniffed> {
        let head = &self.head;
        if head.len() < 4 {
            return None;
        }
        let hex = std::str::from_utf8(&head[..4])
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()));
        if let Some(hex) = hex {
            let len = usize::from_str_radix(hex, 16).unwrap_or(0);
            if !(5..=65520).contains(&len) {
                self.done = true;
                return None;
            }
            if head.len() < len {
                return None;
            }
            let (method, path, host) = parse_request(&head[..len]);
            return Some(Sniffed { method, path, host });
        }
        let text = String::from_utf8_lossy(head);
        let end = text.find("\r\n\r\n").or_else(|| text.find("\n\n"))?;
        let mut lines = text[..end].lines();
        let mut request = lines.next().unwrap_or_default().split(' ');
        let method = request.next().unwrap_or_default().to_owned();
        let path = request.next().unwrap_or_default().to_owned();
        let host = lines
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
            .map(|(_, value)| value.trim().to_owned())
            .unwrap_or_default();
        Some(Sniffed { method, path, host })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// An upstream server on 127.0.0.1 that runs `serve` on each of `connections`
    /// connections in turn, then stops.
    fn upstream(
        connections: usize,
        serve: impl Fn(TcpStream) + Send + 'static,
    ) -> (SocketAddrV4, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind((HOST, 0)).unwrap();
        let Ok(SocketAddr::V4(addr)) = listener.local_addr() else {
            panic!("an IPv4 listener")
        };
        let thread = std::thread::spawn(move || {
            for _ in 0..connections {
                let (stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                serve(stream);
            }
        });
        (addr, thread)
    }

    /// Echoes each read at once until the client closes, then closes.
    fn echo(mut stream: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }

    fn connect(proxy: &DelayProxy) -> TcpStream {
        let stream = TcpStream::connect(proxy.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Writes `data` and returns how long until as many bytes came back.
    fn exchange(stream: &mut TcpStream, data: &[u8]) -> Duration {
        let began = Instant::now();
        stream.write_all(data).unwrap();
        let mut back = vec![0u8; data.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        began.elapsed()
    }

    #[test]
    fn a_round_trip_takes_twice_the_delay_and_a_handshake_one_more() {
        let one_way = Duration::from_millis(100);
        let (addr, server) = upstream(2, echo);
        let proxy = DelayProxy::start(HOST, addr, one_way).unwrap();
        assert_eq!((proxy.upstream(), proxy.one_way()), (addr, one_way));
        assert!(!proxy.handshake());

        let mut stream = connect(&proxy);
        for _ in 0..2 {
            let took = exchange(&mut stream, b"ping");
            assert!(took >= 2 * one_way, "{took:?}");
            assert!(took < 2 * one_way + Duration::from_secs(2), "{took:?}");
        }
        drop(stream);

        // With the handshake charged, the first exchange on a connection costs one more round
        // trip; the next ones do not.
        proxy.set_handshake(true);
        let mut stream = connect(&proxy);
        let first = exchange(&mut stream, b"ping");
        let second = exchange(&mut stream, b"pong");
        assert!(first >= 4 * one_way, "{first:?}");
        assert!(second >= 2 * one_way && second < 4 * one_way, "{second:?}");
        drop(stream);
        server.join().unwrap();
        assert!(proxy.wait_idle(Duration::from_secs(5)));
        assert_eq!(proxy.requests().len(), 2);
    }

    #[test]
    fn a_half_close_arrives_after_the_data_and_the_answer_still_comes_back() {
        let one_way = Duration::from_millis(50);
        // Reads everything to the end of the client's stream, then answers its length.
        let (addr, server) = upstream(1, |mut stream| {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).unwrap();
            stream
                .write_all(format!("got {}", all.len()).as_bytes())
                .unwrap();
        });
        let proxy = DelayProxy::start(HOST, addr, one_way).unwrap();
        let mut stream = connect(&proxy);
        let began = Instant::now();
        stream.write_all(&[7u8; 100_000]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let took = began.elapsed();
        assert_eq!(answer, "got 100000");
        assert!(took >= 2 * one_way, "{took:?}");
        server.join().unwrap();
    }

    #[test]
    fn a_large_transfer_is_delayed_not_slowed() {
        const LEN: usize = 16 << 20;
        let one_way = Duration::from_millis(50);
        let (addr, server) = upstream(1, echo);
        let proxy = DelayProxy::start(HOST, addr, one_way).unwrap();
        let stream = connect(&proxy);
        let mut writer = stream.try_clone().unwrap();
        let began = Instant::now();
        let sending = std::thread::spawn(move || {
            let data = crate::pseudo_random_bytes(LEN, 16);
            writer.write_all(&data).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&stream).read_to_end(&mut back).unwrap();
        let took = began.elapsed();
        sending.join().unwrap();
        assert_eq!(back.len(), LEN);
        // At one 32 KiB read per delay, 16 MiB would take 512 delays, 25 s.
        assert!(took >= 2 * one_way, "{took:?}");
        assert!(took < Duration::from_secs(8), "{took:?}");
        server.join().unwrap();
        assert!(proxy.wait_idle(Duration::from_secs(5)));
        let record = &proxy.requests()[0];
        assert_eq!(record.bytes_sent, LEN as u64);
    }

    #[test]
    fn dropping_the_proxy_closes_its_connections() {
        // An upstream that never answers and holds the connection until the client goes.
        let (addr, server) = upstream(1, |mut stream| {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let proxy = DelayProxy::start(HOST, addr, Duration::from_millis(10)).unwrap();
        let mut stream = connect(&proxy);
        stream.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let began = Instant::now();
        drop(proxy);
        let mut byte = [0u8; 1];
        assert!(matches!(stream.read(&mut byte), Ok(0) | Err(_)));
        assert!(began.elapsed() < Duration::from_secs(5));
        server.join().unwrap();
    }

    #[test]
    fn requests_are_named_from_their_first_bytes() {
        let sniff = |chunks: &[&[u8]]| {
            let mut sniffer = Sniffer::default();
            let found = chunks.iter().find_map(|c| sniffer.feed(c));
            (found, sniffer.done)
        };
        let git = b"0033git-upload-pack /project.git\0host=myserver.com\0";
        let expected = Sniffed {
            method: "git-upload-pack".into(),
            path: "/project.git".into(),
            host: "myserver.com".into(),
        };
        assert_eq!(sniff(&[git]).0.as_ref(), Some(&expected));
        assert_eq!(
            sniff(&[&git[..3], &git[3..10], &git[10..]]).0,
            Some(expected)
        );
        let http = b"GET /a.git/info/refs?service=git-upload-pack HTTP/1.1\r\nUser-Agent: x\r\n\
                     host: 127.0.0.2:80\r\n\r\nbody";
        let (found, done) = sniff(&[&http[..20], &http[20..]]);
        assert!(done);
        assert_eq!(
            found,
            Some(Sniffed {
                method: "GET".into(),
                path: "/a.git/info/refs?service=git-upload-pack".into(),
                host: "127.0.0.2:80".into(),
            })
        );
        // A bad pkt-line length, or a head that never ends, names nothing.
        assert_eq!(sniff(&[b"0002xxxx"]), (None, true));
        assert_eq!(sniff(&[&[b'x'; SNIFF_LIMIT + 1]]), (None, true));
        assert_eq!(sniff(&[b"GET / HTTP/1.1\r\n"]), (None, false));
    }
}
