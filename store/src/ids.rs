//! Content and pack identifiers: 32-byte newtypes shown as lowercase hex.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! id32 {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lowercase hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, IdParseError> {
                let mut b = [0u8; 32];
                if s.len() != 64 || hex::decode_to_slice(s, &mut b).is_err() {
                    return Err(IdParseError(s.to_string()));
                }
                Ok($name(b))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id32!(
    /// The blake3 hash of a blob's bytes: chunks, tree blobs and list blobs.
    BlobId
);
id32!(
    /// A pack's name: 32 random bytes chosen when the pack is started, so blobs have a
    /// location before the pack is sealed.
    PackId
);

/// A chunk of file content (a blob of kind chunk).
pub type ChunkId = BlobId;
/// A directory tree blob.
pub type TreeId = BlobId;

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a 64-digit hex id")]
pub struct IdParseError(pub String);

impl BlobId {
    /// The id of `bytes`: blake3.
    pub fn of(bytes: &[u8]) -> BlobId {
        BlobId(*blake3::hash(bytes).as_bytes())
    }
}

impl PackId {
    /// A fresh random pack id.
    pub fn random() -> PackId {
        PackId(rand::random())
    }

    /// The pack's object key: `packs/<first 2 hex>/<64 hex>`.
    pub fn key(&self) -> String {
        let h = self.to_hex();
        format!("packs/{}/{}", &h[..2], h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_serde() {
        let id = BlobId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<BlobId>().unwrap(), id);
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<BlobId>(&j).unwrap(), id);
        assert!("zz".parse::<BlobId>().is_err());
        assert!(s[..63].parse::<BlobId>().is_err());
        let p = PackId::random();
        assert!(p.key().starts_with(&format!("packs/{}/", &p.to_hex()[..2])));
        assert_ne!(PackId::random(), p);
    }
}
