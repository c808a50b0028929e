//! Directory tree blobs and file chunk lists, with canonical binary encodings (layout in
//! `FORMAT.md`). A tree's id is the blake3 of its encoding, so equal directories have equal
//! ids and unchanged subtrees are shared. Decoding accepts only the canonical encoding: the
//! encoding of a decoded tree is byte-identical to its input.

use bytes::Bytes;

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::ids::{BlobId, TreeId};
use crate::pack::{BlobKind, BlobRef, Codec, PackWriter, read_blob};

pub const TREE_MAGIC: &[u8; 8] = b"OWSTREE\0";
pub const LIST_MAGIC: &[u8; 8] = b"OWSLIST\0";
/// The newest tree version: 2 when a ref in it names a compressed blob (its refs then
/// carry the stored length and the codec), else 1, byte for byte what earlier versions wrote.
pub const TREE_VERSION: u16 = 2;
/// The newest list version, chosen like a tree's.
pub const LIST_VERSION: u16 = 2;
/// Bytes of a ref in a version 1 tree or list: id, pack, offset, len.
pub const REF_LEN_V1: usize = 76;
/// Bytes of a ref in a version 2 tree or list: id, pack, offset, len, stored, codec.
pub const REF_LEN_V2: usize = 81;
/// Files with more chunks than this keep their chunk refs in list blobs.
pub const MAX_INLINE_CHUNKS: usize = 64;
/// Most chunk refs in one list blob.
pub const MAX_LIST_REFS: usize = 1024;
/// Longest entry name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// The permission, setid and sticky bits a mode may hold.
pub const MODE_MASK: u32 = 0o7777;

/// The kind of a directory entry (serialized for `owsfs diff --json` as `file`, `dir`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    CharDev = 5,
    BlockDev = 6,
    Socket = 7,
}

impl NodeKind {
    fn from_u8(b: u8) -> Option<NodeKind> {
        Some(match b {
            1 => NodeKind::File,
            2 => NodeKind::Dir,
            3 => NodeKind::Symlink,
            4 => NodeKind::Fifo,
            5 => NodeKind::CharDev,
            6 => NodeKind::BlockDev,
            7 => NodeKind::Socket,
            _ => return None,
        })
    }
}

/// A group of chunk refs in a list blob, and how many file bytes they cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListRef {
    pub blob: BlobRef,
    pub covered: u64,
}

/// The content of a regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileContent {
    Empty,
    /// At most [`MAX_INLINE_CHUNKS`] chunks, in file order.
    Chunks(Vec<BlobRef>),
    /// More chunks, grouped in list blobs.
    List(Vec<ListRef>),
}

/// What an entry holds besides its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Fifos, sockets and device nodes.
    None,
    File(FileContent),
    Dir(BlobRef),
    Symlink(Vec<u8>),
}

impl Content {
    /// The blob refs the entry holds (a subtree, chunks, or list blobs).
    pub fn refs(&self) -> impl Iterator<Item = &BlobRef> {
        let (one, many, lists): (Option<&BlobRef>, &[BlobRef], &[ListRef]) = match self {
            Content::Dir(r) => (Some(r), &[], &[]),
            Content::File(FileContent::Chunks(c)) => (None, c, &[]),
            Content::File(FileContent::List(l)) => (None, &[], l),
            _ => (None, &[], &[]),
        };
        one.into_iter()
            .chain(many)
            .chain(lists.iter().map(|l| &l.blob))
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry {
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission, setid and sticky bits (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// File bytes; symlink target length; 0 for the rest.
    pub size: u64,
    /// Device number of character and block devices, else 0.
    pub rdev: u64,
    /// 0 unless the file has several hard links; entries of one generation with the same
    /// non-zero key are one inode.
    pub link_key: u64,
    /// Sorted by name, names unique and non-empty.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content: Content,
}

/// A directory: entries sorted by name bytes, unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

/// A chunk of a file and the file offset where it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    pub r: BlobRef,
    pub offset: u64,
}

impl ChunkSpan {
    pub fn end(&self) -> u64 {
        self.offset + self.r.len as u64
    }
}

/// Something that fetches verified blobs (the store, or a local cache in front of it).
pub trait BlobLoader {
    fn load(&self, r: &BlobRef) -> Result<Bytes>;
}

impl BlobLoader for Store {
    fn load(&self, r: &BlobRef) -> Result<Bytes> {
        read_blob(self, r)
    }
}

/// Checks an entry name: 1..=1024 bytes, no '/', no NUL, not "." or "..".
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != b"."
        && name != b".."
        && !name.iter().any(|&c| c == b'/' || c == 0)
}

/// The version a tree or list holding `refs` is written in: 1 unless a ref needs 2.
fn version_for<'a>(mut refs: impl Iterator<Item = &'a BlobRef>) -> u16 {
    if refs.any(|r| !r.codec.is_none()) {
        2
    } else {
        1
    }
}

fn put_ref(out: &mut Vec<u8>, version: u16, r: &BlobRef) {
    out.extend_from_slice(r.id.as_bytes());
    out.extend_from_slice(r.pack.as_bytes());
    out.extend_from_slice(&r.offset.to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
    if version >= 2 {
        out.extend_from_slice(&r.stored.to_le_bytes());
        out.push(r.codec as u8);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    object: &'a str,
    /// The version of the blob being read (refs are longer from version 2).
    version: u16,
}

impl<'a> Reader<'a> {
    fn bad(&self, what: impl Into<String>) -> StoreError {
        StoreError::corrupt(
            self.object,
            format!("{} (at byte {})", what.into(), self.at),
        )
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(self.bad("truncated"));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn id(&mut self) -> Result<[u8; 32]> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn blob_ref(&mut self) -> Result<BlobRef> {
        let r = BlobRef::plain(
            BlobId(self.id()?),
            crate::ids::PackId(self.id()?),
            self.u64()?,
            self.u32()?,
        );
        if self.version < 2 {
            return Ok(r);
        }
        let stored = self.u32()?;
        let c = self.u8()?;
        let codec = Codec::from_u8(c).ok_or_else(|| self.bad(format!("unknown codec {c}")))?;
        if codec.is_none() && stored != r.len {
            return Err(self.bad(format!(
                "a plain blob of {} bytes stored as {stored}",
                r.len
            )));
        }
        Ok(BlobRef { stored, codec, ..r })
    }

    /// Reads the version after the magic; `newest` is the newest this build reads.
    fn version(&mut self, newest: u16) -> Result<u16> {
        let v = self.u16()?;
        if v == 0 || v > newest {
            return Err(StoreError::UnsupportedVersion {
                object: self.object.into(),
                found: v as u64,
                supported: newest as u64,
            });
        }
        self.version = v;
        Ok(v)
    }
    fn done(&self) -> Result<()> {
        if self.at != self.b.len() {
            return Err(self.bad("trailing bytes"));
        }
        Ok(())
    }
}

fn check_entry(e: &TreeEntry) -> std::result::Result<(), String> {
    let name = String::from_utf8_lossy(&e.name);
    if !valid_name(&e.name) {
        return Err(format!("invalid entry name {name:?}"));
    }
    if e.mode & !MODE_MASK != 0 {
        return Err(format!(
            "{name:?}: mode {:o} has bits outside 07777",
            e.mode
        ));
    }
    if e.mtime_nsec >= 1_000_000_000 {
        return Err(format!("{name:?}: nanoseconds out of range"));
    }
    let is_dev = matches!(e.kind, NodeKind::CharDev | NodeKind::BlockDev);
    if !is_dev && e.rdev != 0 {
        return Err(format!("{name:?}: rdev on a non-device"));
    }
    if e.link_key != 0 && matches!(e.kind, NodeKind::Dir) {
        return Err(format!("{name:?}: a directory cannot have a link key"));
    }
    for w in e.xattrs.windows(2) {
        if w[0].0 >= w[1].0 {
            return Err(format!("{name:?}: xattrs not strictly sorted"));
        }
    }
    if e.xattrs
        .iter()
        .any(|(n, _)| n.is_empty() || n.len() > 0xffff)
    {
        return Err(format!("{name:?}: bad xattr name"));
    }
    match (&e.kind, &e.content) {
        (NodeKind::File, Content::File(fc)) => match fc {
            FileContent::Empty if e.size == 0 => Ok(()),
            FileContent::Empty => Err(format!("{name:?}: empty content but size {}", e.size)),
            FileContent::Chunks(c) => {
                if c.is_empty() || c.len() > MAX_INLINE_CHUNKS {
                    return Err(format!("{name:?}: {} inline chunks", c.len()));
                }
                let sum: u64 = c.iter().map(|r| r.len as u64).sum();
                if sum != e.size || c.iter().any(|r| r.len == 0) {
                    return Err(format!(
                        "{name:?}: chunks cover {sum} bytes, size {}",
                        e.size
                    ));
                }
                Ok(())
            }
            FileContent::List(l) => {
                let sum: u64 = l.iter().map(|r| r.covered).sum();
                if l.is_empty() || sum != e.size || l.iter().any(|r| r.covered == 0) {
                    return Err(format!(
                        "{name:?}: lists cover {sum} bytes, size {}",
                        e.size
                    ));
                }
                Ok(())
            }
        },
        (NodeKind::Dir, Content::Dir(_)) if e.size == 0 => Ok(()),
        (NodeKind::Symlink, Content::Symlink(t)) if e.size == t.len() as u64 && !t.is_empty() => {
            Ok(())
        }
        (
            NodeKind::Fifo | NodeKind::CharDev | NodeKind::BlockDev | NodeKind::Socket,
            Content::None,
        ) if e.size == 0 => Ok(()),
        _ => Err(format!(
            "{name:?}: content or size does not match kind {:?}",
            e.kind
        )),
    }
}

impl Tree {
    /// Checks the canonical-form rules.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for w in self.entries.windows(2) {
            if w[0].name >= w[1].name {
                return Err(format!(
                    "entries not strictly sorted at {:?}",
                    String::from_utf8_lossy(&w[1].name)
                ));
            }
        }
        self.entries.iter().try_for_each(check_entry)
    }

    /// Canonical encoding; fails if the tree breaks a rule.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()
            .map_err(|m| StoreError::Invalid(format!("cannot encode tree: {m}")))?;
        let mut o = Vec::with_capacity(64 + self.entries.len() * 128);
        let version = version_for(self.entries.iter().flat_map(|e| e.content.refs()));
        o.extend_from_slice(TREE_MAGIC);
        o.extend_from_slice(&version.to_le_bytes());
        o.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            o.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            o.extend_from_slice(&e.name);
            o.push(e.kind as u8);
            o.extend_from_slice(&e.mode.to_le_bytes());
            o.extend_from_slice(&e.uid.to_le_bytes());
            o.extend_from_slice(&e.gid.to_le_bytes());
            o.extend_from_slice(&e.mtime_sec.to_le_bytes());
            o.extend_from_slice(&e.mtime_nsec.to_le_bytes());
            o.extend_from_slice(&e.size.to_le_bytes());
            o.extend_from_slice(&e.rdev.to_le_bytes());
            o.extend_from_slice(&e.link_key.to_le_bytes());
            o.extend_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
            for (n, v) in &e.xattrs {
                o.extend_from_slice(&(n.len() as u16).to_le_bytes());
                o.extend_from_slice(n);
                o.extend_from_slice(&(v.len() as u32).to_le_bytes());
                o.extend_from_slice(v);
            }
            match &e.content {
                Content::None => {}
                Content::Dir(r) => put_ref(&mut o, version, r),
                Content::Symlink(t) => {
                    o.extend_from_slice(&(t.len() as u32).to_le_bytes());
                    o.extend_from_slice(t);
                }
                Content::File(FileContent::Empty) => o.push(0),
                Content::File(FileContent::Chunks(c)) => {
                    o.push(1);
                    o.extend_from_slice(&(c.len() as u32).to_le_bytes());
                    c.iter().for_each(|r| put_ref(&mut o, version, r));
                }
                Content::File(FileContent::List(l)) => {
                    o.push(2);
                    o.extend_from_slice(&(l.len() as u32).to_le_bytes());
                    for r in l {
                        put_ref(&mut o, version, &r.blob);
                        o.extend_from_slice(&r.covered.to_le_bytes());
                    }
                }
            }
        }
        Ok(o)
    }

    /// The tree's id: blake3 of its encoding.
    pub fn id(&self) -> Result<TreeId> {
        Ok(BlobId::of(&self.encode()?))
    }

    /// Decodes a tree blob; `object` names it in errors (e.g. "tree <id> in packs/ab/…").
    pub fn decode(object: &str, b: &[u8]) -> Result<Tree> {
        let mut r = Reader {
            b,
            at: 0,
            object,
            version: 0,
        };
        if r.take(8)? != TREE_MAGIC {
            return Err(r.bad("not a tree blob (bad magic)"));
        }
        let v = r.version(TREE_VERSION)?;
        let n = r.u32()? as usize;
        let mut entries = Vec::with_capacity(n.min(b.len() / 50));
        for _ in 0..n {
            let nl = r.u16()? as usize;
            let name = r.take(nl)?.to_vec();
            let kb = r.u8()?;
            let kind = NodeKind::from_u8(kb).ok_or_else(|| r.bad(format!("unknown kind {kb}")))?;
            let mode = r.u32()?;
            let uid = r.u32()?;
            let gid = r.u32()?;
            let mtime_sec = r.u64()? as i64;
            let mtime_nsec = r.u32()?;
            let size = r.u64()?;
            let rdev = r.u64()?;
            let link_key = r.u64()?;
            let nx = r.u32()? as usize;
            let mut xattrs = Vec::with_capacity(nx.min(64));
            for _ in 0..nx {
                let l = r.u16()? as usize;
                let xn = r.take(l)?.to_vec();
                let l = r.u32()? as usize;
                let xv = r.take(l)?.to_vec();
                xattrs.push((xn, xv));
            }
            let content = match kind {
                NodeKind::Dir => Content::Dir(r.blob_ref()?),
                NodeKind::Symlink => {
                    let l = r.u32()? as usize;
                    Content::Symlink(r.take(l)?.to_vec())
                }
                NodeKind::File => match r.u8()? {
                    0 => Content::File(FileContent::Empty),
                    1 => {
                        let c = r.u32()? as usize;
                        if c > MAX_INLINE_CHUNKS {
                            return Err(r.bad("too many inline chunks"));
                        }
                        let v = (0..c).map(|_| r.blob_ref()).collect::<Result<_>>()?;
                        Content::File(FileContent::Chunks(v))
                    }
                    2 => {
                        let c = r.u32()? as usize;
                        let mut v = Vec::with_capacity(c.min(b.len() / 84));
                        for _ in 0..c {
                            v.push(ListRef {
                                blob: r.blob_ref()?,
                                covered: r.u64()?,
                            });
                        }
                        Content::File(FileContent::List(v))
                    }
                    t => return Err(r.bad(format!("unknown file content tag {t}"))),
                },
                _ => Content::None,
            };
            entries.push(TreeEntry {
                name,
                kind,
                mode,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
                size,
                rdev,
                link_key,
                xattrs,
                content,
            });
        }
        r.done()?;
        let t = Tree { entries };
        t.validate()
            .map_err(|m| StoreError::corrupt(object, format!("non-canonical tree: {m}")))?;
        if version_for(t.entries.iter().flat_map(|e| e.content.refs())) != v {
            return Err(StoreError::corrupt(
                object,
                format!("non-canonical tree: version {v} for these refs"),
            ));
        }
        Ok(t)
    }

    /// Loads, verifies and decodes the tree blob `r`.
    pub fn load(loader: &dyn BlobLoader, r: &BlobRef) -> Result<Tree> {
        let b = loader.load(r)?;
        Tree::decode(&format!("tree {} in {}", r.id, r.pack.key()), &b)
    }

    /// The entry called `name`.
    pub fn get(&self, name: &[u8]) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// Encodes a list blob of chunk refs.
pub fn encode_list(refs: &[BlobRef]) -> Vec<u8> {
    let mut o = Vec::with_capacity(14 + refs.len() * 76);
    o.extend_from_slice(LIST_MAGIC);
    let version = version_for(refs.iter());
    o.extend_from_slice(&version.to_le_bytes());
    o.extend_from_slice(&(refs.len() as u32).to_le_bytes());
    refs.iter().for_each(|r| put_ref(&mut o, version, r));
    o
}

/// Decodes a list blob.
pub fn decode_list(object: &str, b: &[u8]) -> Result<Vec<BlobRef>> {
    let mut r = Reader {
        b,
        at: 0,
        object,
        version: 0,
    };
    if r.take(8)? != LIST_MAGIC {
        return Err(r.bad("not a list blob (bad magic)"));
    }
    let v = r.version(LIST_VERSION)?;
    let n = r.u32()? as usize;
    if n == 0 || n > MAX_LIST_REFS {
        return Err(r.bad(format!("{n} refs in a list blob")));
    }
    let refs: Vec<BlobRef> = (0..n).map(|_| r.blob_ref()).collect::<Result<_>>()?;
    r.done()?;
    if refs.iter().any(|c| c.len == 0) {
        return Err(r.bad("empty chunk in a list blob"));
    }
    if version_for(refs.iter()) != v {
        return Err(r.bad(format!("a version {v} list of these refs is not canonical")));
    }
    Ok(refs)
}

/// True when a chunk ends a list group: a content-defined rule, so an edit moves group ends
/// only near itself.
fn ends_group(id: &BlobId) -> bool {
    id.0[31].is_multiple_of(64)
}

/// Builds a file's content from its chunks, storing list blobs through `emit` (which may
/// return an existing ref for a list blob already stored: dedup).
pub fn build_file_content_with(
    chunks: Vec<BlobRef>,
    emit: &mut dyn FnMut(BlobKind, &[u8]) -> Result<BlobRef>,
) -> Result<FileContent> {
    if chunks.is_empty() {
        return Ok(FileContent::Empty);
    }
    if chunks.len() <= MAX_INLINE_CHUNKS {
        return Ok(FileContent::Chunks(chunks));
    }
    let mut lists = Vec::new();
    let mut group: Vec<BlobRef> = Vec::new();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let end = ends_group(&c.id);
        group.push(c);
        if end || group.len() == MAX_LIST_REFS || i + 1 == n {
            let covered = group.iter().map(|r| r.len as u64).sum();
            let blob = emit(BlobKind::List, &encode_list(&group))?;
            lists.push(ListRef { blob, covered });
            group.clear();
        }
    }
    Ok(FileContent::List(lists))
}

/// Builds a file's content, adding list blobs to `pack`.
pub fn build_file_content(chunks: Vec<BlobRef>, pack: &mut PackWriter) -> FileContent {
    match build_file_content_with(chunks, &mut |k, b| Ok(pack.add(k, b))) {
        Ok(c) => c,
        Err(_) => unreachable!("adding to a pack writer cannot fail"),
    }
}

/// The chunks of a file with their offsets, loading list blobs through `loader`.
pub fn file_chunks(loader: &dyn BlobLoader, content: &FileContent) -> Result<Vec<ChunkSpan>> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut push = |r: BlobRef, out: &mut Vec<ChunkSpan>| {
        out.push(ChunkSpan { r, offset });
        offset += r.len as u64;
    };
    match content {
        FileContent::Empty => {}
        FileContent::Chunks(c) => c.iter().for_each(|r| push(*r, &mut out)),
        FileContent::List(lists) => {
            for l in lists {
                let object = format!("list {} in {}", l.blob.id, l.blob.pack.key());
                let refs = decode_list(&object, &loader.load(&l.blob)?)?;
                let sum: u64 = refs.iter().map(|r| r.len as u64).sum();
                if sum != l.covered {
                    return Err(StoreError::Corrupt {
                        object: l.blob.pack.key(),
                        blob: Some(l.blob.id),
                        what: format!("list covers {sum} bytes, the tree says {}", l.covered),
                    });
                }
                refs.into_iter().for_each(|r| push(r, &mut out));
            }
        }
    }
    Ok(out)
}

/// The entry at `path` (`/`-separated, relative) under tree `root`; `None` when a component
/// is missing or not a directory.
pub fn lookup(loader: &dyn BlobLoader, root: &BlobRef, path: &str) -> Result<Option<TreeEntry>> {
    let mut dir = *root;
    let mut parts = path.split('/').filter(|p| !p.is_empty()).peekable();
    while let Some(name) = parts.next() {
        let tree = Tree::load(loader, &dir)?;
        let Some(e) = tree.get(name.as_bytes()) else {
            return Ok(None);
        };
        if parts.peek().is_none() {
            return Ok(Some(e.clone()));
        }
        match e.content {
            Content::Dir(r) => dir = r,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Writes a file's bytes to `out`, every chunk verified as it is loaded.
pub fn write_file(
    loader: &dyn BlobLoader,
    content: &FileContent,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let mut n = 0;
    for span in file_chunks(loader, content)? {
        let b = loader.load(&span.r)?;
        out.write_all(&b)
            .map_err(|e| StoreError::io("cannot write a file's bytes", e))?;
        n += b.len() as u64;
    }
    Ok(n)
}
