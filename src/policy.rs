//! Which clone URLs the engine may fetch from, and which domain each belongs to.
//!
//! Clone URLs come from other people's events. A domain is the URL's host, lower-cased,
//! without user info, port or trailing dot; it is the unit of politeness (rate limits,
//! concurrency caps, the naughty list).
//!
//! The [`UrlPolicy`] is applied twice: at submit (a refused URL is returned to the host and
//! never queued) and by the fetcher right before each fetch. The second check also reaches the
//! socket: every address a host name resolves to is checked with [`ip_allowed`] before the
//! connection is made, and a connection to any other host than the URL's is refused (see
//! `fetch::conn`), so a name pointing at 127.0.0.1 or 10.x, DNS rebinding, a redirect or a
//! rewritten URL cannot reach a private address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::event::UrlRefusal;

/// A clone URL accepted at submit, with its domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CloneUrl {
    /// As the event gave it.
    pub url: Arc<str>,
    /// What the engine fetches: the URL with its scheme in lower case and its host in the
    /// canonical form the policy checked (`git\u{AD}hub.com` is fetched as `github.com`), so
    /// that the name a connection resolves, a TLS certificate is checked against and the
    /// naughty list records is the name the policy passed. Two URLs with the same fetch URL
    /// are one URL.
    pub fetch_url: Arc<str>,
    /// The canonical host: the unit of politeness.
    pub domain: Arc<str>,
    /// The scheme, lower case.
    pub scheme: Arc<str>,
    /// The port a connection goes to: the URL's, or the scheme's default.
    pub port: u16,
}

/// `url` as a clone URL accepted by an open policy, for tests.
#[cfg(test)]
pub(crate) fn clone_url(url: &str) -> CloneUrl {
    UrlPolicy::new()
        .allow_private_addresses(true)
        .check(url)
        .unwrap_or_else(|r| panic!("{url}: {r}"))
}

/// The port of `scheme` when a URL names none.
pub(crate) fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "https" => Some(443),
        "http" => Some(80),
        "git" => Some(9418),
        "ssh" | "git+ssh" | "ssh+git" => Some(22),
        _ => None,
    }
}

/// The relay's own domain: a host, and optionally the one port of it that is the relay's.
///
/// Written `host` (every port of the host is ours), `host:port` or `[v6-address]:port` (only
/// that authority is ours: a sibling git service on another port of the same host may be
/// fetched from). The host is kept in the canonical form of clone URLs' domains
/// ([`domain_of`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OwnDomain {
    /// Canonical, as [`domain_of`] gives it.
    pub host: Arc<str>,
    /// `None`: every port of `host`.
    pub port: Option<u16>,
}

impl OwnDomain {
    /// Reads `host`, `host:port` or `[v6]:port`; the host is canonicalised like a clone URL's.
    ///
    /// # Errors
    /// Why the value is not a host with an optional port.
    pub(crate) fn parse(value: &str) -> Result<OwnDomain, &'static str> {
        let value = value.trim();
        if value.is_empty() {
            return Err("empty");
        }
        // A bare address, IPv6 included, has no port: `::1` is not host `:` port `1`.
        if let Ok(ip) = value.parse::<IpAddr>() {
            return Ok(OwnDomain {
                host: Arc::from(ip.to_string()),
                port: None,
            });
        }
        let (host, port) = if let Some(inner) = value.strip_prefix('[') {
            let (v6, rest) = inner.split_once(']').ok_or("`[` without `]`")?;
            let port = match rest {
                "" => None,
                _ => Some(
                    rest.strip_prefix(':')
                        .ok_or("text after `]` that is not `:port`")?,
                ),
            };
            (format!("[{v6}]"), port)
        } else {
            match value.rsplit_once(':') {
                Some((_, _)) if value.matches(':').count() > 1 => {
                    return Err("an IPv6 address with a port is written `[address]:port`")
                }
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (value.to_owned(), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err("the port is not a number from 1 to 65535"),
            },
        };
        // Anything a URL parser would read as the end of the authority or as user info.
        if host.contains(['/', '?', '#', '@', '\\']) || host.contains(char::is_whitespace) {
            return Err("not a valid host name or address");
        }
        let host =
            domain_of(&format!("http://{host}/")).ok_or("not a valid host name or address")?;
        Ok(OwnDomain {
            host: Arc::from(host),
            port,
        })
    }

    /// Whether a URL of `domain` (canonical) whose connections go to `port` is ours.
    pub(crate) fn covers(&self, domain: &str, port: u16) -> bool {
        *self.host == *domain && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for OwnDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.port, self.host.contains(':')) {
            (None, _) => f.write_str(&self.host),
            (Some(p), true) => write!(f, "[{}]:{p}", self.host),
            (Some(p), false) => write!(f, "{}:{p}", self.host),
        }
    }
}

/// Which clone URLs may be fetched.
///
/// The engine builds its policy from [`EngineBuilder`](crate::EngineBuilder)'s
/// `allowed_schemes`, `allow_private_addresses` and `our_domain`; [`UrlPolicy::new`] is the
/// strict default, which a [`FetchControl`](crate::FetchControl) carries unless told
/// otherwise. A URL is refused ([`UrlRefusal`]) when:
///
/// - it cannot be parsed, is a local path (`/srv/x.git`, `./x`, `C:\x`), uses the scp-like
///   `host:path` form, or has no host (`Invalid`);
/// - its scheme is not allowed (default `https`, `http`, `git`), or it uses git's
///   `<transport>::<address>` form such as `ext::` (`Scheme`);
/// - it embeds user info (`user@`, `user:password@`) (`Credentials`);
/// - its host is the relay's own domain, compared on the whole host after lower-casing and
///   removing a trailing dot, and, when the own domain names a port, its port (the URL's, or
///   its scheme's default) is that port (`OwnDomain`);
/// - unless private addresses are allowed, its host is a literal loopback, private (10/8,
///   172.16/12, 192.168/16, 100.64/10, fc00::/7), link-local, multicast, unspecified,
///   broadcast or reserved address, also inside an IPv4-mapped IPv6 address, an address of
///   the local-use translation prefix `64:ff9b:1::/48` (RFC 8215, never globally routed), or
///   the name `localhost` or `*.localhost` (`PrivateAddress`).
///
/// Names are not resolved here; the fetcher checks every resolved address at connect time.
///
/// ```
/// use purgatory_sync::{UrlPolicy, UrlRefusal};
///
/// let policy = UrlPolicy::new().our_domain("relay.example.com");
/// assert!(policy.permits("https://git.example.com/alice/project.git").is_ok());
/// assert_eq!(policy.permits("https://Relay.Example.COM./x.git"), Err(UrlRefusal::OwnDomain));
/// assert!(policy.permits("https://notrelay.example.com.evil/x.git").is_ok());
/// // With a port, only that authority is ours: a sibling git service on the host is not.
/// let policy = UrlPolicy::new().our_domain("relay.example.com:443");
/// assert_eq!(policy.permits("https://relay.example.com/x.git"), Err(UrlRefusal::OwnDomain));
/// assert!(policy.permits("https://relay.example.com:8443/x.git").is_ok());
/// assert!(matches!(policy.permits("file:///srv/x.git"), Err(UrlRefusal::Scheme(_))));
/// assert!(matches!(policy.permits("git://10.0.0.7/x.git"), Err(UrlRefusal::PrivateAddress(_))));
/// assert!(UrlPolicy::new().allow_private_addresses(true).permits("git://10.0.0.7/x.git").is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Lower case.
    schemes: Arc<[String]>,
    allow_private: bool,
    our_domain: Option<OwnDomain>,
}

impl Default for UrlPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl UrlPolicy {
    /// The strict policy: schemes `https`, `http` and `git`, no private addresses, no own
    /// domain.
    pub fn new() -> Self {
        UrlPolicy {
            schemes: Arc::from(["https".to_owned(), "http".to_owned(), "git".to_owned()]),
            allow_private: false,
            our_domain: None,
        }
    }

    /// Sets or clears the own domain, already parsed (the builder refuses one that is not a
    /// host).
    pub(crate) fn own_domain(mut self, own: Option<OwnDomain>) -> Self {
        self.our_domain = own;
        self
    }

    /// The own domain, if any.
    pub(crate) fn own(&self) -> Option<&OwnDomain> {
        self.our_domain.as_ref()
    }

    /// The allowed schemes, lower case.
    pub(crate) fn schemes(&self) -> &[String] {
        &self.schemes
    }

    /// Whether hosts may be loopback, private, link-local, multicast or unspecified addresses
    /// (default `false`).
    pub fn allow_private_addresses(mut self, allow: bool) -> Self {
        self.allow_private = allow;
        self
    }

    /// The schemes that may be fetched, compared without case (default `https`, `http`,
    /// `git`).
    pub fn allowed_schemes<I, S>(mut self, schemes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.schemes = schemes
            .into_iter()
            .map(|s| s.as_ref().to_ascii_lowercase())
            .collect();
        self
    }

    /// The relay's own domain, never fetched from: `host` (every port of it), `host:port` or
    /// `[v6-address]:port` (only URLs whose port, given or the scheme's default, is `port`).
    /// The host is matched on the whole host, without case and trailing dot; an IP address is
    /// compared as an address. A value that is no host (with a port) matches no URL;
    /// [`EngineBuilder::our_domain`](crate::EngineBuilder::our_domain) refuses it at build.
    pub fn our_domain(mut self, domain: &str) -> Self {
        let own = OwnDomain::parse(domain).unwrap_or_else(|_| OwnDomain {
            host: Arc::from(domain.trim_end_matches('.').to_ascii_lowercase()),
            port: None,
        });
        self.our_domain = Some(own);
        self
    }

    /// Whether private addresses are allowed.
    pub fn private_addresses_allowed(&self) -> bool {
        self.allow_private
    }

    /// Checks `url`; `Err` says why it may not be fetched.
    ///
    /// # Errors
    /// The reason the URL is refused.
    pub fn permits(&self, url: &str) -> Result<(), UrlRefusal> {
        self.check(url).map(drop)
    }

    /// Checks `url` and returns it with its domain.
    pub(crate) fn check(&self, url: &str) -> Result<CloneUrl, UrlRefusal> {
        let invalid = |why: &str| Err(UrlRefusal::Invalid(why.to_owned()));
        if let Some(transport) = remote_helper(url) {
            // git's `<transport>::<address>`: runs `git-remote-<transport>` (`ext::` runs any
            // command).
            return Err(UrlRefusal::Scheme(format!("{transport}::")));
        }
        if is_local_path(url) {
            return invalid("a local path");
        }
        let Some(sep) = url.find("://") else {
            let before = url.split('/').next().unwrap_or_default();
            return match before.split_once(':') {
                Some((s, _)) if s.eq_ignore_ascii_case("file") => {
                    Err(UrlRefusal::Scheme("file".to_owned()))
                }
                Some(_) => invalid("scp-like host:path (an ssh address)"),
                None => invalid("a relative local path"),
            };
        };
        let scheme = &url[..sep];
        if !is_scheme(scheme) {
            return invalid("not a URL: malformed scheme");
        }
        let scheme = scheme.to_ascii_lowercase();
        if !self.schemes.contains(&scheme) {
            return Err(UrlRefusal::Scheme(scheme));
        }
        // The authority as written, before any normalisation: any `@` is user info to some
        // parser, whatever the `url` crate makes of it.
        let rest = &url[sep + 3..];
        let authority = &rest[..rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len())];
        if authority.contains('@') {
            return Err(UrlRefusal::Credentials);
        }
        let parsed = match url::Url::parse(url) {
            Ok(p) => p,
            Err(e) => return Err(UrlRefusal::Invalid(e.to_string())),
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlRefusal::Credentials);
        }
        let host = match parsed.host_str() {
            None | Some("") => return invalid("no host"),
            Some(h) => canonical_host(h).ok_or_else(|| {
                UrlRefusal::Invalid(format!("host {h:?} is not a valid host name"))
            })?,
        };
        let domain = host.to_string();
        // 0 for a scheme allowed by configuration whose default port nobody knows.
        let port = parsed
            .port()
            .or_else(|| default_port(&scheme))
            .or_else(|| parsed.port_or_known_default())
            .unwrap_or(0);
        if self
            .our_domain
            .as_ref()
            .is_some_and(|d| d.covers(&domain, port))
        {
            return Err(UrlRefusal::OwnDomain);
        }
        if !self.allow_private {
            let private = match &host {
                Host::Ip(ip) => !ip_allowed(*ip, false),
                Host::Name(name) => name == "localhost" || name.ends_with(".localhost"),
            };
            if private {
                return Err(UrlRefusal::PrivateAddress(domain));
            }
        }
        let host_in_url = match host {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => domain.clone(),
        };
        let port_in_url = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        let fetch_url = format!(
            "{scheme}://{host_in_url}{port_in_url}{}",
            &rest[authority.len()..]
        );
        Ok(CloneUrl {
            url: Arc::from(url),
            fetch_url: Arc::from(fetch_url),
            domain: Arc::from(domain),
            scheme: Arc::from(scheme),
            port,
        })
    }
}

/// The `<transport>` of git's `<transport>::<address>` syntax, if `url` uses it.
fn remote_helper(url: &str) -> Option<&str> {
    let end = url
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.')))
        .unwrap_or(url.len());
    (end > 0 && url[end..].starts_with("::")).then(|| &url[..end])
}

/// Whether `url` is a local path as git sees it: absolute, relative, home-relative, or a
/// Windows drive or UNC path.
fn is_local_path(url: &str) -> bool {
    let b = url.as_bytes();
    matches!(b.first(), Some(b'/' | b'.' | b'~' | b'\\'))
        || (b.len() >= 2
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && matches!(b.get(2), None | Some(b'/' | b'\\')))
}

/// A URL scheme: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A host in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    /// ASCII (punycode), lower case, without trailing dot.
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// The canonical form of a host as it appears in a URL or as libgit2 hands it to a socket:
/// IPv6 literals with or without brackets, IPv4 in any form the WHATWG URL standard reads
/// (`127.1`, `0x7f.0.0.1`, `2130706433`), names lower-cased and in ASCII, without trailing
/// dot. `None` for something that is no valid host, including a name with an empty label
/// (`.a`, `a..b`, `a..`) and one written with percent-escapes (`a%2Eb`): the URL parser keeps
/// those as they are for `git://`, libgit2 would resolve them as written, and no DNS name
/// has them.
pub(crate) fn canonical_host(raw: &str) -> Option<Host> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(Host::Ip(ip));
    }
    if raw.contains('%') {
        return None;
    }
    let name = without_root_dot(raw)?;
    match url::Host::parse(name).ok()? {
        url::Host::Ipv4(ip) => Some(Host::Ip(IpAddr::V4(ip))),
        url::Host::Ipv6(ip) => Some(Host::Ip(IpAddr::V6(ip))),
        // IDNA mapping can make dots of other characters (`a。。b`), so check the result too.
        url::Host::Domain(d) => without_root_dot(&d).map(|d| Host::Name(d.to_ascii_lowercase())),
    }
}

/// `name` without the one trailing dot of a fully qualified name; `None` when a label is
/// empty.
fn without_root_dot(name: &str) -> Option<&str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.split('.').any(str::is_empty)).then_some(name)
}

/// The domain of `url`: its host, lower-cased, without user info, port or trailing dot;
/// IPv6 literals without brackets, IPv4 addresses in dotted form. `None` when the URL has no
/// (valid) host.
///
/// ```
/// use purgatory_sync::domain_of;
///
/// assert_eq!(domain_of("https://User@Git.Example.COM.:8443/r.git").as_deref(), Some("git.example.com"));
/// assert_eq!(domain_of("git://[::1]:9418/r.git").as_deref(), Some("::1"));
/// assert_eq!(domain_of("/srv/git/r.git"), None);
/// ```
pub fn domain_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    canonical_host(parsed.host_str()?).map(|h| h.to_string())
}

/// Whether the engine may connect to `ip`: always when private addresses are allowed,
/// otherwise only to a public address (not loopback, private, shared (100.64/10), link-local,
/// multicast, unspecified, broadcast or reserved, nor such an IPv4 address inside an IPv6
/// one: mapped, compatible, NAT64 or 6to4; nor any address of the local-use translation
/// prefix `64:ff9b:1::/48`).
pub(crate) fn ip_allowed(ip: IpAddr, allow_private: bool) -> bool {
    allow_private
        || match ip {
            IpAddr::V4(v4) => public_v4(v4),
            IpAddr::V6(v6) => public_v6(v6),
        }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || o[0] == 0 // "this network"
        || o[0] >= 240 // reserved
        || (o[0] == 100 && (o[1] & 0xc0) == 64)) // shared address space (CGNAT)
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let ([a, b], [c, d]) = (hi.to_be_bytes(), lo.to_be_bytes());
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_loopback() || ip.is_unspecified() {
        return false;
    }
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        // IPv4-mapped (::ffff:a.b.c.d) or IPv4-compatible (::a.b.c.d).
        return public_v4(embedded(s[6], s[7]));
    }
    if s[..3] == [0x64, 0xff9b, 1] {
        // Local-use IPv4/IPv6 translation prefix (RFC 8215): never globally routed, so it
        // reaches only the operator's own translator, whatever IPv4 address it embeds (and
        // where in the /48 it embeds it is the operator's choice).
        return false;
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix.
        return public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        // 6to4.
        return public_v4(embedded(s[1], s[2]));
    }
    !(ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0) // site-local fec0::/10 (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> UrlPolicy {
        UrlPolicy::new()
    }

    fn refusal(p: &UrlPolicy, url: &str) -> UrlRefusal {
        match p.check(url) {
            Err(r) => r,
            Ok(c) => panic!("{url} accepted as {c:?}"),
        }
    }

    fn accepted(p: &UrlPolicy, url: &str) -> String {
        match p.check(url) {
            Ok(c) => {
                assert_eq!(&*c.url, url);
                c.domain.to_string()
            }
            Err(r) => panic!("{url} refused: {r}"),
        }
    }

    #[test]
    fn domains_ignore_case_user_info_port_and_trailing_dot() {
        for (url, domain) in [
            ("https://git.example.com/r.git", Some("git.example.com")),
            ("HTTPS://GIT.Example.com/r.git", Some("git.example.com")),
            (
                "https://alice:secret@git.example.com:8443/r.git",
                Some("git.example.com"),
            ),
            ("git://git.example.com./r.git", Some("git.example.com")),
            ("git://GIT.example.com./r.git", Some("git.example.com")),
            ("http://127.0.0.2:8080/r.git", Some("127.0.0.2")),
            ("git://127.0.0.2:9418/r.git", Some("127.0.0.2")),
            ("git://127.2/r.git", Some("127.0.0.2")),
            ("http://[2001:DB8::1]:80/r.git", Some("2001:db8::1")),
            ("git://[2001:DB8::1]/r.git", Some("2001:db8::1")),
            (
                "https://bücher.example/r.git",
                Some("xn--bcher-kva.example"),
            ),
            ("file:///srv/r.git", None),
            ("not a url", None),
        ] {
            assert_eq!(domain_of(url).as_deref(), domain, "{url}");
        }
    }

    /// What the engine fetches is the URL with the host the policy checked: a name that IDNA
    /// maps onto another (a soft hyphen, fullwidth letters, an ideographic full stop) is
    /// fetched as that other name, never resolved as written.
    #[test]
    fn the_fetched_url_has_the_checked_host_and_the_port_is_known() {
        let p = strict();
        for (url, fetch, port) in [
            (
                "https://git.example.com/alice/r.git",
                "https://git.example.com/alice/r.git",
                443,
            ),
            (
                "HTTPS://Git.Example.COM./r.git?x=1",
                "https://git.example.com/r.git?x=1",
                443,
            ),
            (
                "http://git.example.com:8080/r",
                "http://git.example.com:8080/r",
                8080,
            ),
            (
                "http://git.example.com:80/r",
                "http://git.example.com/r",
                80,
            ),
            (
                "git://git.example.com/r.git",
                "git://git.example.com/r.git",
                9418,
            ),
            (
                "git://git.example.com:22/r.git",
                "git://git.example.com:22/r.git",
                22,
            ),
            (
                "https://git\u{AD}hub.com/a/b.git",
                "https://github.com/a/b.git",
                443,
            ),
            (
                "https://\u{FF47}\u{FF49}\u{FF54}hub.com/a/b.git",
                "https://github.com/a/b.git",
                443,
            ),
            (
                "https://github\u{3002}com/a/b.git",
                "https://github.com/a/b.git",
                443,
            ),
            (
                "https://bücher.example/r.git",
                "https://xn--bcher-kva.example/r.git",
                443,
            ),
            (
                "https://[2606:2800:21F:CB07::1]:8443/r.git",
                "https://[2606:2800:21f:cb07::1]:8443/r.git",
                8443,
            ),
            (
                "git://93.184.215.14/r.git",
                "git://93.184.215.14/r.git",
                9418,
            ),
        ] {
            let c = p.check(url).unwrap_or_else(|r| panic!("{url}: {r}"));
            assert_eq!(&*c.fetch_url, fetch, "{url}");
            // The fetched URL is its own canonical form.
            assert_eq!(p.check(fetch).unwrap().fetch_url, c.fetch_url, "{fetch}");
            assert_eq!(c.port, port, "{url}");
            assert_eq!(&*c.url, url);
            assert_eq!(domain_of(fetch).as_deref(), Some(&*c.domain), "{url}");
        }
        // git:// hosts are not mapped by the URL standard (the scheme is not a special one):
        // written with anything but ASCII, they are refused rather than resolved as written.
        for url in [
            "git://github\u{3002}com/a/b.git",
            "git://git\u{AD}hub.com/a/b.git",
        ] {
            assert!(
                matches!(p.check(url), Err(UrlRefusal::Invalid(_))),
                "{url}: {:?}",
                p.check(url)
            );
        }
    }

    #[test]
    fn ordinary_urls_are_accepted_with_their_domain() {
        let p = strict();
        assert_eq!(
            accepted(&p, "https://git.example.com/alice/r.git"),
            "git.example.com"
        );
        assert_eq!(
            accepted(&p, "http://git.example.com:8080/r"),
            "git.example.com"
        );
        assert_eq!(
            accepted(&p, "git://git.example.com/r.git"),
            "git.example.com"
        );
        assert_eq!(
            accepted(&p, "HTTPS://Git.Example.COM./r.git"),
            "git.example.com"
        );
        assert_eq!(
            accepted(&p, "Git://git.example.com/r.git"),
            "git.example.com"
        );
        assert_eq!(accepted(&p, "https://93.184.215.14/r.git"), "93.184.215.14");
        assert_eq!(
            accepted(&p, "https://[2606:2800:21f:cb07::1]/r.git"),
            "2606:2800:21f:cb07::1"
        );
        // A path or query with `@` or `::` is no user info and no remote helper.
        accepted(&p, "https://git.example.com/r@x.git");
        accepted(&p, "https://git.example.com/r.git?a::b");
    }

    #[test]
    fn local_paths_and_scp_like_addresses_are_invalid() {
        let p = strict();
        for url in [
            "/srv/x.git",
            "./x",
            "../x.git",
            "~/x.git",
            "x.git",
            "C:\\x",
            "C:/x",
            "c:",
            "\\\\server\\share\\x.git",
            "git@github.com:alice/x.git",
            "github.com:alice/x.git",
            "host:path",
            "mailto:alice@example.com",
            "https:git.example.com/x.git",
            "1http://git.example.com/x.git",
            // git:// hosts are kept as written, escapes and empty labels included.
            "git://127.0.0.1%2E%2E/x.git",
            "git://git..example.com/x.git",
            "git://.example.com/x.git",
        ] {
            assert!(
                matches!(refusal(&p, url), UrlRefusal::Invalid(_)),
                "{url}: {:?}",
                p.check(url)
            );
        }
    }

    #[test]
    fn schemes_outside_the_allow_list_are_refused() {
        let p = strict();
        for (url, scheme) in [
            ("file:///srv/x.git", "file"),
            ("FILE:///srv/x.git", "file"),
            ("file:/srv/x.git", "file"),
            ("file://localhost/srv/x.git", "file"),
            ("ssh://git.example.com/x.git", "ssh"),
            ("ssh://git@git.example.com/x.git", "ssh"),
            ("git+ssh://git.example.com/x.git", "git+ssh"),
            ("ftp://git.example.com/x.git", "ftp"),
            ("ext::sh -c touch% /tmp/pwned", "ext::"),
            ("ext::git-remote-x", "ext::"),
            ("fd::17", "fd::"),
            ("https::https://git.example.com/x.git", "https::"),
        ] {
            assert_eq!(
                refusal(&p, url),
                UrlRefusal::Scheme(scheme.to_owned()),
                "{url}"
            );
        }
        let only_https = UrlPolicy::new().allowed_schemes(["HTTPS"]);
        accepted(&only_https, "https://git.example.com/x.git");
        assert_eq!(
            refusal(&only_https, "git://git.example.com/x.git"),
            UrlRefusal::Scheme("git".to_owned())
        );
    }

    #[test]
    fn credentials_are_refused() {
        let p = strict();
        for url in [
            "https://user:pass@git.example.com/x.git",
            "https://user@git.example.com/x.git",
            "https://:pass@git.example.com/x.git",
            "https://@git.example.com/x.git",
            "git://user@git.example.com/x.git",
            "HTTPS://User:Pass@Git.Example.com/x.git",
            "http://git.example.com@10.0.0.1/x.git",
        ] {
            assert_eq!(refusal(&p, url), UrlRefusal::Credentials, "{url}");
        }
    }

    #[test]
    fn private_and_local_hosts_are_refused_unless_allowed() {
        let p = strict();
        let open = UrlPolicy::new().allow_private_addresses(true);
        for (url, host) in [
            ("git://127.0.0.1/x.git", "127.0.0.1"),
            ("http://127.0.0.2:8080/x.git", "127.0.0.2"),
            ("git://127.255.255.254/x.git", "127.255.255.254"),
            ("git://127.1/x.git", "127.0.0.1"),
            ("http://2130706433/x.git", "127.0.0.1"),
            ("git://0x7f.0.0.1/x.git", "127.0.0.1"),
            ("https://10.1.2.3/x.git", "10.1.2.3"),
            ("https://172.16.0.1/x.git", "172.16.0.1"),
            ("https://172.31.255.255/x.git", "172.31.255.255"),
            ("https://192.168.1.1/x.git", "192.168.1.1"),
            ("https://100.64.0.1/x.git", "100.64.0.1"),
            ("https://100.127.255.255/x.git", "100.127.255.255"),
            ("https://169.254.169.254/x.git", "169.254.169.254"),
            ("https://224.0.0.1/x.git", "224.0.0.1"),
            ("https://239.255.255.250/x.git", "239.255.255.250"),
            ("https://0.0.0.0/x.git", "0.0.0.0"),
            ("https://0.1.2.3/x.git", "0.1.2.3"),
            ("https://255.255.255.255/x.git", "255.255.255.255"),
            ("https://240.0.0.1/x.git", "240.0.0.1"),
            ("https://[::1]/x.git", "::1"),
            ("git://[::1]:9418/x.git", "::1"),
            ("https://[::]/x.git", "::"),
            ("https://[fc00::1]/x.git", "fc00::1"),
            ("https://[FD12:3456::1]/x.git", "fd12:3456::1"),
            ("https://[fe80::1]/x.git", "fe80::1"),
            ("https://[febf::1]/x.git", "febf::1"),
            ("https://[ff02::1]/x.git", "ff02::1"),
            ("https://[::ffff:127.0.0.1]/x.git", "::ffff:127.0.0.1"),
            ("https://[::ffff:7f00:1]/x.git", "::ffff:127.0.0.1"),
            ("https://[::ffff:10.0.0.1]/x.git", "::ffff:10.0.0.1"),
            ("https://[::127.0.0.1]/x.git", "::7f00:1"),
            ("https://[64:ff9b::10.0.0.1]/x.git", "64:ff9b::a00:1"),
            // RFC 8215's local-use translation prefix is never globally routed, whatever
            // address it embeds.
            ("https://[64:ff9b:1::10.0.0.1]/x.git", "64:ff9b:1::a00:1"),
            ("https://[64:ff9b:1::8.8.8.8]/x.git", "64:ff9b:1::808:808"),
            ("https://[64:ff9b:1:ffff::1]/x.git", "64:ff9b:1:ffff::1"),
            ("https://[2002:7f00:1::1]/x.git", "2002:7f00:1::1"),
            ("http://localhost/x.git", "localhost"),
            ("http://LOCALHOST./x.git", "localhost"),
            ("http://localhost:8080/x.git", "localhost"),
            ("https://git.localhost/x.git", "git.localhost"),
            ("git://a.b.LocalHost/x.git", "a.b.localhost"),
        ] {
            assert_eq!(
                refusal(&p, url),
                UrlRefusal::PrivateAddress(host.to_owned()),
                "{url}"
            );
            assert_eq!(
                accepted(&open, url),
                host,
                "{url} with private addresses allowed"
            );
        }
        // Near misses are public.
        for url in [
            "https://172.32.0.1/x.git",
            "https://172.15.255.255/x.git",
            "https://100.128.0.1/x.git",
            "https://100.63.255.255/x.git",
            "https://192.169.0.1/x.git",
            "https://[::ffff:93.184.215.14]/x.git",
            "https://[2001:db8::1]/x.git",
            "https://localhost.example.com/x.git",
            "https://notlocalhost/x.git",
        ] {
            accepted(&p, url);
        }
    }

    #[test]
    fn our_domain_is_matched_on_the_whole_host() {
        let p = UrlPolicy::new().our_domain("relay.example.com");
        for url in [
            "https://relay.example.com/x.git",
            "https://RELAY.Example.com/x.git",
            "https://relay.example.com./x.git",
            "git://relay.example.com:9418/x.git",
            "http://relay.example.com:8080/x.git",
        ] {
            assert_eq!(refusal(&p, url), UrlRefusal::OwnDomain, "{url}");
        }
        for url in [
            "https://notrelay.example.com.evil/x.git",
            "https://notrelay.example.com/x.git",
            "https://relay.example.com.evil/x.git",
            "https://git.relay.example.com/x.git",
            "https://example.com/relay.example.com/x.git",
        ] {
            accepted(&p, url);
        }
        // The configured name is canonicalised too.
        let p = UrlPolicy::new().our_domain("Relay.Example.COM.");
        assert_eq!(
            refusal(&p, "https://relay.example.com/x.git"),
            UrlRefusal::OwnDomain
        );
        // Addresses are compared as addresses, before the private-address check.
        let p = UrlPolicy::new()
            .our_domain("[::1]")
            .allow_private_addresses(true);
        assert_eq!(refusal(&p, "git://[0::1]/x.git"), UrlRefusal::OwnDomain);
        let p = UrlPolicy::new().our_domain("127.0.0.3");
        assert_eq!(
            refusal(&p, "git://127.0.0.3:9/x.git"),
            UrlRefusal::OwnDomain
        );
        assert_eq!(
            refusal(&p, "git://127.0.0.2:9/x.git"),
            UrlRefusal::PrivateAddress("127.0.0.2".to_owned())
        );
    }

    #[test]
    fn our_domain_with_a_port_is_matched_on_the_host_and_the_effective_port() {
        let p = UrlPolicy::new().our_domain("Relay.Example.COM.:443");
        for url in [
            "https://relay.example.com/x.git",
            "https://relay.example.com:443/x.git",
            "https://RELAY.example.com.:443/x.git",
            "http://relay.example.com:443/x.git",
            "git://relay.example.com:443/x.git",
        ] {
            assert_eq!(refusal(&p, url), UrlRefusal::OwnDomain, "{url}");
        }
        for url in [
            "https://relay.example.com:8443/x.git",
            "http://relay.example.com/x.git",
            "git://relay.example.com/x.git",
            "https://git.relay.example.com/x.git",
        ] {
            accepted(&p, url);
        }
        // A scheme's default port counts as the URL's port.
        let p = UrlPolicy::new().our_domain("relay.example.com:9418");
        assert_eq!(
            refusal(&p, "git://relay.example.com/x.git"),
            UrlRefusal::OwnDomain
        );
        accepted(&p, "https://relay.example.com/x.git");
        // IPv6 addresses take brackets with a port, and are compared as addresses.
        let p = UrlPolicy::new()
            .our_domain("[0::1]:9418")
            .allow_private_addresses(true);
        assert_eq!(refusal(&p, "git://[::1]/x.git"), UrlRefusal::OwnDomain);
        accepted(&p, "git://[::1]:9419/x.git");
        let p = UrlPolicy::new()
            .our_domain("127.0.0.3:8080")
            .allow_private_addresses(true);
        assert_eq!(
            refusal(&p, "http://127.0.0.3:8080/x.git"),
            UrlRefusal::OwnDomain
        );
        accepted(&p, "http://127.0.0.3/x.git");
    }

    #[test]
    fn own_domains_read_host_port_and_bracketed_addresses() {
        let own = |s: &str| OwnDomain::parse(s).map(|d| (d.host.to_string(), d.port));
        let ok = |h: &str, p: Option<u16>| Ok((h.to_owned(), p));
        assert_eq!(own("relay.example.com"), ok("relay.example.com", None));
        assert_eq!(
            own("relay.example.com:8443"),
            ok("relay.example.com", Some(8443))
        );
        assert_eq!(own("::1"), ok("::1", None));
        assert_eq!(own("[::1]"), ok("::1", None));
        assert_eq!(own("[::1]:22"), ok("::1", Some(22)));
        assert_eq!(own("0x7f.0.0.1:80"), ok("127.0.0.1", Some(80)));
        for bad in [
            "", ":80", "h:", "h:0", "h:-1", "h:1:2", "[::1]x", "[::1", "h/x", "u@h",
        ] {
            assert!(OwnDomain::parse(bad).is_err(), "{bad:?}");
        }
        for s in [
            "relay.example.com",
            "relay.example.com:8443",
            "::1",
            "[::1]:22",
        ] {
            let d = OwnDomain::parse(s).unwrap();
            assert_eq!(OwnDomain::parse(&d.to_string()), Ok(d.clone()), "{s}");
        }
        assert_eq!(
            OwnDomain::parse("[::1]:22").unwrap().to_string(),
            "[::1]:22"
        );
    }

    #[test]
    fn hosts_are_canonical() {
        let name = |s: &str| Some(Host::Name(s.to_owned()));
        let ip = |s: &str| Some(Host::Ip(s.parse().unwrap()));
        assert_eq!(canonical_host("Git.Example.COM."), name("git.example.com"));
        assert_eq!(canonical_host("[::1]"), ip("::1"));
        assert_eq!(canonical_host("::1"), ip("::1"));
        assert_eq!(canonical_host("127.1"), ip("127.0.0.1"));
        assert_eq!(canonical_host("0x7f.0.0.1"), ip("127.0.0.1"));
        assert_eq!(
            canonical_host("bücher.example"),
            name("xn--bcher-kva.example")
        );
        assert_eq!(canonical_host(""), None);
        assert_eq!(canonical_host("."), None);
        assert_eq!(canonical_host("a b"), None);
        assert_eq!(canonical_host("[::1"), None);
        // Empty labels and percent-escapes (found by the url_policy fuzz target: the host
        // `.a..0.2%2E%2E` became `.a..0.2`, which was then no valid host at all).
        for bad in [
            ".a",
            "a..b",
            "a..",
            "..",
            ".a..0.2%2E%2E",
            "a%2Eb",
            "127.0.0.1%2E%2E",
        ] {
            assert_eq!(canonical_host(bad), None, "{bad}");
        }
        assert_eq!(canonical_host("a\u{3002}\u{3002}b"), None);
        assert_eq!(canonical_host("a\u{3002}b"), name("a.b"));
    }

    #[test]
    fn addresses_at_connect_time() {
        let public = [
            "93.184.215.14",
            "8.8.8.8",
            "2606:2800:21f:cb07::1",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "64:ff9b::808:808",
        ];
        let private = [
            "127.0.0.1",
            "127.0.0.2",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.0.1",
            "100.64.0.1",
            "169.254.1.1",
            "224.0.0.251",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "64:ff9b:1::808:808",
            "64:ff9b:1:abcd::1",
            "2002:a00:1::1",
        ];
        for a in public {
            let ip: IpAddr = a.parse().unwrap();
            assert!(ip_allowed(ip, false), "{a}");
            assert!(ip_allowed(ip, true), "{a}");
        }
        for a in private {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!ip_allowed(ip, false), "{a}");
            assert!(ip_allowed(ip, true), "{a}");
        }
    }

    #[test]
    fn the_policy_follows_the_configuration() {
        assert_eq!(
            crate::config::Config::default().url_policy,
            UrlPolicy::new()
        );
        let p = crate::EngineBuilder::new()
            .allow_private_addresses(true)
            .allowed_schemes(["HTTPS"])
            .our_domain("relay.example.com:443")
            .config()
            .url_policy
            .clone();
        assert!(p.private_addresses_allowed());
        accepted(&p, "https://127.0.0.1/x.git");
        assert_eq!(
            refusal(&p, "http://git.example.com/x.git"),
            UrlRefusal::Scheme("http".to_owned())
        );
        assert_eq!(
            refusal(&p, "https://relay.example.com/x.git"),
            UrlRefusal::OwnDomain
        );
        accepted(&p, "https://relay.example.com:8443/x.git");
    }
}

#[cfg(test)]
mod props;
