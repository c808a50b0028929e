//! Fetching file bytes: the missing chunks of a range, deduplicated across threads, read in
//! runs, verified, and written only into ranges still missing; and what writes, truncates
//! and removals change of a partial file.

use super::*;

impl Hydrator {
    pub fn is_whole(&self, ino: u64) -> bool {
        !self.files.contains_key(&ino)
    }

    /// Any file still missing bytes, not in `skip` (for the prefetch).
    pub(crate) fn some_partial_file(&self, skip: &HashSet<u64>) -> Option<u64> {
        self.files
            .iter()
            .find(|e| !skip.contains(e.key()) && !e.value().inner.lock().removed)
            .map(|e| *e.key())
    }

    /// Missing chunk spans overlapping `[start, end)`, at most `limit` bytes of them (at least
    /// one span), loading list blobs as needed.
    pub(crate) fn missing_spans(
        &self,
        f: &FileState,
        start: u64,
        end: u64,
        limit: u64,
    ) -> io::Result<Vec<ChunkSpan>> {
        let mut out = Vec::new();
        let mut budget = limit.max(1);
        let (valid_end, ngroups) = {
            let inner = f.inner.lock();
            (inner.valid_end, inner.groups.len())
        };
        let end = end.min(valid_end).min(f.len);
        if start >= end {
            return Ok(out);
        }
        let mut group_start = 0u64;
        for g in 0..ngroups {
            let covered = match &f.content {
                FileContent::List(l) => l[g].covered,
                _ => f.len,
            };
            let group_end = group_start + covered;
            if group_end <= start {
                group_start = group_end;
                continue;
            }
            if group_start >= end {
                break;
            }
            let spans = self.group_spans(f, g, group_start)?;
            let inner = f.inner.lock();
            out.extend(ranges::missing_chunks(
                &spans,
                start,
                end,
                inner.valid_end,
                &inner.present,
                &mut budget,
            ));
            if budget == 0 {
                return Ok(out);
            }
            drop(inner);
            group_start = group_end;
        }
        Ok(out)
    }

    /// The chunks of one list group, fetched and checked.
    pub(crate) fn list_refs(
        &self,
        l: &owsfs_store::tree::ListRef,
        ino: u64,
    ) -> io::Result<Vec<BlobRef>> {
        let b = &l.blob;
        let data = owsfs_store::read_blob(&self.store, b).map_err(|e| {
            eio(format!(
                "hydrate: cannot fetch chunk list {} (in {}) of inode {ino}: {e}",
                b.id,
                b.pack.key(),
            ))
        })?;
        let object = format!("list {} in {}", b.id, b.pack.key());
        let refs = owsfs_store::tree::decode_list(&object, &data)
            .map_err(|e| eio(format!("hydrate: {e}")))?;
        let sum: u64 = refs.iter().map(|r| r.len as u64).sum();
        if sum != l.covered {
            return Err(eio(format!(
                "hydrate: {object} covers {sum} bytes, the tree says {}",
                l.covered
            )));
        }
        Ok(refs)
    }

    pub(crate) fn group_spans(
        &self,
        f: &FileState,
        g: usize,
        offset: u64,
    ) -> io::Result<Arc<Vec<ChunkSpan>>> {
        if let Some(s) = &f.inner.lock().groups[g] {
            return Ok(Arc::clone(s));
        }
        let refs: Vec<BlobRef> = match &f.content {
            FileContent::Empty => Vec::new(),
            FileContent::Chunks(c) => c.clone(),
            FileContent::List(l) => self.list_refs(&l[g], f.ino)?,
        };
        let mut at = offset;
        let spans: Vec<ChunkSpan> = refs
            .into_iter()
            .map(|r| {
                let s = ChunkSpan { r, offset: at };
                at += r.len as u64;
                s
            })
            .collect();
        let spans = Arc::new(spans);
        f.inner.lock().groups[g] = Some(Arc::clone(&spans));
        Ok(spans)
    }

    /// Makes `[start, end)` of file `ino` local. `foreground`: a program waits for it.
    pub fn fetch_range(&self, ino: u64, start: u64, end: u64, foreground: bool) -> io::Result<()> {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return Ok(());
        };
        self.fetch_file_range(&f, start, end, foreground)
    }

    /// Fetches every missing span of `[start, end)`, at most 64 MiB per round. `foreground`:
    /// counted as a program's wait once there is something to fetch (a read of what is local
    /// already does not hold the prefetch back).
    pub(crate) fn fetch_file_range(
        &self,
        f: &Arc<FileState>,
        start: u64,
        end: u64,
        foreground: bool,
    ) -> io::Result<()> {
        let mut at = start;
        let mut waited_on = None;
        loop {
            let spans = self.missing_spans(f, at, end, 64 << 20)?;
            let Some(last) = spans.last() else {
                return Ok(());
            };
            if foreground && waited_on.is_none() {
                waited_on = Some(self.foreground.begin());
            }
            at = last.end();
            let data = self.fetch_chunks(&spans)?;
            self.write_spans(f, &spans, &data)?;
        }
    }

    /// Fetches the next at most `step` missing bytes of file `ino` from `from` on (for the
    /// prefetch). Returns where it stopped, or None when nothing is missing from there.
    pub(crate) fn fetch_step(&self, ino: u64, from: u64, step: u64) -> io::Result<Option<u64>> {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return Ok(None);
        };
        let spans = self.missing_spans(&f, from, u64::MAX, step)?;
        let Some(last) = spans.last() else {
            return Ok(None);
        };
        let next = last.end();
        let data = self.fetch_chunks(&spans)?;
        self.write_spans(&f, &spans, &data)?;
        Ok(Some(next))
    }

    /// Fetches and verifies chunks; a chunk another thread is fetching is waited for, not
    /// fetched twice. Adjacent chunks of one pack are fetched with one ranged GET.
    pub(crate) fn fetch_chunks(&self, spans: &[ChunkSpan]) -> io::Result<Vec<Bytes>> {
        let mut mine: Vec<usize> = Vec::new();
        let mut waits: Vec<(usize, Arc<Inflight>)> = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for (i, s) in spans.iter().enumerate() {
                match inflight.get(&s.r.id) {
                    Some(w) => waits.push((i, Arc::clone(w))),
                    None => {
                        inflight.insert(s.r.id, Arc::new(Inflight::default()));
                        mine.push(i);
                    }
                }
            }
        }
        let mut out: Vec<Option<Bytes>> = vec![None; spans.len()];
        let mut failure: Option<io::Error> = None;
        // Runs: same pack, each chunk right after the previous one.
        let refs: Vec<BlobRef> = mine.iter().map(|&i| spans[i].r).collect();
        for run in ranges::runs(&refs, MAX_RUN) {
            let (k, j) = (run.start, run.end);
            let first = refs[k];
            let end = refs[j - 1].end();
            let got = if failure.is_none() {
                owsfs_store::read_blob_run(&self.store, &refs[k..j]).map_err(|e| e.to_string())
            } else {
                Err("an earlier chunk of the same read failed".to_string())
            };
            for (t, &i) in mine[k..j].iter().enumerate() {
                let r = spans[i].r;
                let res = got.as_ref().map(|b| b[t].clone()).map_err(|e| e.clone());
                if let Ok(d) = &res {
                    out[i] = Some(d.clone());
                } else if let Err(e) = &res
                    && failure.is_none()
                {
                    failure = Some(eio(format!(
                        "hydrate: cannot fetch chunk {} from {}: {e}",
                        r.id,
                        r.pack.key()
                    )));
                }
                let w = self.inflight.lock().remove(&r.id);
                if let Some(w) = w {
                    *w.result.lock() = Some(res);
                    w.cv.notify_all();
                }
            }
            if got.is_ok() {
                self.count_fetched(end - first.offset);
            }
        }
        for (i, w) in waits {
            let mut res = w.result.lock();
            while res.is_none() {
                w.cv.wait(&mut res);
            }
            match res.as_ref() {
                Some(Ok(b)) => out[i] = Some(b.clone()),
                Some(Err(e)) if failure.is_none() => {
                    failure = Some(eio(format!(
                        "hydrate: cannot fetch chunk {} from {}: {e}",
                        spans[i].r.id,
                        spans[i].r.pack.key()
                    )));
                }
                Some(Err(_)) => {}
                None => {}
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(out.into_iter().map(|b| b.unwrap_or_default()).collect())
    }

    pub(crate) fn count_fetched(&self, n: u64) {
        self.fetched_bytes.fetch_add(n, Ordering::Relaxed);
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window.lock();
        let now = Instant::now();
        w.push_back((now, n));
        while w
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            w.pop_front();
        }
    }

    /// Writes fetched chunks into the ranges of the file that are not local yet, and starts
    /// their writeback (so a later fdatasync, the save's or the unmount's, has less to wait
    /// for; waiting for it here too was tried: no shorter pause, and a slower prefetch).
    pub(crate) fn write_spans(
        &self,
        f: &Arc<FileState>,
        spans: &[ChunkSpan],
        data: &[Bytes],
    ) -> io::Result<()> {
        let fd = match handle::open(self.root.as_fd(), &f.handle, libc::O_WRONLY) {
            Ok(fd) => File::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                // The inode is gone: nobody can read it any more.
                self.forget_file(f.ino);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut inner = f.inner.lock();
        let before = inner.missing(f.len);
        // Fetched bytes are the generation's, not a change: the file keeps its mtime (a read
        // must not change it, and the cut would take a new one for a local change).
        let mtime = rustix::fs::fstat(&fd).ok().map(|st| rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        });
        let mut written: Option<(u64, u64)> = None;
        for (s, d) in spans.iter().zip(data) {
            let clip_end = s.end().min(inner.valid_end);
            for (a, b) in inner.present.gaps(s.offset, clip_end) {
                let lo = (a - s.offset) as usize;
                let hi = (b - s.offset) as usize;
                owsfs_local::write::write_at(&fd, a, &d[lo..hi])?;
                written = Some(written.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
            }
            if s.offset < clip_end {
                inner.present.insert(s.offset, clip_end);
            }
        }
        if let (Some(_), Some(mtime)) = (written, mtime) {
            let times = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: mtime,
            };
            rustix::fs::futimens(&fd, &times)?;
        }
        let after = inner.missing(f.len);
        let removed = inner.removed;
        inner.unsaved = true;
        let whole = inner.whole(f.len);
        drop(inner);
        if let Some((a, b)) = written {
            owsfs_sys::fs::start_writeback(&fd, a, b - a);
        }
        if !removed {
            self.missing_bytes
                .fetch_sub(before.saturating_sub(after) as i64, Ordering::Relaxed);
        }
        self.unsaved.lock().insert(f.ino);
        if whole {
            self.files.remove(&f.ino);
            if !removed {
                self.missing_files.fetch_sub(1, Ordering::Relaxed);
            }
            self.update_active();
        }
        self.counters_unsaved.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn forget_file(&self, ino: u64) {
        if let Some((_, f)) = self.files.remove(&ino) {
            let inner = f.inner.lock();
            if !inner.removed {
                self.missing_bytes
                    .fetch_sub(inner.missing(f.len) as i64, Ordering::Relaxed);
                self.missing_files.fetch_sub(1, Ordering::Relaxed);
            }
            self.unsaved.lock().insert(ino);
            self.counters_unsaved.store(true, Ordering::Relaxed);
        }
        self.update_active();
    }

    pub fn truncate(&self, ino: u64, size: u64) {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return;
        };
        let mut inner = f.inner.lock();
        if size >= inner.valid_end {
            return;
        }
        let before = inner.missing(f.len);
        inner.valid_end = size;
        let after = inner.missing(f.len);
        inner.unsaved = true;
        let whole = inner.whole(f.len);
        let removed = inner.removed;
        drop(inner);
        if !removed {
            self.missing_bytes
                .fetch_sub(before.saturating_sub(after) as i64, Ordering::Relaxed);
        }
        self.unsaved.lock().insert(ino);
        self.counters_unsaved.store(true, Ordering::Relaxed);
        if whole {
            self.files.remove(&ino);
            if !removed {
                self.missing_files.fetch_sub(1, Ordering::Relaxed);
            }
            self.update_active();
        }
    }

    /// A new inode got number `ino`: state of an older inode with that number goes (unless
    /// the handle still opens: then it is the same file, opened with O_CREAT).
    pub fn created(&self, ino: u64) {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return;
        };
        if let Err(e) = handle::open(self.root.as_fd(), &f.handle, owsfs_sys::fs::O_PATH_RAW)
            && e.raw_os_error() == Some(libc::ESTALE)
        {
            f.inner.lock().removed = true;
            self.forget_file(ino);
        }
    }

    pub fn removed(&self, ino: u64) {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return;
        };
        let mut inner = f.inner.lock();
        if inner.removed {
            return;
        }
        inner.removed = true;
        let missing = inner.missing(f.len);
        drop(inner);
        self.missing_bytes
            .fetch_sub(missing as i64, Ordering::Relaxed);
        self.missing_files.fetch_sub(1, Ordering::Relaxed);
        self.counters_unsaved.store(true, Ordering::Relaxed);
    }

    pub fn opened(&self, ino: u64, path: Option<&Path>) {
        let Some(path) = path else {
            return;
        };
        let tick = self.access_tick.fetch_add(1, Ordering::Relaxed);
        let mut a = self.access.lock();
        a.insert(ino, (tick, path.to_path_buf()));
        // Bounded: the oldest half goes when it grows past the limit.
        if a.len() > 2 * owsfs_local::access::ACCESS_LIMIT {
            let mut ticks: Vec<u64> = a.values().map(|(t, _)| *t).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            a.retain(|_, (t, _)| *t >= cut);
        }
    }

    /// Paths opened during this mount, most recent first.
    pub fn accessed_paths(&self) -> Vec<String> {
        let a = self.access.lock();
        let mut v: Vec<(u64, String)> = a
            .values()
            .map(|(t, p)| (*t, p.to_string_lossy().into_owned()))
            .collect();
        v.sort_unstable_by_key(|x| std::cmp::Reverse(x.0));
        v.into_iter().map(|(_, p)| p).collect()
    }
}
