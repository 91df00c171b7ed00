//! [`HttpGitServer`]: `git http-backend` behind a small HTTP/1.1 server, with faults.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::net::{self, Listener, Pacer, Stopper};
use super::record::{Entry, RequestLog, RequestRecord};
use super::{http_backend_program, max_concurrent, served_repo, LOG_TARGET};

/// How long a connection may stay silent while the server waits for its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client that does not read may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `git http-backend` may run for one request before it is killed.
const CGI_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest request line or header line.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines in a request.
const MAX_HEADERS: usize = 100;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Length of a [`Fault::Garbage`] body.
const GARBAGE_LEN: usize = 4096;

/// How an [`HttpGitServer`] misbehaves, for the requests a [`FaultTarget`] selects.
///
/// Every fault but [`Hang`](Fault::Hang) first reads the whole request, body included.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serves `git http-backend`'s response.
    #[default]
    None,
    /// Reads the request and never answers: the connection stays open until the client closes
    /// it, the server is dropped, or 10 minutes pass. Logged with status 0.
    Hang,
    /// Serves the real response (status line and headers included) at `bytes_per_sec` (0
    /// counts as 1): one byte a second at 1, about 20 writes a second above 20.
    Drip {
        /// The rate.
        bytes_per_sec: u64,
    },
    /// Answers `200 OK` with the content type the client expects for the request and a body
    /// of 4 KiB of pseudo-random bytes that are no pkt-lines.
    Garbage,
    /// Serves the real status and headers (with the full `Content-Length`), then only the
    /// first `after_bytes` bytes of the body, and closes the connection. Meant for
    /// [`FaultTarget::UploadPack`], whose body is the pack; a body no longer than
    /// `after_bytes` is sent whole.
    CloseMidPack {
        /// Body bytes sent before the connection is closed.
        after_bytes: u64,
    },
    /// Answers this status (such as 404, 500 or 503) with a short `text/plain` body.
    Status(u16),
    /// Answers `302 Found` with `Location:` the given base URL (such as another server's
    /// `http://127.0.0.3:PORT`, trailing `/` ignored) followed by the request's own path and
    /// query, which is the form of redirect git clients follow when a repository moved
    /// to another host.
    RedirectTo(String),
    /// Serves `git http-backend`'s response with one more header line after the backend's
    /// headers: `X-Huge: xxx…`, `bytes` bytes long (at least the 8 of `X-Huge: `; the CRLF
    /// not counted), written 64 KiB at a time as the client reads it, never held in memory.
    /// A client that buffers header lines whole holds all of it; the rest of the response
    /// (`Content-Length`, the body) follows intact for a client that copes.
    HugeHeader {
        /// Length of the header line.
        bytes: usize,
    },
}

/// Which requests a [`Fault`] applies to, by the phase of a smart-HTTP fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultTarget {
    /// Every request.
    All,
    /// The ref advertisement: `GET …/info/refs` (any query).
    InfoRefs,
    /// The negotiation and pack: `POST …/git-upload-pack`.
    UploadPack,
    /// Anything else (`git-receive-pack`, dumb-protocol paths, unknown paths).
    Other,
}

impl FaultTarget {
    fn of(path: &str) -> FaultTarget {
        if path.ends_with("/info/refs") {
            FaultTarget::InfoRefs
        } else if path.ends_with("/git-upload-pack") {
            FaultTarget::UploadPack
        } else {
            FaultTarget::Other
        }
    }
}

/// The fault of every [`FaultTarget`].
#[derive(Debug, Default)]
struct Faults {
    info_refs: Fault,
    upload_pack: Fault,
    other: Fault,
}

impl Faults {
    fn get(&self, target: FaultTarget) -> &Fault {
        match target {
            FaultTarget::InfoRefs => &self.info_refs,
            FaultTarget::UploadPack => &self.upload_pack,
            FaultTarget::Other | FaultTarget::All => &self.other,
        }
    }

    fn set(&mut self, target: FaultTarget, fault: Fault) {
        match target {
            FaultTarget::InfoRefs => self.info_refs = fault,
            FaultTarget::UploadPack => self.upload_pack = fault,
            FaultTarget::Other => self.other = fault,
            FaultTarget::All => {
                self.info_refs = fault.clone();
                self.upload_pack = fault.clone();
                self.other = fault;
            }
        }
    }
}

/// What the connection threads share.
#[derive(Debug)]
struct Shared {
    base_dir: PathBuf,
    faults: Mutex<Faults>,
    log: RequestLog,
    stopper: Arc<Stopper>,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A smart-HTTP git server on a loopback address: a small HTTP/1.1 server that runs
/// `git http-backend` as a CGI for every request, serving the bare repositories under one
/// directory read-only (`upload-pack` only), as `http://ip:port/<path relative to the
/// directory>`. Unix only.
///
/// Each repository's own configuration decides which objects clients may want by id (see
/// [`served_repo_with`](super::served_repo_with)). Both libgit2 and the `git` command-line
/// tool (protocol v0 and v2, gzip-compressed and chunked request bodies) fetch through it.
///
/// Responses carry `Content-Length` and `Connection: close`: one request per connection. A
/// thread serves each connection (at most 64 at once), and a client that sends nothing for
/// 10 s is disconnected. Faults ([`set_fault`](Self::set_fault)) can be switched on and off
/// while clients are connected; they apply to requests whose request line arrives after the
/// call. Every request is logged ([`requests`](Self::requests)).
///
/// Dropping the server closes every connection, kills the `git http-backend` processes still
/// running, and joins every thread. `git http-backend`'s error output goes to the [`log`]
/// crate at debug level, target `purgatory_sync_testkit`.
#[derive(Debug)]
pub struct HttpGitServer {
    listener: Listener,
    shared: Arc<Shared>,
}

impl HttpGitServer {
    /// Starts serving every repository under `base_dir` (created if missing) on `ip` and a
    /// free port. The server accepts connections when this returns.
    ///
    /// # Errors
    /// `git http-backend` is missing ([`io::ErrorKind::NotFound`]), `base_dir` cannot be
    /// created, or no port could be bound on `ip`.
    pub fn start(ip: Ipv4Addr, base_dir: &Path) -> io::Result<HttpGitServer> {
        if http_backend_program().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "`git http-backend` is not available: install git and put it on PATH",
            ));
        }
        std::fs::create_dir_all(base_dir)?;
        let base_dir = std::fs::canonicalize(base_dir)?;
        let stopper = Arc::new(Stopper::default());
        let shared = Arc::new(Shared {
            base_dir,
            faults: Mutex::default(),
            log: RequestLog::default(),
            stopper: Arc::clone(&stopper),
        });
        let listener = {
            let shared = Arc::clone(&shared);
            Listener::start(ip, "git-http", stopper, move |stream, peer| {
                serve_connection(stream, peer, &shared);
            })?
        };
        Ok(HttpGitServer { listener, shared })
    }

    /// The `http://` URL of the repository at `repo_name` (a path relative to the base
    /// directory, such as `alice/hello.git`). `url("")` is the server's root,
    /// `http://ip:port/`.
    pub fn url(&self, repo_name: &str) -> String {
        let addr = self.listener.addr();
        format!(
            "http://{}:{}/{}",
            addr.ip(),
            addr.port(),
            repo_name.trim_start_matches('/')
        )
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.listener.addr()
    }

    /// The directory whose repositories the server serves (canonicalised).
    pub fn base_dir(&self) -> &Path {
        &self.shared.base_dir
    }

    /// Creates (or opens) the served bare repository `name` under the base directory; see
    /// [`served_repo`].
    pub fn repo(&self, name: &str) -> PathBuf {
        served_repo(&self.shared.base_dir, name)
    }

    /// Applies `fault` to every request started from now on ([`FaultTarget::All`]);
    /// `Fault::None` heals the server.
    pub fn set_fault(&self, fault: Fault) {
        self.set_fault_on(FaultTarget::All, fault);
    }

    /// Applies `fault` to the requests of `target` started from now on; the faults of other
    /// targets stay as they are.
    pub fn set_fault_on(&self, target: FaultTarget, fault: Fault) {
        self.shared.faults().set(target, fault);
    }

    /// The fault requests of `target` get now (for [`FaultTarget::All`]: that of
    /// [`FaultTarget::Other`]).
    pub fn fault(&self, target: FaultTarget) -> Fault {
        self.shared.faults().get(target).clone()
    }

    /// A snapshot of the request log, oldest first, including requests in progress.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.snapshot()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.shared.log.clear();
    }

    /// Waits until no logged request is in progress (a client may have its answer a moment
    /// before the server has closed the connection and logged the end), up to `timeout`;
    /// true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.shared.log.wait_idle(timeout)
    }

    /// The most logged requests that were in progress at one instant; see
    /// [`max_concurrent`].
    pub fn max_concurrent_requests(&self) -> usize {
        max_concurrent(&self.requests())
    }
}

/// One parsed request.
#[derive(Debug)]
struct Request {
    method: String,
    /// Path and query as sent (origin form).
    target: String,
    /// The path, percent-decoded, without the query.
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read.
enum Bad {
    /// The client closed or stalled, or the server stops: close without answering.
    Gone,
    /// Answer 400 with this reason.
    Request(&'static str),
}

impl From<io::Error> for Bad {
    fn from(e: io::Error) -> Bad {
        if e.kind() == io::ErrorKind::InvalidData {
            Bad::Request("malformed request")
        } else {
            Bad::Gone
        }
    }
}

fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(_watch) = shared.stopper.watch(&stream) else {
        return;
    };
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    let Ok(Some(request_line)) = net::read_line(&mut reader, MAX_LINE) else {
        return;
    };
    let started = Instant::now();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let raw_target = parts.next().unwrap_or_default().to_owned();
    let mut entry = shared.log.begin(started, &method, &raw_target);

    let request = match read_request(&mut reader, &mut out, &request_line, &entry) {
        Ok(request) => request,
        Err(Bad::Gone) => return,
        Err(Bad::Request(reason)) => {
            let _ = send_simple(&mut out, &entry, 400, reason.as_bytes());
            let _ = out.shutdown(Shutdown::Write);
            entry.finish();
            net::drain(&out, &mut reader);
            return;
        }
    };
    entry.set_request(&request.method, &request.target);
    let fault = shared.faults().get(FaultTarget::of(&request.path)).clone();
    log::debug!(
        target: LOG_TARGET,
        "http {}: {} {} from {peer}, {} body bytes{}{} ({fault:?})",
        out.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        request.method,
        request.target,
        request.body.len(),
        request
            .header("Transfer-Encoding")
            .map(|v| format!(", transfer-encoding {v}"))
            .unwrap_or_default(),
        request
            .header("Content-Encoding")
            .map(|v| format!(", content-encoding {v}"))
            .unwrap_or_default(),
    );
    match respond(
        shared,
        &request,
        peer,
        &fault,
        &mut out,
        &mut reader,
        &entry,
    ) {
        Ok(Ending::Close) => {
            let _ = out.flush();
            let _ = out.shutdown(Shutdown::Write);
            entry.finish();
            net::drain(&out, &mut reader);
        }
        Ok(Ending::Cut) | Err(_) => {
            let _ = out.shutdown(Shutdown::Both);
            entry.finish();
        }
    }
}

/// How a response ends.
enum Ending {
    /// Close the connection politely.
    Close,
    /// Close it at once (the response is cut short on purpose).
    Cut,
}

/// Reads headers and body after the request line.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    out: &mut TcpStream,
    request_line: &str,
    entry: &Entry,
) -> Result<Request, Bad> {
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Bad::Request("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Err(Bad::Request("only HTTP/1.x is served"));
    }
    let mut headers = Vec::new();
    loop {
        let line = net::read_line(reader, MAX_LINE)?.ok_or(Bad::Gone)?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(Bad::Request("too many headers"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Bad::Request("malformed header"));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if let Some(host) = header("Host") {
        entry.set_host(&host);
    }
    // Absolute form (`http://host/path`) is allowed by HTTP/1.1; keep the path.
    let origin_form = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !origin_form.starts_with('/') {
        return Err(Bad::Request("the request target is not a path"));
    }
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    let path = percent_decode(path).ok_or(Bad::Request("malformed path"))?;

    if header("Expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        net::write_counted(out, b"HTTP/1.1 100 Continue\r\n\r\n", entry)?;
    }
    let chunked =
        header("Transfer-Encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(reader)?
    } else if let Some(length) = header("Content-Length") {
        let length: usize = length
            .parse()
            .map_err(|_| Bad::Request("malformed Content-Length"))?;
        if length > MAX_BODY {
            return Err(Bad::Request("body too large"));
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    } else {
        Vec::new()
    };
    Ok(Request {
        method: method.to_owned(),
        target: origin_form.to_owned(),
        path,
        query: query.to_owned(),
        headers,
        body,
    })
}

/// Reads a `Transfer-Encoding: chunked` body, trailers included.
fn read_chunked(reader: &mut dyn BufRead) -> Result<Vec<u8>, Bad> {
    let mut body = Vec::new();
    // Every chunk but the last has at least one byte, so this bounds the loop.
    for _ in 0..=MAX_BODY {
        let line = net::read_line(reader, MAX_LINE)?.ok_or(Bad::Gone)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| Bad::Request("malformed chunk size"))?;
        if size == 0 {
            for _ in 0..MAX_HEADERS {
                let trailer = net::read_line(reader, MAX_LINE)?.ok_or(Bad::Gone)?;
                if trailer.is_empty() {
                    return Ok(body);
                }
            }
            return Err(Bad::Request("too many trailers"));
        }
        if body.len() + size > MAX_BODY {
            return Err(Bad::Request("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let end = net::read_line(reader, 2)?;
        if end.as_deref() != Some("") {
            return Err(Bad::Request("malformed chunk end"));
        }
    }
    Err(Bad::Request("too many chunks"))
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Answers `request` as `fault` says.
fn respond(
    shared: &Shared,
    request: &Request,
    peer: SocketAddr,
    fault: &Fault,
    out: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    entry: &Entry,
) -> io::Result<Ending> {
    match fault {
        Fault::Hang => {
            let socket = out.try_clone()?;
            net::hang(reader, &socket, &shared.stopper);
            return Ok(Ending::Cut);
        }
        Fault::Status(code) => {
            let body = format!("purgatory-sync testkit: fault status {code}\n");
            send_simple(out, entry, *code, body.as_bytes())?;
            return Ok(Ending::Close);
        }
        Fault::RedirectTo(base) => {
            let location = format!("{}{}", base.trim_end_matches('/'), request.target);
            let head = response_head(
                302,
                &[
                    ("Location".to_owned(), location),
                    ("Content-Type".to_owned(), "text/plain".to_owned()),
                ],
                0,
            );
            net::write_counted(out, &head, entry)?;
            entry.set_status(302);
            return Ok(Ending::Close);
        }
        Fault::Garbage => {
            let content_type = match FaultTarget::of(&request.path) {
                FaultTarget::InfoRefs => {
                    format!("application/x-{}-advertisement", service(&request.query))
                }
                FaultTarget::UploadPack => "application/x-git-upload-pack-result".to_owned(),
                _ => "application/octet-stream".to_owned(),
            };
            let body = net::garbage(GARBAGE_LEN, entry.id());
            let head = response_head(
                200,
                &[("Content-Type".to_owned(), content_type)],
                body.len(),
            );
            entry.set_status(200);
            net::write_counted(out, &head, entry)?;
            net::write_counted(out, &body, entry)?;
            return Ok(Ending::Close);
        }
        Fault::None
        | Fault::Drip { .. }
        | Fault::CloseMidPack { .. }
        | Fault::HugeHeader { .. } => {}
    }
    let response = match run_backend(shared, request, peer) {
        Ok(response) => response,
        Err(e) => {
            log::debug!(target: LOG_TARGET, "git http-backend failed: {e}");
            if shared.stopper.is_stopped() {
                return Ok(Ending::Cut);
            }
            send_simple(
                out,
                entry,
                502,
                format!("git http-backend: {e}\n").as_bytes(),
            )?;
            return Ok(Ending::Close);
        }
    };
    let head = response_head(response.status, &response.headers, response.body.len());
    log::trace!(
        target: LOG_TARGET,
        "http {} {}: {} with {} body bytes, starting {:?}",
        request.method,
        request.target,
        response.status,
        response.body.len(),
        String::from_utf8_lossy(&response.body[..response.body.len().min(120)])
    );
    entry.set_status(response.status);
    match fault {
        Fault::Drip { bytes_per_sec } => {
            let mut pacer = Pacer::new(*bytes_per_sec);
            pacer.write(out, &head, &shared.stopper, entry)?;
            pacer.write(out, &response.body, &shared.stopper, entry)?;
            Ok(Ending::Close)
        }
        Fault::HugeHeader { bytes } => {
            net::write_counted(out, &head_start(response.status, &response.headers), entry)?;
            write_huge_header(out, *bytes, &shared.stopper, entry)?;
            net::write_counted(out, &head_end(response.body.len()), entry)?;
            net::write_counted(out, &response.body, entry)?;
            Ok(Ending::Close)
        }
        Fault::CloseMidPack { after_bytes } => {
            let keep = usize::try_from(*after_bytes).unwrap_or(usize::MAX);
            net::write_counted(out, &head, entry)?;
            if keep >= response.body.len() {
                net::write_counted(out, &response.body, entry)?;
                Ok(Ending::Close)
            } else {
                net::write_counted(out, &response.body[..keep], entry)?;
                Ok(Ending::Cut)
            }
        }
        _ => {
            net::write_counted(out, &head, entry)?;
            net::write_counted(out, &response.body, entry)?;
            Ok(Ending::Close)
        }
    }
}

/// The service a `…/info/refs?service=…` request asks for (`git-upload-pack` by default).
fn service(query: &str) -> &str {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("service="))
        .filter(|s| !s.is_empty())
        .unwrap_or("git-upload-pack")
}

/// Sends a complete `text/plain` response.
fn send_simple(out: &mut TcpStream, entry: &Entry, status: u16, body: &[u8]) -> io::Result<()> {
    let head = response_head(
        status,
        &[("Content-Type".to_owned(), "text/plain".to_owned())],
        body.len(),
    );
    entry.set_status(status);
    net::write_counted(out, &head, entry)?;
    net::write_counted(out, body, entry)
}

/// Status line and headers, with `Content-Length` and `Connection: close`.
fn response_head(status: u16, headers: &[(String, String)], content_length: usize) -> Vec<u8> {
    let mut head = head_start(status, headers);
    head.extend(head_end(content_length));
    head
}

/// Status line and `headers`, without the hop-by-hop ones this server sets itself.
fn head_start(status: u16, headers: &[(String, String)]) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        let hop = [
            "content-length",
            "connection",
            "transfer-encoding",
            "status",
        ];
        if !hop.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.into_bytes()
}

/// `Content-Length`, `Connection: close` and the blank line that ends the head.
fn head_end(content_length: usize) -> Vec<u8> {
    format!("Content-Length: {content_length}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Writes the header line of [`Fault::HugeHeader`]: `X-Huge: ` and `x`s up to `bytes` bytes,
/// then CRLF, 64 KiB at a time. Fails with [`io::ErrorKind::Interrupted`] if the server
/// stops.
fn write_huge_header(
    out: &mut TcpStream,
    bytes: usize,
    stopper: &Stopper,
    entry: &Entry,
) -> io::Result<()> {
    const NAME: &[u8] = b"X-Huge: ";
    net::write_counted(out, NAME, entry)?;
    let filler = [b'x'; 64 * 1024];
    let mut left = bytes.saturating_sub(NAME.len());
    while left > 0 {
        if stopper.is_stopped() {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = left.min(filler.len());
        net::write_counted(out, &filler[..n], entry)?;
        left -= n;
    }
    net::write_counted(out, b"\r\n", entry)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A CGI response.
#[derive(Debug, PartialEq, Eq)]
struct CgiResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Splits CGI output into status, headers and body. The status comes from a `Status:` header,
/// else 302 if there is a `Location:`, else 200.
fn parse_cgi(output: &[u8]) -> Option<CgiResponse> {
    let mut headers = Vec::new();
    let mut status = None;
    let mut rest = output;
    loop {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let line = std::str::from_utf8(&rest[..end]).ok()?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        rest = &rest[end + 1..];
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("Status") {
            status = Some(value.split(' ').next()?.parse().ok()?);
        } else {
            headers.push((name.trim().to_owned(), value.to_owned()));
        }
    }
    let redirect = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("Location"));
    Some(CgiResponse {
        status: status.unwrap_or(if redirect { 302 } else { 200 }),
        headers,
        body: rest.to_vec(),
    })
}

/// Runs `git http-backend` for `request` and collects its whole output. Bounded: the process
/// is killed after [`CGI_TIMEOUT`] or when the server stops.
fn run_backend(shared: &Shared, request: &Request, peer: SocketAddr) -> io::Result<CgiResponse> {
    let program = http_backend_program().ok_or(io::ErrorKind::NotFound)?;
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("GIT_PROJECT_ROOT", &shared.base_dir)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", &shared.base_dir)
        .env("LC_ALL", "C")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_SOFTWARE", "purgatory-sync-testkit")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", &request.method)
        .env("PATH_INFO", &request.path)
        .env("QUERY_STRING", &request.query)
        .env("REMOTE_ADDR", peer.ip().to_string())
        .env("REMOTE_PORT", peer.port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    if let Some(content_type) = request.header("Content-Type") {
        command.env("CONTENT_TYPE", content_type);
    }
    if !request.body.is_empty() || request.method == "POST" {
        command.env("CONTENT_LENGTH", request.body.len().to_string());
    }
    for (name, value) in &request.headers {
        let skip = [
            "content-type",
            "content-length",
            "transfer-encoding",
            "proxy",
        ];
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if valid && !skip.iter().any(|s| name.eq_ignore_ascii_case(s)) {
            let var = format!("HTTP_{}", name.to_ascii_uppercase().replace('-', "_"));
            command.env(var, value);
        }
    }

    let mut child = command.spawn()?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::other("the CGI's pipes are missing"));
    };
    // Feed, drain and wait at the same time: the backend may answer before it read all.
    let body = request.body.clone();
    let feeder = std::thread::spawn(move || {
        // An early exit of the backend closes the pipe: not an error here.
        let _ = stdin.write_all(&body);
    });
    let collector = std::thread::spawn(move || {
        let mut output = Vec::new();
        stdout.read_to_end(&mut output).map(|_| output)
    });
    let errors = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let status = wait_bounded(&mut child, &shared.stopper);
    let _ = feeder.join();
    let output = collector
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("CGI reader panicked")));
    let errors = errors.join().unwrap_or_default();
    for line in String::from_utf8_lossy(&errors).lines() {
        log::debug!(target: LOG_TARGET, "git http-backend {}: {line}", request.target);
    }
    let status = status?;
    let output = output?;
    parse_cgi(&output).ok_or_else(|| {
        io::Error::other(format!(
            "no CGI response ({status}; {} bytes of output)",
            output.len()
        ))
    })
}

/// Waits for `child`, killing it after [`CGI_TIMEOUT`] or when the server stops.
fn wait_bounded(child: &mut std::process::Child, stopper: &Stopper) -> io::Result<ExitStatus> {
    let deadline = Instant::now() + CGI_TIMEOUT;
    let mut pause = Duration::from_micros(200);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline && !stopper.is_stopped() => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match other {
                    Err(e) => e,
                    _ => io::Error::new(io::ErrorKind::TimedOut, "git http-backend was stopped"),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_output_is_parsed() {
        let out = b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope";
        let parsed = parse_cgi(out).unwrap();
        assert_eq!(parsed.status, 404);
        assert_eq!(
            parsed.headers,
            [("Content-Type".to_owned(), "text/plain".to_owned())]
        );
        assert_eq!(parsed.body, b"nope");
        let parsed = parse_cgi(b"Expires: x\n\n\x00\x01").unwrap();
        assert_eq!((parsed.status, &parsed.body[..]), (200, &b"\x00\x01"[..]));
        assert_eq!(parse_cgi(b"Location: /x\r\n\r\n").unwrap().status, 302);
        assert!(parse_cgi(b"no headers").is_none());
        assert!(parse_cgi(b"").is_none());
    }

    #[test]
    fn chunked_bodies_and_paths_are_decoded() {
        let mut input =
            BufReader::new(&b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\n"[..]);
        assert!(matches!(read_chunked(&mut input), Ok(b) if b == b"Wikipedia"));
        let mut input = BufReader::new(&b"zz\r\n"[..]);
        assert!(matches!(read_chunked(&mut input), Err(Bad::Request(_))));
        let mut input = BufReader::new(&b"4\r\nWi"[..]);
        assert!(matches!(read_chunked(&mut input), Err(Bad::Gone)));
        assert_eq!(percent_decode("/a%20b/c.git").unwrap(), "/a b/c.git");
        assert!(percent_decode("/a%2").is_none() && percent_decode("/%zz").is_none());
    }

    #[test]
    fn huge_header_lines_reach_plain_clients() {
        crate::require_git();
        let dir = std::env::temp_dir().join(format!(
            "purgatory-testkit-{}-huge-header",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let repo = served_repo(&dir, "r.git");
        crate::commit(&repo, "main", &[("f", b"1")], "first");
        let server = HttpGitServer::start(Ipv4Addr::new(127, 0, 0, 2), &dir).unwrap();
        let huge = 1 << 20;
        server.set_fault_on(FaultTarget::InfoRefs, Fault::HugeHeader { bytes: huge });

        let mut client = TcpStream::connect(server.addr()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            client,
            "GET /r.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: {}\r\n\r\n",
            server.addr()
        )
        .unwrap();
        let mut reader = BufReader::new(client);
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line).unwrap();
            assert!(
                line.ends_with(b"\r\n"),
                "{:?}",
                String::from_utf8_lossy(&line)
            );
            line.truncate(line.len() - 2);
            if line.is_empty() {
                break;
            }
            lines.push(line);
        }
        assert_eq!(lines[0], b"HTTP/1.1 200 OK");
        let long = lines.iter().find(|l| l.starts_with(b"X-Huge: ")).unwrap();
        assert_eq!(long.len(), huge);
        let length = lines
            .iter()
            .find_map(|l| l.strip_prefix(b"Content-Length: "))
            .map(|l| String::from_utf8_lossy(l).parse::<usize>().unwrap())
            .unwrap();
        let mut body = Vec::new();
        reader.read_to_end(&mut body).unwrap();
        assert_eq!(body.len(), length);
        assert!(body.starts_with(b"001e# service=git-upload-pack\n"));
        assert!(server.wait_idle(Duration::from_secs(10)));
        assert!(server.requests()[0].bytes_sent > huge as u64);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn targets_faults_and_heads() {
        assert_eq!(FaultTarget::of("/a/b.git/info/refs"), FaultTarget::InfoRefs);
        assert_eq!(
            FaultTarget::of("/a/b.git/git-upload-pack"),
            FaultTarget::UploadPack
        );
        assert_eq!(FaultTarget::of("/a/b.git/HEAD"), FaultTarget::Other);
        let mut faults = Faults::default();
        faults.set(FaultTarget::UploadPack, Fault::Garbage);
        assert_eq!(faults.get(FaultTarget::InfoRefs), &Fault::None);
        assert_eq!(faults.get(FaultTarget::UploadPack), &Fault::Garbage);
        faults.set(FaultTarget::All, Fault::Status(500));
        for target in [
            FaultTarget::InfoRefs,
            FaultTarget::UploadPack,
            FaultTarget::Other,
        ] {
            assert_eq!(faults.get(target), &Fault::Status(500));
        }
        assert_eq!(service("service=git-receive-pack"), "git-receive-pack");
        assert_eq!(service(""), "git-upload-pack");
        let head = response_head(
            404,
            &[
                ("Content-Length".to_owned(), "9".to_owned()),
                ("X-A".to_owned(), "b".to_owned()),
            ],
            3,
        );
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 404 Not Found\r\nX-A: b\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }
}
