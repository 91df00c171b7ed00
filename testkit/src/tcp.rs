//! [`FaultyTcpServer`]: a misbehaving `git://` server, mostly a proxy to a real daemon.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::net::{self, Listener, Pacer, Stopper, HANG_LIMIT};
use super::record::{Entry, RequestLog, RequestRecord};
use super::{max_concurrent, LOG_TARGET};

/// How long the server waits for a client's request, and for the upstream daemon to accept.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client that does not read may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Length of a [`TcpFault::Garbage`] answer.
const GARBAGE_LEN: usize = 4096;

/// How a [`FaultyTcpServer`] treats each `git://` connection.
///
/// Every fault first reads the client's request (its first pkt-line,
/// `git-upload-pack /path\0host=…\0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpFault {
    /// Relays the connection to the upstream daemon faithfully.
    #[default]
    None,
    /// Never answers: the connection stays open until the client closes it, the server is
    /// dropped, or 10 minutes pass.
    Hang,
    /// Relays to the upstream daemon, but the daemon's bytes reach the client at
    /// `bytes_per_sec` (0 counts as 1): one byte a second at 1.
    Drip {
        /// The rate.
        bytes_per_sec: u64,
    },
    /// Answers 4 KiB of pseudo-random bytes that are no pkt-lines, then closes.
    Garbage,
    /// Relays to the upstream daemon, and closes the connection `after_bytes` bytes after the
    /// end of the ref advertisement (the first flush-pkt `0000` from the daemon), that is, in
    /// the negotiation or the pack. If the daemon sends less, nothing is cut.
    CloseMidPack {
        /// Bytes relayed after the ref advertisement.
        after_bytes: u64,
    },
}

/// What the connection threads share.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddrV4,
    fault: Mutex<TcpFault>,
    log: RequestLog,
    stopper: Arc<Stopper>,
}

/// A `git://` server on a loopback address that misbehaves on demand ([`TcpFault`]); when it
/// behaves, it relays each connection to an upstream server, normally a
/// [`GitDaemon`](super::GitDaemon), so `git://ip:port/<name>` serves the daemon's
/// repositories. Unix only.
///
/// Each connection is served by its own thread (two while relaying), at most 64 at once. The
/// fault can be changed while clients are connected; it applies to connections whose request
/// arrives after the call. Every connection is logged ([`requests`](Self::requests)) with
/// the service as method, the repository path as path, and status 0. Dropping the server
/// closes every connection (to clients and upstream) and joins every thread.
#[derive(Debug)]
pub struct FaultyTcpServer {
    listener: Listener,
    shared: Arc<Shared>,
}

impl FaultyTcpServer {
    /// Starts listening on `ip` and a free port, relaying to `upstream` (such as
    /// [`GitDaemon::addr`](super::GitDaemon::addr)) with `fault`. The server accepts
    /// connections when this returns; `upstream` is only contacted per connection.
    ///
    /// # Errors
    /// No port could be bound on `ip`.
    pub fn start(
        ip: Ipv4Addr,
        upstream: SocketAddrV4,
        fault: TcpFault,
    ) -> io::Result<FaultyTcpServer> {
        let stopper = Arc::new(Stopper::default());
        let shared = Arc::new(Shared {
            upstream,
            fault: Mutex::new(fault),
            log: RequestLog::default(),
            stopper: Arc::clone(&stopper),
        });
        let listener = {
            let shared = Arc::clone(&shared);
            Listener::start(ip, "git-faulty", stopper, move |stream, peer| {
                serve_connection(stream, peer, &shared);
            })?
        };
        Ok(FaultyTcpServer { listener, shared })
    }

    /// The `git://` URL of the repository `repo_name` (such as `alice/hello.git`) through
    /// this server.
    pub fn url(&self, repo_name: &str) -> String {
        let addr = self.listener.addr();
        format!(
            "git://{}:{}/{}",
            addr.ip(),
            addr.port(),
            repo_name.trim_start_matches('/')
        )
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.listener.addr()
    }

    /// The server it relays to.
    pub fn upstream(&self) -> SocketAddrV4 {
        self.shared.upstream
    }

    /// Applies `fault` to connections whose request arrives from now on.
    pub fn set_fault(&self, fault: TcpFault) {
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fault;
    }

    /// The fault new connections get.
    pub fn fault(&self) -> TcpFault {
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A snapshot of the connection log, oldest first, including connections in progress.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.snapshot()
    }

    /// Empties the connection log.
    pub fn clear_requests(&self) {
        self.shared.log.clear();
    }

    /// Waits until no logged connection is in progress (a client may have its answer a moment
    /// before the server has closed the connection and logged the end), up to `timeout`;
    /// true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.shared.log.wait_idle(timeout)
    }

    /// The most logged connections that were open at one instant; see [`max_concurrent`].
    pub fn max_concurrent_requests(&self) -> usize {
        max_concurrent(&self.requests())
    }
}

fn serve_connection(mut client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let _ = client.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = client.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(_watch) = shared.stopper.watch(&client) else {
        return;
    };
    let request = read_pkt_line(&mut client);
    let started = Instant::now();
    let Ok(request) = request else {
        // Log the connection: it counts towards concurrency like any other.
        let _entry = shared.log.begin(started, "", "");
        return;
    };
    let (service, path, host) = parse_request(&request);
    let mut entry = shared.log.begin(started, &service, &path);
    entry.set_host(&host);
    let fault = *shared.fault.lock().unwrap_or_else(PoisonError::into_inner);
    log::debug!(target: LOG_TARGET, "git:// {service} {path} from {peer} ({fault:?})");
    match fault {
        TcpFault::Hang => {
            if let Ok(mut reader) = client.try_clone() {
                net::hang(&mut reader, &client, &shared.stopper);
            }
        }
        TcpFault::Garbage => {
            let _ = net::write_counted(&mut client, &net::garbage(GARBAGE_LEN, entry.id()), &entry);
            let _ = client.shutdown(Shutdown::Write);
            entry.finish();
            if let Ok(mut reader) = client.try_clone() {
                net::drain(&client, &mut reader);
            }
        }
        TcpFault::None | TcpFault::Drip { .. } | TcpFault::CloseMidPack { .. } => {
            if let Err(e) = relay(&mut client, &request, fault, shared, &entry) {
                log::debug!(target: LOG_TARGET, "git:// relay for {peer} ended: {e}");
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    entry.finish();
}

/// Reads one pkt-line and returns it whole (length prefix included).
pub(super) fn read_pkt_line(client: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut line = vec![0u8; 4];
    client.read_exact(&mut line)?;
    let len = std::str::from_utf8(&line)
        .ok()
        .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        .filter(|len| (4..=65520).contains(len))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a pkt-line"))?;
    line.resize(len, 0);
    client.read_exact(&mut line[4..])?;
    Ok(line)
}

/// Service, path and `host=` parameter of a `git://` request pkt-line
/// (`0033git-upload-pack /project.git\0host=myserver.com\0`).
pub(super) fn parse_request(pkt: &[u8]) -> (String, String, String) {
    let text = String::from_utf8_lossy(pkt.get(4..).unwrap_or_default()).into_owned();
    let mut fields = text.split('\0');
    let command = fields.next().unwrap_or_default().trim_end_matches('\n');
    let (service, path) = command.split_once(' ').unwrap_or((command, ""));
    let host = fields
        .find_map(|f| f.strip_prefix("host="))
        .unwrap_or_default();
    (service.to_owned(), path.to_owned(), host.to_owned())
}

/// Relays the connection to the upstream daemon: client to daemon on a helper thread, daemon
/// to client here, with `fault` applied.
fn relay(
    client: &mut TcpStream,
    request: &[u8],
    fault: TcpFault,
    shared: &Shared,
    entry: &Entry,
) -> io::Result<()> {
    let mut upstream =
        TcpStream::connect_timeout(&SocketAddr::V4(shared.upstream), REQUEST_TIMEOUT)?;
    let _watch = shared.stopper.watch(&upstream)?;
    let _ = upstream.set_nodelay(true);
    // Relaying is bounded by the daemon: it sends, or it closes, within 10 minutes.
    upstream.set_read_timeout(Some(HANG_LIMIT))?;
    upstream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // The client may stay silent while the pack comes: its side ends when this one does.
    client.set_read_timeout(None)?;
    upstream.write_all(request)?;

    let mut from_client = client.try_clone()?;
    let mut to_upstream = upstream.try_clone()?;
    let forward = std::thread::Builder::new()
        .name("git-faulty-up".to_owned())
        .spawn(move || {
            let _ = io::copy(&mut from_client, &mut to_upstream);
            let _ = to_upstream.shutdown(Shutdown::Write);
        })?;
    let result = relay_down(&mut upstream, client, fault, shared, entry);
    // Ends the helper: its read from the client returns at once.
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = forward.join();
    result
}

/// Daemon to client, with the fault applied; returns when the daemon closes, the connection
/// is cut, or a side fails.
fn relay_down(
    upstream: &mut TcpStream,
    client: &mut TcpStream,
    fault: TcpFault,
    shared: &Shared,
    entry: &Entry,
) -> io::Result<()> {
    let mut pacer = match fault {
        TcpFault::Drip { bytes_per_sec } => Some(Pacer::new(bytes_per_sec)),
        _ => None,
    };
    let mut advertisement = AdvertisementEnd::default();
    // Bytes still to relay after the advertisement, once it ended (CloseMidPack only).
    let mut budget: Option<u64> = None;
    let mut buf = vec![0u8; 16 * 1024];
    // Every round relays at least one byte or ends; the daemon's output is finite.
    while !shared.stopper.is_stopped() {
        let n = upstream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut data = &buf[..n];
        if let TcpFault::CloseMidPack { after_bytes } = fault {
            if budget.is_none() {
                if let Some(end) = advertisement.feed(data) {
                    net::write_counted(client, &data[..end], entry)?;
                    data = &data[end..];
                    budget = Some(after_bytes);
                }
            }
            if let Some(left) = budget.as_mut() {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                net::write_counted(client, &data[..take], entry)?;
                *left -= take as u64;
                if *left == 0 {
                    // The budget is spent: cut.
                    return Ok(());
                }
                continue;
            }
        }
        match pacer.as_mut() {
            Some(pacer) => pacer.write(client, data, &shared.stopper, entry)?,
            None => net::write_counted(client, data, entry)?,
        }
    }
    Ok(())
}

/// Finds the end of the ref advertisement (the first flush-pkt) in a stream of pkt-lines fed
/// chunk by chunk.
#[derive(Debug, Default)]
struct AdvertisementEnd {
    header: [u8; 4],
    have: usize,
    skip: usize,
    done: bool,
}

impl AdvertisementEnd {
    /// Feeds the next chunk; returns the offset in it just past the flush-pkt once it is in
    /// this chunk (0 for every chunk after the one it was in). Data that is no pkt-line ends
    /// the advertisement where it starts.
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        if self.done {
            return Some(0);
        }
        let mut i = 0;
        while i < data.len() {
            if self.skip > 0 {
                let take = self.skip.min(data.len() - i);
                self.skip -= take;
                i += take;
                continue;
            }
            self.header[self.have] = data[i];
            self.have += 1;
            i += 1;
            if self.have < 4 {
                continue;
            }
            self.have = 0;
            let len = std::str::from_utf8(&self.header)
                .ok()
                .and_then(|hex| usize::from_str_radix(hex, 16).ok());
            match len {
                // Delimiter and response-end packets (protocol v2) carry nothing.
                Some(1 | 2) => {}
                Some(len) if len >= 4 => self.skip = len - 4,
                Some(_) => {
                    self.done = true;
                    return Some(i);
                }
                None => {
                    self.done = true;
                    return Some(i - 4);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed() {
        let pkt = b"0033git-upload-pack /project.git\0host=myserver.com\0";
        assert_eq!(read_pkt_line(&mut &pkt[..]).unwrap(), pkt);
        assert_eq!(
            parse_request(pkt),
            (
                "git-upload-pack".to_owned(),
                "/project.git".to_owned(),
                "myserver.com".to_owned()
            )
        );
        assert_eq!(
            parse_request(b"0018git-upload-pack /x\n").1,
            "/x".to_owned()
        );
        assert!(read_pkt_line(&mut &b"zzzz"[..]).is_err());
        assert!(read_pkt_line(&mut &b"0002"[..]).is_err());
        assert!(read_pkt_line(&mut &b"0010short"[..]).is_err());
    }

    #[test]
    fn advertisement_end_is_found_across_chunks() {
        let stream = b"0008abcd000aefghij0000PACKDATA";
        // Whole.
        let mut scan = AdvertisementEnd::default();
        assert_eq!(scan.feed(stream), Some(22));
        assert_eq!(scan.feed(b"more"), Some(0));
        // Byte by byte.
        let mut scan = AdvertisementEnd::default();
        let ends: Vec<_> = stream.iter().map(|b| scan.feed(&[*b])).collect();
        assert_eq!(ends.iter().position(Option::is_some), Some(21));
        assert_eq!(ends[21], Some(1));
        // Garbage ends it where it starts.
        let mut scan = AdvertisementEnd::default();
        assert_eq!(scan.feed(b"0008abcdPACK"), Some(8));
    }
}
