//! A generic opendal layer that lets a [`Hook`] see every backend request: it may delay or
//! fail a request before it is sent, and observe or replace its outcome afterwards. The
//! request counters ([`crate::stats`]) and the fault injector ([`crate::fault`]) are hooks.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use opendal::raw::*;
use opendal::{Buffer, BytesRange, Capability, Error, Metadata, OperationContext, Result};

/// The kind of a backend request, as counted and faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Req {
    Get,
    Put,
    List,
    Delete,
    Head,
}

/// What to do with a request before it is sent.
#[derive(Debug, Default)]
pub struct Before {
    /// Sleep this long first (a slow request; longer than the timeout makes a timeout).
    pub delay: Option<Duration>,
    /// Fail the request without sending it.
    pub fail: Option<Error>,
}

/// Sees every request of the layer it is installed in.
pub trait Hook: Send + Sync + Debug + 'static {
    /// Called before a request is sent.
    fn before(&self, req: Req, path: &str) -> Before;
    /// Called with the outcome. `bytes` is the payload moved (down for gets, up for puts).
    /// Returning an error replaces a success (a lost acknowledgement).
    fn after(&self, req: Req, path: &str, bytes: u64, ok: bool) -> Result<()>;
    /// Called for each entry of a listing: `true` leaves it out (a listing that lags behind
    /// recent writes). `modified` is the entry's time when the backend gives one.
    fn hide_listed(&self, _path: &str, _modified: Option<std::time::SystemTime>) -> bool {
        false
    }
}

/// The opendal layer that installs a [`Hook`].
#[derive(Debug, Clone)]
pub struct HookLayer {
    hook: Arc<dyn Hook>,
}

impl HookLayer {
    pub fn new(hook: Arc<dyn Hook>) -> HookLayer {
        HookLayer { hook }
    }
}

impl opendal::raw::Layer for HookLayer {
    fn apply_service(&self, inner: Servicer) -> Servicer {
        Arc::new(HookService {
            inner,
            hook: self.hook.clone(),
        })
    }
}

#[derive(Debug)]
pub struct HookService {
    inner: Servicer,
    hook: Arc<dyn Hook>,
}

async fn before(hook: &dyn Hook, req: Req, path: &str) -> Result<()> {
    let b = hook.before(req, path);
    if let Some(d) = b.delay {
        tokio::time::sleep(d).await;
    }
    match b.fail {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn after<T>(hook: &dyn Hook, req: Req, path: &str, bytes: u64, r: Result<T>) -> Result<T> {
    match r {
        Ok(v) => hook.after(req, path, bytes, true).map(|()| v),
        Err(e) => {
            let _ = hook.after(req, path, bytes, false);
            Err(e)
        }
    }
}

impl Service for HookService {
    type Reader = HookReader;
    type Writer = HookWriter;
    type Lister = HookLister;
    type Deleter = HookDeleter;
    type Copier = oio::Copier;
    type Composer = oio::Composer;

    fn info(&self) -> ServiceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    async fn create_dir(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpCreateDir,
    ) -> Result<RpCreateDir> {
        self.inner.create_dir(ctx, path, args).await
    }

    async fn stat(&self, ctx: &OperationContext, path: &str, args: OpStat) -> Result<RpStat> {
        before(&*self.hook, Req::Head, path).await?;
        let r = self.inner.stat(ctx, path, args).await;
        // A NotFound answer is a successful request.
        let ok_or_absent = match &r {
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => {
                self.hook.after(Req::Head, path, 0, true)?;
                return r;
            }
            _ => r,
        };
        after(&*self.hook, Req::Head, path, 0, ok_or_absent)
    }

    fn read(&self, ctx: &OperationContext, path: &str, args: OpRead) -> Result<Self::Reader> {
        Ok(HookReader {
            inner: self.inner.read(ctx, path, args)?,
            hook: self.hook.clone(),
            path: path.to_string(),
        })
    }

    fn write(&self, ctx: &OperationContext, path: &str, args: OpWrite) -> Result<Self::Writer> {
        Ok(HookWriter {
            inner: self.inner.write(ctx, path, args)?,
            hook: self.hook.clone(),
            path: path.to_string(),
            bytes: 0,
            checked: false,
        })
    }

    fn delete(&self, ctx: &OperationContext) -> Result<Self::Deleter> {
        Ok(HookDeleter {
            inner: self.inner.delete(ctx)?,
            hook: self.hook.clone(),
            queued: 0,
        })
    }

    fn list(&self, ctx: &OperationContext, path: &str, args: OpList) -> Result<Self::Lister> {
        Ok(HookLister {
            inner: self.inner.list(ctx, path, args)?,
            hook: self.hook.clone(),
            path: path.to_string(),
            started: false,
        })
    }

    fn copy(
        &self,
        ctx: &OperationContext,
        from: &str,
        to: &str,
        args: OpCopy,
    ) -> Result<Self::Copier> {
        self.inner.copy(ctx, from, to, args)
    }

    fn compose(&self, ctx: &OperationContext, to: &str, args: OpCompose) -> Result<Self::Composer> {
        self.inner.compose(ctx, to, args)
    }

    async fn rename(
        &self,
        ctx: &OperationContext,
        from: &str,
        to: &str,
        args: OpRename,
    ) -> Result<RpRename> {
        self.inner.rename(ctx, from, to, args).await
    }

    async fn presign(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpPresign,
    ) -> Result<RpPresign> {
        self.inner.presign(ctx, path, args).await
    }
}

pub struct HookReader {
    inner: oio::Reader,
    hook: Arc<dyn Hook>,
    path: String,
}

impl oio::Read for HookReader {
    async fn open(&self, range: BytesRange) -> Result<(RpRead, Box<dyn oio::ReadStreamDyn>)> {
        before(&*self.hook, Req::Get, &self.path).await?;
        let (rp, stream) = after(
            &*self.hook,
            Req::Get,
            &self.path,
            0,
            self.inner.open(range).await,
        )?;
        Ok((
            rp,
            Box::new(HookStream {
                inner: stream,
                hook: self.hook.clone(),
            }) as Box<dyn oio::ReadStreamDyn>,
        ))
    }

    async fn read(&self, range: BytesRange) -> Result<(RpRead, Buffer)> {
        before(&*self.hook, Req::Get, &self.path).await?;
        let r = self.inner.read(range).await;
        let n = r.as_ref().map(|(_, b)| b.len() as u64).unwrap_or(0);
        after(&*self.hook, Req::Get, &self.path, n, r)
    }
}

struct HookStream {
    inner: Box<dyn oio::ReadStreamDyn>,
    hook: Arc<dyn Hook>,
}

impl oio::ReadStream for HookStream {
    async fn read(&mut self) -> Result<Buffer> {
        let b = self.inner.read().await?;
        // Bytes of an open stream count as download; the request was counted at open.
        let _ = self.hook.after(Req::Get, "", b.len() as u64, true);
        Ok(b)
    }
}

pub struct HookWriter {
    inner: oio::Writer,
    hook: Arc<dyn Hook>,
    path: String,
    bytes: u64,
    checked: bool,
}

impl oio::Write for HookWriter {
    async fn write(&mut self, bs: Buffer) -> Result<()> {
        if !self.checked {
            // Faults "before the write" happen before any byte reaches the backend.
            self.checked = true;
            before(&*self.hook, Req::Put, &self.path).await?;
        }
        self.bytes += bs.len() as u64;
        self.inner.write(bs).await
    }

    async fn close(&mut self) -> Result<Metadata> {
        if !self.checked {
            self.checked = true;
            before(&*self.hook, Req::Put, &self.path).await?;
        }
        let r = self.inner.close().await;
        after(&*self.hook, Req::Put, &self.path, self.bytes, r)
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

pub struct HookLister {
    inner: oio::Lister,
    hook: Arc<dyn Hook>,
    path: String,
    started: bool,
}

impl oio::List for HookLister {
    async fn next(&mut self) -> Result<Option<oio::Entry>> {
        if !self.started {
            self.started = true;
            before(&*self.hook, Req::List, &self.path).await?;
            let r = self.inner.next().await;
            let first = after(&*self.hook, Req::List, &self.path, 0, r)?;
            return match first {
                Some(e) if self.hidden(&e) => self.rest().await,
                other => Ok(other),
            };
        }
        self.rest().await
    }
}

impl HookLister {
    fn hidden(&self, e: &oio::Entry) -> bool {
        let modified = e
            .metadata()
            .last_modified()
            .map(std::time::SystemTime::from);
        self.hook.hide_listed(e.path(), modified)
    }

    /// The next entry the hook does not hide.
    async fn rest(&mut self) -> Result<Option<oio::Entry>> {
        loop {
            match oio::List::next(&mut self.inner).await? {
                Some(e) if self.hidden(&e) => continue,
                other => return Ok(other),
            }
        }
    }
}

pub struct HookDeleter {
    inner: oio::Deleter,
    hook: Arc<dyn Hook>,
    /// Paths queued since the last close: a backend with batch deletes (S3's DeleteObjects)
    /// sends them in one request at the close.
    queued: usize,
}

impl oio::Delete for HookDeleter {
    /// The hook sees a batch as the one request it is, by its first path: counted, delayed
    /// or failed once; the other paths travel with it.
    async fn delete(&mut self, path: &str, args: OpDelete) -> Result<()> {
        self.queued += 1;
        if self.queued > 1 {
            return self.inner.delete(path, args).await;
        }
        before(&*self.hook, Req::Delete, path).await?;
        let r = self.inner.delete(path, args).await;
        after(&*self.hook, Req::Delete, path, 0, r)
    }

    async fn close(&mut self) -> Result<()> {
        self.queued = 0;
        self.inner.close().await
    }
}
