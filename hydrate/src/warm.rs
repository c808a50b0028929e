//! Warm remount: a pending directory that holds entries of an older generation keeps what
//! did not change (see [`Hydrator::reconcile`]).

use super::*;

impl Hydrator {
    /// The warm row of directory `ino`: it holds old material.
    pub(crate) fn warm_row(&self, ino: u64) -> io::Result<Option<Warm>> {
        let db = self.db.lock();
        let mut stmt = db
            .prepare_cached("SELECT same, trust FROM hyd_warm WHERE ino = ?1")
            .map_err(err)?;
        stmt.query_row([ino as i64], |r| {
            Ok(Warm {
                same: r.get::<_, i64>(0)? != 0,
                trust: r.get(1)?,
            })
        })
        .optional()
        .map_err(err)
    }

    /// What the cache's older generation had at inode `ino` (`hyd_old`).
    pub(crate) fn old_node(&self, ino: u64) -> io::Result<Option<OldNode>> {
        /// state, node, valid_end, present
        type Row = (i64, Vec<u8>, Option<i64>, Option<Vec<u8>>);
        let row: Option<Row> = {
            let db = self.db.lock();
            let mut stmt = db
                .prepare_cached(
                    "SELECT state, node, valid_end, present FROM hyd_old WHERE ino = ?1",
                )
                .map_err(err)?;
            stmt.query_row([ino as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .map_err(err)?
        };
        let Some((state, node, valid_end, present)) = row else {
            return Ok(None);
        };
        let entry = decode_node(&node).map_err(err)?;
        // The bytes of the older generation that are local: all of a whole file, the stored
        // ranges below `valid_end` of a partial one.
        let present = match state {
            0 => std::iter::once((0, entry.size))
                .filter(|r| r.1 > 0)
                .collect(),
            1 => {
                let end = (valid_end.unwrap_or(0).max(0) as u64).min(entry.size);
                clip(&decode_ranges(&present.unwrap_or_default()), end)
            }
            _ => ExtentSet::new(),
        };
        Ok(Some(OldNode {
            pending: state == 2,
            entry,
            node,
            present,
        }))
    }

    /// The directory's old material is exactly its tree: each entry is kept as it is, with
    /// the node and state it had. False, with nothing changed, when an entry is not known
    /// as expected (then the tree decides).
    pub(crate) fn keep_same(&self, dir: &OwnedFd, batch: &mut Batch) -> io::Result<bool> {
        for (name, st) in list_dir(dir)? {
            let ino = st.st_ino;
            let kind = st.st_mode & libc::S_IFMT;
            if kind != libc::S_IFREG && kind != libc::S_IFDIR {
                continue;
            }
            let Some(old) = self.old_node(ino)? else {
                return Ok(false);
            };
            let h = handle::of(dir.as_fd(), Path::new(&name))?;
            match (&old.entry.content, kind) {
                (Content::File(_), libc::S_IFREG)
                    if !old.pending
                        && st.st_size as u64 == old.entry.size
                        && !self.linked_elsewhere(old.entry.link_key, dir, &name)? =>
                {
                    if old.entry.link_key != 0 {
                        batch.links.push((old.entry.link_key, h.clone()));
                    }
                    batch.nodes.push((ino, Kind::File, old.node.clone()));
                    self.add_file(ino, h, old.node, &old.entry, None, old.present, batch)?;
                }
                (Content::Dir(_), libc::S_IFDIR) => {
                    let warm = if old.pending {
                        self.warm_row(ino)?
                    } else {
                        Some(Warm {
                            same: true,
                            trust: None,
                        })
                    };
                    batch.nodes.push((ino, Kind::Dir, old.node.clone()));
                    batch.dirs.push((
                        ino,
                        DirState {
                            handle: h,
                            node: old.node,
                        },
                        warm,
                    ));
                }
                _ => return Ok(false),
            }
            batch.old_done.push(ino);
        }
        let mut links = self.links.lock();
        for (k, h) in &batch.links {
            links.insert(*k, h.clone());
        }
        Ok(true)
    }

    /// Materializes directory `ino` over its old material: an old entry is kept where the
    /// tree has an entry of the same name and kind and the cache knows what the old one holds
    /// (a file keeps the ranges whose chunks did not change, a directory stays pending with
    /// its old material inside, a symlink with the same target stays); everything else old
    /// goes, and the tree's other entries are made as on a fresh cache.
    ///
    /// Before anything changes, the kept inodes are stored as the directory's `trust`: a
    /// retry after a crash trusts only them (any other entry may be one this attempt made,
    /// with an inode number an old row happens to name), and a kept file that shrinks has
    /// its old row clipped first.
    pub(crate) fn reconcile(
        &self,
        ino: u64,
        dir: &OwnedFd,
        tree: &Tree,
        tree_id: &BlobId,
        trust: Option<&[u8]>,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let trust: Option<HashSet<u64>> = trust.map(|t| {
            t.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect()
        });
        let by_name: HashMap<&[u8], &TreeEntry> =
            tree.entries.iter().map(|e| (&e.name[..], e)).collect();
        let mut keep: Vec<(std::ffi::OsString, rustix::fs::Stat, &TreeEntry, Keep)> = Vec::new();
        let mut remove: Vec<(std::ffi::OsString, bool, u64)> = Vec::new();
        let mut clipped: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        for (name, st) in list_dir(dir)? {
            let decision = match by_name.get(name.as_bytes()) {
                Some(e) if trust.as_ref().is_none_or(|t| t.contains(&st.st_ino)) => {
                    self.keep_decision(dir, &name, &st, e)?
                }
                _ => None,
            };
            match decision {
                Some(k) => {
                    if let Keep::File { old_end, .. } = &k
                        && *old_end > by_name[name.as_bytes()].size
                    {
                        let e = by_name[name.as_bytes()];
                        if let Some(old) = self.old_node(st.st_ino)? {
                            clipped.push((
                                st.st_ino,
                                e.size,
                                encode_ranges(&clip(&old.present, e.size)),
                            ));
                        }
                    }
                    let e = by_name[name.as_bytes()];
                    keep.push((name, st, e, k));
                }
                None => {
                    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    remove.push((name, is_dir, st.st_ino));
                }
            }
        }
        {
            let kept: Vec<u8> = keep.iter().flat_map(|k| k.1.st_ino.to_le_bytes()).collect();
            let mut db = self.db.lock();
            let tx = db.transaction().map_err(err)?;
            tx.execute(
                "UPDATE hyd_warm SET trust = ?2 WHERE ino = ?1",
                params![ino as i64, kept],
            )
            .map_err(err)?;
            for (i, end, present) in &clipped {
                tx.execute(
                    "UPDATE hyd_old SET state = 1, valid_end = ?2, present = ?3 WHERE ino = ?1",
                    params![*i as i64, *end as i64, present],
                )
                .map_err(err)?;
            }
            tx.commit().map_err(err)?;
        }
        for (name, is_dir, old_ino) in remove {
            remove_entry(dir, &name, is_dir)?;
            batch.old_done.push(old_ino);
        }
        let mut kept_names: HashSet<Vec<u8>> = HashSet::new();
        for (name, st, e, k) in keep {
            self.apply_keep(dir, &name, &st, e, k, Some(tree_id), batch)?;
            kept_names.insert(name.as_bytes().to_vec());
            batch.old_done.push(st.st_ino);
        }
        for e in &tree.entries {
            if !kept_names.contains(&e.name) {
                self.create_fresh(dir, e, tree_id, batch)?;
            }
        }
        fail::fail_point!("reconcile-midway");
        Ok(())
    }

    /// Whether old entry `name` (`st`) can stay as entry `e` of the new tree, and what of it.
    pub(crate) fn keep_decision(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        st: &rustix::fs::Stat,
        e: &TreeEntry,
    ) -> io::Result<Option<Keep>> {
        let kind = st.st_mode & libc::S_IFMT;
        Ok(match (&e.content, kind) {
            (Content::File(new), libc::S_IFREG) if st.st_nlink == 1 => {
                let Some(old) = self.old_node(st.st_ino)? else {
                    return Ok(None);
                };
                let Content::File(was) = &old.entry.content else {
                    return Ok(None);
                };
                let local = st.st_size as u64;
                if old.pending
                    || (local != old.entry.size && local != e.size)
                    || self.linked_elsewhere(e.link_key, dir, name)?
                {
                    return Ok(None);
                }
                let present = clip(&old.present, local);
                let present = if was == new {
                    present
                } else {
                    self.unchanged_ranges(was, new, &present, st.st_ino)?
                };
                Some(Keep::File {
                    present,
                    old_end: old.entry.size.min(local),
                })
            }
            (Content::Dir(new), libc::S_IFDIR) => {
                let Some(old) = self.old_node(st.st_ino)? else {
                    return Ok(None);
                };
                let Content::Dir(was) = &old.entry.content else {
                    return Ok(None);
                };
                let warm = if old.pending {
                    // Pending in the older generation too: its own old material, if any.
                    self.warm_row(st.st_ino)?.map(|w| Warm {
                        same: w.same && was.id == new.id,
                        trust: w.trust,
                    })
                } else {
                    Some(Warm {
                        same: was.id == new.id,
                        trust: None,
                    })
                };
                Some(Keep::Dir(warm))
            }
            (Content::Symlink(target), libc::S_IFLNK) => {
                let now = rustix::fs::readlinkat(dir, name, Vec::new())?;
                (now.as_bytes() == &target[..]).then_some(Keep::Other)
            }
            _ => None,
        })
    }

    /// Hard-link key `key` already belongs to another inode than `name`'s (then `name` must
    /// become a link to it, not stay a file of its own).
    pub(crate) fn linked_elsewhere(
        &self,
        key: u64,
        dir: &OwnedFd,
        name: &OsStr,
    ) -> io::Result<bool> {
        if key == 0 {
            return Ok(false);
        }
        let Some(h) = self.links.lock().get(&key).cloned() else {
            return Ok(false);
        };
        Ok(handle::of(dir.as_fd(), Path::new(name))? != h)
    }

    /// Applies a kept entry: size and attributes of the new tree, and its place in `batch`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_keep(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        st: &rustix::fs::Stat,
        e: &TreeEntry,
        keep: Keep,
        tree_id: Option<&BlobId>,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let ino = st.st_ino;
        if let Keep::File { .. } = keep
            && st.st_size as u64 != e.size
        {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            rustix::fs::ftruncate(&fd, e.size)?;
            rustix::fs::fsync(&fd)?;
        }
        owsfs_local::write::drop_other_xattrs(dir.as_fd(), name, e)?;
        owsfs_local::write::set_attrs(dir.as_fd(), Some(name), e, self.is_root)?;
        let node = encode_node(e).map_err(err)?;
        match keep {
            Keep::File { present, .. } => {
                let h = handle::of(dir.as_fd(), Path::new(name))?;
                if e.link_key != 0 {
                    batch.links.push((e.link_key, h.clone()));
                    self.links.lock().insert(e.link_key, h.clone());
                }
                batch.nodes.push((ino, Kind::File, node.clone()));
                self.add_file(ino, h, node, e, tree_id, present, batch)?;
            }
            Keep::Dir(warm) => {
                let h = handle::of(dir.as_fd(), Path::new(name))?;
                batch.nodes.push((ino, Kind::Dir, node.clone()));
                batch.dirs.push((ino, DirState { handle: h, node }, warm));
            }
            Keep::Other => {}
        }
        Ok(())
    }

    /// The ranges of `present` (bytes of content `was`) whose chunks content `new` has at the
    /// same offsets.
    pub(crate) fn unchanged_ranges(
        &self,
        was: &FileContent,
        new: &FileContent,
        present: &ExtentSet,
        ino: u64,
    ) -> io::Result<ExtentSet> {
        let a = self.content_spans(was, ino)?;
        let b = self.content_spans(new, ino)?;
        Ok(ranges::intersect(&ranges::same_chunks(&a, &b), present))
    }

    /// Every chunk of a file's content, at its offset (chunk lists fetched).
    pub(crate) fn content_spans(&self, c: &FileContent, ino: u64) -> io::Result<Vec<ChunkSpan>> {
        let refs: Vec<BlobRef> = match c {
            FileContent::Empty => Vec::new(),
            FileContent::Chunks(c) => c.clone(),
            FileContent::List(l) => {
                let mut v = Vec::new();
                for g in l {
                    v.extend(self.list_refs(g, ino)?);
                }
                v
            }
        };
        let mut at = 0u64;
        Ok(refs
            .into_iter()
            .map(|r| {
                let s = ChunkSpan { r, offset: at };
                at += r.len as u64;
                s
            })
            .collect())
    }
}
