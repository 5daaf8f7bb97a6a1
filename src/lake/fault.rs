//! A fault-injecting `ObjectStore` wrapper: the process aborts (as with `kill -9`) at the Nth
//! write or delete, before that request reaches the store.
//!
//! It is how the crash tests stop `ingest attack`, `run`, `map-intel`, `lake optimize` and
//! `lake upgrade` at every step of their writes, on disk and on S3. Switched on only by the
//! environment variable [`ABORT_AT_ENV`], which no deployment sets: a positive number aborts at that
//! write; `trace` only prints every write (`write N: put PATH`) so a test can pick the steps of one
//! stage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// Abort the process at this write or delete (1 = the first), or `trace`.
pub const ABORT_AT_ENV: &str = "THREATLAKE_TEST_ABORT_AT_WRITE";

/// Counts writes and deletes; aborts at the configured one.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    /// 0: trace only.
    abort_at: u64,
    writes: Arc<AtomicU64>,
}

/// Count one write; print it when tracing, abort when it is the chosen one.
fn step(writes: &AtomicU64, abort_at: u64, what: &str, path: &str) {
    let n = writes.fetch_add(1, Ordering::SeqCst) + 1;
    if abort_at == 0 {
        eprintln!("write {n}: {what} {path}");
    } else if n >= abort_at {
        eprintln!("{ABORT_AT_ENV}: aborting at write {n} ({what} {path})");
        std::process::abort();
    }
}

impl FaultStore {
    /// Wrap `inner` when [`ABORT_AT_ENV`] asks for it (all stores of a process share one count).
    pub fn wrap_from_env(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        static WRITES: std::sync::OnceLock<Arc<AtomicU64>> = std::sync::OnceLock::new();
        let setting = std::env::var(ABORT_AT_ENV).ok();
        let abort_at = match setting.as_deref().map(str::trim) {
            Some("trace") => Some(0),
            Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0),
            None => None,
        };
        match abort_at {
            Some(n) => Arc::new(Self {
                inner,
                abort_at: n,
                writes: WRITES.get_or_init(Arc::default).clone(),
            }),
            _ => inner,
        }
    }

    fn step(&self, what: &str, path: &Path) {
        step(&self.writes, self.abort_at, what, path.as_ref());
    }
}

impl std::fmt::Display for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fault({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.step("put", location);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.step("multipart put", location);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (abort_at, writes) = (self.abort_at, self.writes.clone());
        let counted = locations
            .inspect(move |p| {
                let shown = p.as_ref().map(|p| p.to_string()).unwrap_or_default();
                step(&writes, abort_at, "delete", &shown);
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.step("copy", to);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.step("rename", to);
        self.inner.rename_opts(from, to, options).await
    }
}
