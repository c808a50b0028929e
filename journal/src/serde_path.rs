//! Serialization of paths as strings. Paths in the journal are raw bytes (Linux allows any
//! byte but '/' and NUL in a name); JSON output replaces invalid UTF-8 with U+FFFD rather than
//! failing, since it is for people and tools, never read back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serializer;
use serde::ser::SerializeSeq;

pub(crate) fn path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

pub(crate) fn opt_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_some(&*p.to_string_lossy()),
        None => s.serialize_none(),
    }
}

pub(crate) fn path_set<S: Serializer>(set: &BTreeSet<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(set.len()))?;
    for p in set {
        seq.serialize_element(&*p.to_string_lossy())?;
    }
    seq.end()
}
