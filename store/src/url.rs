//! Store locations: `file:///abs/path`, `s3://bucket/prefix?endpoint=..&region=..`, `memory://name`.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Result, StoreError};

const HINT: &str = "use file:///abs/path, s3://bucket/prefix or memory://";

/// A parsed store location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory (absolute path).
    File { root: PathBuf },
    /// An S3-compatible bucket, optionally under a prefix.
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        region: Option<String>,
        /// Virtual-host-style addressing; path style (the default) suits SeaweedFS and MinIO.
        virtual_host: bool,
    },
    /// A process-wide named in-memory store (tests). Opens of the same name share data.
    Memory { name: String },
}

impl StoreUrl {
    /// Parses a store URL.
    pub fn parse(s: &str) -> Result<StoreUrl> {
        let bad = |msg: String| StoreError::Config {
            url: s.to_string(),
            msg: format!("{msg}; {HINT}"),
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad("no scheme".into()));
        };
        match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("the file path must be absolute".into()));
                }
                if rest.contains('?') {
                    return Err(bad("file:// takes no options".into()));
                }
                Ok(StoreUrl::File {
                    root: PathBuf::from(rest),
                })
            }
            "memory" => {
                if rest.contains('/') || rest.contains('?') {
                    return Err(bad("memory:// takes only a name".into()));
                }
                Ok(StoreUrl::Memory {
                    name: rest.to_string(),
                })
            }
            "s3" => {
                let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
                let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
                if bucket.is_empty() {
                    return Err(bad("the bucket is missing".into()));
                }
                let prefix = prefix.trim_matches('/').to_string();
                let mut endpoint = None;
                let mut region = None;
                let mut virtual_host = false;
                for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    match k {
                        "endpoint" => endpoint = Some(v.trim_end_matches('/').to_string()),
                        "region" => region = Some(v.to_string()),
                        "virtual_host" => virtual_host = v == "true" || v == "1",
                        _ => {
                            return Err(bad(format!(
                                "unknown option {k:?} (known: endpoint, region, virtual_host)"
                            )));
                        }
                    }
                }
                Ok(StoreUrl::S3 {
                    bucket: bucket.to_string(),
                    prefix,
                    endpoint,
                    region,
                    virtual_host,
                })
            }
            other => Err(bad(format!("unknown scheme {other:?}"))),
        }
    }

    /// The URL that [`StoreUrl::parse`] reads back as this location (for `--store`; `Display`
    /// is for messages).
    pub fn to_url(&self) -> String {
        match self {
            StoreUrl::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                virtual_host,
            } => {
                let mut s = format!("s3://{bucket}");
                if !prefix.is_empty() {
                    s.push('/');
                    s.push_str(prefix);
                }
                let mut q = Vec::new();
                if let Some(e) = endpoint {
                    q.push(format!("endpoint={e}"));
                }
                if let Some(r) = region {
                    q.push(format!("region={r}"));
                }
                if *virtual_host {
                    q.push("virtual_host=true".into());
                }
                if !q.is_empty() {
                    s.push('?');
                    s.push_str(&q.join("&"));
                }
                s
            }
            other => other.to_string(),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File { root } => write!(f, "file://{}", root.display()),
            StoreUrl::Memory { name } => write!(f, "memory://{name}"),
            StoreUrl::S3 {
                bucket,
                prefix,
                endpoint,
                ..
            } => {
                write!(f, "s3://{bucket}")?;
                if !prefix.is_empty() {
                    write!(f, "/{prefix}")?;
                }
                if let Some(e) = endpoint {
                    write!(f, " (endpoint {e})")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            StoreUrl::parse("file:///tmp/x").unwrap(),
            StoreUrl::File {
                root: "/tmp/x".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("memory://t1").unwrap(),
            StoreUrl::Memory { name: "t1".into() }
        );
        let u = StoreUrl::parse("s3://b/p/q/?endpoint=http://127.0.0.1:8333/&region=us-east-1")
            .unwrap();
        assert_eq!(
            u,
            StoreUrl::S3 {
                bucket: "b".into(),
                prefix: "p/q".into(),
                endpoint: Some("http://127.0.0.1:8333".into()),
                region: Some("us-east-1".into()),
                virtual_host: false,
            }
        );
        assert_eq!(StoreUrl::parse(&u.to_url()).unwrap(), u);
        for s in [
            "file:///tmp/x",
            "memory://t1",
            "s3://b",
            "s3://b/p?virtual_host=true",
        ] {
            let u = StoreUrl::parse(s).unwrap();
            assert_eq!(StoreUrl::parse(&u.to_url()).unwrap(), u, "{s}");
        }
        assert!(matches!(
            StoreUrl::parse("s3://b").unwrap(),
            StoreUrl::S3 { ref prefix, .. } if prefix.is_empty()
        ));
    }

    #[test]
    fn rejects_with_the_fix() {
        for bad in [
            "file://rel/path",
            "gs://x",
            "s3:///p",
            "/abs",
            "s3://b?foo=1",
        ] {
            let e = StoreUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("file:///abs/path"), "{bad}: {e}");
        }
    }
}
