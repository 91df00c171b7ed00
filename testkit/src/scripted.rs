//! [`ScriptedGitServer`]: a `git://` server that says what its [`Script`] says.
//!
//! It speaks the protocol (v0, stateful, as `git daemon` does: `gitprotocol-pack(5)`) but
//! has no repository: the ref advertisement and the pack come from the script, so a test can
//! serve a flood of refs, an `ERR` line full of terminal escapes, or a pack made by
//! [`PackBuilder`](super::PackBuilder) that no real server would send.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::net::{self, Listener, Stopper, HANG_LIMIT};
use super::record::{Entry, RequestLog, RequestRecord};
use super::tcp::{parse_request, read_pkt_line};
use super::{max_concurrent, LOG_TARGET};
use purgatory_sync::ObjectId;

/// How long the server waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for each line of the negotiation: a client may look at the
/// advertisement for a while before it says what it wants.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write to a client that does not read may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pkt-line, length prefix included.
const MAX_PKT_LEN: usize = 65520;
/// Most pkt-lines read from one client after the advertisement.
const MAX_NEGOTIATION_LINES: usize = 100_000;
/// Data bytes in one `side-band-64k` packet: 65520 less the length and the band byte.
const SIDE_BAND_64K_DATA: usize = MAX_PKT_LEN - 5;
/// Data bytes in one `side-band` packet (1000-byte packets).
const SIDE_BAND_DATA: usize = 1000 - 5;
/// The buffer between the server and the socket.
const WRITE_BUFFER: usize = 64 * 1024;

/// The capabilities a [`Script`] advertises by default: those of a `git daemon` whose
/// repository lets clients fetch commits by id, without `thin-pack` (the server sends what it
/// is given) and with `no-progress`. libgit2 fetches nothing by id unless one of the
/// `allow-*-sha1-in-want` is there; drop both ([`Script::without_capabilities`]) to make it
/// refuse.
pub const DEFAULT_CAPABILITIES: [&str; 6] = [
    "multi_ack_detailed",
    "side-band-64k",
    "ofs-delta",
    "allow-tip-sha1-in-want",
    "allow-reachable-sha1-in-want",
    "no-progress",
];

/// What a [`ScriptedGitServer`] sends first, in place of a repository's refs.
///
/// Every pkt-line payload longer than 65516 bytes is cut to that length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advertisement {
    /// These refs in this order, the first carrying the capabilities after a NUL, then a
    /// flush-pkt. No refs is [`Empty`](Self::Empty).
    Refs(Vec<(ObjectId, String)>),
    /// `refs` (may be empty), then `count` refs `refs/heads/b0`, `refs/heads/b1`, … all
    /// pointing at `oid`, then a flush-pkt. The lines are generated as they are sent: a
    /// million refs (about 60 MB) cost the server no memory.
    Flood {
        /// Refs sent before the flood.
        refs: Vec<(ObjectId, String)>,
        /// Where every generated ref points.
        oid: ObjectId,
        /// How many refs are generated.
        count: usize,
    },
    /// An empty repository as `git upload-pack` advertises it: one line
    /// `0000000000000000000000000000000000000000 capabilities^{}` carrying the capabilities,
    /// then a flush-pkt.
    Empty,
    /// Only a flush-pkt: no refs and no capabilities.
    FlushOnly,
    /// These pkt-line payloads as given (add `\n`, NULs and capabilities yourself), then a
    /// flush-pkt.
    Lines(Vec<Vec<u8>>),
    /// One pkt-line `ERR <message>`, the bytes as given (escapes, CR, LF, anything), and the
    /// connection closes. Clients print it as "remote error".
    Err(Vec<u8>),
}

/// A pack a [`ScriptedGitServer`] sends: bytes, or chunks generated per connection.
#[derive(Clone)]
pub struct Pack(PackSource);

/// Makes the chunks of one [`Pack::stream`].
type ChunkFactory = dyn Fn() -> Box<dyn Iterator<Item = Vec<u8>> + Send> + Send + Sync;

#[derive(Clone)]
enum PackSource {
    Bytes(Arc<[u8]>),
    Stream(Arc<ChunkFactory>),
}

impl Pack {
    /// These bytes, shared by every connection (cloning the pack copies no byte).
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Pack {
        Pack(PackSource::Bytes(bytes.into().into()))
    }

    /// The chunks `make()` yields, called once per connection and sent as they come: a pack
    /// larger than memory, or one that never ends. An endless one is sent until the client
    /// closes, the server is dropped, or 10 minutes pass.
    pub fn stream<F, I>(make: F) -> Pack
    where
        F: Fn() -> I + Send + Sync + 'static,
        I: IntoIterator<Item = Vec<u8>>,
        I::IntoIter: Send + 'static,
    {
        Pack(PackSource::Stream(Arc::new(move || {
            Box::new(make().into_iter()) as Box<dyn Iterator<Item = Vec<u8>> + Send>
        })))
    }

    /// Calls `send` with each chunk, in order, until it fails.
    fn for_each_chunk(&self, mut send: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        match &self.0 {
            PackSource::Bytes(bytes) => send(bytes),
            PackSource::Stream(make) => make().try_for_each(|chunk| send(&chunk)),
        }
    }
}

impl From<Vec<u8>> for Pack {
    fn from(bytes: Vec<u8>) -> Pack {
        Pack::bytes(bytes)
    }
}

impl std::fmt::Debug for Pack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            PackSource::Bytes(bytes) => write!(f, "Pack::bytes({} bytes)", bytes.len()),
            PackSource::Stream(_) => f.write_str("Pack::stream(..)"),
        }
    }
}

/// How a [`ScriptedGitServer`] answers a client that wants something.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The negotiation of a server that has nothing in common with the client (`NAK` to each
    /// flush of `have` lines and to `done`), then the pack: in side-band packets (band 1,
    /// at most 65515 data bytes each for `side-band-64k`, 995 for `side-band`) and a
    /// flush-pkt if the client asked for a side band, raw otherwise; then the connection
    /// closes.
    Pack(Pack),
    /// One pkt-line `ERR <message>` right after the client's wants, as `git upload-pack`
    /// refuses a want ("upload-pack: not our ref …"); then the connection closes.
    Err(Vec<u8>),
    /// The connection closes right after the client's wants, without a word.
    Close,
}

/// What a [`ScriptedGitServer`] says: the advertisement, its capabilities, and the answer to
/// the client's wants. Change it at run time with [`ScriptedGitServer::set_script`].
///
/// The default is an empty repository ([`Advertisement::Empty`]) with the
/// [`DEFAULT_CAPABILITIES`] that answers with an empty pack.
#[derive(Debug, Clone)]
pub struct Script {
    /// The ref advertisement.
    pub advertisement: Advertisement,
    /// Capabilities after the NUL of the first advertised line, joined by spaces.
    pub capabilities: Vec<String>,
    /// The answer to the client's wants.
    pub answer: Answer,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            advertisement: Advertisement::Empty,
            capabilities: DEFAULT_CAPABILITIES.map(str::to_owned).to_vec(),
            answer: Answer::Pack(Pack::bytes(super::PackBuilder::new().build())),
        }
    }
}

impl Script {
    /// Advertises `refs` with the [`DEFAULT_CAPABILITIES`] and answers every want with
    /// `pack`.
    pub fn serving(refs: Vec<(ObjectId, String)>, pack: impl Into<Pack>) -> Script {
        Script {
            advertisement: Advertisement::Refs(refs),
            answer: Answer::Pack(pack.into()),
            ..Script::default()
        }
    }

    /// The same script without the capabilities `names` (such as `side-band-64k`, or
    /// `allow-tip-sha1-in-want` and `allow-reachable-sha1-in-want` to refuse wants by id).
    pub fn without_capabilities(mut self, names: &[&str]) -> Script {
        self.capabilities.retain(|c| !names.contains(&c.as_str()));
        self
    }
}

/// What one client said after the advertisement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Negotiation {
    /// The ids of the `want` lines, in order.
    pub wants: Vec<ObjectId>,
    /// The capabilities the client asked for on its first `want` line.
    pub capabilities: Vec<String>,
    /// The ids of the `have` lines, in order.
    pub haves: Vec<ObjectId>,
    /// Whether the client sent `done`.
    pub done: bool,
    /// Every other line (`shallow`, `deepen`, `filter`, malformed wants), without its
    /// newline.
    pub other: Vec<String>,
}

impl Negotiation {
    /// Files one pkt-line of the client's; returns whether it was `done`.
    fn note(&mut self, payload: &[u8]) -> bool {
        let text = String::from_utf8_lossy(payload);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        if let Some(rest) = text.strip_prefix("want ") {
            let (hex, caps) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Ok(oid) = hex.parse() {
                if self.wants.is_empty() {
                    self.capabilities = caps
                        .split(' ')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                self.wants.push(oid);
                return false;
            }
        } else if let Some(hex) = text.strip_prefix("have ") {
            if let Ok(oid) = hex.trim_end().parse() {
                self.haves.push(oid);
                return false;
            }
        } else if text == "done" {
            self.done = true;
            return true;
        }
        self.other.push(text.to_owned());
        false
    }

    /// The side band the client asked for: its largest data length.
    fn side_band(&self) -> Option<usize> {
        let asked = |name: &str| self.capabilities.iter().any(|c| c == name);
        if asked("side-band-64k") {
            Some(SIDE_BAND_64K_DATA)
        } else if asked("side-band") {
            Some(SIDE_BAND_DATA)
        } else {
            None
        }
    }

    fn deepens(&self) -> bool {
        self.other.iter().any(|line| line.starts_with("deepen"))
    }
}

/// What the connection threads share.
struct Shared {
    script: Mutex<Script>,
    log: RequestLog,
    /// Negotiations by the request log's entry id.
    negotiations: Mutex<Vec<(u64, Negotiation)>>,
    stopper: Arc<Stopper>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Stores the negotiation of the connection `id`, replacing what was stored for it.
    fn publish(&self, id: u64, negotiation: &Negotiation) {
        let mut all = lock(&self.negotiations);
        match all.iter_mut().rev().find(|(i, _)| *i == id) {
            Some((_, stored)) => stored.clone_from(negotiation),
            None => all.push((id, negotiation.clone())),
        }
    }
}

/// A `git://` server on a loopback address that serves whatever its [`Script`] says, to
/// test clients against hostile servers: crafted packs, floods of refs, error lines with
/// terminal escapes. Unix only.
///
/// It speaks protocol v0 as `git daemon` does and ignores a client's request for v2, which a
/// client must accept: that is how servers without v2 answer. Every repository path and
/// service gets the same script. After the advertisement it reads the client's `want` lines
/// up to a flush-pkt (a client that wants nothing sends just the flush-pkt and is done),
/// then its `have` lines (`NAK` after each flush-pkt) up to `done`, then sends the
/// [`Answer`]; it never finds a common commit. What each client said is kept
/// ([`negotiations`](Self::negotiations), [`wants`](Self::wants)), and every connection is
/// logged ([`requests`](Self::requests)) with the service as method, the repository path as
/// path, and status 0.
///
/// Each connection is served by its own thread, at most 64 at once; the script can be changed
/// while clients are connected and applies to connections whose request arrives after the
/// call. Waits are bounded: 10 s for the request, 60 s for each line of the negotiation,
/// 30 s for each write. Dropping the server closes every connection and joins every thread.
///
/// ```no_run
/// use purgatory_sync_testkit::{self as testkit, PackBuilder, Script, ScriptedGitServer};
/// use std::net::Ipv4Addr;
///
/// let repo = testkit::init_bare(&std::env::temp_dir().join("scripted-doc.git"));
/// let tip = testkit::commit(&repo, "main", &[("README", b"hi\n")], "first");
/// let mut pack = PackBuilder::new();
/// pack.add_reachable(&repo, tip);
/// let script = Script::serving(vec![(tip, "refs/heads/main".into())], pack.build());
/// let server = ScriptedGitServer::start(Ipv4Addr::new(127, 0, 0, 2), script)?;
/// println!("{tip} is at {}", server.url("any/name.git"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct ScriptedGitServer {
    listener: Listener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ScriptedGitServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedGitServer")
            .field("addr", &self.listener.addr())
            .finish_non_exhaustive()
    }
}

impl ScriptedGitServer {
    /// Starts listening on `ip` and a free port with `script`. The server accepts
    /// connections when this returns.
    ///
    /// # Errors
    /// No port could be bound on `ip`.
    pub fn start(ip: Ipv4Addr, script: Script) -> io::Result<ScriptedGitServer> {
        let stopper = Arc::new(Stopper::default());
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            log: RequestLog::default(),
            negotiations: Mutex::default(),
            stopper: Arc::clone(&stopper),
        });
        let listener = {
            let shared = Arc::clone(&shared);
            Listener::start(ip, "git-scripted", stopper, move |stream, peer| {
                serve_connection(stream, peer, &shared);
            })?
        };
        Ok(ScriptedGitServer { listener, shared })
    }

    /// The `git://` URL of `repo_name` (such as `alice/hello.git`) on this server; every
    /// name gets the same script.
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

    /// Serves `script` to connections whose request arrives from now on.
    pub fn set_script(&self, script: Script) {
        *lock(&self.shared.script) = script;
    }

    /// The script new connections get.
    pub fn script(&self) -> Script {
        lock(&self.shared.script).clone()
    }

    /// What each client said after the advertisement, oldest connection first: one entry per
    /// connection that sent at least one line besides a lone flush-pkt (a client that only
    /// listed the refs sends nothing else). An entry appears once the client's wants are
    /// complete and is updated as its negotiation goes on.
    pub fn negotiations(&self) -> Vec<Negotiation> {
        lock(&self.shared.negotiations)
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Every id clients asked for (`want` lines), over all connections, in order.
    pub fn wants(&self) -> Vec<ObjectId> {
        lock(&self.shared.negotiations)
            .iter()
            .flat_map(|(_, n)| n.wants.iter().copied())
            .collect()
    }

    /// A snapshot of the connection log, oldest first, including connections in progress.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.snapshot()
    }

    /// Empties the connection log and forgets the negotiations.
    pub fn clear_requests(&self) {
        self.shared.log.clear();
        lock(&self.shared.negotiations).clear();
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

/// The socket as a writer that counts what it writes in the request log.
struct Counted<'a> {
    stream: &'a TcpStream,
    entry: &'a Entry,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.entry.add_bytes(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

type Out<'a> = BufWriter<Counted<'a>>;

fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(_watch) = shared.stopper.watch(&stream) else {
        return;
    };
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let request = read_pkt_line(&mut reader);
    let started = Instant::now();
    let Ok(request) = request else {
        // Logged all the same: it counts towards concurrency like any other.
        let _entry = shared.log.begin(started, "", "");
        return;
    };
    let (service, path, host) = parse_request(&request);
    let mut entry = shared.log.begin(started, &service, &path);
    entry.set_host(&host);
    let script = lock(&shared.script).clone();
    log::debug!(
        target: LOG_TARGET,
        "scripted git:// {service} {path} from {peer}: {:?}, answer {:?}",
        AdvertisementSummary(&script.advertisement),
        script.answer
    );
    let mut out = BufWriter::with_capacity(
        WRITE_BUFFER,
        Counted {
            stream: &stream,
            entry: &entry,
        },
    );
    let result =
        converse(&mut reader, &mut out, &script, shared, &entry).and_then(|()| out.flush());
    drop(out);
    match result {
        Ok(()) => {
            let _ = stream.shutdown(Shutdown::Write);
            entry.finish();
            net::drain(&stream, &mut reader);
        }
        Err(e) => {
            log::debug!(target: LOG_TARGET, "scripted git:// for {peer} ended: {e}");
            let _ = stream.shutdown(Shutdown::Both);
            entry.finish();
        }
    }
}

/// The advertisement for the log, without a flood's or a long list's lines.
struct AdvertisementSummary<'a>(&'a Advertisement);

impl std::fmt::Debug for AdvertisementSummary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Advertisement::Refs(refs) => write!(f, "{} refs", refs.len()),
            Advertisement::Flood { refs, count, .. } => {
                write!(f, "{} refs and a flood of {count}", refs.len())
            }
            Advertisement::Lines(lines) => write!(f, "{} raw lines", lines.len()),
            other => write!(f, "{other:?}"),
        }
    }
}

/// Advertisement, negotiation and answer.
fn converse(
    reader: &mut BufReader<TcpStream>,
    out: &mut Out<'_>,
    script: &Script,
    shared: &Shared,
    entry: &Entry,
) -> io::Result<()> {
    if !advertise(out, script, &shared.stopper)? {
        return Ok(());
    }
    out.flush()?;
    reader
        .get_ref()
        .set_read_timeout(Some(NEGOTIATION_TIMEOUT))?;
    let mut lines = 0usize;
    let mut next = |reader: &mut BufReader<TcpStream>| -> io::Result<Pkt> {
        lines += 1;
        if lines > MAX_NEGOTIATION_LINES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many negotiation lines",
            ));
        }
        read_pkt(reader)
    };

    // The wants, up to a flush-pkt.
    let mut negotiation = Negotiation::default();
    let mut said_anything = false;
    loop {
        match next(reader)? {
            Pkt::Eof => {
                if said_anything {
                    shared.publish(entry.id(), &negotiation);
                }
                return Ok(());
            }
            Pkt::Flush => break,
            Pkt::Delim => negotiation.other.push("0001".to_owned()),
            Pkt::Data(line) => {
                negotiation.note(&line);
            }
        }
        said_anything = true;
    }
    if !said_anything {
        // A lone flush-pkt: the client only wanted the refs.
        return Ok(());
    }
    shared.publish(entry.id(), &negotiation);
    match &script.answer {
        Answer::Err(message) => return write_pkt(out, &[b"ERR ", &message[..]].concat()),
        Answer::Close => return Ok(()),
        Answer::Pack(_) => {}
    }
    if negotiation.deepens() {
        // No shallow or unshallow lines: the end of the shallow list.
        out.write_all(b"0000")?;
        out.flush()?;
    }

    // The haves, up to `done`.
    loop {
        match next(reader)? {
            Pkt::Eof => {
                shared.publish(entry.id(), &negotiation);
                return Ok(());
            }
            Pkt::Flush => {
                write_pkt(out, b"NAK\n")?;
                out.flush()?;
            }
            Pkt::Delim => negotiation.other.push("0001".to_owned()),
            Pkt::Data(line) => {
                if negotiation.note(&line) {
                    break;
                }
            }
        }
    }
    shared.publish(entry.id(), &negotiation);
    write_pkt(out, b"NAK\n")?;
    if let Answer::Pack(pack) = &script.answer {
        send_pack(out, pack, negotiation.side_band(), &shared.stopper)?;
    }
    Ok(())
}

/// Writes the advertisement; false if the connection ends with it (an `ERR` line).
fn advertise(out: &mut Out<'_>, script: &Script, stopper: &Stopper) -> io::Result<bool> {
    let caps = script.capabilities.join(" ");
    let mut line = Vec::with_capacity(256);
    let mut first = true;
    let mut write_ref = |out: &mut Out<'_>, oid: &ObjectId, name: &str| -> io::Result<()> {
        line.clear();
        write!(line, "{oid} {name}")?;
        if std::mem::take(&mut first) {
            line.push(0);
            line.extend_from_slice(caps.as_bytes());
        }
        line.push(b'\n');
        write_pkt(out, &line)
    };
    let zero = ObjectId::from_bytes([0; 20]);
    match &script.advertisement {
        Advertisement::Refs(refs) if !refs.is_empty() => {
            for (oid, name) in refs {
                write_ref(out, oid, name)?;
            }
        }
        Advertisement::Refs(_) | Advertisement::Empty => {
            write_ref(out, &zero, "capabilities^{}")?;
        }
        Advertisement::Flood { refs, oid, count } => {
            for (oid, name) in refs {
                write_ref(out, oid, name)?;
            }
            use std::fmt::Write as _;
            let mut name = String::with_capacity(32);
            for i in 0..*count {
                if i % 4096 == 0 && stopper.is_stopped() {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                name.clear();
                write!(name, "refs/heads/b{i}").expect("formatting into a String");
                write_ref(out, oid, &name)?;
            }
            if refs.is_empty() && *count == 0 {
                write_ref(out, &zero, "capabilities^{}")?;
            }
        }
        Advertisement::FlushOnly => {}
        Advertisement::Lines(lines) => {
            for line in lines {
                write_pkt(out, line)?;
            }
        }
        Advertisement::Err(message) => {
            write_pkt(out, &[b"ERR ", &message[..]].concat())?;
            return Ok(false);
        }
    }
    out.write_all(b"0000")?;
    Ok(true)
}

/// Sends `pack`: in side-band packets of at most `side_band` data bytes followed by a
/// flush-pkt, or raw. Ends when the pack does, the client fails, the server stops, or
/// [`HANG_LIMIT`] passes.
fn send_pack(
    out: &mut Out<'_>,
    pack: &Pack,
    side_band: Option<usize>,
    stopper: &Stopper,
) -> io::Result<()> {
    let deadline = Instant::now() + HANG_LIMIT;
    pack.for_each_chunk(|chunk| {
        if stopper.is_stopped() || Instant::now() >= deadline {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match side_band {
            Some(max) => chunk.chunks(max).try_for_each(|piece| {
                write!(out, "{:04x}\x01", piece.len() + 5)?;
                out.write_all(piece)
            }),
            None => out.write_all(chunk),
        }
    })?;
    if side_band.is_some() {
        out.write_all(b"0000")?;
    }
    out.flush()
}

/// Writes one pkt-line with `payload`, cut to the longest a pkt-line holds.
fn write_pkt(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let payload = &payload[..payload.len().min(MAX_PKT_LEN - 4)];
    write!(out, "{:04x}", payload.len() + 4)?;
    out.write_all(payload)
}

/// One pkt-line from the client.
#[derive(Debug, PartialEq, Eq)]
enum Pkt {
    /// `0000`.
    Flush,
    /// `0001` or `0002` (protocol v2's delimiter and response end).
    Delim,
    /// A line's payload.
    Data(Vec<u8>),
    /// The client closed the connection between two pkt-lines.
    Eof,
}

fn read_pkt(reader: &mut impl Read) -> io::Result<Pkt> {
    let mut head = [0u8; 4];
    let mut have = 0;
    while have < 4 {
        match reader.read(&mut head[have..]) {
            Ok(0) if have == 0 => return Ok(Pkt::Eof),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = std::str::from_utf8(&head)
        .ok()
        .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a pkt-line"))?;
    match len {
        0 => Ok(Pkt::Flush),
        1 | 2 => Ok(Pkt::Delim),
        4..=MAX_PKT_LEN => {
            let mut payload = vec![0; len - 4];
            reader.read_exact(&mut payload)?;
            Ok(Pkt::Data(payload))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad pkt-line length",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        commit, commit_large, git_command, init_bare, missing_objects, require_git, PackBuilder,
    };
    use std::path::{Path, PathBuf};

    const HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    const WAIT: Duration = Duration::from_secs(10);

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("purgatory-testkit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    /// A repository with a commit of a 4 MiB random blob under a small commit; the tip, a
    /// pack of everything reachable from it and the ids in the pack.
    fn fixture(dir: &Path) -> (ObjectId, Vec<u8>, Vec<ObjectId>) {
        let repo = init_bare(&dir.join("src.git"));
        commit_large(&repo, "main", 4 << 20, 1);
        let tip = commit(&repo, "main", &[("README", b"hi\n")], "second");
        let mut pack = PackBuilder::new();
        let ids = pack.add_reachable(&repo, tip);
        (tip, pack.build(), ids)
    }

    fn git(args: &[&str]) -> std::process::Output {
        git_command().args(args).output().expect("git runs")
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn pkt_lines_and_negotiation_lines_are_parsed() {
        let mut input = &b"0009want"[..];
        assert!(read_pkt(&mut input).is_err());
        let mut input = &b"000ahello\n00000001"[..];
        assert_eq!(
            read_pkt(&mut input).unwrap(),
            Pkt::Data(b"hello\n".to_vec())
        );
        assert_eq!(read_pkt(&mut input).unwrap(), Pkt::Flush);
        assert_eq!(read_pkt(&mut input).unwrap(), Pkt::Delim);
        assert_eq!(read_pkt(&mut input).unwrap(), Pkt::Eof);
        assert!(read_pkt(&mut &b"00"[..]).is_err());
        assert!(read_pkt(&mut &b"0003"[..]).is_err());
        assert!(read_pkt(&mut &b"fff1"[..]).is_err());

        let a = "1111111111111111111111111111111111111111";
        let b = "2222222222222222222222222222222222222222";
        let mut n = Negotiation::default();
        assert!(!n.note(format!("want {a} multi_ack_detailed side-band-64k\n").as_bytes()));
        assert!(!n.note(format!("want {b}\n").as_bytes()));
        assert!(!n.note(b"want nonsense\n"));
        assert!(!n.note(b"deepen 1\n"));
        assert!(!n.note(format!("have {b}\n").as_bytes()));
        assert!(n.note(b"done\n"));
        assert_eq!(n.wants, [a.parse().unwrap(), b.parse().unwrap()]);
        assert_eq!(n.capabilities, ["multi_ack_detailed", "side-band-64k"]);
        assert_eq!(n.haves, [b.parse().unwrap()]);
        assert_eq!(n.other, ["want nonsense", "deepen 1"]);
        assert!(n.done && n.deepens());
        assert_eq!(n.side_band(), Some(SIDE_BAND_64K_DATA));

        let mut out = Vec::new();
        write_pkt(&mut out, &[b'x'; 70_000]).unwrap();
        assert_eq!(&out[..4], b"fff0");
        assert_eq!(out.len(), MAX_PKT_LEN);
    }

    #[test]
    fn git_fetches_a_scripted_pack() {
        require_git();
        let dir = scratch("scripted-git");
        let (tip, pack, ids) = fixture(&dir);
        let script = Script::serving(vec![(tip, "refs/heads/main".to_owned())], pack);
        let server = ScriptedGitServer::start(HOST, script).unwrap();
        let url = server.url("r.git");

        // Default protocol: the client asks for v2 and gets v0.
        let target = init_bare(&dir.join("cli.git"));
        let out = git(&[
            "-C",
            target.to_str().unwrap(),
            "fetch",
            "--quiet",
            &url,
            &format!("{tip}:refs/heads/main"),
        ]);
        assert!(out.status.success(), "git fetch: {}", text(&out.stderr));
        assert_eq!(missing_objects(&target, &ids), []);
        assert_eq!(server.wants(), [tip]);
        let n = &server.negotiations()[0];
        assert!(n.done && n.haves.is_empty(), "{n:?}");
        assert!(n.capabilities.iter().any(|c| c == "side-band-64k"), "{n:?}");
        assert!(server.wait_idle(WAIT));
        let log = server.requests();
        assert_eq!(log.len(), 1);
        assert_eq!(
            (log[0].method.as_str(), log[0].path.as_str()),
            ("git-upload-pack", "/r.git")
        );
        assert!(log[0].bytes_sent > 4 << 20);

        // A second fetch into the same repository sends haves first, and gets NAKs.
        let next = commit(&dir.join("src.git"), "main", &[("x", b"x\n")], "third");
        let mut pack = PackBuilder::new();
        pack.add_reachable(&dir.join("src.git"), next);
        server.set_script(Script::serving(
            vec![(next, "refs/heads/main".to_owned())],
            pack.build(),
        ));
        let out = git(&[
            "-C",
            target.to_str().unwrap(),
            "fetch",
            "--quiet",
            &url,
            &next.to_string(),
        ]);
        assert!(out.status.success(), "git fetch: {}", text(&out.stderr));
        assert!(missing_objects(&target, &[next]).is_empty());
        assert!(server.negotiations()[1].haves.contains(&tip));

        // An ERR line in place of the pack: git prints it.
        server.set_script(Script {
            answer: Answer::Err(b"upload-pack: not our ref".to_vec()),
            ..Script::serving(vec![(tip, "refs/heads/main".to_owned())], Vec::new())
        });
        let empty = init_bare(&dir.join("err.git"));
        let out = git(&[
            "-C",
            empty.to_str().unwrap(),
            "fetch",
            &url,
            &tip.to_string(),
        ]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("remote error: upload-pack: not our ref"),
            "{stderr}"
        );

        // Without allow-*-sha1-in-want, git does not ask for an unadvertised id.
        let refusing = Script::serving(vec![(tip, "refs/heads/main".to_owned())], Vec::new())
            .without_capabilities(&["allow-tip-sha1-in-want", "allow-reachable-sha1-in-want"]);
        server.set_script(refusing);
        server.clear_requests();
        let fresh = init_bare(&dir.join("refused.git"));
        let out = git(&[
            "-C",
            fresh.to_str().unwrap(),
            "fetch",
            &url,
            &next.to_string(),
        ]);
        assert!(!out.status.success());
        assert!(server.wants().is_empty(), "{:?}", server.negotiations());
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn libgit2_fetches_a_scripted_pack() {
        let dir = scratch("scripted-libgit2");
        let (tip, pack, ids) = fixture(&dir);
        let refs = vec![(tip, "refs/heads/main".to_owned())];
        let server =
            ScriptedGitServer::start(HOST, Script::serving(refs.clone(), pack.clone())).unwrap();
        let url = server.url("r.git");
        let fetch = |name: &str| {
            let target = init_bare(&dir.join(name));
            let repo = git2::Repository::open_bare(&target).unwrap();
            let mut remote = repo.remote_anonymous(&url).unwrap();
            let result = remote.fetch(&[tip.to_string()], None, None);
            (target, result)
        };

        // Side band, raw, and a pack streamed in chunks.
        let (target, result) = fetch("sideband.git");
        result.unwrap();
        assert_eq!(missing_objects(&target, &ids), []);
        let n = &server.negotiations()[0];
        assert_eq!(n.wants, [tip]);
        assert!(
            n.done && n.capabilities.iter().any(|c| c == "side-band-64k"),
            "{n:?}"
        );

        server.set_script(
            Script::serving(refs.clone(), pack.clone()).without_capabilities(&["side-band-64k"]),
        );
        let (target, result) = fetch("raw.git");
        result.unwrap();
        assert_eq!(missing_objects(&target, &ids), []);
        assert_eq!(server.negotiations()[1].side_band(), None);

        let shared: Arc<[u8]> = pack.into();
        let stream = Pack::stream(move || {
            let shared = Arc::clone(&shared);
            (0..shared.len().div_ceil(1000))
                .map(move |i| shared[i * 1000..shared.len().min((i + 1) * 1000)].to_vec())
        });
        server.set_script(Script::serving(refs.clone(), stream));
        let (target, result) = fetch("stream.git");
        result.unwrap();
        assert_eq!(missing_objects(&target, &ids), []);
        assert_eq!(server.wants(), [tip, tip, tip]);
        assert!(server.wait_idle(WAIT));
        assert_eq!(server.requests().len(), 3);

        // Refused wants: libgit2 gives up before asking without allow-*-sha1-in-want, and
        // reports an ERR answer.
        server.set_script(
            Script::serving(refs.clone(), Vec::new())
                .without_capabilities(&["allow-tip-sha1-in-want", "allow-reachable-sha1-in-want"]),
        );
        let (_, result) = fetch("refused.git");
        let e = result.unwrap_err();
        assert!(
            e.message().contains("cannot fetch a specific object"),
            "{e}"
        );
        assert_eq!(server.wants().len(), 3);
        server.set_script(Script {
            answer: Answer::Err(b"upload-pack: not our ref".to_vec()),
            ..Script::serving(refs, Vec::new())
        });
        // libgit2 1.9 skips anything but ACK and NAK after `done`, the ERR line included,
        // and then finds the connection closed.
        let (_, result) = fetch("err.git");
        let e = result.unwrap_err();
        assert_eq!(
            (e.class(), e.code()),
            (git2::ErrorClass::Net, git2::ErrorCode::Eof),
            "{e}"
        );
        assert_eq!(server.wants().len(), 4);

        // Dropping the server stops it.
        let addr = server.addr();
        drop(server);
        assert!(TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn floods_errors_and_empty_advertisements_reach_clients() {
        require_git();
        let oid: ObjectId = "1234567890123456789012345678901234567890".parse().unwrap();
        let flood = Script {
            advertisement: Advertisement::Flood {
                refs: Vec::new(),
                oid,
                count: 100_000,
            },
            ..Script::default()
        };
        let server = ScriptedGitServer::start(HOST, flood).unwrap();
        let url = server.url("flood.git");
        let out = git(&["ls-remote", &url]);
        assert!(out.status.success(), "git ls-remote: {}", text(&out.stderr));
        let listing = text(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 100_000);
        assert!(lines.iter().all(|l| l.starts_with(&oid.to_string())));
        assert!(lines.contains(&format!("{oid}\trefs/heads/b99999").as_str()));
        assert!(server.wait_idle(WAIT));
        assert!(server.requests()[0].bytes_sent > 100_000 * 60);
        assert!(server.negotiations().is_empty());

        // An ERR line instead of the advertisement, escapes and all.
        let message = b"\x1b[31mno such\r\nrepository\x07".to_vec();
        server.set_script(Script {
            advertisement: Advertisement::Err(message),
            ..Script::default()
        });
        let out = git(&["ls-remote", &url]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("remote error") && stderr.contains("repository"),
            "{stderr:?}"
        );
        let dir = scratch("scripted-err");
        let repo = git2::Repository::init_bare(dir.join("t.git")).unwrap();
        let mut remote = repo.remote_anonymous(&url).unwrap();
        let e = remote.connect(git2::Direction::Fetch).unwrap_err();
        assert!(e.message().contains("remote error: \x1b[31mno such"), "{e}");

        // Empty repositories, both ways.
        for advertisement in [Advertisement::Empty, Advertisement::FlushOnly] {
            server.set_script(Script {
                advertisement,
                ..Script::default()
            });
            let out = git(&["ls-remote", &url]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(out.stdout.is_empty());
            let mut remote = repo.remote_anonymous(&url).unwrap();
            remote.connect(git2::Direction::Fetch).unwrap();
            assert!(remote.list().unwrap().is_empty());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
