//! A store for one test: a `file://` directory or a bucket on a SeaweedFS server of its own.
//! Included (with `testkit/seaweed.rs`) by the test crates that need S3, not by every crate.

#![allow(dead_code)]

use std::path::PathBuf;

use super::Workspace;
use crate::seaweed::Seaweed;

/// Dropping it stops the server and removes the directory.
pub struct TestStore {
    pub url: String,
    pub env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    _s3: Option<Seaweed>,
}

impl TestStore {
    pub fn file() -> TestStore {
        let dir = tempdir();
        TestStore {
            url: format!("file://{}", dir.path().join("store").display()),
            env: Vec::new(),
            dir,
            _s3: None,
        }
    }

    pub fn seaweed(bucket: &str) -> TestStore {
        let s3 = Seaweed::start();
        s3.create_bucket(bucket);
        TestStore {
            url: s3.store_url(bucket, "t1"),
            env: s3.env(),
            dir: tempdir(),
            _s3: Some(s3),
        }
    }

    /// The root of a `file://` store.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A workspace on this store with a cache of its own (not mounted yet).
    pub fn workspace(&self, name: &str, extra: &[&str]) -> Workspace {
        let mut ws = Workspace::unmounted(Some(&self.url), name);
        ws.env = self.env.clone();
        ws.extra = extra.iter().map(|s| s.to_string()).collect();
        ws
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("owsfs-store-")
        .tempdir()
        .expect("tempdir")
}
