//! Fault injection, a test hook. [`FaultLayer`] is an opendal layer that fails requests at a
//! configurable rate with a seedable RNG: read errors, write errors before the write happens,
//! lost acknowledgements (the write happened, the caller sees an error: a retried conditional
//! PUT then meets its own object) and delays longer than the timeout. Injected errors are
//! marked temporary, so the store's retry loop retries them like real ones.
//!
//! `OWSFS_FAULTS=rate=0.1,seed=7,kinds=read+write+ack+timeout,delay_ms=200` enables it for a
//! process (see [`FaultConfig::from_env`]). It exists for tests; do not set it in production.

use std::sync::Arc;
use std::time::Duration;

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
}

impl FaultKinds {
    pub const ALL: FaultKinds = FaultKinds {
        read: true,
        write: true,
        ack: true,
        timeout: true,
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

    /// Parses `rate=0.1,seed=7,kinds=read+write+ack+timeout,delay_ms=200`.
    pub fn parse(s: &str) -> Result<FaultConfig> {
        let bad = |m: String| {
            StoreError::Invalid(format!(
                "OWSFS_FAULTS={s:?}: {m} (expected rate=0.1,seed=7,kinds=read+write+ack+timeout,delay_ms=200,partition=/path)"
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
                "delay_ms" => {
                    c.delay =
                        Duration::from_millis(v.parse().map_err(|_| bad("bad delay_ms".into()))?)
                }
                "kinds" => {
                    c.kinds = FaultKinds {
                        read: false,
                        write: false,
                        ack: false,
                        timeout: false,
                    };
                    for k in v.split('+') {
                        match k {
                            "read" => c.kinds.read = true,
                            "write" => c.kinds.write = true,
                            "ack" => c.kinds.ack = true,
                            "timeout" => c.kinds.timeout = true,
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
    pub partition: u64,
}

/// The shared fault injector; the layer and the store's own `file://` conditional path use it.
#[derive(Debug)]
pub struct FaultInjector {
    cfg: FaultConfig,
    rng: Mutex<StdRng>,
    counts: Mutex<FaultCounts>,
}

fn injected(what: &str) -> opendal::Error {
    opendal::Error::new(
        opendal::ErrorKind::Unexpected,
        format!("injected fault: {what}"),
    )
    .set_temporary()
}

impl FaultInjector {
    pub fn new(cfg: FaultConfig) -> FaultInjector {
        FaultInjector {
            rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
            cfg,
            counts: Mutex::new(FaultCounts::default()),
        }
    }

    pub fn counts(&self) -> FaultCounts {
        *self.counts.lock()
    }

    fn roll(&self) -> bool {
        self.cfg.rate > 0.0 && self.rng.lock().gen_bool(self.cfg.rate)
    }

    fn pick(&self, options: &[u8]) -> Option<u8> {
        if options.is_empty() {
            return None;
        }
        Some(options[self.rng.lock().gen_range(0..options.len())])
    }
}

impl Hook for FaultInjector {
    fn before(&self, req: Req, _path: &str) -> Before {
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
                        self.counts.lock().partition += 1;
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
            opts.push(b'r');
        }
        if !is_read && k.write {
            opts.push(b'w');
        }
        if k.timeout {
            opts.push(b't');
        }
        let mut c = self.counts.lock();
        match self.pick(&opts) {
            Some(b'r') => {
                c.read += 1;
                Before {
                    delay: None,
                    fail: Some(injected("read error")),
                }
            }
            Some(b'w') => {
                c.write += 1;
                Before {
                    delay: None,
                    fail: Some(injected("write error before the write")),
                }
            }
            Some(b't') => {
                c.timeout += 1;
                Before {
                    delay: Some(self.cfg.delay),
                    fail: None,
                }
            }
            _ => Before::default(),
        }
    }

    fn after(&self, req: Req, _path: &str, _bytes: u64, ok: bool) -> opendal::Result<()> {
        if ok && req == Req::Put && self.cfg.kinds.ack && self.roll() {
            self.counts.lock().ack += 1;
            return Err(injected("acknowledgement lost after the write"));
        }
        Ok(())
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
        assert!(FaultConfig::parse("nope").is_err());
    }
}
