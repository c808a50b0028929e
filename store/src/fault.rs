//! Fault injection, a test hook. [`FaultLayer`] is an opendal layer that fails requests at a
//! configurable rate with a seedable RNG: read errors, write errors before the write happens,
//! lost acknowledgements (the write happened, the caller sees an error: a retried conditional
//! PUT then meets its own object), delays longer than the timeout, slow answers within it, and
//! listings that lag behind recent writes (entries written less than `recent_ms` ago left
//! out). Injected errors are marked temporary, so the store's retry loop retries them like
//! real ones.
//!
//! `OWSFS_FAULTS=rate=0.1,seed=7,kinds=read+write+ack+timeout+slow+list,delay_ms=200` enables
//! it for a process (see [`FaultConfig::from_env`]); `log=/path` appends one line per injected
//! fault (`kind path`) to a file, so a harness can count the faults of a process it killed.
//! It exists for tests; do not set it in production.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, StoreError};
use crate::hook::{Before, Hook, HookLayer, Req};

/// Which faults to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultKinds {
    pub read: bool,
    pub write: bool,
    pub ack: bool,
    pub timeout: bool,
    /// A slow answer: delayed by `slow`, within the store's timeout.
    pub slow: bool,
    /// A listing without the entries written less than `recent` ago.
    pub list: bool,
}

impl FaultKinds {
    pub const ALL: FaultKinds = FaultKinds {
        read: true,
        write: true,
        ack: true,
        timeout: true,
        slow: true,
        list: true,
    };

    pub const NONE: FaultKinds = FaultKinds {
        read: false,
        write: false,
        ack: false,
        timeout: false,
        slow: false,
        list: false,
    };
}

/// Fault injection settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// Probability in [0, 1] that a request is faulted.
    pub rate: f64,
    pub seed: u64,
    pub kinds: FaultKinds,
    /// Delay of an injected timeout; should exceed the store's timeout.
    pub delay: Duration,
    /// Delay of a slow answer; should be below the store's timeout.
    pub slow: Duration,
    /// How recent a listed entry must be for a lagging listing to leave it out.
    pub recent: Duration,
    /// Appends `kind path` for each injected fault.
    pub log: Option<std::path::PathBuf>,
    /// The store's request deadline instead of its default (`store_timeout_ms`), so that
    /// injected timeouts (`delay`) outlast it.
    pub store_timeout: Option<Duration>,
    /// While this file exists, every request fails (a network partition, for tests). If the
    /// file holds `hang`, requests wait instead until it is removed (a black hole).
    pub partition: Option<std::path::PathBuf>,
}

impl FaultConfig {
    pub fn new(rate: f64, seed: u64) -> FaultConfig {
        FaultConfig {
            rate,
            seed,
            kinds: FaultKinds::ALL,
            delay: Duration::from_millis(200),
            slow: Duration::from_millis(30),
            recent: Duration::from_secs(2),
            log: None,
            store_timeout: None,
            partition: None,
        }
    }

    /// Reads `OWSFS_FAULTS`; `None` when unset or empty.
    pub fn from_env() -> Result<Option<FaultConfig>> {
        match std::env::var("OWSFS_FAULTS") {
            Ok(s) if !s.trim().is_empty() => FaultConfig::parse(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// Parses `rate=0.1,seed=7,kinds=read+write+ack+timeout+slow+list,delay_ms=200,slow_ms=30,
    /// recent_ms=2000,store_timeout_ms=1000,log=/path,partition=/path`.
    pub fn parse(s: &str) -> Result<FaultConfig> {
        let bad = |m: String| {
            StoreError::Invalid(format!(
                "OWSFS_FAULTS={s:?}: {m} (expected rate=0.1,seed=7,kinds=read+write+ack+timeout+slow+list,delay_ms=200,slow_ms=30,recent_ms=2000,store_timeout_ms=1000,log=/path,partition=/path)"
            ))
        };
        let mut c = FaultConfig::new(0.0, 0);
        for kv in s.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            match k {
                "rate" => {
                    c.rate = v
                        .parse()
                        .ok()
                        .filter(|r: &f64| (0.0..=1.0).contains(r))
                        .ok_or_else(|| bad("rate must be in [0, 1]".into()))?
                }
                "seed" => c.seed = v.parse().map_err(|_| bad("bad seed".into()))?,
                "partition" => c.partition = Some(v.into()),
                "log" => c.log = Some(v.into()),
                "store_timeout_ms" => {
                    c.store_timeout = Some(Duration::from_millis(
                        v.parse().map_err(|_| bad("bad store_timeout_ms".into()))?,
                    ))
                }
                "slow_ms" => {
                    c.slow =
                        Duration::from_millis(v.parse().map_err(|_| bad("bad slow_ms".into()))?)
                }
                "recent_ms" => {
                    c.recent =
                        Duration::from_millis(v.parse().map_err(|_| bad("bad recent_ms".into()))?)
                }
                "delay_ms" => {
                    c.delay =
                        Duration::from_millis(v.parse().map_err(|_| bad("bad delay_ms".into()))?)
                }
                "kinds" => {
                    c.kinds = FaultKinds::NONE;
                    for k in v.split('+') {
                        match k {
                            "read" => c.kinds.read = true,
                            "write" => c.kinds.write = true,
                            "ack" => c.kinds.ack = true,
                            "timeout" => c.kinds.timeout = true,
                            "slow" => c.kinds.slow = true,
                            "list" => c.kinds.list = true,
                            _ => return Err(bad(format!("unknown kind {k:?}"))),
                        }
                    }
                }
                _ => return Err(bad(format!("unknown key {k:?}"))),
            }
        }
        Ok(c)
    }
}

/// Counts of injected faults.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultCounts {
    pub read: u64,
    pub write: u64,
    pub ack: u64,
    pub timeout: u64,
    pub slow: u64,
    pub list: u64,
    pub partition: u64,
}

/// The shared fault injector; the layer and the store's own `file://` conditional path use it.
#[derive(Debug)]
pub struct FaultInjector {
    cfg: FaultConfig,
    rng: Mutex<StdRng>,
    counts: Mutex<FaultCounts>,
    /// When this process last wrote each object (for lagging listings).
    written: Mutex<std::collections::HashMap<String, SystemTime>>,
}

fn injected(what: &str) -> opendal::Error {
    opendal::Error::new(
        opendal::ErrorKind::Unexpected,
        format!("injected fault: {what}"),
    )
    .set_temporary()
}

/// Real time: a lagging listing is judged against the objects' real write times (written by
/// this or another process), which no manual clock drives.
#[expect(clippy::disallowed_methods, reason = "listings lag in real time")]
fn real_now() -> SystemTime {
    SystemTime::now()
}

impl FaultInjector {
    pub fn new(cfg: FaultConfig) -> FaultInjector {
        FaultInjector {
            rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
            cfg,
            counts: Mutex::new(FaultCounts::default()),
            written: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn counts(&self) -> FaultCounts {
        *self.counts.lock()
    }

    fn roll(&self) -> bool {
        self.cfg.rate > 0.0 && self.rng.lock().gen_bool(self.cfg.rate)
    }

    fn pick(&self, options: &[&'static str]) -> Option<&'static str> {
        if options.is_empty() {
            return None;
        }
        Some(options[self.rng.lock().gen_range(0..options.len())])
    }

    /// Counts an injected fault, and appends it to the log when there is one.
    fn note(&self, kind: &str, path: &str) {
        {
            let mut c = self.counts.lock();
            match kind {
                "read" => c.read += 1,
                "write" => c.write += 1,
                "ack" => c.ack += 1,
                "timeout" => c.timeout += 1,
                "slow" => c.slow += 1,
                "list" => c.list += 1,
                _ => c.partition += 1,
            }
        }
        if let Some(log) = &self.cfg.log {
            use std::io::Write as _;
            // One write(2) per line on an O_APPEND file: lines of processes sharing the log
            // do not interleave, and a process killed later loses none it wrote.
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = f.write_all(format!("{kind} {path}\n").as_bytes());
            }
        }
    }
}

impl Hook for FaultInjector {
    fn before(&self, req: Req, path: &str) -> Before {
        if let Some(p) = &self.cfg.partition {
            loop {
                match std::fs::read(p) {
                    Ok(b) if b.trim_ascii() == b"hang" => {
                        // Polls the partition file on real time: it is changed by another
                        // process, and the request it holds stands for a hanging network.
                        #[expect(clippy::disallowed_methods, reason = "a black-holed request")]
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(_) => {
                        self.note("partition", path);
                        return Before {
                            delay: None,
                            fail: Some(injected("partition: the store is unreachable")),
                        };
                    }
                    Err(_) => break,
                }
            }
        }
        if !self.roll() {
            return Before::default();
        }
        let k = self.cfg.kinds;
        let mut opts = Vec::new();
        let is_read = matches!(req, Req::Get | Req::Head | Req::List);
        if is_read && k.read {
            opts.push("read");
        }
        if !is_read && k.write {
            opts.push("write");
        }
        if k.timeout {
            opts.push("timeout");
        }
        if k.slow {
            opts.push("slow");
        }
        let kind = self.pick(&opts);
        if let Some(kind) = kind {
            self.note(kind, path);
        }
        match kind {
            Some("read") => Before {
                delay: None,
                fail: Some(injected("read error")),
            },
            Some("write") => Before {
                delay: None,
                fail: Some(injected("write error before the write")),
            },
            Some("timeout") => Before {
                delay: Some(self.cfg.delay),
                fail: None,
            },
            Some("slow") => Before {
                delay: Some(self.cfg.slow),
                fail: None,
            },
            _ => Before::default(),
        }
    }

    fn after(&self, req: Req, path: &str, _bytes: u64, ok: bool) -> opendal::Result<()> {
        if ok && req == Req::Put {
            if self.cfg.kinds.list {
                let now = real_now();
                let mut w = self.written.lock();
                if w.len() > 10_000 {
                    w.retain(|_, t| now.duration_since(*t).unwrap_or_default() < self.cfg.recent);
                }
                w.insert(path.to_string(), now);
            }
            if self.cfg.kinds.ack && self.roll() {
                self.note("ack", path);
                return Err(injected("acknowledgement lost after the write"));
            }
        }
        Ok(())
    }

    fn hide_listed(&self, path: &str, modified: Option<SystemTime>) -> bool {
        if !self.cfg.kinds.list {
            return false;
        }
        let now = real_now();
        let recent = |t: SystemTime| now.duration_since(t).unwrap_or_default() < self.cfg.recent;
        let fresh = modified.is_some_and(recent)
            || self.written.lock().get(path).is_some_and(|t| recent(*t));
        if fresh && self.roll() {
            self.note("list", path);
            return true;
        }
        false
    }
}

/// The opendal layer that injects faults from a shared [`FaultInjector`].
#[derive(Debug, Clone)]
pub struct FaultLayer(HookLayer);

impl FaultLayer {
    pub fn new(injector: Arc<FaultInjector>) -> FaultLayer {
        FaultLayer(HookLayer::new(injector))
    }
}

impl opendal::raw::Layer for FaultLayer {
    fn apply_service(&self, srv: opendal::raw::Servicer) -> opendal::raw::Servicer {
        self.0.apply_service(srv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_syntax() {
        let c = FaultConfig::parse("rate=0.1,seed=7,kinds=read+ack,delay_ms=50").unwrap();
        assert_eq!(c.rate, 0.1);
        assert_eq!(c.seed, 7);
        assert!(c.kinds.read && c.kinds.ack && !c.kinds.write && !c.kinds.timeout);
        assert_eq!(c.delay, Duration::from_millis(50));
        assert!(FaultConfig::parse("rate=2").is_err());
        assert!(FaultConfig::parse("kinds=disk").is_err());
        let c =
            FaultConfig::parse("kinds=slow+list,slow_ms=5,recent_ms=9,store_timeout_ms=300,log=/x")
                .unwrap();
        assert!(c.kinds.slow && c.kinds.list && !c.kinds.read);
        assert_eq!(c.slow, Duration::from_millis(5));
        assert_eq!(c.recent, Duration::from_millis(9));
        assert_eq!(c.store_timeout, Some(Duration::from_millis(300)));
        assert_eq!(c.log.as_deref(), Some(std::path::Path::new("/x")));
        assert!(FaultConfig::parse("nope").is_err());
    }
}
