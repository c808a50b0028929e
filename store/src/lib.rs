//! owsfs-store: the object store side of owsfs (content-addressed chunks, packs, trees,
//! generations, leases). It arrives with the generations issue; this crate holds its place in
//! the dependency graph (`src/` → `fuse/` → `journal/`, `store/`).
