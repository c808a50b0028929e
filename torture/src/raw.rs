//! The store's objects read and written behind owsfs's back, to corrupt them: files under a
//! `file://` root, or objects of the SeaweedFS bucket through its S3 API.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};

use crate::seaweed::Seaweed;

#[derive(Clone)]
pub enum Raw {
    File(PathBuf),
    S3 {
        s3: Arc<Seaweed>,
        bucket: String,
        prefix: String,
    },
}

impl Raw {
    /// A store of its own for one trial, on the same server: its URL and its objects. A
    /// `file://` store goes in `dir`.
    pub fn fresh(&self, name: &str, dir: &std::path::Path) -> (String, Raw) {
        match self {
            Raw::File(_) => {
                let root = dir.join("store");
                (format!("file://{}", root.display()), Raw::File(root))
            }
            Raw::S3 { s3, bucket, .. } => (
                s3.store_url(bucket, name),
                Raw::S3 {
                    s3: s3.clone(),
                    bucket: bucket.clone(),
                    prefix: name.to_string(),
                },
            ),
        }
    }

    /// Keys under `prefix` (relative to the store's root), sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out = match self {
            Raw::File(root) => {
                let mut out = Vec::new();
                let mut stack = vec![root.clone()];
                while let Some(d) = stack.pop() {
                    let Ok(rd) = std::fs::read_dir(&d) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if let Ok(rel) = p.strip_prefix(root) {
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    }
                }
                out.retain(|k| k.starts_with(prefix));
                out
            }
            Raw::S3 {
                s3,
                bucket,
                prefix: p,
            } => s3
                .list_keys(bucket, &format!("{p}/{prefix}"))
                .into_iter()
                .filter_map(|k| k.strip_prefix(&format!("{p}/")).map(str::to_string))
                .collect(),
        };
        out.sort();
        out
    }

    /// Deletes every object of the store (a trial's own store, once the trial passed), so that
    /// a long run's store does not grow with every trial.
    pub fn remove_all(&self) -> Result<()> {
        match self {
            Raw::File(root) => match std::fs::remove_dir_all(root) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(anyhow::Error::new(e).context(format!("remove {}", root.display())))
                }
                _ => Ok(()),
            },
            Raw::S3 { s3, bucket, prefix } => {
                for key in s3.list_keys(bucket, &format!("{prefix}/")) {
                    let r = s3.delete_object(bucket, &key);
                    if !r.is_success() && r.status != 404 {
                        bail!("DELETE {key}: {}", r.status);
                    }
                }
                Ok(())
            }
        }
    }

    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        match self {
            Raw::File(root) => Ok(std::fs::read(root.join(key))?),
            Raw::S3 { s3, bucket, prefix } => {
                let r = s3.get_object(bucket, &format!("{prefix}/{key}"));
                if !r.is_success() {
                    bail!("GET {key}: {}", r.status);
                }
                Ok(r.body)
            }
        }
    }

    pub fn put(&self, key: &str, body: &[u8]) -> Result<()> {
        match self {
            Raw::File(root) => Ok(std::fs::write(root.join(key), body)?),
            Raw::S3 { s3, bucket, prefix } => {
                let r = s3.put_object(bucket, &format!("{prefix}/{key}"), body);
                if !r.is_success() {
                    bail!("PUT {key}: {}", r.status);
                }
                Ok(())
            }
        }
    }
}
