//! Repository fixtures built with libgit2.

use std::path::{Path, PathBuf};

use git2::{FileMode, Repository, Signature, Time};

use purgatory_sync::ObjectId;

/// Author and committer name of every [`commit`].
pub const AUTHOR_NAME: &str = "Purgatory Test";
/// Author and committer e-mail of every [`commit`].
pub const AUTHOR_EMAIL: &str = "test@purgatory-sync.invalid";
/// Author and committer time of every [`commit`] (seconds since the epoch, UTC).
pub const COMMIT_TIME: i64 = 1_700_000_000;

/// Creates a bare repository at `path` (and its parent directories), or opens the one that is
/// there, and returns `path`. This is the kind of repository the engine fetches into.
///
/// # Panics
/// When libgit2 cannot create or open it.
pub fn init_bare(path: &Path) -> PathBuf {
    if let Err(e) = Repository::init_bare(path) {
        panic!(
            "testkit: cannot create bare repository {}: {e}",
            path.display()
        );
    }
    path.to_path_buf()
}

/// Which objects `git upload-pack` lets a client ask for by id, set in a served repository's
/// own configuration by [`served_repo_with`]. It matters for protocol v0 (the only one
/// libgit2 speaks); measured with git 2.47 and libgit2 1.9:
///
/// - Clients only ask for an id the server did not advertise as a ref tip if the server
///   advertises `allow-tip-sha1-in-want` or `allow-reachable-sha1-in-want` (`Tip`,
///   `Reachable`, `Any`). libgit2 refuses every fetch by id without them, even of an
///   advertised tip: "cannot fetch a specific object from the remote repository"
///   (class `Invalid`).
/// - Over `git://` the server enforces the policy: `Tip` refuses a commit that is only
///   reachable. Over HTTP upload-pack is stateless and cannot know what it advertised, so it
///   gives out anything reachable from a ref under `Tip` too (and under `None`, to a client
///   that asks anyway).
/// - Only `Any` gives out objects no ref reaches.
///
/// Protocol v2 (the `git` command-line tool's default) ignores these settings and gives out
/// any object the server has: test policies with `git -c protocol.version=0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WantPolicy {
    /// None of the settings: only advertised ref tips may be wanted.
    None,
    /// `uploadpack.allowTipSHA1InWant`: also tips of refs hidden by `uploadpack.hideRefs`.
    Tip,
    /// `uploadpack.allowReachableSHA1InWant`: any object reachable from a ref.
    Reachable,
    /// `uploadpack.allowAnySHA1InWant`: any object in the repository, even unreachable.
    Any,
}

impl WantPolicy {
    /// Every policy, from the strictest to the most lenient.
    pub const ALL: [WantPolicy; 4] = [
        WantPolicy::None,
        WantPolicy::Tip,
        WantPolicy::Reachable,
        WantPolicy::Any,
    ];

    /// The configuration keys this policy sets to `true` (all others of [`WANT_KEYS`] are
    /// removed).
    fn keys(self) -> &'static [&'static str] {
        match self {
            WantPolicy::None => &[],
            WantPolicy::Tip => &[WANT_KEYS[0]],
            WantPolicy::Reachable => &[WANT_KEYS[1]],
            WantPolicy::Any => &[WANT_KEYS[2]],
        }
    }
}

/// The `upload-pack` settings [`WantPolicy`] controls.
const WANT_KEYS: [&str; 3] = [
    "uploadpack.allowTipSHA1InWant",
    "uploadpack.allowReachableSHA1InWant",
    "uploadpack.allowAnySHA1InWant",
];

/// Creates a bare repository `name` (a relative path such as `alice/hello.git`) under
/// `base_dir` to be served by a [`GitDaemon`](super::GitDaemon) or an
/// [`HttpGitServer`](super::HttpGitServer), and returns its path.
///
/// Its configuration lets clients fetch any commit by id
/// (`uploadpack.allowReachableSHA1InWant` and `uploadpack.allowTipSHA1InWant`), as the
/// engine does, and a `git-daemon-export-ok` file marks it as exported even without
/// `--export-all`. [`served_repo_with`] chooses another [`WantPolicy`].
///
/// # Panics
/// When libgit2 cannot create the repository or write its configuration.
pub fn served_repo(base_dir: &Path, name: &str) -> PathBuf {
    served_repo_keys(base_dir, name, &WANT_KEYS[..2])
}

/// Like [`served_repo`], but the repository's configuration sets exactly the `upload-pack`
/// settings of `want` (the other ones are removed, also from an existing repository).
///
/// # Panics
/// When libgit2 cannot create the repository or write its configuration.
pub fn served_repo_with(base_dir: &Path, name: &str, want: WantPolicy) -> PathBuf {
    served_repo_keys(base_dir, name, want.keys())
}

/// Creates or opens the served repository and sets exactly `keys` of [`WANT_KEYS`].
fn served_repo_keys(base_dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
    let path = base_dir.join(name.trim_start_matches('/'));
    init_bare(&path);
    let repo = open(&path);
    let mut config = repo
        .config()
        .and_then(|c| c.open_level(git2::ConfigLevel::Local))
        .unwrap_or_else(|e| panic!("testkit: config of {}: {e}", path.display()));
    for key in WANT_KEYS {
        let result = if keys.contains(&key) {
            config.set_bool(key, true)
        } else {
            match config.remove(key) {
                Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(()),
                other => other,
            }
        };
        if let Err(e) = result {
            panic!("testkit: cannot set {key} in {}: {e}", path.display());
        }
    }
    if let Err(e) = std::fs::write(path.join("git-daemon-export-ok"), b"") {
        panic!("testkit: cannot mark {} as exported: {e}", path.display());
    }
    path
}

fn open(path: &Path) -> Repository {
    Repository::open_bare(path).unwrap_or_else(|e| {
        panic!(
            "testkit: cannot open bare repository {}: {e}",
            path.display()
        )
    })
}

fn fixed_signature() -> Signature<'static> {
    Signature::new(AUTHOR_NAME, AUTHOR_EMAIL, &Time::new(COMMIT_TIME, 0))
        .expect("the fixed signature is valid")
}

fn oid(o: git2::Oid) -> ObjectId {
    let mut b = [0u8; 20];
    b.copy_from_slice(&o.as_bytes()[..20]);
    ObjectId::from_bytes(b)
}

/// Creates a commit on `branch` (`refs/heads/<branch>`) of the repository at `repo`: its tree
/// is the branch tip's tree (empty for a new branch) with `files` written in (paths may contain
/// `/`; data replaces a file of the same path), its parent is the tip, and author, committer
/// and time are fixed ([`AUTHOR_NAME`], [`AUTHOR_EMAIL`], [`COMMIT_TIME`]).
///
/// Because nothing depends on the wall clock, the same sequence of calls gives the same commit
/// ids in any repository: to put one commit on two mirrors, make the same calls on both (or
/// copy it with [`push_all`]).
///
/// # Panics
/// When libgit2 fails, or a path is empty.
pub fn commit(repo: &Path, branch: &str, files: &[(&str, &[u8])], message: &str) -> ObjectId {
    let fail = |what: &str, e: git2::Error| -> ! {
        panic!(
            "testkit: cannot {what} in {} (branch {branch}): {e}",
            repo.display()
        )
    };
    let r = open(repo);
    let refname = format!("refs/heads/{branch}");
    let parent = match r.find_reference(&refname) {
        Ok(reference) => Some(
            reference
                .peel_to_commit()
                .unwrap_or_else(|e| fail("read the branch tip", e)),
        ),
        Err(e) if e.code() == git2::ErrorCode::NotFound => None,
        Err(e) => fail("read the branch", e),
    };
    let baseline = match &parent {
        Some(c) => c.tree().unwrap_or_else(|e| fail("read the tip's tree", e)),
        None => {
            let empty = r
                .treebuilder(None)
                .and_then(|b| b.write())
                .unwrap_or_else(|e| fail("write the empty tree", e));
            r.find_tree(empty)
                .unwrap_or_else(|e| fail("read the empty tree", e))
        }
    };
    let mut update = git2::build::TreeUpdateBuilder::new();
    for (path, data) in files {
        assert!(!path.is_empty(), "testkit: empty file path");
        let blob = r.blob(data).unwrap_or_else(|e| fail("write a blob", e));
        update.upsert(*path, blob, FileMode::Blob);
    }
    let tree_id = update
        .create_updated(&r, &baseline)
        .unwrap_or_else(|e| fail("write the tree", e));
    let tree = r
        .find_tree(tree_id)
        .unwrap_or_else(|e| fail("read the tree", e));
    let sig = fixed_signature();
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let id = r
        .commit(Some(&refname), &sig, &sig, message, &tree, &parents)
        .unwrap_or_else(|e| fail("write the commit", e));
    oid(id)
}

/// Creates a commit on `branch` (like [`commit`]) that adds the file
/// `large-<seed as 16 hex digits>.bin` holding `size_bytes` incompressible pseudo-random bytes
/// ([`pseudo_random_bytes`] of `seed`), to test size caps: the pack that carries it is about
/// `size_bytes` long. Deterministic like [`commit`]: the same calls give the same ids.
///
/// # Panics
/// When libgit2 fails.
pub fn commit_large(repo: &Path, branch: &str, size_bytes: usize, seed: u64) -> ObjectId {
    let data = pseudo_random_bytes(size_bytes, seed);
    let path = format!("large-{seed:016x}.bin");
    commit(
        repo,
        branch,
        &[(&path, &data)],
        &format!("large blob of {size_bytes} bytes (seed {seed})"),
    )
}

/// `len` pseudo-random bytes, a deterministic function of `seed` (xorshift64*). They do not
/// compress, and a prefix of a longer output is the shorter output.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // Any seed, zero included, gives a non-zero state.
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 0x2545_F491_4F6C_DD1D;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Copies every ref of the repository at `from` (`+refs/*:refs/*`), with the objects they
/// reach, into the repository at `to`, through libgit2's local transport. This is how a test
/// simulates a `git push` to the host or seeds a second mirror.
///
/// # Panics
/// When either repository cannot be opened or the fetch fails.
pub fn push_all(from: &Path, to: &Path) {
    let target = open(to);
    let source = std::fs::canonicalize(from)
        .unwrap_or_else(|e| panic!("testkit: cannot resolve {}: {e}", from.display()));
    let url = source
        .to_str()
        .unwrap_or_else(|| panic!("testkit: path {} is not UTF-8", source.display()));
    let result = target.remote_anonymous(url).and_then(|mut remote| {
        let mut options = git2::FetchOptions::new();
        options
            .download_tags(git2::AutotagOption::None)
            .update_fetchhead(false);
        remote.fetch(&["+refs/*:refs/*"], Some(&mut options), None)
    });
    if let Err(e) = result {
        panic!(
            "testkit: cannot copy refs of {} into {}: {e}",
            from.display(),
            to.display()
        );
    }
}

/// Whether the object `oid` is in the object database of the repository at `repo`.
///
/// # Panics
/// When the repository cannot be opened.
pub fn has_object(repo: &Path, oid: ObjectId) -> bool {
    missing_objects(repo, &[oid]).is_empty()
}

/// The ids among `oids` that `repo`'s object database lacks, in their order (one open of the
/// repository for all of them).
pub fn missing_objects(repo: &Path, oids: &[ObjectId]) -> Vec<ObjectId> {
    let r = open(repo);
    let odb = r
        .odb()
        .unwrap_or_else(|e| panic!("testkit: object database of {}: {e}", repo.display()));
    oids.iter()
        .copied()
        .filter(|o| {
            !odb.exists(git2::Oid::from_bytes(o.as_bytes()).expect("20 bytes is a valid oid"))
        })
        .collect()
}

/// The names of the refs of the repository at `repo` that start with `prefix` (such as
/// [`TEMP_REF_PREFIX`](purgatory_sync::TEMP_REF_PREFIX)), sorted.
///
/// # Panics
/// When the repository cannot be opened or its refs read.
pub fn refs_with_prefix(repo: &Path, prefix: &str) -> Vec<String> {
    let r = open(repo);
    let refs = r
        .references()
        .unwrap_or_else(|e| panic!("testkit: refs of {}: {e}", repo.display()));
    let mut names: Vec<String> = refs
        .filter_map(|reference| reference.ok()?.name().ok().map(str::to_owned))
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("purgatory-testkit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    #[test]
    fn commits_are_deterministic_across_repositories() {
        let dir = scratch("determinism");
        let a = init_bare(&dir.join("a.git"));
        let b = served_repo(&dir.join("served"), "b.git");
        let make = |repo: &Path| {
            let one = commit(repo, "main", &[("README", b"one\n")], "one");
            let two = commit(repo, "main", &[("src/lib.rs", b"two\n")], "two");
            let side = commit(repo, "side", &[("x", b"x")], "side");
            (one, two, side)
        };
        let ids_a = make(&a);
        assert_eq!(ids_a, make(&b));
        assert_ne!(ids_a.0, ids_a.1);
        assert!(has_object(&a, ids_a.1));

        // The second commit keeps the first one's file and has it as parent.
        let r = open(&a);
        let two = r
            .find_commit(git2::Oid::from_bytes(ids_a.1.as_bytes()).unwrap())
            .unwrap();
        assert_eq!(two.parent_count(), 1);
        assert!(two.tree().unwrap().get_path(Path::new("README")).is_ok());
        assert!(two
            .tree()
            .unwrap()
            .get_path(Path::new("src/lib.rs"))
            .is_ok());

        // Copying brings every ref and object.
        let c = init_bare(&dir.join("c.git"));
        assert!(!has_object(&c, ids_a.2));
        push_all(&a, &c);
        assert!(has_object(&c, ids_a.0) && has_object(&c, ids_a.2));
        assert_eq!(
            refs_with_prefix(&c, "refs/heads/"),
            ["refs/heads/main", "refs/heads/side"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn served_repo_with_sets_exactly_the_policy() {
        let dir = scratch("policy");
        let value = |path: &Path, key: &str| -> Option<bool> {
            let config = open(path)
                .config()
                .unwrap()
                .open_level(git2::ConfigLevel::Local);
            config.unwrap().get_bool(key).ok()
        };
        let path = served_repo(&dir, "r.git");
        assert_eq!(value(&path, WANT_KEYS[0]), Some(true));
        assert_eq!(value(&path, WANT_KEYS[1]), Some(true));
        assert_eq!(value(&path, WANT_KEYS[2]), None);
        for policy in WantPolicy::ALL {
            // Applied over the previous policy: nothing of it is left.
            let again = served_repo_with(&dir, "r.git", policy);
            assert_eq!(again, path);
            for key in WANT_KEYS {
                let expected = policy.keys().contains(&key).then_some(true);
                assert_eq!(value(&path, key), expected, "{policy:?} {key}");
            }
        }
        assert!(path.join("git-daemon-export-ok").is_file());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn large_commits_are_deterministic_and_incompressible() {
        let a = pseudo_random_bytes(1000, 7);
        assert_eq!(a.len(), 1000);
        assert_eq!(a, pseudo_random_bytes(1000, 7));
        assert_eq!(a[..10], pseudo_random_bytes(10, 7)[..]);
        assert_ne!(a, pseudo_random_bytes(1000, 8));
        assert!(pseudo_random_bytes(0, 0).is_empty());
        // Every byte value shows up about equally often.
        let sample = pseudo_random_bytes(256 * 64, 0);
        let mut counts = [0u32; 256];
        sample.iter().for_each(|b| counts[usize::from(*b)] += 1);
        assert!(counts.iter().all(|c| (20..=120).contains(c)), "{counts:?}");

        let dir = scratch("large");
        let one = init_bare(&dir.join("one.git"));
        let two = init_bare(&dir.join("two.git"));
        let id = commit_large(&one, "main", 50_000, 42);
        assert_eq!(id, commit_large(&two, "main", 50_000, 42));
        assert_ne!(commit_large(&two, "main", 50_000, 43), id);
        let r = open(&one);
        let commit = r
            .find_commit(git2::Oid::from_bytes(id.as_bytes()).unwrap())
            .unwrap();
        let entry = commit
            .tree()
            .unwrap()
            .get_path(Path::new("large-000000000000002a.bin"))
            .unwrap();
        let blob = r.find_blob(entry.id()).unwrap();
        assert_eq!(blob.content(), &pseudo_random_bytes(50_000, 42)[..]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
