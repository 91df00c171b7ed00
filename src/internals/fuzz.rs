//! Fuzz entry points, for the cargo-fuzz project in `fuzz/` and for `tests/fuzz_corpus.rs`,
//! which replays the committed corpus on every `cargo test`. Not part of the API: may change
//! at any time.
//!
//! Each function takes arbitrary bytes (`submit_validation`: an event the C ABI's parser made
//! of them), runs one parser or checker of untrusted input the way the engine runs it, and asserts more than "no panic": the invariants are listed on each
//! function. None touches a repository, the network or a thread.

use std::net::IpAddr;

use serde_json::Value;

use crate::config::Config;
use crate::error::SubmitError;
use crate::event::{RefTarget, UrlRefusal};
use crate::nip34::{self, Announcement, Nip34Error, NostrEvent, RepoRef};
use crate::policy::{self, OwnDomain, UrlPolicy};
use crate::state_file::{self, StateFileError, STATE_VERSION};
use crate::{validate, ObjectId, Origin, PendingEvent};

/// The repository path given to [`nip34::pending_event`]: never opened.
const NO_REPOSITORY: &str = "/nonexistent/purgatory-sync-fuzz.git";

fn is_lower_hex(value: &str, len: usize) -> bool {
    value.len() == len
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The scheme of a URL the policy accepted, lower-cased.
fn scheme_of(url: &str) -> String {
    let end = url.find("://").expect("an accepted URL has `://`");
    url[..end].to_ascii_lowercase()
}

/// Submit validation without a repository: `event` (parsed from the fuzzer's bytes by the C
/// ABI's event JSON parser, `purgatory_sync_capi::fuzz::submit_validation`) checked by the
/// validation `Engine::submit` runs before it opens the repository, with the default settings
/// and with small limits.
///
/// Invariants: on `Ok` the object ids are 40 lower-case hex digits, sorted, distinct, between 1
/// and the limit, and exactly the event's ids; accepted and refused URLs are the event's own,
/// accepted ones with an allowed scheme and a non-empty domain; the ref updates are the
/// event's, oid targets among the checked ids, deletions never of `HEAD`, and a complete ref
/// set (`replace_refs`) is not empty; an error displays a non-empty message and its index
/// points at the value it names.
pub fn submit_validation(event: &PendingEvent) {
    check_submit(event, &Config::default());
    let small = Config {
        max_oids_per_event: 2,
        max_urls_per_event: 2,
        max_ref_updates_per_event: 2,
        url_policy: UrlPolicy::new()
            .allow_private_addresses(true)
            .allowed_schemes(["https"])
            .own_domain(Some(OwnDomain::parse("relay.example.com").expect("a host"))),
        ..Config::default()
    };
    check_submit(event, &small);
}

/// Runs `validate::event` and checks its result against `ev`; returns the error, if any.
fn check_submit(ev: &PendingEvent, cfg: &Config) -> Option<SubmitError> {
    let checked = match validate::event(ev, cfg) {
        Ok(checked) => checked,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "{e:?}");
            match &e {
                SubmitError::InvalidObjectId { index, value } => {
                    assert_eq!(ev.oids.get(*index), Some(value));
                    assert!(value.parse::<ObjectId>().is_err(), "{value}");
                }
                SubmitError::InvalidCloneUrl { index, value, .. } => {
                    assert_eq!(ev.clone_urls.get(*index), Some(value));
                }
                SubmitError::InvalidRefUpdate { index, name, .. } => {
                    assert_eq!(ev.ref_updates.get(*index).map(|u| &u.name), Some(name));
                }
                SubmitError::TooManyObjectIds { count, max }
                | SubmitError::TooManyCloneUrls { count, max }
                | SubmitError::TooManyRefUpdates { count, max } => assert!(count > max),
                SubmitError::InvalidEventId { value, .. } => assert_eq!(value, &ev.id),
                SubmitError::InvalidIdentifier { value, .. } => assert_eq!(value, &ev.identifier),
                SubmitError::NoObjectIds => assert!(ev.oids.is_empty()),
                SubmitError::ReplaceRefsWithoutRefUpdates => {
                    assert!(ev.replace_refs && ev.ref_updates.is_empty())
                }
                other => panic!("validate::event does no I/O and holds no queue: {other:?}"),
            }
            return Some(e);
        }
    };
    let oids = &checked.oids;
    assert!(!oids.is_empty() && oids.len() <= cfg.max_oids_per_event);
    assert!(oids.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
    for oid in oids {
        let hex = oid.to_string();
        assert!(is_lower_hex(&hex, 40), "{hex}");
        assert!(
            ev.oids.iter().any(|o| o.eq_ignore_ascii_case(&hex)),
            "{hex}"
        );
    }
    for given in &ev.oids {
        let oid: ObjectId = given.parse().expect("every given oid parsed");
        assert!(oids.binary_search(&oid).is_ok(), "{given}");
    }
    assert!(checked.urls.len() + checked.refused.len() <= ev.clone_urls.len());
    for url in &checked.urls {
        assert!(ev.clone_urls.iter().any(|u| *u == *url.url), "{}", url.url);
        assert!(
            cfg.url_policy.schemes().contains(&scheme_of(&url.url)),
            "{}",
            url.url
        );
        assert!(!url.domain.is_empty(), "{}", url.url);
        assert!(
            !cfg.url_policy
                .own()
                .is_some_and(|d| d.covers(&url.domain, url.port)),
            "{}",
            url.url
        );
    }
    for refused in &checked.refused {
        assert_eq!(ev.clone_urls.get(refused.index), Some(&refused.url));
        assert!(!refused.reason.to_string().is_empty());
    }
    assert_eq!(checked.refs.len(), ev.ref_updates.len());
    for (out, given) in checked.refs.iter().zip(&ev.ref_updates) {
        assert_eq!(out.name, given.name);
        match &out.target {
            RefTarget::Oid(hex) => {
                assert!(is_lower_hex(hex, 40), "{hex}");
                let oid: ObjectId = hex.parse().expect("40 hex digits");
                assert!(oids.binary_search(&oid).is_ok(), "{hex}");
            }
            RefTarget::Symbolic(target) => {
                assert_eq!(out.name, "HEAD");
                assert!(target.starts_with("refs/"), "{target}");
            }
            RefTarget::Delete => {
                assert_ne!(out.name, "HEAD");
                assert_eq!(given.target, RefTarget::Delete);
            }
        }
    }
    // A complete ref set is never empty: that would delete every branch and tag.
    assert!(!(ev.replace_refs && checked.refs.is_empty()), "{ev:?}");
    None
}

/// A clone URL through the strict default [`UrlPolicy`] and through one that allows private
/// addresses.
///
/// Invariants: an accepted URL is returned as given, with a scheme of the allow-list and a
/// non-empty domain that is [`domain_of`](crate::domain_of) the URL, already canonical, and
/// refused as the policy's own domain, also as that domain with the URL's port but not with
/// another port; the strict policy accepts no loopback or private
/// host; the two policies agree except that the open one accepts what the strict one refuses
/// as a private address; every refusal displays a non-empty reason.
pub fn url_policy(data: &[u8]) {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let strict = UrlPolicy::new();
    let open = UrlPolicy::new().allow_private_addresses(true);
    let strict_result = strict.check(url);
    let open_result = open.check(url);
    for (policy, result) in [(&strict, &strict_result), (&open, &open_result)] {
        match result {
            Ok(accepted) => {
                assert_eq!(&*accepted.url, url);
                let scheme = scheme_of(url);
                assert!(["https", "http", "git"].contains(&scheme.as_str()), "{url}");
                let domain = &*accepted.domain;
                assert!(!domain.is_empty(), "{url}");
                assert_eq!(crate::domain_of(url).as_deref(), Some(domain), "{url}");
                let again = policy::canonical_host(domain).map(|h| h.to_string());
                assert_eq!(again.as_deref(), Some(domain), "{url}: not canonical");
                assert_eq!(
                    policy.clone().our_domain(domain).check(url),
                    Err(UrlRefusal::OwnDomain),
                    "{url}"
                );
                // With a port, the own domain is that authority only: the URL's effective port
                // is refused, any other port of the host is not.
                if accepted.port != 0 {
                    let host = if domain.contains(':') {
                        format!("[{domain}]")
                    } else {
                        domain.to_owned()
                    };
                    let ours = format!("{host}:{}", accepted.port);
                    assert_eq!(
                        policy.clone().our_domain(&ours).check(url),
                        Err(UrlRefusal::OwnDomain),
                        "{url} {ours}"
                    );
                    let other = format!("{host}:{}", accepted.port % 65535 + 1);
                    assert_eq!(
                        policy.clone().our_domain(&other).check(url).as_ref(),
                        Ok(accepted),
                        "{url} {other}"
                    );
                }
                if !policy.private_addresses_allowed() {
                    if let Ok(ip) = domain.parse::<IpAddr>() {
                        assert!(policy::ip_allowed(ip, false), "{url}");
                    }
                    assert!(
                        domain != "localhost" && !domain.ends_with(".localhost"),
                        "{url}"
                    );
                }
            }
            Err(refusal) => assert!(!refusal.to_string().is_empty(), "{refusal:?}"),
        }
    }
    match (&strict_result, &open_result) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(UrlRefusal::PrivateAddress(host)), Ok(b)) => assert_eq!(host, &*b.domain),
        (Err(a), Err(b)) => {
            assert!(!matches!(a, UrlRefusal::PrivateAddress(_)), "{url}: {b:?}");
            assert_eq!(a, b, "{url}");
        }
        (strict, open) => panic!("{url}: strict {strict:?}, open {open:?}"),
    }
}

/// NIP-34 events: the bytes are one event as relays send it, or a JSON array of events (the
/// first is read as the event, the others as announcements). The event goes through
/// [`NostrEvent::from_json`], [`Announcement::from_event`], [`nip34::repository_of`] and
/// [`nip34::pending_event`] (with the announcements given, or the event's own when it is one).
///
/// Invariants: a parsed event survives a JSON round trip and has a 64-hex computed id; a
/// repository's address parses back to it; an announcement matches its own repository and
/// holds distinct non-empty URLs and 64-hex maintainers; a pending event has the event's id,
/// its repository's identifier, at least one object id, all 40 lower-case hex and distinct,
/// ref targets among them and no deletion, a complete ref set exactly when it is a state, the
/// event's `created_at`,
/// distinct non-empty clone URLs, and is refused by submit validation
/// for nothing but limits, identifiers, URL strings and ref clashes; errors display a
/// non-empty message.
pub fn nip34(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (event, announcements) = match NostrEvent::from_json(text) {
        Ok(event) => {
            let own = Announcement::from_event(&event).ok();
            (event, own.into_iter().collect::<Vec<_>>())
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "{e:?}");
            let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
                return;
            };
            let mut events = items.into_iter().map(NostrEvent::from_value);
            let Some(Ok(first)) = events.next() else {
                return;
            };
            let announcements = events
                .filter_map(Result::ok)
                .filter_map(|e| Announcement::from_event(&e).ok())
                .collect();
            (first, announcements)
        }
    };
    check_nostr_event(&event);
    for a in &announcements {
        check_announcement(a);
    }
    let repository = nip34::repository_of(&event);
    match &repository {
        Ok(repo) => {
            assert!(is_lower_hex(&repo.owner, 64), "{repo:?}");
            assert!(!repo.identifier.is_empty());
            assert_eq!(
                RepoRef::from_address(&repo.to_string()).as_ref(),
                Some(repo)
            );
        }
        Err(e) => assert!(!e.to_string().is_empty(), "{e:?}"),
    }
    if let Ok(a) = Announcement::from_event(&event) {
        assert_eq!(repository.as_ref().ok(), Some(&a.repo()));
    }
    match nip34::pending_event(&event, &announcements, NO_REPOSITORY, Origin::Sync) {
        Ok(pending) => check_pending(&event, &pending, repository.as_ref().ok()),
        Err(e) => {
            assert!(!e.to_string().is_empty(), "{e:?}");
            let supported = [
                nip34::KIND_REPOSITORY_STATE,
                nip34::KIND_PULL_REQUEST,
                nip34::KIND_PULL_REQUEST_UPDATE,
                nip34::KIND_PATCH,
            ];
            if !supported.contains(&event.kind) {
                assert_eq!(e, Nip34Error::UnsupportedKind { kind: event.kind });
            }
        }
    }
}

fn check_nostr_event(event: &NostrEvent) {
    assert_eq!(event.check_shape(), Ok(()));
    let json = serde_json::to_string(event).expect("an event serializes");
    assert_eq!(NostrEvent::from_json(&json).as_ref(), Ok(event), "{json}");
    let id = event.computed_id();
    assert!(is_lower_hex(&id, 64), "{id}");
    assert_eq!(event.verify_id().is_ok(), event.id == id);
}

fn check_announcement(a: &Announcement) {
    assert!(a.matches(&a.repo()));
    assert!(!a.identifier.is_empty());
    assert!(a.clone_urls.iter().all(|u| !u.is_empty()));
    assert!(a.maintainers.iter().all(|m| is_lower_hex(m, 64)));
    assert!(distinct(&a.clone_urls) && distinct(&a.maintainers));
}

fn distinct(values: &[String]) -> bool {
    values
        .iter()
        .enumerate()
        .all(|(i, v)| !values[..i].contains(v))
}

fn check_pending(event: &NostrEvent, pending: &PendingEvent, repo: Option<&RepoRef>) {
    assert_eq!(pending.id, event.id);
    let repo = repo.expect("a pending event's repository is known");
    assert_eq!(pending.identifier, repo.identifier);
    assert!(!pending.oids.is_empty());
    assert!(
        pending.oids.iter().all(|o| is_lower_hex(o, 40)),
        "{pending:?}"
    );
    assert!(distinct(&pending.oids), "{:?}", pending.oids);
    for u in &pending.ref_updates {
        if let RefTarget::Oid(hex) = &u.target {
            assert!(pending.oids.contains(hex), "{u:?}");
        }
    }
    assert!(!pending.clone_urls.is_empty());
    assert!(pending.clone_urls.iter().all(|u| !u.is_empty()));
    assert!(distinct(&pending.clone_urls), "{:?}", pending.clone_urls);
    assert_eq!(pending.created_at, Some(event.created_at));
    // A state is the repository's complete set of branches and tags; nothing else is.
    assert_eq!(
        pending.replace_refs,
        event.kind == nip34::KIND_REPOSITORY_STATE
    );
    assert!(
        pending
            .ref_updates
            .iter()
            .all(|u| u.target != RefTarget::Delete),
        "NIP-34 events delete by leaving out"
    );
    if event.kind != nip34::KIND_REPOSITORY_STATE {
        assert_eq!(pending.oids.len(), 1);
        assert_eq!(pending.ref_updates.len(), 1);
        assert_eq!(
            pending.ref_updates[0].name,
            format!("refs/nostr/{}", event.id)
        );
    }
    // What nip34 produced passes submit's checks, but for what nip34 leaves to the engine.
    let cfg = Config {
        url_policy: UrlPolicy::new().allow_private_addresses(true),
        ..Config::default()
    };
    match check_submit(pending, &cfg) {
        None
        | Some(
            SubmitError::TooManyObjectIds { .. }
            | SubmitError::TooManyCloneUrls { .. }
            | SubmitError::TooManyRefUpdates { .. }
            | SubmitError::InvalidIdentifier { .. }
            | SubmitError::InvalidCloneUrl { .. },
        ) => {}
        Some(SubmitError::InvalidRefUpdate { reason, .. }) if reason.contains("clashes") => {}
        Some(other) => panic!("nip34 produced an event submit refuses: {other}\n{pending:?}"),
    }
}

/// The bytes of a state file, read with the function the engine uses at start.
///
/// Invariants: a state file that reads is of this format's version and reads back equal after
/// being written again the way the engine writes it; an error is `Corrupt` or an
/// `UnknownVersion` other than this one, with a non-empty message.
pub fn state_file(data: &[u8]) {
    match state_file::parse(data) {
        Ok(file) => {
            assert_eq!(file.version, STATE_VERSION);
            let mut bytes = serde_json::to_vec(&file).expect("a state file serializes");
            bytes.push(b'\n');
            match state_file::parse(&bytes) {
                Ok(again) => assert_eq!(again, file),
                Err(e) => panic!("written again, it does not read: {e}"),
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "{e:?}");
            match e {
                StateFileError::Corrupt(_) => {}
                StateFileError::UnknownVersion(v) => assert_ne!(v, STATE_VERSION),
                other => panic!("parsing bytes reads no file: {other:?}"),
            }
        }
    }
}
