//! [`PackBuilder`]: git pack files written byte by byte, well-formed or crafted.
//!
//! A hostile server sends packs no real server would: deltas that expand a few bytes into
//! gigabytes, objects whose zlib stream inflates far beyond its size on the wire, lying
//! object counts, entries that are not entries at all. This module writes such packs, and
//! ordinary ones, without going through git.
//!
//! The format is git's `Documentation/gitformat-pack.txt` (man page `gitformat-pack(5)`),
//! section "pack-*.pack files have the following format":
//!
//! - a 12-byte header: `PACK`, the version (2) and the number of entries, both 4-byte
//!   big-endian;
//! - the entries, each a type-and-size header (3-bit type, then the size of the *inflated*
//!   data in 4 + 7·n bits, little-endian groups with a continuation bit: "Size encoding"),
//!   for an `OBJ_OFS_DELTA` the distance back to its base entry ("offset encoding", see
//!   [`PackBuilder::ofs_delta`]), for an `OBJ_REF_DELTA` the base's 20-byte object id, and
//!   then the zlib stream of the object's content or of the delta;
//! - a trailer: the SHA-1 of everything before it.
//!
//! Deltas ("Deltified representation") are the base's size and the result's size (size
//! encoding), then copy and insert instructions: see [`delta`].

use std::io::Write;
use std::path::Path;

use flate2::write::ZlibEncoder;
use flate2::Compression;
use sha1::{Digest, Sha1};

use purgatory_sync::ObjectId;

/// The pack version [`PackBuilder`] writes; git reads 2 and 3 and writes 2.
const PACK_VERSION: u32 = 2;
/// Pack entry type of an `OBJ_OFS_DELTA`.
const OFS_DELTA: u8 = 6;
/// Pack entry type of an `OBJ_REF_DELTA`.
const REF_DELTA: u8 = 7;
/// The largest object [`PackBuilder::content`] materialises when it resolves deltas.
pub const RESOLVE_LIMIT: usize = 64 * 1024 * 1024;
/// The most bytes one copy instruction of [`delta_bomb`] copies: what a copy instruction
/// without size bytes means.
const MAX_BOMB_COPY: u64 = 0x10000;

/// The four object types (`gitformat-pack(5)`, "Object types").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// `OBJ_COMMIT` (1).
    Commit,
    /// `OBJ_TREE` (2).
    Tree,
    /// `OBJ_BLOB` (3).
    Blob,
    /// `OBJ_TAG` (4).
    Tag,
}

impl ObjectKind {
    /// The type's name in object headers (`commit`, `tree`, `blob`, `tag`).
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Commit => "commit",
            ObjectKind::Tree => "tree",
            ObjectKind::Blob => "blob",
            ObjectKind::Tag => "tag",
        }
    }

    /// The type's number in pack entry headers (1 to 4).
    pub fn pack_type(self) -> u8 {
        match self {
            ObjectKind::Commit => 1,
            ObjectKind::Tree => 2,
            ObjectKind::Blob => 3,
            ObjectKind::Tag => 4,
        }
    }

    fn from_git(kind: git2::ObjectType) -> Option<ObjectKind> {
        match kind {
            git2::ObjectType::Commit => Some(ObjectKind::Commit),
            git2::ObjectType::Tree => Some(ObjectKind::Tree),
            git2::ObjectType::Blob => Some(ObjectKind::Blob),
            git2::ObjectType::Tag => Some(ObjectKind::Tag),
            _ => None,
        }
    }
}

/// The git object id of an object: the SHA-1 of `<type> <length>\0<content>`, as
/// `git hash-object` computes it.
pub fn hash_object(kind: ObjectKind, content: &[u8]) -> ObjectId {
    let mut hash = Sha1::new();
    hash.update(format!("{} {}\0", kind.name(), content.len()));
    hash.update(content);
    ObjectId::from_bytes(hash.finalize().into())
}

/// What an entry of a [`PackBuilder`] holds, kept to answer [`PackBuilder::object_id`] and
/// [`PackBuilder::content`].
#[derive(Debug)]
enum Repr {
    Whole {
        kind: ObjectKind,
        content: Vec<u8>,
        id: ObjectId,
    },
    /// A blob of `len` copies of `byte`, never held in memory.
    Filled {
        byte: u8,
        len: u64,
        id: ObjectId,
    },
    OfsDelta {
        base: usize,
        delta: Vec<u8>,
    },
    RefDelta {
        base: ObjectId,
        delta: Vec<u8>,
    },
    /// Bytes appended verbatim; the builder knows nothing of them.
    Raw,
}

/// A git pack (version 2) assembled entry by entry, for servers that hand out crafted data.
///
/// Each method appends one entry and returns its index (0 for the first); entries are
/// compressed as they are added. [`build`](Self::build) adds the header and the SHA-1
/// trailer. Nothing is checked: a delta may name a base that does not exist, copy past its
/// base's end or promise a size it does not produce. The pack is then as broken as asked
/// for, which is the point.
///
/// ```
/// use purgatory_sync_testkit::{delta, ObjectKind, PackBuilder};
///
/// let mut pack = PackBuilder::new();
/// let base = pack.blob(b"hello, world\n");
/// // "hello, world\n" -> "hello, hostile world\n"
/// let mut d = delta::header(13, 21);
/// d.extend(delta::copy(0, 7));
/// d.extend(delta::insert(b"hostile "));
/// d.extend(delta::copy(7, 6));
/// let changed = pack.ofs_delta(base, &d);
/// assert_eq!(
///     pack.content(changed),
///     Some((ObjectKind::Blob, b"hello, hostile world\n".to_vec()))
/// );
/// let bytes = pack.build();
/// assert_eq!(&bytes[..4], b"PACK");
/// ```
#[derive(Debug)]
pub struct PackBuilder {
    /// The entries, without the pack header.
    body: Vec<u8>,
    entries: Vec<(usize, Repr)>,
    declared_count: Option<u32>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        PackBuilder::new()
    }
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder {
            body: Vec::new(),
            entries: Vec::new(),
            declared_count: None,
        }
    }

    /// The number of entries added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The offset in the built pack where the next entry starts (the 12-byte header counts).
    fn next_offset(&self) -> usize {
        12 + self.body.len()
    }

    fn push(&mut self, offset: usize, repr: Repr) -> usize {
        self.entries.push((offset, repr));
        self.entries.len() - 1
    }

    /// Appends a whole (undeltified) object of `kind` with `content`, whatever it holds: a
    /// malformed commit or tree is written as given.
    pub fn object(&mut self, kind: ObjectKind, content: &[u8]) -> usize {
        let offset = self.next_offset();
        self.body
            .extend(entry_header(kind.pack_type(), content.len() as u64));
        self.body.extend(compress(content));
        let id = hash_object(kind, content);
        self.push(
            offset,
            Repr::Whole {
                kind,
                content: content.to_vec(),
                id,
            },
        )
    }

    /// Appends a blob.
    pub fn blob(&mut self, content: &[u8]) -> usize {
        self.object(ObjectKind::Blob, content)
    }

    /// Appends a commit whose raw text (`tree …\nauthor …`) is `content`.
    pub fn commit_raw(&mut self, content: &[u8]) -> usize {
        self.object(ObjectKind::Commit, content)
    }

    /// Appends a blob of `len` copies of `byte` without holding it in memory: it is
    /// compressed and hashed 64 KiB at a time. Zeros compress about a thousandfold, so a
    /// gigabyte blob costs about a megabyte on the wire (a zlib bomb), and some seconds to
    /// build.
    pub fn blob_filled(&mut self, byte: u8, len: u64) -> usize {
        let offset = self.next_offset();
        self.body
            .extend(entry_header(ObjectKind::Blob.pack_type(), len));
        let chunk = vec![byte; 64 * 1024];
        let mut hash = Sha1::new();
        hash.update(format!("blob {len}\0"));
        let mut zlib = ZlibEncoder::new(std::mem::take(&mut self.body), Compression::default());
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            zlib.write_all(&chunk[..n])
                .expect("writing to a Vec does not fail");
            hash.update(&chunk[..n]);
            left -= n as u64;
        }
        self.body = zlib.finish().expect("writing to a Vec does not fail");
        let id = ObjectId::from_bytes(hash.finalize().into());
        self.push(offset, Repr::Filled { byte, len, id })
    }

    /// Appends an `OBJ_OFS_DELTA` entry: `delta` (see [`delta`]) applied to the entry `base`,
    /// which must come earlier in the pack. Its base is named by the distance back from this
    /// entry's start to the base's start, in git's "offset encoding": big-endian groups of 7
    /// bits with a continuation bit, where every group after the first also adds one
    /// (`gitformat-pack(5)`; `encode_in_pack_object_header` and the `dheader` loop in git's
    /// `builtin/pack-objects.c`).
    ///
    /// # Panics
    /// When `base` is not an index of an earlier entry.
    pub fn ofs_delta(&mut self, base: usize, delta: &[u8]) -> usize {
        assert!(
            base < self.entries.len(),
            "testkit: ofs_delta base {base} is not an earlier entry (there are {})",
            self.entries.len()
        );
        let offset = self.next_offset();
        let distance = (offset - self.entries[base].0) as u64;
        self.body
            .extend(entry_header(OFS_DELTA, delta.len() as u64));
        self.body.extend(offset_encoding(distance));
        self.body.extend(compress(delta));
        self.push(
            offset,
            Repr::OfsDelta {
                base,
                delta: delta.to_vec(),
            },
        )
    }

    /// Appends an `OBJ_REF_DELTA` entry: `delta` applied to the object `base`, in this pack
    /// or (a thin pack) in the client's repository.
    pub fn ref_delta(&mut self, base: ObjectId, delta: &[u8]) -> usize {
        let offset = self.next_offset();
        self.body
            .extend(entry_header(REF_DELTA, delta.len() as u64));
        self.body.extend_from_slice(base.as_bytes());
        self.body.extend(compress(delta));
        self.push(
            offset,
            Repr::RefDelta {
                base,
                delta: delta.to_vec(),
            },
        )
    }

    /// Appends `bytes` verbatim as one entry: a hand-made header, a broken zlib stream,
    /// anything. It counts as an entry in the header's object count.
    pub fn raw_entry(&mut self, bytes: &[u8]) -> usize {
        let offset = self.next_offset();
        self.body.extend_from_slice(bytes);
        self.push(offset, Repr::Raw)
    }

    /// Makes the header claim `count` objects instead of the number of entries: a pack
    /// announcing four billion objects, or fewer than it holds.
    pub fn declare_count(&mut self, count: u32) {
        self.declared_count = Some(count);
    }

    /// Appends every object reachable from the commit `tip` in the repository at `repo`
    /// (commits, their trees and blobs, the commits' ancestors) as whole objects, each once,
    /// commits first; returns their ids in pack order. This is how a scripted server gets a
    /// pack of a real commit.
    ///
    /// # Panics
    /// When the repository cannot be opened or an object cannot be read.
    pub fn add_reachable(&mut self, repo: &Path, tip: ObjectId) -> Vec<ObjectId> {
        let fail = |what: &str, e: git2::Error| -> ! {
            panic!("testkit: cannot {what} in {}: {e}", repo.display())
        };
        let r = git2::Repository::open(repo).unwrap_or_else(|e| fail("open the repository", e));
        let odb = r
            .odb()
            .unwrap_or_else(|e| fail("open the object database", e));
        let mut walk = r.revwalk().unwrap_or_else(|e| fail("walk history", e));
        walk.push(git2::Oid::from_bytes(tip.as_bytes()).expect("20 bytes"))
            .unwrap_or_else(|e| fail("start the walk", e));
        let mut order = Vec::new();
        let mut trees = Vec::new();
        for id in walk {
            let id = id.unwrap_or_else(|e| fail("walk history", e));
            let commit = r
                .find_commit(id)
                .unwrap_or_else(|e| fail("read a commit", e));
            order.push(id);
            trees.push(commit.tree_id());
        }
        let mut seen: std::collections::HashSet<git2::Oid> = order.iter().copied().collect();
        // Trees and blobs, each once, breadth first.
        let mut queue: std::collections::VecDeque<git2::Oid> = trees.into();
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id) {
                continue;
            }
            order.push(id);
            let Ok(tree) = r.find_tree(id) else { continue };
            for entry in tree.iter() {
                // Submodule commits are not in this repository.
                if let Some(git2::ObjectType::Tree | git2::ObjectType::Blob) = entry.kind() {
                    queue.push_back(entry.id());
                }
            }
        }
        order
            .into_iter()
            .map(|id| {
                let object = odb.read(id).unwrap_or_else(|e| fail("read an object", e));
                let kind = ObjectKind::from_git(object.kind())
                    .unwrap_or_else(|| panic!("testkit: object {id} has no pack type"));
                let index = self.object(kind, object.data());
                self.object_id(index).expect("whole objects have ids")
            })
            .collect()
    }

    /// The object id of entry `index`: for a whole object, the hash of its content; for a
    /// delta, the hash of the object it resolves to, computed by applying it in memory
    /// (see [`content`](Self::content)). `None` for a raw entry, an index past the end, or a
    /// delta that does not resolve.
    pub fn object_id(&self, index: usize) -> Option<ObjectId> {
        match &self.entries.get(index)?.1 {
            Repr::Whole { id, .. } | Repr::Filled { id, .. } => Some(*id),
            Repr::Raw => None,
            Repr::OfsDelta { .. } | Repr::RefDelta { .. } => {
                let (kind, content) = self.content(index)?;
                Some(hash_object(kind, &content))
            }
        }
    }

    /// The type and content of the object entry `index` stands for. Deltas are applied in
    /// memory, also in chains; a `REF_DELTA` resolves only against objects of this pack.
    /// `None` for a raw entry, an index past the end, a delta that does not apply or whose
    /// base is missing, and any object (a delta bomb's result, a [`blob_filled`] blob) larger
    /// than [`RESOLVE_LIMIT`].
    ///
    /// [`blob_filled`]: Self::blob_filled
    pub fn content(&self, index: usize) -> Option<(ObjectKind, Vec<u8>)> {
        // A chain of deltas is at most as long as the pack: bounds cycles of REF_DELTAs.
        self.resolve(index, self.entries.len())
    }

    fn resolve(&self, index: usize, depth: usize) -> Option<(ObjectKind, Vec<u8>)> {
        let depth = depth.checked_sub(1)?;
        let (base, delta) = match &self.entries.get(index)?.1 {
            Repr::Whole { kind, content, .. } => return Some((*kind, content.clone())),
            Repr::Filled { byte, len, .. } => {
                let len = usize::try_from(*len).ok().filter(|l| *l <= RESOLVE_LIMIT)?;
                return Some((ObjectKind::Blob, vec![*byte; len]));
            }
            Repr::Raw => return None,
            Repr::OfsDelta { base, delta } => (*base, delta),
            Repr::RefDelta { base, delta } => {
                // Only entries whose id is known without resolving this one.
                let base = (0..self.entries.len())
                    .filter(|i| *i != index)
                    .find(|i| self.known_id(*i, depth) == Some(*base))?;
                (base, delta)
            }
        };
        let (kind, base) = self.resolve(base, depth)?;
        Some((kind, delta::apply(&base, delta, RESOLVE_LIMIT)?))
    }

    /// The id of entry `index` if it can be had within `depth` resolutions.
    fn known_id(&self, index: usize, depth: usize) -> Option<ObjectId> {
        match &self.entries.get(index)?.1 {
            Repr::Whole { id, .. } | Repr::Filled { id, .. } => Some(*id),
            Repr::Raw => None,
            _ => {
                let (kind, content) = self.resolve(index, depth)?;
                Some(hash_object(kind, &content))
            }
        }
    }

    /// The pack: header (with the declared count, if any), entries, SHA-1 trailer.
    pub fn build(&self) -> Vec<u8> {
        let count = self
            .declared_count
            .unwrap_or_else(|| u32::try_from(self.entries.len()).unwrap_or(u32::MAX));
        let mut pack = Vec::with_capacity(12 + self.body.len() + 20);
        pack.extend_from_slice(b"PACK");
        pack.extend_from_slice(&PACK_VERSION.to_be_bytes());
        pack.extend_from_slice(&count.to_be_bytes());
        pack.extend_from_slice(&self.body);
        let trailer: [u8; 20] = Sha1::digest(&pack).into();
        pack.extend_from_slice(&trailer);
        pack
    }
}

/// zlib stream of `data` at the default level.
fn compress(data: &[u8]) -> Vec<u8> {
    let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
    zlib.write_all(data)
        .expect("writing to a Vec does not fail");
    zlib.finish().expect("writing to a Vec does not fail")
}

/// A pack entry's type-and-size header: type in bits 6-4 of the first byte, the size's low 4
/// bits below it, then 7 bits a byte, least significant first, each byte but the last with
/// its top bit set.
fn entry_header(pack_type: u8, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    let mut byte = (pack_type & 7) << 4 | (size & 0x0f) as u8;
    let mut rest = size >> 4;
    while rest != 0 {
        out.push(byte | 0x80);
        byte = (rest & 0x7f) as u8;
        rest >>= 7;
    }
    out.push(byte);
    out
}

/// git's offset encoding of an `OBJ_OFS_DELTA`'s distance to its base.
fn offset_encoding(mut distance: u64) -> Vec<u8> {
    let mut out = vec![(distance & 0x7f) as u8];
    distance >>= 7;
    while distance != 0 {
        distance -= 1;
        out.push(0x80 | (distance & 0x7f) as u8);
        distance >>= 7;
    }
    out.reverse();
    out
}

/// A delta that rebuilds its base repeated until `result_len` bytes: `base_len` and
/// `result_len` in its header, then copy instructions, each copying at most 64 KiB
/// (`0x10000`, the size a copy instruction without size bytes stands for) of the base from
/// its start, and a last one for the remainder.
///
/// With a base of 64 KiB or more every instruction is one to three bytes, so a delta of
/// 16 KiB expands to a gigabyte; smaller bases need one instruction per `base_len` bytes of
/// result (a 1-byte base makes the delta about as long as its result). The delta is valid:
/// a client that applies it without a size cap produces `result_len` bytes.
///
/// # Panics
/// When `base_len` is 0 and `result_len` is not, or `base_len` exceeds 4 GiB (copy offsets
/// have 32 bits).
pub fn delta_bomb(base_len: u64, result_len: u64) -> Vec<u8> {
    assert!(
        base_len > 0 || result_len == 0,
        "testkit: a delta cannot copy from an empty base"
    );
    assert!(
        base_len <= 1 << 32,
        "testkit: copy offsets have 32 bits: base of {base_len} bytes"
    );
    let mut out = delta::header(base_len, result_len);
    let mut written = 0u64;
    let mut at = 0u64;
    while written < result_len {
        if at == base_len {
            at = 0;
        }
        let len = MAX_BOMB_COPY.min(base_len - at).min(result_len - written);
        let offset = u32::try_from(at).expect("offsets of a base up to 4 GiB fit");
        out.extend(delta::copy(offset, len as u32));
        at += len;
        written += len;
    }
    out
}

/// Encoders of git's delta format (`gitformat-pack(5)`, "Deltified representation") to write
/// deltas by hand, and [`apply`](delta::apply) to check them.
///
/// A delta is [`header`](delta::header) followed by instructions; an instruction either
/// copies a range of the base ([`copy`](delta::copy)) or inserts literal bytes
/// ([`insert`](delta::insert)). The byte `0x00` is a reserved instruction that git rejects:
/// push it by hand to test that.
pub mod delta {
    /// The delta header: the base's size and the result's size, each in git's size encoding
    /// (little-endian groups of 7 bits, the top bit set on every byte but the last).
    pub fn header(base_size: u64, result_size: u64) -> Vec<u8> {
        let mut out = varint(base_size);
        out.extend(varint(result_size));
        out
    }

    fn varint(mut n: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(10);
        while n >= 0x80 {
            out.push(0x80 | (n & 0x7f) as u8);
            n >>= 7;
        }
        out.push(n as u8);
        out
    }

    /// A copy instruction: `len` bytes of the base from `offset`. The first byte is `0x80`
    /// with one bit per offset byte (`0x01`…`0x08`) and size byte (`0x10`…`0x40`) that
    /// follows; zero bytes are left out. A size of `0x10000` is written with no size byte at
    /// all, which is what a missing size means, so `copy(0, 0x10000)` is the single byte
    /// `0x80`.
    ///
    /// # Panics
    /// When `len` is 0 or more than `0xFF_FFFF` (three size bytes): no copy instruction says
    /// that.
    pub fn copy(offset: u32, len: u32) -> Vec<u8> {
        assert!(
            (1..=0xFF_FFFF).contains(&len),
            "testkit: a copy instruction copies 1 to 0xFFFFFF bytes, not {len}"
        );
        let mut out = vec![0x80u8];
        for (i, byte) in offset.to_le_bytes().into_iter().enumerate() {
            if byte != 0 {
                out[0] |= 1 << i;
                out.push(byte);
            }
        }
        if len != 0x10000 {
            for (i, byte) in len.to_le_bytes().into_iter().take(3).enumerate() {
                if byte != 0 {
                    out[0] |= 0x10 << i;
                    out.push(byte);
                }
            }
        }
        out
    }

    /// Insert instructions for `bytes`: one per 127 bytes, each its length (1 to 127) and
    /// the bytes. Nothing for an empty slice.
    pub fn insert(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 127 + 1);
        for chunk in bytes.chunks(0x7f) {
            out.push(chunk.len() as u8);
            out.extend_from_slice(chunk);
        }
        out
    }

    /// Applies `delta` to `base` as git's `patch-delta.c` does, with its checks: the header's
    /// base size must be `base.len()`, copies must stay inside the base, and the result must
    /// have the header's size. `None` when a check fails, on the reserved instruction, or
    /// when the header's result size exceeds `limit` (checked before anything is allocated:
    /// a delta bomb costs nothing here).
    pub fn apply(base: &[u8], delta: &[u8], limit: usize) -> Option<Vec<u8>> {
        let mut at = 0usize;
        let mut read_varint = || -> Option<u64> {
            let mut n = 0u64;
            for shift in (0..64).step_by(7) {
                let byte = *delta.get(at)?;
                at += 1;
                n |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Some(n);
                }
            }
            None
        };
        let base_size = read_varint()?;
        let result_size = read_varint()?;
        if base_size != base.len() as u64 {
            return None;
        }
        let result_size = usize::try_from(result_size).ok().filter(|n| *n <= limit)?;
        let mut out = Vec::with_capacity(result_size);
        while at < delta.len() {
            let cmd = delta[at];
            at += 1;
            if cmd & 0x80 != 0 {
                let mut offset = 0usize;
                let mut len = 0usize;
                for i in 0..4 {
                    if cmd & (1 << i) != 0 {
                        offset |= usize::from(*delta.get(at)?) << (8 * i);
                        at += 1;
                    }
                }
                for i in 0..3 {
                    if cmd & (0x10 << i) != 0 {
                        len |= usize::from(*delta.get(at)?) << (8 * i);
                        at += 1;
                    }
                }
                if len == 0 {
                    len = 0x10000;
                }
                let end = offset.checked_add(len)?;
                if end > base.len() || out.len() + len > result_size {
                    return None;
                }
                out.extend_from_slice(&base[offset..end]);
            } else if cmd != 0 {
                let len = usize::from(cmd);
                let data = delta.get(at..at + len)?;
                if out.len() + len > result_size {
                    return None;
                }
                out.extend_from_slice(data);
                at += len;
            } else {
                return None;
            }
        }
        (out.len() == result_size).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{git_command, require_git};
    use std::path::PathBuf;
    use std::process::Stdio;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("purgatory-testkit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    #[test]
    fn headers_and_offsets_are_encoded_as_git_does() {
        // Type 3 (blob), size 5: one byte.
        assert_eq!(entry_header(3, 5), [0x35]);
        // Size 100 = 0b110_0100: low nibble 4, then 6.
        assert_eq!(entry_header(1, 100), [0x94, 0x06]);
        assert_eq!(entry_header(7, 0), [0x70]);
        // Offset encoding (git's `dheader` loop): 127 is one byte, 128 is [0x80, 0x00].
        assert_eq!(offset_encoding(1), [0x01]);
        assert_eq!(offset_encoding(127), [0x7f]);
        assert_eq!(offset_encoding(128), [0x80, 0x00]);
        assert_eq!(offset_encoding(16511), [0xff, 0x7f]);
        assert_eq!(offset_encoding(16512), [0x80, 0x80, 0x00]);
        // Delta encoders.
        assert_eq!(delta::header(13, 300), [13, 0xac, 0x02]);
        assert_eq!(delta::copy(0, 0x10000), [0x80]);
        assert_eq!(
            delta::copy(0x0102, 0x10),
            [0x80 | 0x03 | 0x10, 0x02, 0x01, 0x10]
        );
        assert_eq!(
            delta::copy(0x0300_0000, 0x01_0001),
            [0x80 | 0x08 | 0x10 | 0x40, 3, 1, 1]
        );
        assert_eq!(delta::insert(b""), Vec::<u8>::new());
        let long = delta::insert(&[7; 130]);
        assert_eq!((long.len(), long[0], long[128]), (132, 127, 3));
        // Known id: `git hash-object` of "hello\n" and of the empty tree.
        assert_eq!(
            hash_object(ObjectKind::Blob, b"hello\n").to_string(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            hash_object(ObjectKind::Tree, b"").to_string(),
            "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
        );
    }

    #[test]
    fn deltas_apply_and_bombs_stay_small() {
        let base = b"0123456789";
        let mut d = delta::header(10, 7);
        d.extend(delta::copy(8, 2));
        d.extend(delta::insert(b"ab"));
        d.extend(delta::copy(0, 3));
        assert_eq!(delta::apply(base, &d, 100).unwrap(), b"89ab012");
        // Wrong base size, copy past the end, short result, reserved opcode, over the limit.
        assert!(delta::apply(b"012345678", &d, 100).is_none());
        let mut bad = delta::header(10, 3);
        bad.extend(delta::copy(9, 3));
        assert!(delta::apply(base, &bad, 100).is_none());
        let mut short = delta::header(10, 5);
        short.extend(delta::copy(0, 3));
        assert!(delta::apply(base, &short, 100).is_none());
        let mut reserved = delta::header(10, 1);
        reserved.push(0);
        assert!(delta::apply(base, &reserved, 100).is_none());
        assert!(delta::apply(base, &d, 6).is_none());

        let bomb = delta_bomb(10, 1005);
        let out = delta::apply(base, &bomb, 2000).unwrap();
        assert_eq!(out.len(), 1005);
        assert!(out.chunks(10).all(|c| c == &base[..c.len()]));
        // A 64 KiB base: one byte per 64 KiB of result.
        let bomb = delta_bomb(0x10000, 1 << 30);
        assert_eq!(
            bomb.len(),
            delta::header(0x10000, 1 << 30).len() + (1 << 14)
        );
        assert!(delta::apply(&[0; 0x10000], &bomb, RESOLVE_LIMIT).is_none());
        // A base larger than 64 KiB is copied in pieces.
        let big: Vec<u8> = (0..0x18000u32).map(|i| (i % 251) as u8).collect();
        let bomb = delta_bomb(big.len() as u64, 0x40000);
        let out = delta::apply(&big, &bomb, 0x40000).unwrap();
        assert_eq!(&out[..big.len()], &big[..]);
        assert_eq!(&out[big.len()..2 * big.len()], &big[..]);
    }

    /// A blob, a tree holding it, a commit of the tree, an OFS_DELTA and a REF_DELTA on the
    /// blob, and a filled blob; with the ids and contents each should have.
    fn sample() -> (PackBuilder, Vec<(ObjectId, ObjectKind, Vec<u8>)>) {
        let mut pack = PackBuilder::new();
        let text = b"The quick brown fox jumps over the lazy dog.\n".repeat(20);
        let blob = pack.blob(&text);
        let blob_id = pack.object_id(blob).unwrap();
        let mut tree = b"100644 fox.txt\0".to_vec();
        tree.extend_from_slice(blob_id.as_bytes());
        let tree_index = pack.object(ObjectKind::Tree, &tree);
        let tree_id = pack.object_id(tree_index).unwrap();
        let commit = format!(
            "tree {tree_id}\nauthor A U Thor <a@example.invalid> 1700000000 +0000\n\
             committer A U Thor <a@example.invalid> 1700000000 +0000\n\nfox\n"
        );
        let commit_index = pack.commit_raw(commit.as_bytes());

        let mut ofs = delta::header(text.len() as u64, 45 + 6);
        ofs.extend(delta::copy(0, 45));
        ofs.extend(delta::insert(b"again\n"));
        let ofs_index = pack.ofs_delta(blob, &ofs);
        let mut refd = delta::header(text.len() as u64, 9);
        refd.extend(delta::copy(4, 5));
        refd.extend(delta::insert(b"cat\n"));
        let ref_index = pack.ref_delta(blob_id, &refd);
        let filled = pack.blob_filled(0, 100_000);

        let mut expected = vec![
            (blob_id, ObjectKind::Blob, text.clone()),
            (tree_id, ObjectKind::Tree, tree),
            (
                pack.object_id(commit_index).unwrap(),
                ObjectKind::Commit,
                commit.into_bytes(),
            ),
        ];
        let mut fox_again = text[..45].to_vec();
        fox_again.extend_from_slice(b"again\n");
        expected.push((
            hash_object(ObjectKind::Blob, &fox_again),
            ObjectKind::Blob,
            fox_again,
        ));
        expected.push((
            hash_object(ObjectKind::Blob, b"quickcat\n"),
            ObjectKind::Blob,
            b"quickcat\n".to_vec(),
        ));
        expected.push((
            hash_object(ObjectKind::Blob, &[0; 100_000]),
            ObjectKind::Blob,
            vec![0; 100_000],
        ));
        for (index, (id, kind, content)) in
            [blob, tree_index, commit_index, ofs_index, ref_index, filled]
                .into_iter()
                .zip(&expected)
        {
            assert_eq!(pack.object_id(index), Some(*id), "entry {index}");
            assert_eq!(pack.content(index), Some((*kind, content.clone())));
        }
        (pack, expected)
    }

    #[test]
    fn packs_are_indexed_by_libgit2() {
        let dir = scratch("pack-libgit2");
        let (pack, expected) = sample();
        let bytes = pack.build();
        assert_eq!(&bytes[..12], b"PACK\0\0\0\x02\0\0\0\x06");

        // Through the object database's pack writer, into a repository.
        let repo = git2::Repository::init_bare(dir.join("r.git")).unwrap();
        let odb = repo.odb().unwrap();
        let mut writer = odb.packwriter().unwrap();
        writer.write_all(&bytes).unwrap();
        writer.commit().unwrap();
        for (id, kind, content) in &expected {
            let object = odb
                .read(git2::Oid::from_bytes(id.as_bytes()).unwrap())
                .unwrap();
            assert_eq!(ObjectKind::from_git(object.kind()), Some(*kind), "{id}");
            assert_eq!(object.data(), &content[..], "{id}");
        }

        // Through the indexer, verifying connectivity, into a directory.
        let out = dir.join("indexed");
        std::fs::create_dir_all(&out).unwrap();
        let mut indexer = git2::Indexer::new(Some(&odb), &out, 0o644, true).unwrap();
        indexer.write_all(&bytes).unwrap();
        let name = indexer.commit().unwrap();
        assert!(out.join(format!("pack-{name}.idx")).is_file());

        // A corrupt trailer is refused.
        let mut corrupt = bytes.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        let other = git2::Repository::init_bare(dir.join("o.git")).unwrap();
        let odb = other.odb().unwrap();
        let mut writer = odb.packwriter().unwrap();
        let refused = writer
            .write_all(&corrupt)
            .map_err(|e| e.to_string())
            .and_then(|()| writer.commit().map(drop).map_err(|e| e.to_string()));
        assert!(refused.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn packs_are_indexed_by_git() {
        require_git();
        let dir = scratch("pack-git");
        let (pack, expected) = sample();
        let bytes = pack.build();
        let repo = dir.join("r.git");
        let status = git_command()
            .args(["init", "--quiet", "--bare"])
            .arg(&repo)
            .status()
            .unwrap();
        assert!(status.success());
        let mut index = git_command()
            .arg("-C")
            .arg(&repo)
            .args(["index-pack", "--stdin", "--strict"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        index.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = index.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "git index-pack: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (id, kind, content) in &expected {
            let out = git_command()
                .arg("-C")
                .arg(&repo)
                .args(["cat-file", kind.name(), &id.to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(&out.stdout, content, "{id}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reachable_objects_and_crafted_entries() {
        let dir = scratch("pack-reachable");
        let repo = crate::init_bare(&dir.join("src.git"));
        crate::commit(&repo, "main", &[("a/b.txt", b"b\n")], "one");
        let tip = crate::commit(&repo, "main", &[("c.txt", b"c\n")], "two");
        let mut pack = PackBuilder::new();
        let ids = pack.add_reachable(&repo, tip);
        // Two commits, three trees (two roots and `a`; `a` is shared), two blobs.
        assert_eq!(ids.len(), 7, "{ids:?}");
        assert_eq!(ids[0], tip);
        let target = git2::Repository::init_bare(dir.join("t.git")).unwrap();
        let odb = target.odb().unwrap();
        let mut writer = odb.packwriter().unwrap();
        writer.write_all(&pack.build()).unwrap();
        writer.commit().unwrap();
        assert!(ids
            .iter()
            .all(|id| odb.exists(git2::Oid::from_bytes(id.as_bytes()).unwrap())));

        // Raw entries and a lying count are written as asked; they have no ids.
        let mut crafted = PackBuilder::new();
        let raw = crafted.raw_entry(&[0x35, 0x78]);
        crafted.declare_count(u32::MAX);
        assert_eq!(crafted.object_id(raw), None);
        assert_eq!(crafted.object_id(raw + 1), None);
        let bytes = crafted.build();
        assert_eq!(&bytes[8..14], &[0xff, 0xff, 0xff, 0xff, 0x35, 0x78]);
        assert_eq!(bytes.len(), 12 + 2 + 20);
        // A REF_DELTA on an object outside the pack does not resolve.
        let thin = crafted.ref_delta(tip, &delta::insert(b"x"));
        assert_eq!(crafted.object_id(thin), None);
        // Nor does a bomb, without allocating its result.
        let base = crafted.blob(&[1; 0x10000]);
        let bomb = crafted.ofs_delta(base, &delta_bomb(0x10000, 1 << 34));
        assert_eq!(crafted.content(bomb), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Packs crafted to expand when a client resolves their deltas: what a hostile server sends to
/// make a fetch cost memory and time after its last byte. Each holds a 64 KiB pseudo-random
/// blob (seeded by `seed`) and deltas built on it.
pub mod bombs {
    use super::{delta, delta_bomb, PackBuilder};

    const BASE: u64 = 64 * 1024;

    fn base(pack: &mut PackBuilder, seed: u64) -> usize {
        pack.blob(&crate::pseudo_random_bytes(BASE as usize, seed))
    }

    /// One delta repeating the blob `result` bytes long (16 KiB of delta per GiB; the pack is
    /// about 80 KB for 1 GiB).
    pub fn one(result: u64, seed: u64) -> Vec<u8> {
        let mut pack = PackBuilder::new();
        let b = base(&mut pack, seed);
        pack.ofs_delta(b, &delta_bomb(BASE, result));
        pack.build()
    }

    /// A delta repeating the blob 1 GiB long, and a second one repeating that result 1 GiB
    /// long again (about 130 KB): resolving the second builds both.
    pub fn chained(seed: u64) -> Vec<u8> {
        let mut pack = PackBuilder::new();
        let b = base(&mut pack, seed);
        let first = pack.ofs_delta(b, &delta_bomb(BASE, 1 << 30));
        pack.ofs_delta(first, &delta_bomb(1 << 30, 1 << 30));
        pack.build()
    }

    /// `count` deltas on the blob, each repeating it to just under `size` bytes (a multiple of
    /// 64 KiB, less 64 KiB). With `distinct`, each result ends in its own 4 bytes, so each is
    /// its own object; without, every result is the same object, which libgit2 1.9 then leaks
    /// once per duplicate.
    pub fn many(count: u32, size: u64, distinct: bool, seed: u64) -> Vec<u8> {
        let mut pack = PackBuilder::new();
        let b = base(&mut pack, seed);
        let repeat = (size / BASE).saturating_sub(1) as u32;
        for i in 0..count {
            let tail = if distinct {
                i.to_be_bytes().to_vec()
            } else {
                Vec::new()
            };
            let result = u64::from(repeat) * BASE + tail.len() as u64;
            let mut d = delta::header(BASE, result);
            for _ in 0..repeat {
                d.extend(delta::copy(0, 0x10000));
            }
            if !tail.is_empty() {
                d.extend(delta::insert(&tail));
            }
            pack.ofs_delta(b, &d);
        }
        pack.build()
    }
}
