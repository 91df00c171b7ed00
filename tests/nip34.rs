//! NIP-34 events in: NIP-01 ids, reading events as relays send them, turning repository states,
//! pull requests and pull request updates into pending events, every malformed case, and the
//! engine accepting (and, against `git daemon` on loopback, releasing) what comes out.
//!
//! Events are built like real ones: real public keys (the x-only keys of the secret keys 1, 2
//! and 3, which `nak` uses), ids computed with NIP-01, tags as ngit writes them. Signatures are
//! placeholders: this module does not verify them (the relay did).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use purgatory_sync::nip34::{
    self, clone_urls_for, pending_event, repository_of, Announcement, Nip34Error, NostrEvent,
    RepoRef,
};
use purgatory_sync::{Admission, FakeClock, Origin, Outcome, PendingEvent, RefUpdate};
use purgatory_sync_testkit::{self as testkit, GitDaemon};

/// Secret key 1: nak's default key.
const ALICE: &str = "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";
const ALICE_NPUB: &str = "npub10xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqpkge6d";
/// Secret key 2.
const BOB: &str = "c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5";
/// Secret key 3.
const MALLORY: &str = "f9308a019258c31049344f85f89d5229b531c845836f99b08601f113bce036f9";

const MAIN: &str = "e92758a50bbf13ea1fe986bbe254a709b0bf741c";
const DEV: &str = "5c83da77af1dec6d7289834998ad7aafbd9e2191";
const V1: &str = "1f7a7a472abf3dd9643fd615f6da379c4acb3e3a";
const EUC: &str = "9f2f0d6dbbaf8d41e2c6b3d8a2f8e1ab0c4d3e21";

fn alice_relay_url() -> String {
    format!("https://relay.ngit.dev/{ALICE_NPUB}/hello.git")
}

const ALICE_GITHUB: &str = "https://github.com/alice/hello.git";
const BOB_CODEBERG: &str = "https://codeberg.org/bob/hello.git";

/// An event with its NIP-01 id and a placeholder signature.
fn event(pubkey: &str, created_at: u64, kind: u32, tags: &[&[&str]], content: &str) -> NostrEvent {
    let mut ev = NostrEvent {
        id: String::new(),
        pubkey: pubkey.to_owned(),
        created_at,
        kind,
        tags: tags
            .iter()
            .map(|t| t.iter().map(|s| s.to_string()).collect())
            .collect(),
        content: content.to_owned(),
        sig: "4bdb609c975b2b61338c2ff4c7ce91d4afe74bea4ed1601a62e1fd125bd4c0ae\
              6e0166cca96e5cfb7e0f50583eb6a0dd0b66072566299b6007742db56278010c"
            .to_owned(),
    };
    ev.id = ev.computed_id();
    ev
}

/// Alice's announcement of `hello`, as ngit writes it, with `extra` tags appended.
fn alice_announcement(extra: &[&[&str]]) -> NostrEvent {
    let relay_url = alice_relay_url();
    let clone = ["clone", &relay_url, ALICE_GITHUB];
    let mut tags: Vec<&[&str]> = vec![
        &["d", "hello"],
        &["name", "hello"],
        &["description", "a friendly greeting"],
        &clone,
        &["web", "https://gitworkshop.dev/alice/hello"],
        &["relays", "wss://relay.ngit.dev", "wss://nos.lol"],
        &["r", EUC, "euc"],
    ];
    tags.extend_from_slice(extra);
    event(
        ALICE,
        1_714_000_000,
        nip34::KIND_REPOSITORY_ANNOUNCEMENT,
        &tags,
        "",
    )
}

/// The announcement of `hello` (or whatever `tags` say) by `pubkey`.
fn announcement_by(pubkey: &str, tags: &[&[&str]]) -> Announcement {
    let kind = nip34::KIND_REPOSITORY_ANNOUNCEMENT;
    announcement(&event(pubkey, 1_714_000_050, kind, tags, ""))
}

/// Mallory's announcement of her own `hello`.
fn mallorys_announcement() -> Announcement {
    announcement_by(
        MALLORY,
        &[
            &["d", "hello"],
            &["clone", "https://evil.example/hello.git"],
        ],
    )
}

fn announcement(ev: &NostrEvent) -> Announcement {
    Announcement::from_event(ev).unwrap_or_else(|e| panic!("announcement: {e}"))
}

fn state(pubkey: &str, tags: &[&[&str]]) -> NostrEvent {
    event(
        pubkey,
        1_714_000_100,
        nip34::KIND_REPOSITORY_STATE,
        tags,
        "",
    )
}

/// A pull request from Bob to Alice's `hello`, with `extra` tags after the usual ones.
fn pull_request(kind: u32, extra: &[&[&str]]) -> NostrEvent {
    let address = format!("30617:{ALICE}:hello");
    let a = ["a", &address];
    let mut tags: Vec<&[&str]> = vec![
        &a,
        &["r", EUC],
        &["p", ALICE],
        &["subject", "Say hello louder"],
        &["t", "enhancement"],
    ];
    tags.extend_from_slice(extra);
    event(BOB, 1_714_000_200, kind, &tags, "Shouting is friendlier.")
}

/// `ev` against Alice's announcement of `hello`, for the repository `/r`.
fn against_alice(ev: &NostrEvent) -> Result<PendingEvent, Nip34Error> {
    let ann = announcement(&alice_announcement(&[]));
    pending_event(ev, &[ann], "/r", Origin::Sync)
}

/// Alice's state with `tags`, against her announcement.
fn alice_state(tags: &[&[&str]]) -> Result<PendingEvent, Nip34Error> {
    against_alice(&state(ALICE, tags))
}

/// Asserts what a pending event waits for and which refs it sets.
fn assert_fetches(p: &PendingEvent, oids: &[&str], refs: &[RefUpdate]) {
    assert_eq!(p.oids, oids, "{p:?}");
    assert_eq!(p.ref_updates, refs, "{p:?}");
}

fn err(result: Result<PendingEvent, Nip34Error>) -> Nip34Error {
    match result {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e,
    }
}

fn bad_tag(index: usize, tag: &str) -> impl Fn(&Nip34Error) -> bool + '_ {
    move |e| matches!(e, Nip34Error::BadTag { index: i, tag: t, .. } if *i == index && t == tag)
}

// ---------------------------------------------------------------------------------------------
// NIP-01 ids

/// Real events whose ids were checked independently (Python's `json.dumps` with
/// `separators=(",", ":"), ensure_ascii=False`, then SHA-256): nak's README examples, one with
/// a tag and one with newlines and an emoji, a profile whose content is JSON (quotes), and a
/// note whose wire form escapes non-ASCII as `\u` sequences, surrogate pairs included (the id
/// is over the raw UTF-8, not the escapes).
#[test]
fn nip01_ids_of_real_events() {
    let real = [
        r#"{"id":"53443506e7d09e55b922a2369b80f926007a8a8a8ea5f09df1db59fe1993335e","pubkey":"79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798","created_at":1698632644,"kind":1,"tags":[],"content":"hello from the nostr army knife","sig":"4bdb609c975b2b61338c2ff4c7ce91d4afe74bea4ed1601a62e1fd125bd4c0ae6e0166cca96e5cfb7e0f50583eb6a0dd0b66072566299b6007742db56278010c"}"#,
        r#"{"id":"e20978737ab7cd36eca300a65f11738176123f2e0c23054544b18fe493e2aa1a","pubkey":"c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5","created_at":1698632753,"kind":1,"tags":[["t","gm"]],"content":"good morning","sig":"5687c1a97066c349cb3bde0c0719fd1652a13403ba6aca7557b646307ee6718528cd86989db08bf6a7fd04bea0b0b87c1dd1b78c2d21b80b80eebab7f40b8916"}"#,
        r#"{"id":"acc6d53b163b0a5b3b18416370dd9343f26332c0ab56f42403d26997c0375703","pubkey":"fa984bd7dbb282f07e16e7ae87b26a2a7b9b90b7246a44771f0cf5ae58018f52","created_at":1697370933,"kind":1,"tags":[],"content":"`q` tags = a kind 1 that wanted to be a kind:6 but fell short\n\n🥁","sig":"b5b63d7c8491a4a0517df2c58151665c583abc6cd31fd50b957bf8fefc8e55c87c922cbdcb50888cb9f1c03c26ab5c02c1dccc14b46b78e1e16c60094f2358da"}"#,
        r#"{"id":"90a761aec9b5b60b399a76826141f529db17466deac85696a17e4a243aa271f9","pubkey":"aa4fc8665f5696e33db7e1a572e3b0f5b3d615837b0f362dcb1c8068b098c7b4","created_at":1704645606,"kind":0,"tags":[],"content":"{\"name\":\"key-a\",\"display_name\":\"Key A\",\"lud16\":\"keya@ln.address\"}","sig":"ec8f49d4c722b7ccae102d49befff08e62db775e5da43ef51b25c47dfdd6a09dc7519310a3a63cbdb6ec6b3250e6f19518eb47be604edeb598d16cdc071d3dbc"}"#,
        r#"{"id":"cd720b23163210ebddec88bc4e74d83c9667cdf11b95d376865315c686ed34eb","pubkey":"11d0b66747887ba9a6d34b23eb31287374b45b1a1b161eac54cb183c53e00ef7","created_at":1684947090,"kind":1,"tags":[["e","f9f30e37adffe3afe12fda2f8db4502ece334f261273a9a0be7e8adb29b35145"],["p","9eefd04d32ab5da8de12d7b83201578ea095a676acf3a692ec1b0b202ae4e16f"]],"content":"I'll take a large lill\u00f6rdag please.\n\n\ud83d\ude0e\ud83e\udd19\ud83d\udc47\ud83c\udf7b\n\nnostr:nevent1qqs0nucwx7kllca0uyha5tudk3gzan3nfunpyuaf5zl8azkm9xe4z3gpzamhxue69uhhyetvv9ujumn0wd68ytnzv9hxgtczyz0wl5zdx244m2x7zttmsvsp2782p9dxw6k08f5jasdskgp2unsk7qcyqqqqqqgncdx20","sig":"6c66e42dd481a0769148be33932a643672710f0ed83eeaaf4af5fe0f53e52b810a924ba2498354b8b00a54f065f4de0d92c42c70fdb39a2da67ac97baf4f9ae0"}"#,
    ];
    for json in real {
        let ev = NostrEvent::from_json(json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(ev.computed_id(), ev.id, "{json}");
        ev.verify_id().unwrap();
    }
}

/// NIP-01's escaping, character by character: `"` `\` and the five named control characters
/// escaped, other control characters as `\u00xx`, and everything else (`/`, DEL, non-ASCII,
/// U+2028, emoji) verbatim, in content and in tags alike.
#[test]
fn nip01_serialization_escapes_exactly_what_nip01_says() {
    let special = "q\"b\\n\nr\rt\tb\u{8}f\u{c}u\u{1}\u{1f}d\u{7f}s/é\u{2028}🥁";
    let escaped = r#""q\"b\\n\nr\rt\tb\bf\fu\u0001\u001fd"#.to_owned() + "\u{7f}s/é\u{2028}🥁\"";
    let ev = event(ALICE, 1_700_000_000, 1, &[&["t", special]], special);
    assert_eq!(
        ev.serialized_for_id(),
        format!("[0,\"{ALICE}\",1700000000,1,[[\"t\",{escaped}]],{escaped}]")
    );
    // The id is the SHA-256 of exactly that text, and it round-trips through JSON.
    let back = NostrEvent::from_json(&serde_json::to_string(&ev).unwrap()).unwrap();
    assert_eq!(back, ev);
    back.verify_id().unwrap();
}

/// A changed content, tag, kind or timestamp no longer matches the id, and the error gives
/// both ids.
#[test]
fn verify_id_catches_any_change() {
    let ev = state(ALICE, &[&["d", "hello"], &["refs/heads/main", MAIN]]);
    ev.verify_id().unwrap();
    let changes: [fn(&mut NostrEvent); 5] = [
        |e| e.content.push(' '),
        |e| e.tags[1][1] = DEV.to_owned(),
        |e| e.tags.push(vec!["t".into()]),
        |e| e.kind = nip34::KIND_REPOSITORY_ANNOUNCEMENT,
        |e| e.created_at += 1,
    ];
    for change in changes {
        let mut tampered = ev.clone();
        change(&mut tampered);
        match tampered.verify_id() {
            Err(Nip34Error::IdMismatch { expected, found }) => {
                assert_eq!(found, ev.id);
                assert_eq!(expected, tampered.computed_id());
                assert_ne!(expected, found);
            }
            other => panic!("expected IdMismatch, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading events

fn json_with(field: &str, value: serde_json::Value) -> String {
    let ev = state(ALICE, &[&["d", "hello"], &["refs/heads/main", MAIN]]);
    let mut v = serde_json::to_value(&ev).unwrap();
    if value.is_null() {
        v.as_object_mut().unwrap().remove(field);
    } else {
        v[field] = value;
    }
    v.to_string()
}

/// Each field's shape is checked, and the error names the field.
#[test]
fn from_json_names_the_bad_field() {
    use serde_json::json;
    let upper_id = state(ALICE, &[&["d", "x"]]).id.to_uppercase();
    let cases = [
        ("id", json!(null)),
        ("id", json!(upper_id)),
        ("id", json!("abc")),
        ("id", json!(7)),
        ("pubkey", json!(ALICE_NPUB)),
        ("pubkey", json!(ALICE.to_uppercase())),
        ("sig", json!("ab".repeat(63))),
        ("sig", json!("zz".repeat(64))),
        ("kind", json!(65_536)),
        ("kind", json!(-1)),
        ("kind", json!("30618")),
        ("created_at", json!(1.5e9)),
        ("created_at", json!(-5)),
        ("created_at", json!(null)),
        ("tags", json!({"d": "hello"})),
        ("tags", json!([["d", "hello"], "refs/heads/main"])),
        ("tags", json!([["d", 7]])),
        ("content", json!(null)),
        ("content", json!(["x"])),
    ];
    for (field, value) in cases {
        let json = json_with(field, value.clone());
        match NostrEvent::from_json(&json) {
            Err(Nip34Error::Field { field: f, reason }) => {
                assert_eq!(f, field, "{value}: {reason}")
            }
            other => panic!("{field} = {value}: expected a Field error, got {other:?}"),
        }
    }
    // Upper-case hex is fine for the signature; unknown fields are ignored.
    let sig_upper = json_with("sig", json!("AB".repeat(64)));
    NostrEvent::from_json(&sig_upper).unwrap();
    NostrEvent::from_json(&json_with("relay", json!("wss://nos.lol"))).unwrap();
}

#[test]
fn from_json_refuses_what_is_not_an_event_object() {
    for text in ["", "{", "not json", "[1,2]", "\"event\"", "null"] {
        match NostrEvent::from_json(text) {
            Err(Nip34Error::Json(message)) => assert!(!message.is_empty()),
            other => panic!("{text:?}: expected a Json error, got {other:?}"),
        }
    }
    let e = NostrEvent::from_json("[1,2]").unwrap_err();
    assert_eq!(
        e.to_string(),
        "not a Nostr event in JSON: expected an event object, found an array"
    );
}

/// `from_value` is `from_json` on a parsed value, and the JSON a relay sends round-trips.
#[test]
fn from_value_reads_a_relay_message() {
    let ev = alice_announcement(&[]);
    let message = serde_json::json!(["EVENT", "sub1", ev]);
    let read = NostrEvent::from_value(message[2].clone()).unwrap();
    assert_eq!(read, ev);
    read.verify_id().unwrap();
}

/// An event built in code with a malformed id or pubkey is refused by every entry point, so
/// that it cannot reach a ref name (`refs/nostr/<id>`) or a repository match.
#[test]
fn entry_points_check_the_shape_of_events_built_in_code() {
    let mut pr = pull_request(
        nip34::KIND_PULL_REQUEST,
        &[&["c", MAIN], &["clone", BOB_CODEBERG]],
    );
    pr.id = "../../heads/main".to_owned();
    let e = err(pending_event(&pr, &[], "/r", Origin::Sync));
    assert!(matches!(e, Nip34Error::Field { field: "id", .. }), "{e}");
    assert!(matches!(
        repository_of(&pr),
        Err(Nip34Error::Field { field: "id", .. })
    ));

    let mut ann = alice_announcement(&[]);
    ann.pubkey = ALICE.to_uppercase();
    assert!(matches!(
        Announcement::from_event(&ann),
        Err(Nip34Error::Field {
            field: "pubkey",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Announcements

#[test]
fn announcement_reads_clone_urls_and_maintainers() {
    let ev = alice_announcement(&[
        &["clone", BOB_CODEBERG, ALICE_GITHUB, ""],
        &["maintainers", BOB, &MALLORY.to_uppercase()],
        &["maintainers", BOB],
    ]);
    let a = announcement(&ev);
    assert_eq!(
        a,
        Announcement {
            event_id: ev.id.clone(),
            owner: ALICE.to_owned(),
            identifier: "hello".to_owned(),
            clone_urls: vec![alice_relay_url(), ALICE_GITHUB.into(), BOB_CODEBERG.into()],
            maintainers: vec![BOB.to_owned(), MALLORY.to_owned()],
        }
    );
    assert_eq!(a.repo(), RepoRef::new(ALICE, "hello"));
    assert!(a.matches(&RepoRef::new(ALICE, "hello")));
    assert!(a.matches(&RepoRef::new(BOB, "hello")));
    assert!(!a.matches(&RepoRef::new(BOB, "other")));
}

#[test]
fn announcement_errors_name_the_problem() {
    let not_ann = state(ALICE, &[&["d", "hello"]]);
    let e = Announcement::from_event(&not_ann).unwrap_err();
    assert!(matches!(e, Nip34Error::Field { field: "kind", .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "field `kind`: expected 30617 (a repository announcement), found 30618"
    );

    let no_d = event(
        ALICE,
        1,
        nip34::KIND_REPOSITORY_ANNOUNCEMENT,
        &[&["clone", ALICE_GITHUB]],
        "",
    );
    let e = Announcement::from_event(&no_d).unwrap_err();
    assert_eq!(e, Nip34Error::MissingTag { tag: "d" });
    assert_eq!(e.to_string(), "missing `d` tag");

    let bad_maintainer = alice_announcement(&[&["maintainers", BOB, ALICE_NPUB]]);
    let e = Announcement::from_event(&bad_maintainer).unwrap_err();
    assert!(bad_tag(7, "maintainers")(&e), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("tag 7 (`maintainers`): `{ALICE_NPUB}` is not a 64-hex public key")
    );
}

// ---------------------------------------------------------------------------------------------
// Repository states

/// The whole pending event of an owner's state: id, identifier, repository, object ids in tag
/// order and lower case, one ref update per `refs/` tag then `HEAD`, the announcement's clone
/// URLs, the origin.
#[test]
fn owner_state_becomes_a_pending_event() {
    let ann = announcement(&alice_announcement(&[]));
    let ev = state(
        ALICE,
        &[
            &["d", "hello"],
            &["refs/heads/main", &MAIN.to_uppercase()],
            &["refs/tags/v1.0", V1],
            &["HEAD", "ref: refs/heads/main"],
            &["refs/heads/dev", DEV],
        ],
    );
    let p = pending_event(&ev, &[ann], "/srv/git/alice/hello.git", Origin::User).unwrap();
    assert_eq!(
        p,
        PendingEvent {
            id: ev.id.clone(),
            identifier: "hello".into(),
            repo: "/srv/git/alice/hello.git".into(),
            oids: vec![MAIN.into(), V1.into(), DEV.into()],
            clone_urls: vec![alice_relay_url(), ALICE_GITHUB.into()],
            origin: Origin::User,
            ref_updates: vec![
                RefUpdate::oid("refs/heads/main", MAIN),
                RefUpdate::oid("refs/tags/v1.0", V1),
                RefUpdate::oid("refs/heads/dev", DEV),
                RefUpdate::symbolic("HEAD", "refs/heads/main"),
            ],
            // A state names every branch and tag of the repository.
            replace_refs: true,
            created_at: Some(ev.created_at),
        }
    );
    assert_eq!(repository_of(&ev).unwrap(), RepoRef::new(ALICE, "hello"));
}

/// NIP-34 lets a `refs/` tag carry ancestry after the commit id: only the first value counts.
#[test]
fn extra_values_after_the_commit_id_are_ignored() {
    let p = alice_state(&[
        &["d", "hello"],
        &["refs/heads/main", MAIN, "5c83da7", "1f7a7a4"],
    ])
    .unwrap();
    assert_fetches(&p, &[MAIN], &[RefUpdate::oid("refs/heads/main", MAIN)]);
}

/// Two refs on one commit: the commit is waited for once, both refs are set.
#[test]
fn object_ids_are_distinct() {
    let upper = MAIN.to_uppercase();
    let p = alice_state(&[
        &["d", "hello"],
        &["refs/heads/main", MAIN],
        &["refs/heads/release", &upper],
    ])
    .unwrap();
    let both = [
        RefUpdate::oid("refs/heads/main", MAIN),
        RefUpdate::oid("refs/heads/release", MAIN),
    ];
    assert_fetches(&p, &[MAIN], &both);
}

/// ngit lists an annotated tag twice, as `git ls-remote` does: the tag object under the tag's
/// name and the commit under `<name>^{}`. The peeled entry is waited for but is no ref.
#[test]
fn peeled_tag_entries_add_their_commit_but_no_ref() {
    let p = alice_state(&[
        &["d", "hello"],
        &["refs/heads/main", MAIN],
        &["refs/tags/v1.0", V1],
        &["refs/tags/v1.0^{}", DEV],
    ])
    .unwrap();
    let refs = [
        RefUpdate::oid("refs/heads/main", MAIN),
        RefUpdate::oid("refs/tags/v1.0", V1),
    ];
    assert_fetches(&p, &[MAIN, V1, DEV], &refs);
}

/// A peeled entry says what its tag points at; without the tag in the same state it names no
/// ref, and a state of peeled entries alone would list no branch or tag at all (found by the
/// nip34 fuzz target: submit refused what nip34 produced). The tag may come after it.
#[test]
fn a_peeled_entry_needs_its_ref_in_the_state() {
    let err = alice_state(&[
        &["d", "hello"],
        &["refs/heads/main^{}", MAIN],
        &["HEAD", "ref: refs/heads/main"],
    ])
    .unwrap_err();
    match err {
        Nip34Error::BadTag { index, tag, reason } => {
            assert_eq!((index, tag.as_str()), (1, "refs/heads/main^{}"));
            assert!(reason.contains("refs/heads/main"), "{reason}");
        }
        other => panic!("expected BadTag, got {other:?}"),
    }
    let p = alice_state(&[
        &["d", "hello"],
        &["refs/tags/v1.0^{}", DEV],
        &["refs/tags/v1.0", V1],
    ])
    .unwrap();
    assert_fetches(&p, &[DEV, V1], &[RefUpdate::oid("refs/tags/v1.0", V1)]);
}

/// A maintainer's state gets the URLs of the owner's announcement that names them, after the
/// maintainer's own announcement, without duplicates.
#[test]
fn maintainer_state_gets_the_owner_clone_urls() {
    let owner = announcement(&alice_announcement(&[&["maintainers", BOB]]));
    let bobs = announcement_by(
        BOB,
        &[
            &["d", "hello"],
            &["clone", BOB_CODEBERG, ALICE_GITHUB],
            &["maintainers", ALICE],
        ],
    );
    let ev = state(BOB, &[&["d", "hello"], &["refs/heads/main", MAIN]]);
    // The owner's announcement comes first in the list; Bob's own still goes first.
    let p = pending_event(&ev, &[owner.clone(), bobs], "/r", Origin::Sync).unwrap();
    assert_eq!(
        p.clone_urls,
        [
            BOB_CODEBERG.to_owned(),
            ALICE_GITHUB.into(),
            alice_relay_url()
        ]
    );
    // Without an announcement of their own, the owner's URLs alone.
    let p = pending_event(&ev, &[owner], "/r", Origin::Sync).unwrap();
    assert_eq!(p.clone_urls, [alice_relay_url(), ALICE_GITHUB.into()]);
    assert_eq!(repository_of(&ev).unwrap(), RepoRef::new(BOB, "hello"));
}

/// A stranger's state for the same identifier does not get the owner's URLs: the owner's
/// announcement does not name them. With an announcement of their own, they get only theirs.
#[test]
fn stranger_state_does_not_match_the_owner_announcement() {
    let owner = announcement(&alice_announcement(&[&["maintainers", BOB]]));
    let ev = state(MALLORY, &[&["d", "hello"], &["refs/heads/main", MAIN]]);
    let e = err(pending_event(
        &ev,
        std::slice::from_ref(&owner),
        "/r",
        Origin::Sync,
    ));
    assert_eq!(e, Nip34Error::NoCloneUrls);

    let mallorys = mallorys_announcement();
    let p = pending_event(&ev, &[owner, mallorys], "/r", Origin::Sync).unwrap();
    assert_eq!(p.clone_urls, ["https://evil.example/hello.git"]);
}

/// The owner's announcement of another repository does not match.
#[test]
fn announcement_of_another_identifier_does_not_match() {
    let other = announcement_by(ALICE, &[&["d", "hello-website"], &["clone", ALICE_GITHUB]]);
    let ev = state(ALICE, &[&["d", "hello"], &["refs/heads/main", MAIN]]);
    let e = err(pending_event(
        &ev,
        std::slice::from_ref(&other),
        "/r",
        Origin::Sync,
    ));
    assert_eq!(e, Nip34Error::NoCloneUrls);
    assert!(clone_urls_for(&RepoRef::new(ALICE, "hello"), &[other]).is_empty());
}

/// No `refs/` tag: the author stopped tracking state. Not malformed, but nothing to fetch;
/// a `HEAD` alone does not change that.
#[test]
fn state_without_refs_is_nothing_to_fetch() {
    let cases: [&[&[&str]]; 2] = [
        &[&["d", "hello"]],
        &[&["d", "hello"], &["HEAD", "ref: refs/heads/main"]],
    ];
    for tags in cases {
        let e = err(alice_state(tags));
        assert!(matches!(e, Nip34Error::NothingToFetch { .. }), "{e:?}");
        assert!(e.to_string().starts_with("nothing to fetch: "), "{e}");
    }
}

#[test]
fn state_without_d_tag_is_refused() {
    let ev = state(ALICE, &[&["refs/heads/main", MAIN]]);
    assert_eq!(err(against_alice(&ev)), Nip34Error::MissingTag { tag: "d" });
    assert_eq!(repository_of(&ev), Err(Nip34Error::MissingTag { tag: "d" }));

    let empty = state(ALICE, &[&["d"], &["refs/heads/main", MAIN]]);
    let e = repository_of(&empty).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tag 0 (`d`): the repository identifier is empty"
    );
}

/// Every malformed `refs/` or `HEAD` tag is refused with its index and name.
#[test]
fn malformed_state_tags_are_named() {
    let cases: [(&[&[&str]], usize, &str, &str); 9] = [
        (
            &[&["d", "hello"], &["refs/heads/main", "abc"]],
            1,
            "refs/heads/main",
            "tag 1 (`refs/heads/main`): `abc` is not a 40-hex object id",
        ),
        (
            &[&["d", "hello"], &["refs/heads/main"]],
            1,
            "refs/heads/main",
            "tag 1 (`refs/heads/main`): has no object id",
        ),
        (
            &[&["d", "hello"], &["refs/heads/main", &"a".repeat(64)]],
            1,
            "refs/heads/main",
            "is not a 40-hex object id",
        ),
        (
            &[
                &["d", "hello"],
                &["refs/heads/main", MAIN],
                &["refs/tags/v1", V1],
                &["refs/heads/main", DEV],
            ],
            3,
            "refs/heads/main",
            "tag 3 (`refs/heads/main`): given twice (first at tag 1)",
        ),
        (
            &[
                &["d", "hello"],
                &["refs/heads/main", MAIN],
                &["HEAD", "ref: refs/heads/main"],
                &["HEAD", "ref: refs/heads/dev"],
            ],
            3,
            "HEAD",
            "tag 3 (`HEAD`): given twice (first at tag 2)",
        ),
        (
            &[
                &["d", "hello"],
                &["refs/heads/main", MAIN],
                &["HEAD", "refs/heads/main"],
            ],
            2,
            "HEAD",
            "tag 2 (`HEAD`): expected `ref: refs/heads/<branch>`, found `refs/heads/main`",
        ),
        (
            &[&["d", "hello"], &["refs/heads/a b", MAIN]],
            1,
            "refs/heads/a b",
            "tag 1 (`refs/heads/a b`): not a usable git ref name: contains a space",
        ),
        (
            &[&["d", "hello"], &["refs/heads/x.lock", MAIN]],
            1,
            "refs/heads/x.lock",
            "ending with `.lock`",
        ),
        (
            &[&["d", "hello"], &["refs/purgatory-sync/pin", MAIN]],
            1,
            "refs/purgatory-sync/pin",
            "the engine's own namespace",
        ),
    ];
    for (tags, index, tag, message) in cases {
        let e = err(alice_state(tags));
        assert!(bad_tag(index, tag)(&e), "{tags:?}: {e:?}");
        assert!(e.to_string().contains(message), "{tags:?}: {e}");
    }
}

/// Tags that are not refs (`d`, `relays`, `r`, an empty tag) are not mistaken for refs.
#[test]
fn other_state_tags_are_ignored() {
    let p = alice_state(&[
        &[],
        &["d", "hello"],
        &["r", EUC, "euc"],
        &["refsx/heads/main", "not an oid"],
        &["head", "not a ref"],
        &["refs/heads/main", MAIN],
    ])
    .unwrap();
    assert_fetches(&p, &[MAIN], &[RefUpdate::oid("refs/heads/main", MAIN)]);
}

// ---------------------------------------------------------------------------------------------
// Pull requests, updates and patches

/// A pull request: its `c` tip under `refs/nostr/<event-id>`, its own clone URLs before the
/// announcement's, the identifier from its `a` tag.
#[test]
fn pull_request_becomes_a_pending_event() {
    let ann = announcement(&alice_announcement(&[]));
    let ev = pull_request(
        nip34::KIND_PULL_REQUEST,
        &[
            &["c", &DEV.to_uppercase()],
            &["clone", BOB_CODEBERG, ALICE_GITHUB],
            &["branch-name", "louder"],
            &["merge-base", MAIN],
        ],
    );
    let p = pending_event(&ev, &[ann], "/srv/git/alice/hello.git", Origin::Sync).unwrap();
    assert_eq!(
        p,
        PendingEvent {
            id: ev.id.clone(),
            identifier: "hello".into(),
            repo: "/srv/git/alice/hello.git".into(),
            oids: vec![DEV.into()],
            clone_urls: vec![BOB_CODEBERG.into(), ALICE_GITHUB.into(), alice_relay_url()],
            origin: Origin::Sync,
            ref_updates: vec![RefUpdate::oid(format!("refs/nostr/{}", ev.id), DEV)],
            // A pull request adds its ref and leaves the others alone.
            replace_refs: false,
            created_at: Some(ev.created_at),
        }
    );
    assert_eq!(repository_of(&ev).unwrap(), RepoRef::new(ALICE, "hello"));
}

/// A pull request update's ref is named after the update itself (NIP-34:
/// `refs/nostr/<[PR|PR-Update]-event-id>`), not after the pull request it updates.
#[test]
fn pull_request_update_ref_is_named_after_the_update() {
    let pr = pull_request(nip34::KIND_PULL_REQUEST, &[&["c", DEV]]);
    let update = pull_request(
        nip34::KIND_PULL_REQUEST_UPDATE,
        &[
            &["E", &pr.id],
            &["P", BOB],
            &["c", V1],
            &["clone", BOB_CODEBERG],
        ],
    );
    let p = against_alice(&update).unwrap();
    assert_eq!(p.id, update.id);
    let name = format!("refs/nostr/{}", update.id);
    assert_fetches(&p, &[V1], &[RefUpdate::oid(name, V1)]);
    assert_eq!(p.clone_urls[0], BOB_CODEBERG);
}

/// Kind 1617 is a patch: with a `c` tag it is read as a pull request; without one it names
/// nothing to fetch.
#[test]
fn patch_kind_only_with_a_c_tag() {
    let with_c = pull_request(nip34::KIND_PATCH, &[&["c", DEV]]);
    let p = against_alice(&with_c).unwrap();
    let name = format!("refs/nostr/{}", with_c.id);
    assert_fetches(&p, &[DEV], &[RefUpdate::oid(name, DEV)]);

    let patch = event(
        BOB,
        1_714_000_300,
        nip34::KIND_PATCH,
        &[
            &["a", &format!("30617:{ALICE}:hello")],
            &["t", "root"],
            &["commit", DEV],
        ],
        "From 5c83da7 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] louder\n",
    );
    let e = err(against_alice(&patch));
    assert!(matches!(e, Nip34Error::NothingToFetch { .. }), "{e:?}");
    assert!(e.to_string().contains("patch"), "{e}");
    // The repository of a patch is still known.
    assert_eq!(repository_of(&patch).unwrap(), RepoRef::new(ALICE, "hello"));
}

#[test]
fn pull_request_c_tag_errors_are_named() {
    let run = |extra: &[&[&str]]| {
        err(against_alice(&pull_request(
            nip34::KIND_PULL_REQUEST,
            extra,
        )))
    };
    let e = run(&[&["clone", BOB_CODEBERG]]);
    assert_eq!(e, Nip34Error::MissingTag { tag: "c" });
    assert_eq!(e.to_string(), "missing `c` tag");

    // Tags 0-4 are the usual ones; `c` is tag 5 here.
    let e = run(&[&["c", "abc"]]);
    assert!(bad_tag(5, "c")(&e), "{e:?}");
    assert_eq!(
        e.to_string(),
        "tag 5 (`c`): `abc` is not a 40-hex commit id"
    );

    let e = run(&[&["c", DEV], &["c", V1]]);
    assert!(bad_tag(6, "c")(&e), "{e:?}");
    assert!(e.to_string().contains("first at tag 5"), "{e}");

    // An update without `c` is as wrong as a pull request without it.
    let update = pull_request(nip34::KIND_PULL_REQUEST_UPDATE, &[&["clone", BOB_CODEBERG]]);
    assert_eq!(
        err(against_alice(&update)),
        Nip34Error::MissingTag { tag: "c" }
    );
}

fn pr_with_tags(tags: &[&[&str]]) -> NostrEvent {
    event(BOB, 1_714_000_200, nip34::KIND_PULL_REQUEST, tags, "")
}

/// The repository comes from the first well-formed `a` tag; a malformed one is named when no
/// well-formed one follows; none at all is a missing tag.
#[test]
fn pull_request_a_tag_rules() {
    let alice_a = format!("30617:{ALICE}:hello");
    let bob_a = format!("30617:{BOB}:hello");
    let upper_a = format!("30617:{}:hello", ALICE.to_uppercase());
    let colon_a = format!("30617:{ALICE}:hello:world");
    let c: &[&str] = &["c", DEV];
    let clone: &[&str] = &["clone", BOB_CODEBERG];

    let cases: [(&[&[&str]], RepoRef); 4] = [
        (
            &[
                &["a", "30023:nope:x"],
                &["a", &alice_a],
                &["a", &bob_a],
                c,
                clone,
            ],
            RepoRef::new(ALICE, "hello"),
        ),
        (
            &[&["a", &bob_a], &["a", &alice_a], c, clone],
            RepoRef::new(BOB, "hello"),
        ),
        (&[&["a", &upper_a], c, clone], RepoRef::new(ALICE, "hello")),
        (
            &[&["a", &colon_a], c, clone],
            RepoRef::new(ALICE, "hello:world"),
        ),
    ];
    for (tags, repo) in cases {
        let ev = pr_with_tags(tags);
        assert_eq!(repository_of(&ev).unwrap(), repo, "{tags:?}");
        let p = pending_event(&ev, &[], "/r", Origin::Sync).unwrap();
        assert_eq!(p.identifier, repo.identifier);
    }

    let bad: [(&str, &str); 6] = [
        ("30617:alice:hello", "`30617:alice:hello`"),
        (
            "30618:79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798:hello",
            "30618",
        ),
        (&alice_a[..alice_a.len() - "hello".len()], "found `30617:"),
        ("30617", "found `30617`"),
        ("", "found ``"),
        ("hello", "found `hello`"),
    ];
    for (value, shown) in bad {
        let ev = pr_with_tags(&[&["p", ALICE], &["a", value], c, clone]);
        let e = err(pending_event(&ev, &[], "/r", Origin::Sync));
        assert!(bad_tag(1, "a")(&e), "{value:?}: {e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("tag 1 (`a`): expected `30617:<pubkey>:<identifier>`"),
            "{text}"
        );
        assert!(text.contains(shown), "{text}");
    }

    let e = err(pending_event(
        &pr_with_tags(&[c, clone]),
        &[],
        "/r",
        Origin::Sync,
    ));
    assert_eq!(e, Nip34Error::MissingTag { tag: "a" });
}

/// A pull request's repository is the `a` tag's, so the announcement that matches is the
/// owner's (and a co-maintainer's that lists the owner), never one that merely shares the
/// identifier.
#[test]
fn pull_request_uses_the_announcements_of_its_a_tag_repository() {
    let alices = announcement(&alice_announcement(&[]));
    let bobs_listing_alice = announcement_by(
        BOB,
        &[
            &["d", "hello"],
            &["clone", BOB_CODEBERG],
            &["maintainers", ALICE],
        ],
    );
    let mallorys = mallorys_announcement();
    let ev = pull_request(nip34::KIND_PULL_REQUEST, &[&["c", DEV]]);
    let p = pending_event(
        &ev,
        &[mallorys, bobs_listing_alice, alices],
        "/r",
        Origin::Sync,
    )
    .unwrap();
    assert_eq!(
        p.clone_urls,
        [alice_relay_url(), ALICE_GITHUB.into(), BOB_CODEBERG.into()]
    );
}

/// No own `clone` tag and no matching announcement: no URL to fetch from.
#[test]
fn pull_request_without_any_clone_url() {
    let ev = pull_request(nip34::KIND_PULL_REQUEST, &[&["c", DEV], &["clone"]]);
    let e = err(pending_event(&ev, &[], "/r", Origin::Sync));
    assert_eq!(e, Nip34Error::NoCloneUrls);
    assert_eq!(
        e.to_string(),
        "no clone URLs: no repository announcement matched and the event has no `clone` tag"
    );
    // Its own clone tag is enough.
    let ev = pull_request(
        nip34::KIND_PULL_REQUEST,
        &[&["c", DEV], &["clone", BOB_CODEBERG]],
    );
    let p = pending_event(&ev, &[], "/r", Origin::Sync).unwrap();
    assert_eq!(p.clone_urls, [BOB_CODEBERG]);
}

// ---------------------------------------------------------------------------------------------
// Kinds

#[test]
fn other_kinds_are_unsupported() {
    let ann_event = alice_announcement(&[]);
    let e = err(pending_event(&ann_event, &[], "/r", Origin::Sync));
    assert_eq!(e, Nip34Error::UnsupportedKind { kind: 30617 });
    assert!(e.to_string().contains("repository announcement"), "{e}");
    // The repository of an announcement is still its author's.
    assert_eq!(
        repository_of(&ann_event).unwrap(),
        RepoRef::new(ALICE, "hello")
    );

    for kind in [0, 1, 1621, 1630, 10317] {
        let ev = event(
            ALICE,
            1,
            kind,
            &[&["a", &format!("30617:{ALICE}:hello")], &["c", MAIN]],
            "",
        );
        let e = err(pending_event(&ev, &[], "/r", Origin::Sync));
        assert_eq!(e, Nip34Error::UnsupportedKind { kind });
        assert!(e
            .to_string()
            .starts_with(&format!("kind {kind} is not supported")));
        assert_eq!(
            repository_of(&ev),
            Err(Nip34Error::UnsupportedKind { kind })
        );
    }
}

#[test]
fn repo_ref_address_round_trips() {
    let repo = RepoRef::new(ALICE, "hello");
    assert_eq!(repo.to_string(), format!("30617:{ALICE}:hello"));
    assert_eq!(RepoRef::from_address(&repo.to_string()), Some(repo));
    assert_eq!(RepoRef::from_address("30617::hello"), None);
}

// ---------------------------------------------------------------------------------------------
// The engine takes what comes out

/// The pending events of a state and a pull request are accepted by a real engine's submit
/// (validation of ids, ref names, targets, URLs). The fake clock never advances, so nothing
/// is fetched.
#[test]
fn engine_accepts_the_pending_events() {
    let dir = tempfile::tempdir().unwrap();
    let repo = testkit::init_bare(&dir.path().join("alice/hello.git"));
    let engine = testkit::loopback_engine()
        .thread_name("n34-acc")
        .clock(FakeClock::new())
        .build()
        .unwrap();

    let ann = announcement(&alice_announcement(&[&["maintainers", BOB]]));
    let st = state(
        BOB,
        &[
            &["d", "hello"],
            &["refs/heads/main", &MAIN.to_uppercase()],
            &["refs/heads/dev", DEV, "e92758a"],
            &["refs/tags/v1.0", V1],
            &["refs/tags/v1.0^{}", MAIN],
            &["HEAD", "ref: refs/heads/main"],
        ],
    );
    let pr = pull_request(
        nip34::KIND_PULL_REQUEST,
        &[&["c", DEV], &["clone", BOB_CODEBERG]],
    );
    let update = pull_request(
        nip34::KIND_PULL_REQUEST_UPDATE,
        &[&["E", &pr.id], &["c", V1]],
    );
    for ev in [&st, &pr, &update] {
        let pending = pending_event(ev, std::slice::from_ref(&ann), &repo, Origin::User).unwrap();
        assert_eq!(engine.submit(pending).unwrap(), Admission::pending());
    }
    engine.shutdown().unwrap();
}

const DAEMON_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 34);

/// Where the ref `name` of `repo` points: an oid, or `ref: <name>` when symbolic.
fn ref_target(repo: &Path, name: &str) -> Option<String> {
    let r = git2::Repository::open_bare(repo).unwrap();
    let reference = r.find_reference(name).ok()?;
    Some(match reference.symbolic_target().unwrap() {
        Some(t) => format!("ref: {t}"),
        None => reference.target().unwrap().to_string(),
    })
}

/// An annotated tag `name` by Alice on `commit` in `repo`; returns the tag object's id.
fn annotated_tag(repo: &Path, name: &str, commit: &str) -> String {
    let r = git2::Repository::open_bare(repo).unwrap();
    let target = r.revparse_single(commit).unwrap();
    let alice = git2::Signature::now("Alice", "alice@example.com").unwrap();
    let tag = r.tag(name, &target, &alice, "hello 1.0", false).unwrap();
    tag.to_string()
}

fn expect_released(engine: &purgatory_sync::Engine, event_id: &str) {
    match engine.outcomes().recv_timeout(Duration::from_secs(30)) {
        Ok(Outcome::Released { event_id: e, .. }) => assert_eq!(e, event_id),
        other => panic!("expected {event_id} released, got {other:?}"),
    }
}

/// End to end over `git daemon` on loopback: a state with a branch, an annotated tag listed
/// the ngit way (tag object and peeled commit) and `HEAD` is released with exactly those refs
/// written, and the relay's branch the state does not list is deleted; then a pull request
/// from a fork, whose own clone URL comes first, gets `refs/nostr/<event-id>` and deletes
/// nothing.
#[test]
fn state_and_pull_request_are_released_with_their_refs() {
    testkit::require_git();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("served");
    let upstream = testkit::served_repo(&base, "alice/hello.git");
    let c1 = testkit::commit(&upstream, "main", &[("README", b"hello\n")], "hello");
    let v1 = annotated_tag(&upstream, "v1.0", &c1.to_string());
    let c2 = testkit::commit(&upstream, "main", &[("README", b"hello!\n")], "louder");
    let fork = testkit::served_repo(&base, "bob/hello.git");
    testkit::push_all(&upstream, &fork);
    let tip = testkit::commit(&fork, "louder", &[("README", b"HELLO!\n")], "shout");
    let daemon = GitDaemon::start(DAEMON_HOST, &base).unwrap();
    let relay_repo = testkit::init_bare(&dir.path().join("relay/alice/hello.git"));
    // A branch of an earlier state that the new one no longer lists.
    testkit::commit(&relay_repo, "stale", &[("f", b"old\n")], "old");

    let ann = announcement_by(
        ALICE,
        &[
            &["d", "hello"],
            &[
                "clone",
                &daemon.url("alice/missing.git"),
                &daemon.url("alice/hello.git"),
            ],
        ],
    );
    let (c1, c2, tip) = (c1.to_string(), c2.to_string(), tip.to_string());
    let st = state(
        ALICE,
        &[
            &["d", "hello"],
            &["refs/heads/main", &c2],
            &["refs/tags/v1.0", &v1],
            &["refs/tags/v1.0^{}", &c1],
            &["HEAD", "ref: refs/heads/main"],
        ],
    );
    let clock = FakeClock::new();
    let engine = testkit::loopback_engine()
        .thread_name("n34-e2e")
        .clock(clock.clone())
        .tick(Duration::from_millis(50))
        .build()
        .unwrap();
    let pending =
        pending_event(&st, std::slice::from_ref(&ann), &relay_repo, Origin::Sync).unwrap();
    assert_eq!(engine.submit(pending).unwrap(), Admission::pending());
    clock.advance(Duration::from_secs(1));
    expect_released(&engine, &st.id);
    assert_eq!(ref_target(&relay_repo, "refs/heads/main"), Some(c2.clone()));
    assert_eq!(ref_target(&relay_repo, "refs/tags/v1.0"), Some(v1));
    assert_eq!(
        ref_target(&relay_repo, "HEAD").as_deref(),
        Some("ref: refs/heads/main")
    );
    assert_eq!(ref_target(&relay_repo, "refs/tags/v1.0^{}"), None);
    assert_eq!(
        ref_target(&relay_repo, "refs/heads/stale"),
        None,
        "not in the state"
    );

    let pr = pull_request(
        nip34::KIND_PULL_REQUEST,
        &[&["c", &tip], &["clone", &daemon.url("bob/hello.git")]],
    );
    let pending = pending_event(&pr, &[ann], &relay_repo, Origin::Sync).unwrap();
    assert_eq!(pending.clone_urls[0], daemon.url("bob/hello.git"));
    assert_eq!(engine.submit(pending).unwrap(), Admission::pending());
    clock.advance(Duration::from_secs(1));
    expect_released(&engine, &pr.id);
    assert_eq!(
        ref_target(&relay_repo, &format!("refs/nostr/{}", pr.id)),
        Some(tip)
    );
    assert_eq!(ref_target(&relay_repo, "refs/heads/main"), Some(c2), "kept");
    engine.shutdown().unwrap();
}
