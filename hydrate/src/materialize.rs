//! Materializing a pending directory: every entry of its tree made (files sparse and
//! pending, directories pending), stored in one transaction.

use super::*;

impl Hydrator {
    pub fn dir_is_pending(&self, ino: u64) -> bool {
        self.dirs.contains_key(&ino)
    }

    /// Any directory still pending (for the prefetch), with a descriptor of it.
    pub(crate) fn some_pending_dir(&self, skip: &HashSet<u64>) -> Option<(u64, OwnedFd)> {
        let candidates: Vec<(u64, Vec<u8>)> = self
            .dirs
            .iter()
            .filter(|e| !skip.contains(e.key()))
            .take(16)
            .map(|e| (*e.key(), e.value().handle.clone()))
            .collect();
        for (ino, h) in candidates {
            match handle::open(
                self.root.as_fd(),
                &h,
                owsfs_sys::fs::O_PATH_RAW | libc::O_DIRECTORY,
            ) {
                Ok(fd) => return Some((ino, fd)),
                Err(e) => tracing::warn!("hydrate: directory inode {ino} cannot be opened: {e}"),
            }
        }
        None
    }

    /// Materializes directory `ino` (an `O_PATH` descriptor of it in `dir`): every entry of
    /// its tree is created (directories pending, files sparse and pending), then its own
    /// attributes are set again. The caller holds the core's barrier shared.
    ///
    /// A directory without old material (made empty by an earlier materialization) is
    /// emptied first: entries of an attempt that died half-way are all it can hold. A
    /// directory with old material (a warm remount, `hyd_warm`) keeps what did not change:
    /// see [`Hydrator::reconcile`]; one whose old material is exactly its tree is taken as it
    /// is, without fetching the tree.
    pub fn materialize_dir(&self, ino: u64, dir: BorrowedFd<'_>) -> io::Result<()> {
        let one = self.materializing.lock();
        self.materialize_locked(ino, dir, one)
    }

    /// [`Hydrator::materialize_dir`] for the prefetch. With `give_way`, when a program waits
    /// on a fetch or a directory once the lock is ours, hands the lock on (fairly, so a
    /// program's materialization waiting for it goes next) and returns false.
    pub(crate) fn materialize_dir_in_background(
        &self,
        ino: u64,
        dir: BorrowedFd<'_>,
        give_way: bool,
    ) -> io::Result<bool> {
        let one = self.materializing.lock();
        if give_way && self.foreground.busy(Duration::ZERO) {
            MutexGuard::unlock_fair(one);
            return Ok(false);
        }
        self.materialize_locked(ino, dir, one)?;
        Ok(true)
    }

    pub(crate) fn materialize_locked(
        &self,
        ino: u64,
        dir: BorrowedFd<'_>,
        _one: MutexGuard<'_, ()>,
    ) -> io::Result<()> {
        let Some(state) = self.dirs.get(&ino).map(|d| d.clone()) else {
            return Ok(());
        };
        let started = Instant::now();
        let entry = decode_node(&state.node).map_err(err)?;
        let Content::Dir(tree_ref) = entry.content else {
            return Err(err(format!(
                "hydration state of directory {ino} holds no tree"
            )));
        };
        let dirfd = open_for_reading(dir)?;
        let warm = self.warm_row(ino)?;
        let mut batch = Batch::default();
        let mut how = "kept as it was";
        let same = warm.as_ref().is_some_and(|w| w.same && w.trust.is_none());
        if !same || !self.keep_same(&dirfd, &mut batch)? {
            batch = Batch::default();
            let tree = Tree::load(&*self.store, &tree_ref).map_err(|e| {
                eio(format!(
                    "hydrate: cannot fetch tree {} of a directory (inode {ino}): {e}",
                    tree_ref.id
                ))
            })?;
            match warm {
                Some(w) => {
                    how = "reconciled with its old entries";
                    self.reconcile(
                        ino,
                        &dirfd,
                        &tree,
                        &tree_ref.id,
                        w.trust.as_deref(),
                        &mut batch,
                    )?;
                }
                None => {
                    how = "made";
                    clear_dir(&dirfd)?;
                    for e in &tree.entries {
                        self.create_fresh(&dirfd, e, &tree_ref.id, &mut batch)?;
                    }
                }
            }
        }
        // The directory's own attributes, changed by the creations.
        if ino != self.root_ino {
            owsfs_local::write::set_attrs(dirfd.as_fd(), None, &entry, self.is_root)?;
        }
        rustix::fs::fsync(&dirfd)?;
        let entries = batch.nodes.len();
        self.commit_batch(ino, batch)?;
        tracing::debug!(
            "hydrate: materialized directory {ino} ({how}): {entries} nodes in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// Creates entry `e` of tree `tree_id` in `dir` as the store has it: a directory
    /// pending, a file sparse (or a link to the inode its hard-link key already became).
    pub(crate) fn create_fresh(
        &self,
        dir: &OwnedFd,
        e: &TreeEntry,
        tree_id: &BlobId,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let name = OsStr::from_bytes(&e.name);
        if e.link_key != 0 && e.kind == NodeKind::File {
            let known = self.links.lock().get(&e.link_key).cloned();
            if let Some(h) = known {
                match handle::open(self.root.as_fd(), &h, owsfs_sys::fs::O_PATH_RAW) {
                    Ok(fd) => {
                        owsfs_sys::fs::link_fd(&fd, dir, name)?;
                        return Ok(());
                    }
                    Err(err) => tracing::warn!(
                        "hydrate: the other names of a hard-linked file are gone ({err}); \
                         {} becomes a file of its own",
                        String::from_utf8_lossy(&e.name)
                    ),
                }
            }
        }
        if owsfs_local::write::create(dir.as_fd(), name, e)? == owsfs_local::write::Created::Skipped
        {
            return Ok(());
        }
        owsfs_local::write::set_attrs(dir.as_fd(), Some(name), e, self.is_root)?;
        let h = handle::of(dir.as_fd(), Path::new(name))?;
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let node = encode_node(e).map_err(err)?;
        match e.kind {
            NodeKind::Dir => {
                batch.nodes.push((st.st_ino, Kind::Dir, node.clone()));
                batch
                    .dirs
                    .push((st.st_ino, DirState { handle: h, node }, None));
            }
            NodeKind::File => {
                if e.link_key != 0 {
                    batch.links.push((e.link_key, h.clone()));
                    self.links.lock().insert(e.link_key, h.clone());
                }
                batch.nodes.push((st.st_ino, Kind::File, node.clone()));
                self.add_file(
                    st.st_ino,
                    h,
                    node,
                    e,
                    Some(tree_id),
                    ExtentSet::new(),
                    batch,
                )?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Adds file `ino` (entry `e`, bytes `present` already local) to `batch`: whole, or to
    /// be fetched.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_file(
        &self,
        ino: u64,
        handle: Vec<u8>,
        node: Vec<u8>,
        e: &TreeEntry,
        tree_id: Option<&BlobId>,
        present: ExtentSet,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let have = e.size - ranges::missing_below(&present, e.size);
        batch.kept_bytes += have as i64;
        if have == e.size {
            batch.whole_files += 1;
            return Ok(());
        }
        let fs = self.file_state(ino, handle, node).map_err(err)?;
        if fs.len != e.size {
            let tree = tree_id.map_or("the cache's older generation".into(), |t| {
                format!("tree {t}")
            });
            return Err(eio(format!(
                "hydrate: {tree}: {} has size {} but its chunks cover {} bytes",
                String::from_utf8_lossy(&e.name),
                e.size,
                fs.len
            )));
        }
        fs.inner.lock().present = present;
        batch.files.push(fs);
        Ok(())
    }

    /// Stores what materializing directory `ino` made, and makes it live.
    pub(crate) fn commit_batch(&self, ino: u64, batch: Batch) -> io::Result<()> {
        // Crash window: the entries are made and durable, not recorded.
        fail::fail_point!("materialize-before-commit");
        let Batch {
            nodes,
            files,
            dirs,
            links,
            whole_files,
            kept_bytes,
            old_done,
        } = batch;
        self.nodes
            .add(nodes, |rows| {
                let mut db = self.db.lock();
                let tx = db.transaction()?;
                {
                    let mut put_node = tx.prepare_cached(
                        "INSERT OR REPLACE INTO nodes (ino, kind, content) VALUES (?1, ?2, ?3)",
                    )?;
                    for (ino, kind, content) in rows {
                        put_node.execute(params![*ino as i64, kind.byte() as i64, content])?;
                    }
                    let mut put_file = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_files (ino, handle, node, valid_end, present)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for f in &files {
                        let present = encode_ranges(&f.inner.lock().present);
                        put_file.execute(params![
                            f.ino as i64,
                            f.handle,
                            f.node,
                            f.len as i64,
                            present
                        ])?;
                    }
                    let mut put_dir = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_dirs (ino, handle, node) VALUES (?1, ?2, ?3)",
                    )?;
                    let mut put_warm = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_warm (ino, same, trust) VALUES (?1, ?2, ?3)",
                    )?;
                    let mut no_warm = tx.prepare_cached("DELETE FROM hyd_warm WHERE ino = ?1")?;
                    for (ino, d, warm) in &dirs {
                        put_dir.execute(params![*ino as i64, d.handle, d.node])?;
                        match warm {
                            Some(w) => {
                                put_warm.execute(params![*ino as i64, w.same as i64, w.trust])?
                            }
                            None => no_warm.execute([*ino as i64])?,
                        };
                    }
                    let mut put_link = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_links (key, handle) VALUES (?1, ?2)",
                    )?;
                    for (k, h) in &links {
                        put_link.execute(params![*k as i64, h])?;
                    }
                    let mut old = tx.prepare_cached("DELETE FROM hyd_old WHERE ino = ?1")?;
                    for i in &old_done {
                        old.execute([*i as i64])?;
                    }
                    tx.execute("DELETE FROM hyd_dirs WHERE ino = ?1", [ino as i64])?;
                    no_warm.execute([ino as i64])?;
                }
                tx.commit()?;
                Ok(())
            })
            .map_err(err)?;
        for (ino, d, _) in dirs {
            self.dirs.insert(ino, d);
        }
        for f in files {
            self.files.insert(f.ino, Arc::new(f));
        }
        self.files_added.fetch_add(1, Ordering::Release);
        self.dirs.remove(&ino);
        if whole_files > 0 || kept_bytes > 0 {
            self.missing_files.fetch_sub(whole_files, Ordering::Relaxed);
            self.missing_bytes.fetch_sub(kept_bytes, Ordering::Relaxed);
            self.counters_unsaved.store(true, Ordering::Relaxed);
        }
        self.update_active();
        Ok(())
    }
}

/// Removes every entry of a directory (what an interrupted materialization left).
pub(crate) fn clear_dir(dir: &OwnedFd) -> io::Result<()> {
    for (name, st) in list_dir(dir)? {
        remove_entry(dir, &name, st.st_mode & libc::S_IFMT == libc::S_IFDIR)?;
    }
    Ok(())
}

/// Removes `name` from `dir`, a directory with everything below it.
pub(crate) fn remove_entry(dir: &OwnedFd, name: &OsStr, is_dir: bool) -> io::Result<()> {
    if is_dir {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&sub)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// The entries of `dir`, each with its own (not followed) status.
pub(crate) fn list_dir(dir: &OwnedFd) -> io::Result<Vec<(std::ffi::OsString, rustix::fs::Stat)>> {
    let mut d = rustix::fs::Dir::new(open_for_reading(dir.as_fd())?)?;
    let mut v = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let name = OsStr::from_bytes(n).to_os_string();
        let st = rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        v.push((name, st));
    }
    Ok(v)
}

/// Directory `dir` (any descriptor of it, `O_PATH` too) opened again for reading (without
/// moving its atime).
pub(crate) fn open_for_reading(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(owsfs_fuse::openat_noatime(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
    )?)
}
