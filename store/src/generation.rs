//! Generation records, workspaces, HEAD discovery and the commit protocol (see `FORMAT.md`).
//!
//! Generation N of workspace W lives in slot `workspaces/W/gens/<N as 20 digits>`, written
//! once with create-if-absent, so exactly one writer wins each slot. `HEAD` is a hint only:
//! the newest generation is found by probing the slots after the hint.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{PutOutcome, Store};
use crate::error::{Result, StoreError};
use crate::pack::BlobRef;

pub const GENERATION_VERSION: u64 = 1;
pub const WORKSPACE_VERSION: u64 = 2;
pub const HEAD_VERSION: u64 = 1;

/// A generation number; the first generation of a workspace is 1.
pub type GenNumber = u64;

/// Commit records carry a tree; fence records (written by a new lease holder) do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenKind {
    Commit,
    Fence,
}

/// Where a SQLite database's WAL stood at the cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalPosition {
    pub last_commit_frame: u32,
    pub frames_valid: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checkpoint_seq: u32,
    pub page_size: u32,
    pub db_pages: u32,
}

/// A SQLite database in the generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqliteState {
    /// Path relative to the workspace root.
    pub path: String,
    pub wal: Option<WalPosition>,
}

/// Numbers about a generation, for `owsfs log` and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes_total: u64,
    pub bytes_new: u64,
    pub blobs_new: u64,
    pub packs_new: u64,
    pub journal_seq: u64,
    pub cut_ms: u64,
    pub upload_ms: u64,
    /// A rollback: the generation whose state this one holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<GenNumber>,
}

/// One generation record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub workspace: String,
    pub number: GenNumber,
    pub parent: Option<GenNumber>,
    pub epoch: u64,
    pub kind: GenKind,
    pub time_unix_ms: u64,
    pub root: Option<BlobRef>,
    #[serde(default)]
    pub sqlite: Vec<SqliteState>,
    #[serde(default)]
    pub stats: GenStats,
    /// The access list: files the writer opened, most recent first (a blob in a pack; JSON
    /// `{"format":"owsfs-access","version":1,"paths":[...]}`). The next holder prefetches
    /// them first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<BlobRef>,
}

/// Key of a generation slot.
pub fn generation_key(workspace: &str, n: GenNumber) -> String {
    format!("workspaces/{workspace}/gens/{n:020}")
}

/// Seals a JSON record as three lines: `TAG VERSION`, the JSON body, the blake3 of the body
/// (the format of generation and lease records, `FORMAT.md`).
pub(crate) fn seal_json<T: Serialize>(tag: &str, version: u64, what: &str, r: &T) -> Result<Bytes> {
    let body = serde_json::to_string(r)
        .map_err(|e| StoreError::Invalid(format!("cannot encode {what}: {e}")))?;
    let sum = blake3::hash(body.as_bytes()).to_hex();
    Ok(Bytes::from(format!("{tag} {version}\n{body}\n{sum}\n")))
}

/// Parses and verifies what [`seal_json`] made, read from `object`: header, version (a newer
/// one is `UnsupportedVersion`), checksum, then the JSON body.
pub(crate) fn unseal_json<T: serde::de::DeserializeOwned>(
    tag: &str,
    supported: u64,
    object: &str,
    b: &[u8],
) -> Result<T> {
    unseal_json_since(tag, supported, supported, object, b)
}

/// [`unseal_json`] of a record of any version from `oldest` to `newest`.
pub(crate) fn unseal_json_since<T: serde::de::DeserializeOwned>(
    tag: &str,
    oldest: u64,
    newest: u64,
    object: &str,
    b: &[u8],
) -> Result<T> {
    let supported = newest;
    let bad = |what: &str| StoreError::corrupt(object, what);
    let text = std::str::from_utf8(b).map_err(|_| bad("not UTF-8"))?;
    let text = text
        .strip_suffix('\n')
        .ok_or_else(|| bad("truncated (no final newline)"))?;
    let mut lines = text.split('\n');
    let (Some(head), Some(body), Some(sum), None) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Err(bad("not three lines"));
    };
    let version: u64 = head
        .strip_prefix(tag)
        .and_then(|v| v.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("bad header line"))?;
    if version > supported {
        return Err(StoreError::UnsupportedVersion {
            object: object.into(),
            found: version,
            supported,
        });
    }
    if version < oldest {
        return Err(bad("unknown version"));
    }
    if blake3::hash(body.as_bytes()).to_hex().as_str() != sum {
        return Err(bad("checksum mismatch"));
    }
    serde_json::from_str(body).map_err(|e| bad(&format!("bad body: {e}")))
}

impl GenerationRecord {
    /// The sealed text: header line, JSON body line, blake3 of the body line.
    pub fn seal(&self) -> Result<Bytes> {
        seal_json("owsfs-generation", GENERATION_VERSION, "generation", self)
    }

    /// Parses and verifies a sealed record read from `object`.
    pub fn unseal(object: &str, b: &[u8]) -> Result<GenerationRecord> {
        unseal_json("owsfs-generation", GENERATION_VERSION, object, b)
    }
}

/// Checks a record before it is committed. `parent` is the parent record when the caller has
/// it (the lease milestone passes it to enforce epochs).
pub fn check_invariants(
    r: &GenerationRecord,
    parent: Option<&GenerationRecord>,
) -> std::result::Result<(), String> {
    if r.number == 0 {
        return Err("generation numbers start at 1".into());
    }
    let want_parent = (r.number > 1).then(|| r.number - 1);
    if r.parent != want_parent {
        return Err(format!(
            "generation {} must have parent {:?}, has {:?}",
            r.number, want_parent, r.parent
        ));
    }
    match (r.kind, r.root.is_some()) {
        (GenKind::Commit, false) => return Err("a commit record needs a root tree".into()),
        (GenKind::Fence, true) => return Err("a fence record carries no tree".into()),
        _ => {}
    }
    if let Some(p) = parent {
        if Some(p.number) != r.parent || p.workspace != r.workspace {
            return Err("parent record is not the parent".into());
        }
        if r.epoch < p.epoch {
            return Err(format!(
                "epoch {} is older than the parent's {}",
                r.epoch, p.epoch
            ));
        }
    }
    Ok(())
}

/// Why a commit did not land.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another writer (or a fence) holds the slot.
    #[error("generation slot {number} is already taken (epoch {}, {:?})", existing.epoch, existing.kind)]
    SlotTaken {
        number: GenNumber,
        existing: Box<GenerationRecord>,
    },
    /// The record breaks an invariant; nothing was written.
    #[error("refusing to commit: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `workspace.json` as version 1 wrote it: plain JSON, no checksum (still read).
#[derive(Deserialize)]
struct WorkspaceMetaV1 {
    format: String,
    version: u64,
    name: String,
    created_unix_ms: u64,
}

pub const FORK_NOTE_VERSION: u64 = 1;

/// `workspaces/SRC/forks/FORK`: a fork of SRC, noted in the source.
#[derive(Serialize, Deserialize)]
struct ForkNote {
    source: String,
    fork: String,
    generation: GenNumber,
}

/// Where a fork came from: the source workspace and the commit its first generation copies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkSource {
    pub workspace: String,
    pub generation: GenNumber,
}

/// What `workspaces/NAME/workspace.json` says (version 2: sealed like a generation record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceInfo {
    pub name: String,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkSource>,
}

impl WorkspaceInfo {
    fn seal(&self) -> Result<Bytes> {
        seal_json("owsfs-workspace", WORKSPACE_VERSION, "workspace.json", self)
    }

    /// Reads either version; the name must match the key's.
    fn parse(key: &str, name: &str, b: &[u8]) -> Result<WorkspaceInfo> {
        let info = if b.first() == Some(&b'{') {
            let v1: WorkspaceMetaV1 = serde_json::from_slice(b)
                .map_err(|e| StoreError::corrupt(key, format!("bad workspace.json: {e}")))?;
            if v1.format != "owsfs-workspace" {
                return Err(StoreError::corrupt(key, "format does not match"));
            }
            if v1.version != 1 {
                return Err(StoreError::corrupt(
                    key,
                    "a JSON workspace.json must be version 1",
                ));
            }
            WorkspaceInfo {
                name: v1.name,
                created_unix_ms: v1.created_unix_ms,
                forked_from: None,
            }
        } else {
            unseal_json("owsfs-workspace", WORKSPACE_VERSION, key, b)?
        };
        if info.name != name {
            return Err(StoreError::corrupt(key, "name does not match"));
        }
        Ok(info)
    }
}

/// Checks a workspace name: `[A-Za-z0-9._-]`, 1..=128 bytes, not starting with '.'.
pub fn valid_workspace_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn check_workspace_name(name: &str) -> Result<()> {
    if valid_workspace_name(name) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid workspace name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.'"
        )))
    }
}

/// A workspace in a store.
#[derive(Clone, Debug)]
pub struct Workspace {
    store: Store,
    name: String,
    info: WorkspaceInfo,
    /// The HEAD hint this handle wrote last, and the newer slot it has not written yet.
    hint: std::sync::Arc<parking_lot::Mutex<HintState>>,
}

/// How often a writer updates the HEAD hint while it commits: a hint is only a starting point
/// for the probes that find the newest slot, so a commit need not pay a PUT for it.
pub const HINT_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Default)]
struct HintState {
    written: Option<std::time::Instant>,
    pending: Option<GenNumber>,
}

impl Workspace {
    /// Opens a workspace, creating `workspaces/NAME/workspace.json` on first use.
    pub fn open_or_create(store: &Store, name: &str) -> Result<Workspace> {
        Self::open_or_create_noting(store, name).map(|(ws, _)| ws)
    }

    /// [`Workspace::open_or_create`], and whether this call created the workspace.
    pub fn open_or_create_noting(store: &Store, name: &str) -> Result<(Workspace, bool)> {
        check_workspace_name(name)?;
        let info = WorkspaceInfo {
            name: name.to_string(),
            created_unix_ms: store.clock().unix_ms(),
            forked_from: None,
        };
        Self::open_with(store, info)
    }

    /// Opens an existing workspace; `None` when it has no `workspace.json`.
    pub fn open_existing(store: &Store, name: &str) -> Result<Option<Workspace>> {
        check_workspace_name(name)?;
        let key = format!("workspaces/{name}/workspace.json");
        match store.get(&key) {
            Ok(b) => Ok(Some(Workspace {
                store: store.clone(),
                name: name.to_string(),
                info: WorkspaceInfo::parse(&key, name, &b)?,
                hint: Default::default(),
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the workspace `info` names, creating its marker from `info` when absent.
    /// Also says whether it made the marker.
    fn open_with(store: &Store, info: WorkspaceInfo) -> Result<(Workspace, bool)> {
        let name = info.name.clone();
        let key = format!("workspaces/{name}/workspace.json");
        let existing = match store.get(&key) {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => match store.put_if_absent(&key, info.seal()?)? {
                PutOutcome::Created | PutOutcome::AlreadyIdentical => {
                    let ws = Workspace {
                        store: store.clone(),
                        name,
                        info,
                        hint: Default::default(),
                    };
                    return Ok((ws, true));
                }
                PutOutcome::Conflict(b) => b,
            },
            Err(e) => return Err(e),
        };
        let info = WorkspaceInfo::parse(&key, &name, &existing)?;
        let ws = Workspace {
            store: store.clone(),
            name,
            info,
            hint: Default::default(),
        };
        Ok((ws, false))
    }

    /// Records in this workspace that workspace `fork` started from its generation `n`
    /// (`workspaces/W/forks/FORK`; retention keeps `n` while the record is there).
    fn note_fork(&self, fork: &str, n: GenNumber) -> Result<()> {
        let note = ForkNote {
            source: self.name.clone(),
            fork: fork.to_string(),
            generation: n,
        };
        self.store.put(
            &self.key(&format!("forks/{fork}")),
            seal_json("owsfs-fork", FORK_NOTE_VERSION, "fork note", &note)?,
        )
    }

    /// The generations forks started from (from `forks/`), by fork name.
    pub fn forks(&self) -> Result<Vec<(String, GenNumber)>> {
        let prefix = self.key("forks/");
        let mut out = Vec::new();
        for key in self.store.list(&prefix)? {
            let b = match self.store.get(&key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let n: ForkNote = unseal_json("owsfs-fork", FORK_NOTE_VERSION, &key, &b)?;
            if n.source != self.name || Some(n.fork.as_str()) != key.strip_prefix(&prefix) {
                return Err(StoreError::corrupt(&key, "the note names another fork"));
            }
            out.push((n.fork, n.generation));
        }
        Ok(out)
    }

    /// What the workspace's marker says (its fork source, when it is a fork).
    pub fn info(&self) -> &WorkspaceInfo {
        &self.info
    }

    /// Creates workspace `name` as a fork of `source` at commit `from`: its first generation
    /// (epoch 0, below every lease's) holds `from`'s tree, so no data is copied. Refused when
    /// `name` exists, unless it is this same fork left half made (its marker without a
    /// generation).
    pub fn fork(
        store: &Store,
        name: &str,
        source: &Workspace,
        from: &GenerationRecord,
    ) -> Result<Workspace> {
        check_workspace_name(name)?;
        let root = match (from.kind, from.root) {
            (GenKind::Commit, Some(root)) => root,
            _ => {
                return Err(StoreError::Invalid(format!(
                    "generation {} of {:?} is a fence, not a state: fork a commit",
                    from.number,
                    source.name()
                )));
            }
        };
        let want = ForkSource {
            workspace: source.name().to_string(),
            generation: from.number,
        };
        let exists = || {
            StoreError::Invalid(format!(
                "workspace {name:?} already exists; pick another name for the fork"
            ))
        };
        let (ws, _) = Self::open_with(
            store,
            WorkspaceInfo {
                name: name.to_string(),
                created_unix_ms: store.clock().unix_ms(),
                forked_from: Some(want.clone()),
            },
        )?;
        if ws.info.forked_from.as_ref() != Some(&want) || ws.head()?.is_some() {
            return Err(exists());
        }
        // The source learns of the fork (its retention keeps the generation).
        source.note_fork(name, from.number)?;
        let record = GenerationRecord {
            workspace: name.to_string(),
            number: 1,
            parent: None,
            epoch: 0,
            kind: GenKind::Commit,
            time_unix_ms: store.clock().unix_ms(),
            root: Some(root),
            sqlite: from.sqlite.clone(),
            stats: GenStats {
                files: from.stats.files,
                dirs: from.stats.dirs,
                bytes_total: from.stats.bytes_total,
                ..GenStats::default()
            },
            access: from.access,
        };
        match ws.commit(&record) {
            Ok(()) => Ok(ws),
            Err(CommitError::SlotTaken { .. }) => Err(exists()),
            Err(CommitError::Invalid(m)) => Err(StoreError::Invalid(m)),
            Err(CommitError::Store(e)) => Err(e),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn key(&self, rest: &str) -> String {
        format!("workspaces/{}/{rest}", self.name)
    }

    /// Key of generation slot `n`.
    pub fn generation_key(&self, n: GenNumber) -> String {
        generation_key(&self.name, n)
    }

    fn read_hint(&self) -> Option<GenNumber> {
        let key = self.key("HEAD");
        let b = match self.store.get(&key) {
            Ok(b) => b,
            Err(e) => {
                if !e.is_not_found() {
                    tracing::warn!("cannot read {key}: {e}; listing generations instead");
                }
                return None;
            }
        };
        let parsed = std::str::from_utf8(&b).ok().and_then(|t| {
            let mut f = t.strip_suffix('\n')?.split(' ');
            let (tag, v, n, sum) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let ok = tag == "owsfs-head"
                && v == HEAD_VERSION.to_string()
                && f.next().is_none()
                && head_sum(n) == sum;
            if ok { n.parse().ok() } else { None }
        });
        if parsed.is_none() {
            tracing::warn!("{key} is corrupt; listing generations instead");
        }
        parsed
    }

    /// The newest committed generation (commit or fence), or `None` for a new workspace.
    ///
    /// From the HEAD hint (or a listing), probes forward: slots are taken in order and never
    /// deleted near the newest, so the slots above the hint are contiguous. The probes gallop
    /// (hint + 1, + 2, + 4, ...) and then halve the last step: a hint `d` slots behind costs
    /// about 2·log2(d) existence checks.
    pub fn head(&self) -> Result<Option<GenNumber>> {
        let n = match self.read_hint() {
            Some(h) if self.store.exists(&self.generation_key(h))? => h,
            _ => match self.list_generations()?.last() {
                Some(&n) => n,
                None => return Ok(None),
            },
        };
        let exists = |k: GenNumber| self.store.exists(&self.generation_key(k));
        // `lo` exists; find a `hi` that does not.
        let (mut lo, mut step) = (n, 1u64);
        let mut hi = loop {
            let probe = lo.saturating_add(step);
            if !exists(probe)? {
                break probe;
            }
            lo = probe;
            step = step.saturating_mul(2);
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if exists(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(Some(lo))
    }

    /// Reads and verifies generation `n`.
    pub fn read_generation(&self, n: GenNumber) -> Result<GenerationRecord> {
        let key = self.generation_key(n);
        let b = self.store.get(&key)?;
        let r = GenerationRecord::unseal(&key, &b)?;
        if r.number != n || r.workspace != self.name {
            return Err(StoreError::corrupt(
                &key,
                format!(
                    "record says workspace {:?} generation {}",
                    r.workspace, r.number
                ),
            ));
        }
        Ok(r)
    }

    /// Numbers of all generations, ascending (from a listing).
    pub fn list_generations(&self) -> Result<Vec<GenNumber>> {
        let prefix = self.key("gens/");
        let mut out: Vec<GenNumber> = self
            .store
            .list(&prefix)?
            .iter()
            .filter_map(|k| {
                let s = k.strip_prefix(&prefix)?;
                (s.len() == 20 && s.bytes().all(|c| c.is_ascii_digit()))
                    .then(|| s.parse().ok())
                    .flatten()
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Commits `record` into slot `record.number`.
    pub fn commit(&self, record: &GenerationRecord) -> std::result::Result<(), CommitError> {
        self.commit_checked(record, None)
    }

    /// Commits after checking the invariants against the parent record, when given.
    pub fn commit_checked(
        &self,
        record: &GenerationRecord,
        parent: Option<&GenerationRecord>,
    ) -> std::result::Result<(), CommitError> {
        if record.workspace != self.name {
            return Err(CommitError::Invalid(format!(
                "record is for workspace {:?}, not {:?}",
                record.workspace, self.name
            )));
        }
        check_invariants(record, parent).map_err(CommitError::Invalid)?;
        let key = self.generation_key(record.number);
        match self.store.put_if_absent(&key, record.seal()?)? {
            PutOutcome::Created | PutOutcome::AlreadyIdentical => {}
            PutOutcome::Conflict(b) => {
                let existing = GenerationRecord::unseal(&key, &b)?;
                return Err(CommitError::SlotTaken {
                    number: record.number,
                    existing: Box::new(existing),
                });
            }
        }
        // Crash window: the slot is taken, the HEAD hint still names an older one.
        match record.kind {
            GenKind::Commit => fail::fail_point!("commit-before-head"),
            GenKind::Fence => fail::fail_point!("fence-before-head"),
        }
        // The hint: at once for a fence (a mount) and when the last one is older than
        // HINT_EVERY; otherwise it waits for `flush_head_hint` or a later commit.
        let due = record.kind == GenKind::Fence
            || self.hint.lock().written.is_none_or(|at| {
                self.store.clock().now().saturating_duration_since(at) >= HINT_EVERY
            });
        if due {
            self.write_hint(record.number);
        } else {
            self.hint.lock().pending = Some(record.number);
        }
        Ok(())
    }

    /// Writes the HEAD hint of the newest slot this handle committed, if it has not yet
    /// (`owsfs sync`, a handoff, an unmount). Best effort, like every hint.
    pub fn flush_head_hint(&self) {
        let pending = self.hint.lock().pending;
        if let Some(n) = pending {
            self.write_hint(n);
        }
    }

    fn write_hint(&self, number: GenNumber) {
        let n = number.to_string();
        let hint = format!("owsfs-head {HEAD_VERSION} {n} {}\n", head_sum(&n));
        let started = self.store.clock().now();
        match self.store.put(&self.key("HEAD"), Bytes::from(hint)) {
            Ok(()) => {
                let mut h = self.hint.lock();
                h.written = Some(started);
                if h.pending.is_some_and(|p| p <= number) {
                    h.pending = None;
                }
            }
            Err(e) => {
                tracing::warn!(
                    "generation {number} of {} is committed but the HEAD hint was not updated: {e}",
                    self.name
                );
                let mut h = self.hint.lock();
                h.pending = h.pending.max(Some(number));
            }
        }
    }
}

impl Workspace {
    /// Claims the next free slot with a fence record of `epoch` (a new lease holder does this
    /// once): every slot before it is then taken, so no writer of an older epoch can commit
    /// again. Skips slots that a commit in flight at the takeover won first. Returns the
    /// fence's number.
    pub fn fence(&self, epoch: u64) -> std::result::Result<GenNumber, CommitError> {
        let mut after = self.head()?;
        loop {
            let number = after.map_or(1, |h| h + 1);
            let parent = match after {
                Some(h) => Some(self.read_generation(h)?),
                None => None,
            };
            if let Some(p) = &parent
                && p.epoch > epoch
            {
                return Err(CommitError::Invalid(format!(
                    "generation {} has epoch {}, newer than {epoch}: this lease was taken over",
                    p.number, p.epoch
                )));
            }
            let record = GenerationRecord {
                workspace: self.name.clone(),
                number,
                parent: after,
                epoch,
                kind: GenKind::Fence,
                time_unix_ms: self.store.clock().unix_ms(),
                root: None,
                sqlite: Vec::new(),
                stats: GenStats::default(),
                access: None,
            };
            match self.commit_checked(&record, parent.as_ref()) {
                Ok(()) => return Ok(number),
                Err(CommitError::SlotTaken { number, .. }) => after = Some(number),
                Err(e) => return Err(e),
            }
        }
    }

    /// The newest commit record at or before generation `n`, skipping fences and slots a GC
    /// pruned.
    pub fn newest_commit(&self, n: GenNumber) -> Result<Option<GenerationRecord>> {
        let mut n = n;
        while n >= 1 {
            match self.read_generation(n) {
                Ok(r) if r.kind == GenKind::Commit => return Ok(Some(r)),
                Ok(_) => {}
                // A pruned slot: the listing says which slots are left.
                Err(e) if e.is_not_found() => {
                    let below = self.list_generations()?;
                    match below.into_iter().rev().find(|&g| g < n) {
                        Some(g) => {
                            n = g;
                            continue;
                        }
                        None => return Ok(None),
                    }
                }
                Err(e) => return Err(e),
            }
            n -= 1;
        }
        Ok(None)
    }
}

fn head_sum(n: &str) -> String {
    let h = blake3::hash(format!("owsfs-head {HEAD_VERSION} {n}").as_bytes());
    hex::encode(&h.as_bytes()[..8])
}
