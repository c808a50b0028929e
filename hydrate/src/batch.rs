//! The prefetch of small files in pack order: a commit packs the chunks of the files it reads
//! one after another, so the files of a directory (and of a whole tree) usually lie back to
//! back in one pack. The prefetch takes the partial file whose first chunk comes first in pack
//! order, then the files whose chunks follow it without a gap, and fetches them all with one
//! ranged GET (`fetch_chunks` reads adjacent chunks as one run), instead of a GET per file.

use std::collections::BTreeMap;

use owsfs_store::PackId;

use super::*;

/// Partial files with an inline chunk list, by where their first chunk is stored.
#[derive(Default)]
pub(crate) struct PackOrder {
    by_start: BTreeMap<(PackId, u64), u64>,
    /// The `files_added` count it was built at (`None`: never built).
    built_at: Option<u64>,
}

/// One file of a run, and its chunks (all of them: it had nothing local).
pub(crate) type RunFile = (Arc<FileState>, Vec<ChunkSpan>);

impl Hydrator {
    /// The next run of small files for the prefetch, at most `budget` stored bytes (at least
    /// one file): the partial file whose first chunk comes first in pack order among those
    /// `claim` accepts, then the files whose chunks follow it back to back in the same pack.
    /// Every file returned is claimed, has nothing local yet, and its chunks are contiguous.
    /// Empty when no such file is left (bigger or partly local files go file by file).
    pub(crate) fn small_file_run(
        &self,
        budget: u64,
        claim: &dyn Fn(u64) -> bool,
    ) -> io::Result<Vec<RunFile>> {
        let mut order = self.pack_order.lock();
        let added = self.files_added.load(Ordering::Acquire);
        if order.built_at != Some(added) {
            order.by_start.clear();
            for e in self.files.iter() {
                if let FileContent::Chunks(c) = &e.value().content
                    && let Some(first) = c.first()
                {
                    order.by_start.insert((first.pack, first.offset), *e.key());
                }
            }
            order.built_at = Some(added);
        }
        // The first file: the earliest one still partial, untouched and claimable. Entries of
        // files that went whole since are dropped on the way.
        let mut start = None;
        let mut gone = Vec::new();
        for (&at, &ino) in order.by_start.iter() {
            match self.untouched_chunks(ino)? {
                None => gone.push(at),
                Some((f, spans)) => {
                    if claim(ino) {
                        start = Some((f, spans));
                        break;
                    }
                }
            }
        }
        for at in gone {
            order.by_start.remove(&at);
        }
        let Some(first) = start else {
            return Ok(Vec::new());
        };
        let mut used = stored_bytes(&first.1);
        let mut end = contiguous_end(&first.1);
        let mut run = vec![first];
        // Then the files right after it in the pack.
        while let Some((pack, at)) = end {
            if used >= budget {
                break;
            }
            let Some(&ino) = order.by_start.get(&(pack, at)) else {
                break;
            };
            let Some((f, spans)) = self.untouched_chunks(ino)? else {
                order.by_start.remove(&(pack, at));
                break;
            };
            let Some(next_end) = contiguous_end(&spans) else {
                break;
            };
            if used + stored_bytes(&spans) > budget || !claim(ino) {
                break;
            }
            used += stored_bytes(&spans);
            end = Some(next_end);
            run.push((f, spans));
        }
        Ok(run)
    }

    /// File `ino`'s chunks when it is partial, not removed, has nothing local yet and keeps
    /// its chunks inline; `None` otherwise.
    fn untouched_chunks(&self, ino: u64) -> io::Result<Option<RunFile>> {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return Ok(None);
        };
        if !matches!(f.content, FileContent::Chunks(_)) {
            return Ok(None);
        }
        {
            let inner = f.inner.lock();
            if inner.removed || !inner.present.is_empty() || inner.valid_end < f.len {
                return Ok(None);
            }
        }
        let spans = self.group_spans(&f, 0, 0)?;
        Ok(Some((f, spans.to_vec())))
    }

    /// Fetches the chunks of a run of files (adjacent ones with one ranged GET) and writes
    /// each file's.
    pub(crate) fn fetch_files(&self, run: &[RunFile]) -> io::Result<u64> {
        let all: Vec<ChunkSpan> = run.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        let data = self.fetch_chunks(&all)?;
        let mut at = 0;
        for (f, spans) in run {
            self.write_spans(f, spans, &data[at..at + spans.len()])?;
            at += spans.len();
        }
        Ok(stored_bytes(&all))
    }
}

fn stored_bytes(spans: &[ChunkSpan]) -> u64 {
    spans.iter().map(|s| s.r.stored as u64).sum()
}

/// Where the chunks end in their pack, when they lie back to back in one pack.
fn contiguous_end(spans: &[ChunkSpan]) -> Option<(PackId, u64)> {
    let first = spans.first()?;
    let mut end = first.r.end();
    for s in &spans[1..] {
        if s.r.pack != first.r.pack || s.r.offset != end {
            return None;
        }
        end = s.r.end();
    }
    Some((first.r.pack, end))
}
