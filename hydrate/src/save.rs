//! Storing the hydration state in `state.db` (after an fdatasync of what it claims).

use super::*;

impl Hydrator {
    /// Stores what changed: each changed file's ranges (after an fdatasync of it, so the
    /// stored ranges are durable bytes), files now whole or gone dropped, and the counters.
    /// Called every 250 ms (the saver), before the journal forgets a cut, and at unmount.
    pub fn save(&self) -> anyhow::Result<()> {
        let inos: Vec<u64> = std::mem::take(&mut *self.unsaved.lock())
            .into_iter()
            .collect();
        if inos.is_empty() && !self.counters_unsaved.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        // (inode, Some((valid_end, present)) to update, None to drop)
        type Row = (u64, Option<(u64, Vec<u8>)>);
        let mut rows: Vec<Row> = Vec::new();
        // The files whose bytes must be durable before the rows are: a partial file's
        // ranges are taken before its sync (a chunk written after the snapshot is not
        // claimed), a whole file's state goes only after its bytes are durable.
        let mut to_sync: Vec<OwnedFd> = Vec::new();
        for ino in inos {
            match self.files.get(&ino).map(|f| Arc::clone(&f)) {
                Some(f) => {
                    {
                        let mut inner = f.inner.lock();
                        inner.unsaved = false;
                        rows.push((ino, Some((inner.valid_end, encode_ranges(&inner.present)))));
                    }
                    if let Ok(fd) = handle::open(self.root.as_fd(), &f.handle, libc::O_RDONLY) {
                        to_sync.push(fd);
                    }
                }
                None => rows.push((ino, None)),
            }
        }
        {
            let db = self.db.lock();
            let mut stmt = db.prepare_cached("SELECT handle FROM hyd_files WHERE ino = ?1")?;
            for (ino, r) in &rows {
                if r.is_none()
                    && let Ok(h) = stmt.query_row([*ino as i64], |r| r.get::<_, Vec<u8>>(0))
                    && let Ok(fd) = handle::open(self.root.as_fd(), &h, libc::O_RDONLY)
                {
                    to_sync.push(fd);
                }
            }
        }
        // One syncfs instead of many fdatasyncs (each a journal commit) when many files
        // were fetched since the last save, e.g. a directory of small files.
        if to_sync.len() > 16 {
            owsfs_sys::fs::syncfs(&self.root)?;
        } else {
            for fd in &to_sync {
                owsfs_sys::fs::fdatasync(fd)?;
            }
        }
        drop(to_sync);
        // Crash window: the bytes are durable, the ranges not recorded.
        fail::fail_point!("hydrate-save-midway");
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        {
            let mut upd = tx.prepare_cached(
                "UPDATE hyd_files SET valid_end = ?2, present = ?3 WHERE ino = ?1",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM hyd_files WHERE ino = ?1")?;
            for (ino, r) in &rows {
                match r {
                    Some((valid_end, present)) => {
                        upd.execute(params![*ino as i64, *valid_end as i64, present])?;
                    }
                    None => {
                        del.execute([*ino as i64])?;
                    }
                }
            }
            let mut meta = tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?;
            meta.execute(params![
                "hyd_missing_files",
                self.missing_files.load(Ordering::Relaxed).to_string()
            ])?;
            meta.execute(params![
                "hyd_missing_bytes",
                self.missing_bytes.load(Ordering::Relaxed).to_string()
            ])?;
            if self.files.is_empty() && self.dirs.is_empty() {
                tx.execute("DELETE FROM hyd_links", [])?;
            }
            if self.dirs.is_empty() {
                // No directory left to reconcile: the older generation's rows are spent.
                tx.execute_batch("DELETE FROM hyd_old; DELETE FROM hyd_warm;")?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

pub(crate) fn encode_ranges(set: &ExtentSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(set.len() * 16);
    for (s, e) in set.iter() {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
    }
    out
}

pub(crate) fn decode_ranges(b: &[u8]) -> ExtentSet {
    b.chunks_exact(16)
        .map(|c| {
            let s = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
            let e = u64::from_le_bytes(c[8..].try_into().unwrap_or_default());
            (s, e)
        })
        .collect()
}
