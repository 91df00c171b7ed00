//! Which clone URLs the engine may fetch from, and which domain each belongs to.
//!
//! Clone URLs come from other people's events. A domain is the URL's host, lower-cased,
//! without user info, port or trailing dot; it is the unit of politeness (rate limits,
//! concurrency caps, the naughty list).

use std::sync::Arc;

/// A clone URL accepted at submit, with its domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CloneUrl {
    pub url: Arc<str>,
    pub domain: Arc<str>,
}

/// The domain of `url`: its host, lower-cased, without user info, port or trailing dot;
/// IPv6 literals without brackets. `None` when the URL has no host.
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
    let host = match parsed.host()? {
        url::Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("http://127.0.0.2:8080/r.git", Some("127.0.0.2")),
            ("http://[2001:DB8::1]:80/r.git", Some("2001:db8::1")),
            ("file:///srv/r.git", None),
            ("not a url", None),
        ] {
            assert_eq!(domain_of(url).as_deref(), domain, "{url}");
        }
    }
}
