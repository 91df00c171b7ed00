//! Limits on the parts of a server's answer, checked on the plaintext bytes the socket stream
//! carries.
//!
//! The byte cap bounds a whole fetch, but libgit2 keeps some parts of an answer in memory in
//! full: every header line of an HTTP response, and the ref advertisement (a few hundred bytes
//! of structures per ref). A 512 MiB header line or a 65 MB advertisement of a million refs
//! would cost that much memory and more. Over `git://` and `http://` the engine's stream sees
//! every byte libgit2 reads, so [`Watch`] follows the protocol's framing just far enough to
//! measure those parts and stops the connection as soon as one is too large:
//!
//! - `git://`: the advertisement is everything the server sends after the request line and
//!   before the client speaks again (its wants);
//! - `http://`: a response's header lines (each, and all of them) until the blank line, and the
//!   body of a `GET` (the `/info/refs` advertisement); a `POST`'s body is the pack, bounded by
//!   the byte cap only. The client writes a new request only after it has read the previous
//!   response, so a write after response bytes starts a new request.
//!
//! Over `https://` the stream carries TLS records and sees none of this; there the memory
//! budget (`net`) bounds what libgit2 may hold.

/// Longest HTTP header line accepted, without its line end (servers commonly refuse request
/// lines longer than 8 KiB themselves).
pub(crate) const MAX_HEADER_LINE: usize = 8 * 1024;
/// Most bytes of one response's header block.
pub(crate) const MAX_HEADERS: usize = 64 * 1024;

/// The application protocol spoken on a connection, as far as the stream can see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `git://`: pkt-lines in the clear.
    Git,
    /// `http://`: HTTP/1.1 in the clear.
    Http,
    /// Anything the stream cannot read (TLS): no framing is followed.
    Opaque,
}

impl Protocol {
    /// The protocol of a URL scheme (lower case).
    pub fn of_scheme(scheme: &str) -> Protocol {
        match scheme {
            "git" => Protocol::Git,
            "http" => Protocol::Http,
            _ => Protocol::Opaque,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Nothing written yet.
    Idle,
    /// `git://`: the request is sent; what arrives is the advertisement.
    GitAdvertisement { bytes: u64 },
    /// `http://`: a request is (being) written, no byte of its response read yet.
    HttpSent { get: bool },
    /// `http://`: reading a response's header block.
    HttpHeaders(Headers),
    /// `http://`: reading a response's body.
    HttpBody { get: bool, bytes: u64 },
    /// Nothing more to watch on this connection.
    Done,
}

#[derive(Debug)]
struct Headers {
    get: bool,
    /// Bytes of the current line so far, line end excluded.
    line: usize,
    /// Bytes of the block so far.
    total: usize,
    /// Whether the block's first line is a status line of an informational (1xx) response,
    /// once known; a 1xx response's headers are followed by another response's.
    informational: Option<bool>,
    /// The start of the block's first line, to read the status code from.
    status: Vec<u8>,
}

impl Headers {
    fn new(get: bool) -> Self {
        Headers {
            get,
            line: 0,
            total: 0,
            informational: None,
            status: Vec::new(),
        }
    }
}

/// Follows one connection's bytes; see the module docs.
#[derive(Debug)]
pub(crate) struct Watch {
    protocol: Protocol,
    max_advertisement: u64,
    state: State,
}

impl Watch {
    pub fn new(protocol: Protocol, max_advertisement: u64) -> Self {
        Watch {
            protocol,
            max_advertisement,
            state: State::Idle,
        }
    }

    /// The client wrote `buf`.
    pub fn on_write(&mut self, buf: &[u8]) {
        self.state = match (
            self.protocol,
            std::mem::replace(&mut self.state, State::Done),
        ) {
            // The request line (written in one piece or several, before any answer).
            (Protocol::Git, State::Idle | State::GitAdvertisement { bytes: 0 }) => {
                State::GitAdvertisement { bytes: 0 }
            }
            (Protocol::Http, State::HttpSent { get }) => State::HttpSent { get },
            // A write after response bytes (or the first one) starts a request.
            (Protocol::Http, _) => State::HttpSent {
                get: buf.starts_with(b"GET "),
            },
            _ => State::Done,
        };
    }

    /// The server sent `buf`. `Err` says which limit it broke.
    pub fn on_read(&mut self, mut buf: &[u8]) -> Result<(), String> {
        loop {
            match &mut self.state {
                State::Idle | State::Done => return Ok(()),
                State::GitAdvertisement { bytes } => {
                    *bytes += buf.len() as u64;
                    let bytes = *bytes;
                    return self.advertisement_within(bytes);
                }
                State::HttpSent { get } => {
                    let get = *get;
                    self.state = State::HttpHeaders(Headers::new(get));
                }
                State::HttpBody { get, bytes } => {
                    *bytes += buf.len() as u64;
                    let (get, bytes) = (*get, *bytes);
                    return if get {
                        self.advertisement_within(bytes)
                    } else {
                        Ok(())
                    };
                }
                State::HttpHeaders(h) => {
                    let Some(used) = headers(h, buf)? else {
                        return Ok(());
                    };
                    let (get, informational) = (h.get, h.informational == Some(true));
                    buf = &buf[used..];
                    self.state = if informational {
                        State::HttpHeaders(Headers::new(get))
                    } else {
                        State::HttpBody { get, bytes: 0 }
                    };
                }
            }
        }
    }

    fn advertisement_within(&self, bytes: u64) -> Result<(), String> {
        if bytes > self.max_advertisement {
            Err(format!(
                "the server's ref advertisement is larger than {} bytes",
                self.max_advertisement
            ))
        } else {
            Ok(())
        }
    }
}

/// Reads header bytes; `Some(n)` when the block ended after the first `n` bytes of `buf`.
fn headers(h: &mut Headers, buf: &[u8]) -> Result<Option<usize>, String> {
    for (i, &b) in buf.iter().enumerate() {
        h.total += 1;
        if h.total > MAX_HEADERS {
            return Err(format!(
                "the server's HTTP headers are longer than {MAX_HEADERS} bytes"
            ));
        }
        if b == b'\n' {
            if h.informational.is_none() {
                // "HTTP/1.1 1xx ...": the status code's first digit.
                h.informational = Some(h.status.get(9) == Some(&b'1'));
            }
            if h.line == 0 {
                return Ok(Some(i + 1));
            }
            h.line = 0;
            continue;
        }
        if b == b'\r' {
            continue;
        }
        h.line += 1;
        if h.informational.is_none() && h.status.len() < 16 {
            h.status.push(b);
        }
        if h.line > MAX_HEADER_LINE {
            return Err(format!(
                "the server sent an HTTP header line longer than {MAX_HEADER_LINE} bytes"
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_git_advertisement_is_counted_until_the_client_speaks() {
        let mut w = Watch::new(Protocol::Git, 100);
        // Before the request nothing counts.
        w.on_read(&[b'x'; 500]).unwrap();
        w.on_write(b"0032git-upload-pack /r.git\0host=h\0");
        w.on_read(&[b'x'; 60]).unwrap();
        let err = w.on_read(&[b'x'; 41]).unwrap_err();
        assert!(err.contains("larger than 100 bytes"), "{err}");
        // Once the wants are written, the pack follows: not an advertisement.
        let mut w = Watch::new(Protocol::Git, 100);
        w.on_write(b"request");
        w.on_read(&[b'x'; 100]).unwrap();
        w.on_write(b"0032want ...");
        w.on_read(&[b'x'; 10_000]).unwrap();
    }

    #[test]
    fn http_header_lines_and_blocks_are_bounded() {
        let mut w = Watch::new(Protocol::Http, 1 << 20);
        w.on_write(b"GET /r.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\r\n");
        w.on_read(b"HTTP/1.1 200 OK\r\nX-A: ").unwrap();
        // The line goes on across reads.
        let long = vec![b'a'; MAX_HEADER_LINE - 5];
        w.on_read(&long).unwrap();
        let err = w.on_read(b"aaaaaaaaaa").unwrap_err();
        assert!(err.contains("header line longer than 8192"), "{err}");

        let mut w = Watch::new(Protocol::Http, 1 << 20);
        w.on_write(b"GET / HTTP/1.1\r\n\r\n");
        w.on_read(b"HTTP/1.1 200 OK\r\n").unwrap();
        let line = format!("X-B: {}\r\n", "b".repeat(1000));
        let err = (0..100)
            .find_map(|_| w.on_read(line.as_bytes()).err())
            .expect("the block is cut");
        assert!(err.contains("headers are longer than 65536"), "{err}");
    }

    #[test]
    fn a_get_body_is_an_advertisement_a_post_body_is_not() {
        let mut w = Watch::new(Protocol::Http, 1000);
        w.on_write(b"GET /r.git/info/refs?service=git-upload-pack HTTP/1.1\r\n");
        w.on_write(b"Host: h\r\n\r\n");
        // Headers and the start of the body in one read.
        let mut first = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\n".to_vec();
        first.extend_from_slice(&[b'r'; 900]);
        w.on_read(&first).unwrap();
        assert!(w.on_read(&[b'r'; 101]).is_err());

        // Keep-alive: the POST on the same connection reads a pack of any size.
        let mut w = Watch::new(Protocol::Http, 1000);
        w.on_write(b"GET /info/refs HTTP/1.1\r\n\r\n");
        w.on_read(b"HTTP/1.1 200 OK\r\n\r\n0000").unwrap();
        w.on_write(b"POST /git-upload-pack HTTP/1.1\r\n\r\n");
        w.on_write(b"0032want ...");
        w.on_read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        w.on_read(&vec![b'p'; 100_000]).unwrap();
        // A header line of the POST's response is still bounded.
        w.on_write(b"POST /git-upload-pack HTTP/1.1\r\n\r\n");
        assert!(w.on_read(&vec![b'h'; MAX_HEADER_LINE + 1]).is_err());
    }

    #[test]
    fn an_informational_response_is_followed_by_the_real_one() {
        let mut w = Watch::new(Protocol::Http, 10);
        w.on_write(b"GET / HTTP/1.1\r\n\r\n");
        // The 100's blank line does not start the body: the next status line is a header.
        w.on_read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nA: b\r\n\r\n0123456789")
            .unwrap();
        assert!(w.on_read(b"x").is_err(), "the body of the 200 is counted");
    }

    #[test]
    fn tls_is_not_followed() {
        let mut w = Watch::new(Protocol::Opaque, 10);
        w.on_write(b"GET / HTTP/1.1\r\n\r\n");
        w.on_read(&vec![b'x'; 1 << 20]).unwrap();
    }
}
