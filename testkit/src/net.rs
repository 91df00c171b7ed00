//! Plumbing shared by the test servers: the accept loop, shutdown, paced writes, hanging.

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::record::Entry;
use super::LOG_TARGET;

/// Connections served at once by one server; further ones are closed at once.
pub(super) const MAX_CONNECTIONS: usize = 64;
/// The longest a hanging server keeps a connection open.
pub(super) const HANG_LIMIT: Duration = Duration::from_secs(600);
/// How long dropping a server tries to wake its accept loop with a connection of its own.
const WAKE_TIMEOUT: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The stop signal of one server: a flag, a condition variable for sleepers, and the sockets
/// to shut down so that blocked reads and writes return at once.
#[derive(Debug, Default)]
pub(super) struct Stopper {
    stopped: AtomicBool,
    sleepers: Mutex<()>,
    wake: Condvar,
    sockets: Mutex<HashMap<u64, TcpStream>>,
    next_socket: AtomicU64,
}

impl Stopper {
    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration` or until the server stops; true if it stopped.
    pub(super) fn sleep(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut guard = lock(&self.sleepers);
        loop {
            if self.is_stopped() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .wake
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Shuts `socket` down when the server stops (at once if it already has), until the
    /// returned guard is dropped.
    pub(super) fn watch(self: &Arc<Self>, socket: &TcpStream) -> io::Result<Watch> {
        let id = self.next_socket.fetch_add(1, Ordering::SeqCst);
        lock(&self.sockets).insert(id, socket.try_clone()?);
        if self.is_stopped() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        Ok(Watch {
            stopper: Arc::clone(self),
            id,
        })
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        {
            let _guard = lock(&self.sleepers);
            self.wake.notify_all();
        }
        for socket in lock(&self.sockets).values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// Unregisters a watched socket.
#[derive(Debug)]
pub(super) struct Watch {
    stopper: Arc<Stopper>,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.stopper.sockets).remove(&self.id);
    }
}

/// A listening socket, the thread accepting on it and one thread per connection. Dropping it
/// stops the server: every watched socket is shut down and every thread joined.
#[derive(Debug)]
pub(super) struct Listener {
    addr: SocketAddrV4,
    stopper: Arc<Stopper>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Listener {
    /// Listens on `ip` and a free port and runs `serve` on its own thread (named `name`) for
    /// every connection, at most [`MAX_CONNECTIONS`] at once.
    pub(super) fn start<F>(
        ip: Ipv4Addr,
        name: &str,
        stopper: Arc<Stopper>,
        serve: F,
    ) -> io::Result<Listener>
    where
        F: Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind((ip, 0))?;
        let SocketAddr::V4(addr) = listener.local_addr()? else {
            return Err(io::Error::other("an IPv4 listener has an IPv4 address"));
        };
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let serve = Arc::new(serve);
        let acceptor = {
            let stopper = Arc::clone(&stopper);
            let connections = Arc::clone(&connections);
            let name = name.to_owned();
            std::thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || accept_loop(&listener, &name, &stopper, &connections, &serve))?
        };
        Ok(Listener {
            addr,
            stopper,
            acceptor: Some(acceptor),
            connections,
        })
    }

    pub(super) fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

/// Accepts connections until the server stops.
fn accept_loop<F>(
    listener: &TcpListener,
    name: &str,
    stopper: &Arc<Stopper>,
    connections: &Mutex<Vec<JoinHandle<()>>>,
    serve: &Arc<F>,
) where
    F: Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
{
    // Blocking accepts; dropping the server connects once to wake this loop.
    while !stopper.is_stopped() {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                log::debug!(target: LOG_TARGET, "{name}: accept failed: {e}");
                // Out of file descriptors, say: let connection threads finish first.
                stopper.sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stopper.is_stopped() {
            break;
        }
        let mut running = lock(connections);
        // Finished threads need no join.
        running.retain(|handle| !handle.is_finished());
        if running.len() >= MAX_CONNECTIONS {
            log::debug!(target: LOG_TARGET, "{name}: too many connections, closing {peer}");
            continue;
        }
        let serve = Arc::clone(serve);
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || serve(stream, peer));
        match spawned {
            Ok(handle) => running.push(handle),
            Err(e) => log::debug!(target: LOG_TARGET, "{name}: cannot spawn a thread: {e}"),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(acceptor) = self.acceptor.take() {
            let woken = (0..3).any(|_| {
                TcpStream::connect_timeout(&SocketAddr::V4(self.addr), WAKE_TIMEOUT).is_ok()
            });
            if woken {
                let _ = acceptor.join();
            } else {
                // Cannot happen on a working loopback interface; the thread ends with the
                // process (it only ever accepts).
                log::debug!(target: LOG_TARGET, "{}: accept loop left running", self.addr);
            }
        }
        // No thread adds connections any more.
        let handles = std::mem::take(&mut *lock(&self.connections));
        for handle in handles {
            let _ = handle.join();
        }
    }
}

/// Writes at a steady rate: about 20 writes a second (one byte per write below 20 bytes per
/// second), each when the bytes before it are due.
#[derive(Debug)]
pub(super) struct Pacer {
    start: Instant,
    sent: u64,
    bytes_per_sec: u64,
}

impl Pacer {
    /// A pacer for `bytes_per_sec` (0 counts as 1).
    pub(super) fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            start: Instant::now(),
            sent: 0,
            bytes_per_sec: bytes_per_sec.max(1),
        }
    }

    /// Writes `data` to `out` at the pacer's rate, counting the bytes in `entry`. Fails with
    /// [`io::ErrorKind::Interrupted`] if the server stops.
    pub(super) fn write(
        &mut self,
        out: &mut TcpStream,
        data: &[u8],
        stopper: &Stopper,
        entry: &Entry,
    ) -> io::Result<()> {
        let chunk = usize::try_from(self.bytes_per_sec / 20)
            .unwrap_or(usize::MAX)
            .max(1);
        for piece in data.chunks(chunk) {
            let due =
                self.start + Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                if stopper.sleep(wait) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
            }
            out.write_all(piece)?;
            entry.add_bytes(piece.len());
            self.sent += piece.len() as u64;
        }
        Ok(())
    }
}

/// Writes all of `data` and counts it in `entry`.
pub(super) fn write_counted(out: &mut TcpStream, data: &[u8], entry: &Entry) -> io::Result<()> {
    out.write_all(data)?;
    entry.add_bytes(data.len());
    Ok(())
}

/// Keeps a connection open without answering: reads and discards what the client sends until
/// it closes its end, the server stops, or [`HANG_LIMIT`] passes.
pub(super) fn hang(client: &mut dyn Read, socket: &TcpStream, stopper: &Stopper) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let until = Instant::now() + HANG_LIMIT;
    let mut sink = [0u8; 4096];
    while !stopper.is_stopped() && Instant::now() < until {
        match client.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

/// After the connection was closed for writing, reads what the client still sends (briefly,
/// bounded) so that closing the socket does not reset the connection while the client reads
/// the response.
pub(super) fn drain(socket: &TcpStream, client: &mut dyn Read) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match client.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Reads one line (up to `max` bytes, `\n` included) and returns it without its line end;
/// `None` at end of input.
pub(super) fn read_line(reader: &mut dyn BufRead, max: usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    reader.take(limit).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if line.len() >= max {
                "line too long"
            } else {
                "end of input inside a line"
            },
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// `len` bytes of garbage that no git client mistakes for a pkt-line: the first byte is not a
/// hex digit.
pub(super) fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = super::pseudo_random_bytes(len, seed ^ 0x6761_7262_6167_6521);
    if let Some(first) = bytes.first_mut() {
        *first = b'!';
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    #[test]
    fn lines_are_bounded() {
        let mut input = BufReader::new(&b"GET / HTTP/1.1\r\nHost: x\n\nlong line here"[..]);
        assert_eq!(
            read_line(&mut input, 100).unwrap().unwrap(),
            "GET / HTTP/1.1"
        );
        assert_eq!(read_line(&mut input, 100).unwrap().unwrap(), "Host: x");
        assert_eq!(read_line(&mut input, 100).unwrap().unwrap(), "");
        assert!(read_line(&mut input, 4).is_err());
        let mut input = BufReader::new(&b""[..]);
        assert!(read_line(&mut input, 4).unwrap().is_none());
    }

    #[test]
    fn stopper_wakes_sleepers_and_shuts_sockets() {
        let stopper = Arc::new(Stopper::default());
        assert!(!stopper.sleep(Duration::from_millis(1)));
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (_accepted, _) = server.accept().unwrap();
        let watch = stopper.watch(&client).unwrap();
        let sleeper = {
            let stopper = Arc::clone(&stopper);
            std::thread::spawn(move || stopper.sleep(Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(20));
        stopper.stop();
        assert!(sleeper.join().unwrap());
        // The watched socket was shut down: reading returns end of file at once.
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        drop(watch);
        assert!(lock(&stopper.sockets).is_empty());
        assert!(garbage(10, 1)[0] == b'!' && garbage(0, 1).is_empty());
    }
}
