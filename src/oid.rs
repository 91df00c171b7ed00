//! Object ids: exactly 40 hex digits, stored as 20 bytes.
//!
//! libgit2 silently fetches nothing for a short id, so short or malformed ids are refused at
//! the door rather than wasting fetches.

use std::fmt;
use std::str::FromStr;

/// A full SHA-1 git object id.
///
/// ```
/// use purgatory_sync::ObjectId;
///
/// let id: ObjectId = "E92758A50BBF13EA1FE986BBE254A709B0BF741C".parse().unwrap();
/// assert_eq!(id.to_string(), "e92758a50bbf13ea1fe986bbe254a709b0bf741c");
/// assert!("e92758a".parse::<ObjectId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId([u8; 20]);

/// The text was not 40 hexadecimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseObjectIdError;

impl fmt::Display for ParseObjectIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a full object id of 40 hex digits")
    }
}

impl std::error::Error for ParseObjectIdError {}

impl ObjectId {
    /// The id's 20 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// An id from its 20 raw bytes.
    pub fn from_bytes(bytes: [u8; 20]) -> Self {
        ObjectId(bytes)
    }

    pub(crate) fn to_git(self) -> git2::Oid {
        git2::Oid::from_bytes(&self.0).expect("20 bytes is a valid SHA-1 oid")
    }

    #[allow(dead_code)]
    pub(crate) fn from_git(oid: git2::Oid) -> Self {
        let mut b = [0u8; 20];
        b.copy_from_slice(&oid.as_bytes()[..20]);
        ObjectId(b)
    }
}

impl FromStr for ObjectId {
    type Err = ParseObjectIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 40 {
            return Err(ParseObjectIdError);
        }
        let mut out = [0u8; 20];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or(ParseObjectIdError)?;
            let lo = hex_value(pair[1]).ok_or(ParseObjectIdError)?;
            out[i] = hi << 4 | lo;
        }
        Ok(ObjectId(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_lowercases() {
        let s = "0123456789ABCDEFabcdef0123456789abcdef01";
        let id: ObjectId = s.parse().unwrap();
        assert_eq!(id.to_string(), s.to_ascii_lowercase());
        assert_eq!(ObjectId::from_git(id.to_git()), id);
    }

    #[test]
    fn refuses_anything_but_40_hex() {
        for bad in [
            "",
            "abc",
            "0123456789abcdef0123456789abcdef0123456", // 39
            "0123456789abcdef0123456789abcdef012345678", // 41
            "g123456789abcdef0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef0123456 ",
            "é123456789abcdef0123456789abcdef0123456",
        ] {
            assert!(bad.parse::<ObjectId>().is_err(), "{bad:?}");
        }
    }
}
