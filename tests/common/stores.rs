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
    bucket: String,
}

impl TestStore {
    pub fn file() -> TestStore {
        let dir = tempdir();
        TestStore {
            url: format!("file://{}", dir.path().join("store").display()),
            env: Vec::new(),
            dir,
            _s3: None,
            bucket: String::new(),
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
            bucket: bucket.to_string(),
        }
    }

    /// The root of a `file://` store.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Keys of the store's objects under `prefix` (a `dir/` prefix), sorted, read behind
    /// owsfs's back.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        match &self._s3 {
            Some(s3) => {
                let mut k: Vec<String> = s3
                    .list_keys(&self.bucket, &format!("t1/{prefix}"))
                    .into_iter()
                    .map(|k| k.strip_prefix("t1/").unwrap_or(&k).to_string())
                    .collect();
                k.sort();
                k
            }
            None => {
                fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
                    let Ok(rd) = std::fs::read_dir(dir) else {
                        return;
                    };
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            walk(root, &p, out);
                        } else {
                            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                        }
                    }
                }
                let mut out = Vec::new();
                walk(&self.root(), &self.root().join(prefix), &mut out);
                out.sort();
                out
            }
        }
    }

    /// An object's bytes, read behind owsfs's back.
    pub fn get(&self, key: &str) -> Vec<u8> {
        match &self._s3 {
            Some(s3) => {
                let r = s3.get_object(&self.bucket, &format!("t1/{key}"));
                assert!(r.is_success(), "GET {key}: {}", r.body_str());
                r.body
            }
            None => std::fs::read(self.root().join(key)).unwrap(),
        }
    }

    /// Replaces an object behind owsfs's back.
    pub fn put(&self, key: &str, body: &[u8]) {
        match &self._s3 {
            Some(s3) => {
                let r = s3.put_object(&self.bucket, &format!("t1/{key}"), body);
                assert!(r.is_success(), "PUT {key}: {}", r.body_str());
            }
            None => std::fs::write(self.root().join(key), body).unwrap(),
        }
    }

    /// Deletes an object behind owsfs's back.
    pub fn delete(&self, key: &str) {
        match &self._s3 {
            Some(s3) => {
                let r = s3.delete_object(&self.bucket, &format!("t1/{key}"));
                assert!(r.is_success(), "DELETE {key}: {}", r.body_str());
            }
            None => std::fs::remove_file(self.root().join(key)).unwrap(),
        }
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
