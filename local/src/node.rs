//! A node of the cache state: one backing inode's entry in the base generation, encoded as a
//! one-entry tree in the store's canonical encoding (so it carries the store's version and
//! checks).

use anyhow::Context;
use owsfs_store::{Tree, TreeEntry};

/// Encodes a node's entry for the cache state (a one-entry tree, in the store's encoding).
pub fn encode_node(entry: &TreeEntry) -> anyhow::Result<Vec<u8>> {
    let mut e = entry.clone();
    e.name = b"n".to_vec();
    Ok(Tree { entries: vec![e] }.encode()?)
}

pub fn decode_node(bytes: &[u8]) -> anyhow::Result<TreeEntry> {
    let t = Tree::decode("cache state node", bytes)?;
    t.entries
        .into_iter()
        .next()
        .context("cache state node without an entry")
}
