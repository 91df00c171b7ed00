//! Property tests of the URL policy and of domain extraction, on generated URLs: schemes in
//! any case, hosts as names, IPv4 in every form the URL standard reads, IPv6, international
//! names, with ports, user info and paths; and on arbitrary strings.

use super::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const ALLOWED: [&str; 3] = ["https", "http", "git"];

/// `s` with the case of its ASCII letters flipped where `mask` says (bit `i % 64`).
fn flip_case(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| match mask >> (i % 64) & 1 {
            1 if c.is_ascii_lowercase() => c.to_ascii_uppercase(),
            1 if c.is_ascii_uppercase() => c.to_ascii_lowercase(),
            _ => c,
        })
        .collect()
}

/// A host as written in a URL, and the domain it must give when that is known (`None` for
/// international names, whose punycode is the `idna` crate's business).
#[derive(Debug, Clone)]
struct HostCase {
    written: String,
    domain: Option<String>,
}

fn name_host() -> impl Strategy<Value = HostCase> {
    let label = "[a-z][a-z0-9]{0,8}(-[a-z0-9]{1,4})?";
    // A name whose last label is a number is read as an IPv4 address (or refused).
    let inner = prop::collection::vec(prop_oneof![label, "[0-9]{1,3}"], 0..=3);
    (inner, label, any::<bool>(), any::<u64>()).prop_map(|(mut labels, last, dot, mask)| {
        labels.push(last);
        let name = labels.join(".");
        HostCase {
            written: flip_case(&name, mask) + if dot { "." } else { "" },
            domain: Some(name),
        }
    })
}

/// IPv4 written dotted, as one decimal number, or as dotted hex.
fn written_v4(ip: Ipv4Addr, form: u8, mask: u64) -> String {
    match form % 3 {
        0 => ip.to_string(),
        1 => u32::from(ip).to_string(),
        _ => {
            let hex: Vec<String> = ip.octets().iter().map(|o| format!("0x{o:x}")).collect();
            flip_case(&hex.join("."), mask)
        }
    }
}

/// IPv6 in brackets, compressed or in full, in any case.
fn written_v6(ip: Ipv6Addr, full: bool, mask: u64) -> String {
    let text = if full {
        let s: Vec<String> = ip.segments().iter().map(|s| format!("{s:x}")).collect();
        s.join(":")
    } else {
        ip.to_string()
    };
    format!("[{}]", flip_case(&text, mask))
}

fn v4_host(ip: impl Strategy<Value = Ipv4Addr>) -> impl Strategy<Value = HostCase> {
    (ip, any::<u8>(), any::<u64>()).prop_map(|(ip, form, mask)| HostCase {
        written: written_v4(ip, form, mask),
        domain: Some(ip.to_string()),
    })
}

fn v6_host(ip: impl Strategy<Value = Ipv6Addr>) -> impl Strategy<Value = HostCase> {
    (ip, any::<bool>(), any::<u64>()).prop_map(|(ip, full, mask)| HostCase {
        written: written_v6(ip, full, mask),
        domain: Some(ip.to_string()),
    })
}

fn idn_host() -> impl Strategy<Value = HostCase> {
    let label = prop::sample::select(vec![
        "bücher",
        "пример",
        "例え",
        "ñandú",
        "straße",
        "ελληνικά",
        "日本",
        "café",
        "git",
    ]);
    (
        prop::collection::vec(label, 1..=3),
        "[a-z]{2,6}",
        any::<u64>(),
    )
        .prop_map(|(labels, tld, mask)| HostCase {
            written: flip_case(&format!("{}.{tld}", labels.join(".")), mask),
            domain: None,
        })
}

fn any_host() -> impl Strategy<Value = HostCase> {
    prop_oneof![
        3 => name_host(),
        2 => v4_host(any::<u32>().prop_map(Ipv4Addr::from)),
        2 => v6_host(any::<u128>().prop_map(Ipv6Addr::from)),
        1 => idn_host(),
    ]
}

fn path() -> impl Strategy<Value = String> {
    "(/[A-Za-z0-9._~-]{0,10}){0,4}(\\?[a-z=&]{0,8})?(#[a-z]{0,6})?"
}

/// A URL in parts, so that one part can be changed.
#[derive(Debug, Clone)]
struct UrlCase {
    scheme: String,
    user_info: Option<String>,
    host: HostCase,
    port: Option<u16>,
    path: String,
}

impl UrlCase {
    fn url(&self) -> String {
        let mut url = format!("{}://", self.scheme);
        if let Some(u) = &self.user_info {
            url.push_str(u);
            url.push('@');
        }
        url.push_str(&self.host.written);
        if let Some(p) = self.port {
            url.push_str(&format!(":{p}"));
        }
        url + &self.path
    }
}

fn url_case(scheme: impl Strategy<Value = String>) -> impl Strategy<Value = UrlCase> {
    (
        scheme,
        prop::option::of("[a-z]{1,6}(:[a-zA-Z0-9]{0,6})?"),
        any_host(),
        prop::option::of(any::<u16>()),
        path(),
    )
        .prop_map(|(scheme, user_info, host, port, path)| UrlCase {
            scheme,
            user_info,
            host,
            port,
            path,
        })
}

fn some_scheme() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "http", "https", "git", "HTTP", "Https", "GIT", "gIt", "ssh", "ftp", "file", "git+ssh",
        "svn",
    ])
    .prop_map(str::to_owned)
}

fn allowed_scheme() -> impl Strategy<Value = String> {
    (prop::sample::select(ALLOWED.to_vec()), any::<u64>()).prop_map(|(s, m)| flip_case(s, m))
}

/// A URL on an allowed scheme, without user info, on the host `host`.
fn plain_url(host: impl Strategy<Value = HostCase>) -> impl Strategy<Value = (String, String)> {
    (allowed_scheme(), host, prop::option::of(1u16..), path()).prop_map(
        |(scheme, host, port, path)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let domain = host.domain.expect("address hosts have known domains");
            (format!("{scheme}://{}{port}{path}", host.written), domain)
        },
    )
}

/// An IPv4 address in `prefix/len`.
fn v4_in(prefix: [u8; 4], len: u32) -> impl Strategy<Value = Ipv4Addr> {
    let net = u32::from(Ipv4Addr::from(prefix));
    let host_bits = u32::MAX.checked_shr(len).unwrap_or(0);
    any::<u32>().prop_map(move |x| Ipv4Addr::from(net & !host_bits | x & host_bits))
}

/// An IPv6 address in `prefix/len`.
fn v6_in(prefix: u128, len: u32) -> impl Strategy<Value = Ipv6Addr> {
    let host_bits = u128::MAX.checked_shr(len).unwrap_or(0);
    any::<u128>().prop_map(move |x| Ipv6Addr::from(prefix & !host_bits | x & host_bits))
}

/// The IPv4 ranges the policy refuses, as the documentation lists them.
const PRIVATE_V4: [([u8; 4], u32); 9] = [
    ([0, 0, 0, 0], 8),      // this network, 0.0.0.0 unspecified
    ([10, 0, 0, 0], 8),     // private
    ([100, 64, 0, 0], 10),  // shared (CGNAT)
    ([127, 0, 0, 0], 8),    // loopback
    ([169, 254, 0, 0], 16), // link-local
    ([172, 16, 0, 0], 12),  // private
    ([192, 168, 0, 0], 16), // private
    ([224, 0, 0, 0], 4),    // multicast
    ([240, 0, 0, 0], 4),    // reserved, 255.255.255.255 broadcast
];

fn in_v4_range(ip: Ipv4Addr, (prefix, len): ([u8; 4], u32)) -> bool {
    let mask = !u32::MAX.checked_shr(len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(prefix)) & mask
}

fn private_v4() -> impl Strategy<Value = Ipv4Addr> {
    prop::sample::select(PRIVATE_V4.to_vec()).prop_flat_map(|(prefix, len)| v4_in(prefix, len))
}

fn private_v6() -> impl Strategy<Value = Ipv6Addr> {
    let embedding = |prefix: u128, shift: u32| {
        private_v4().prop_map(move |v4| Ipv6Addr::from(prefix | u128::from(u32::from(v4)) << shift))
    };
    prop_oneof![
        Just(Ipv6Addr::LOCALHOST),
        Just(Ipv6Addr::UNSPECIFIED),
        v6_in(0xfc00 << 112, 7),         // unique local
        v6_in(0xfe80 << 112, 10),        // link-local
        v6_in(0xfec0 << 112, 10),        // site-local
        v6_in(0xff00 << 112, 8),         // multicast
        embedding(0xffff << 32, 0),      // IPv4-mapped
        embedding(0, 0),                 // IPv4-compatible
        embedding(0x64_ff9b << 96, 0),   // NAT64
        v6_in(0x64_ff9b_0001 << 80, 48), // local-use translation (RFC 8215)
        embedding(0x2002 << 112, 80),    // 6to4
    ]
}

/// What every domain looks like: ASCII, lower case, no port, user info, brackets or
/// trailing dot, and its own canonical form.
fn check_domain(d: &str) -> Result<(), TestCaseError> {
    prop_assert!(!d.is_empty());
    prop_assert!(d.is_ascii(), "{:?}", d);
    prop_assert_eq!(d, d.to_ascii_lowercase());
    prop_assert!(!d.contains(['@', '/', '[', ']', ' ']), "{:?}", d);
    prop_assert!(!d.ends_with('.'), "{:?}", d);
    if d.contains(':') {
        prop_assert!(d.parse::<Ipv6Addr>().is_ok(), "a port in {:?}", d);
    }
    let again = canonical_host(d).map(|h| h.to_string());
    prop_assert_eq!(again.as_deref(), Some(d), "not canonical");
    Ok(())
}

/// Everything the policy and domain extraction say about `s`, checked for consistency; none
/// of it may panic.
fn check_any(s: &str) -> Result<(), TestCaseError> {
    let domain = domain_of(s);
    if let Some(d) = &domain {
        check_domain(d)?;
    }
    if let Some(h) = canonical_host(s) {
        prop_assert_eq!(canonical_host(&h.to_string()), Some(h), "not idempotent");
    }
    for p in [
        UrlPolicy::new(),
        UrlPolicy::new().allow_private_addresses(true),
    ] {
        let verdict = p.check(s);
        prop_assert_eq!(&verdict, &p.clone().check(s), "not stable");
        if let Ok(c) = verdict {
            prop_assert_eq!(Some(&*c.domain), domain.as_deref());
            let scheme = s[..s.find("://").expect("a URL")].to_ascii_lowercase();
            prop_assert!(ALLOWED.contains(&scheme.as_str()), "{}", scheme);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `domain_of` gives the host in canonical form: lower case, without user info, port or
    /// trailing dot, the same whatever the case of scheme and host and whatever the path.
    #[test]
    fn domains_are_canonical_and_ignore_case_and_path(
        case in url_case(some_scheme()),
        scheme_mask in any::<u64>(),
        host_mask in any::<u64>(),
        other_path in path(),
    ) {
        let url = case.url();
        let domain = domain_of(&url);
        if let Some(d) = &domain {
            check_domain(d)?;
        }
        if let (Some(expected), false) = (&case.host.domain, case.scheme.eq_ignore_ascii_case("file")) {
            prop_assert_eq!(domain.as_ref(), Some(expected), "{}", url);
        }
        let mut changed = case.clone();
        changed.scheme = flip_case(&case.scheme, scheme_mask);
        changed.host.written = flip_case(&case.host.written, host_mask);
        prop_assert_eq!(&domain_of(&changed.url()), &domain, "{} vs {}", url, changed.url());
        changed.path = other_path;
        prop_assert_eq!(&domain_of(&changed.url()), &domain, "{} vs {}", url, changed.url());
        check_any(&url)?;
    }

    /// `canonical_host` is idempotent: the text of a canonical host is that host again; for
    /// hosts as URLs write them (any case, trailing dot, IPv4 in any form, IPv6 with brackets
    /// or in full) and for any text.
    #[test]
    fn canonical_host_is_idempotent(host in any_host(), text in ".{0,40}") {
        let h = canonical_host(&host.written);
        if let Some(expected) = &host.domain {
            prop_assert_eq!(h.as_ref().map(Host::to_string), Some(expected.clone()));
        }
        for h in [h, canonical_host(&text)].into_iter().flatten() {
            prop_assert_eq!(canonical_host(&h.to_string()), Some(h.clone()), "{}", h);
        }
    }

    /// Loopback, private, shared, link-local, unspecified, multicast, broadcast and reserved
    /// IPv4 literals in any form, and IPv6 ones (loopback, unspecified, unique and site
    /// local, link-local, multicast, private IPv4 inside mapped, compatible, NAT64 and 6to4
    /// addresses, anything in the local-use translation prefix 64:ff9b:1::/48), are refused naming the address, unless private addresses are allowed.
    #[test]
    fn private_ip_literals_are_refused(
        (url, domain) in prop_oneof![
            plain_url(v4_host(private_v4())),
            plain_url(v6_host(private_v6())),
        ],
    ) {
        prop_assert_eq!(
            UrlPolicy::new().check(&url),
            Err(UrlRefusal::PrivateAddress(domain.clone())),
            "{}", url
        );
        let open = UrlPolicy::new().allow_private_addresses(true).check(&url);
        prop_assert_eq!(open.map(|c| c.domain.to_string()), Ok(domain));
    }

    /// Public IPv4 literals (and global IPv6 ones) on allowed schemes are accepted, with the
    /// address as their domain.
    #[test]
    fn public_ip_literals_are_accepted(
        (url4, domain4) in plain_url(v4_host(
            any::<u32>()
                .prop_map(Ipv4Addr::from)
                .prop_filter("public", |ip| !PRIVATE_V4.iter().any(|r| in_v4_range(*ip, *r))),
        )),
        (url6, domain6) in plain_url(v6_host(
            v6_in(0x2000 << 112, 3).prop_filter("not 6to4", |ip| ip.segments()[0] != 0x2002),
        )),
    ) {
        for (url, domain) in [(url4, domain4), (url6, domain6)] {
            let verdict = UrlPolicy::new().check(&url);
            prop_assert_eq!(verdict.map(|c| c.domain.to_string()), Ok(domain), "{}", url);
        }
    }

    /// A scheme outside the allowed list is refused, by name in lower case, whatever the rest
    /// of the URL; so is git's `<transport>::<address>` form, whatever the transport.
    #[test]
    fn schemes_outside_the_allow_list_are_refused(
        allowed in prop::sample::subsequence(ALLOWED.to_vec(), 1..=3),
        scheme in prop_oneof![
            "[a-zA-Z][a-zA-Z0-9+.-]{1,10}",
            // Near misses of the allowed ones.
            (allowed_scheme(), "[a-zA-Z0-9+.-]{1,4}").prop_map(|(s, tail)| s + &tail),
            ("[a-zA-Z][a-zA-Z0-9+.-]{0,3}", allowed_scheme()).prop_map(|(head, s)| head + &s),
            prop::sample::select(vec!["ssh", "git+ssh", "ssh+git", "file", "ftp", "ext", "fd"])
                .prop_map(str::to_owned),
        ],
        case in url_case(Just(String::new())),
        transport in "[a-zA-Z0-9+.-]{1,10}",
        address in ".{0,30}",
    ) {
        let policy = UrlPolicy::new().allowed_schemes(allowed.iter().copied());
        let lower = scheme.to_ascii_lowercase();
        let url = UrlCase { scheme, ..case }.url();
        if allowed.contains(&lower.as_str()) {
            prop_assert!(!matches!(policy.check(&url), Err(UrlRefusal::Scheme(_))), "{}", url);
        } else {
            prop_assert_eq!(policy.check(&url), Err(UrlRefusal::Scheme(lower)), "{}", url);
        }
        let helper = format!("{transport}::{address}");
        prop_assert_eq!(
            policy.check(&helper),
            Err(UrlRefusal::Scheme(format!("{transport}::"))),
            "{}", helper
        );
    }

    /// Arbitrary text panics nothing, gets the same verdict every time, and what is accepted
    /// has the domain `domain_of` gives and an allowed scheme.
    #[test]
    fn arbitrary_strings_never_panic(
        any_text in ".*",
        url_ish in "(?i)(https?|git|file|ssh)://.{0,40}",
        host_ish in "[\\[\\]0-9a-fA-FxX:.%@]{0,30}",
    ) {
        for s in [&any_text, &url_ish, &host_ish] {
            check_any(s)?;
        }
        check_any(&format!("http://{host_ish}/r.git"))?;
    }
}
