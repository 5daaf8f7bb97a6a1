//! A fault-injecting `ObjectStore` wrapper: the process aborts (as with `kill -9`) at the Nth
//! write or delete, before that request reaches the store.
//!
//! It is how the crash tests stop `ingest attack`, `run`, `map-intel`, `lake optimize` and
//! `lake upgrade` at every step of their writes, on disk and on S3. Switched on only by the
//! environment variable [`ABORT_AT_ENV`] (a positive number), which no deployment sets.

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

/// Abort the process at this write or delete (1 = the first).
pub const ABORT_AT_ENV: &str = "THREATLAKE_TEST_ABORT_AT_WRITE";

/// Counts writes and deletes; aborts at the configured one.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    abort_at: u64,
    writes: Arc<AtomicU64>,
}

impl FaultStore {
    /// Wrap `inner` when [`ABORT_AT_ENV`] asks for it (all stores of a process share one count).
    pub fn wrap_from_env(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        static WRITES: std::sync::OnceLock<Arc<AtomicU64>> = std::sync::OnceLock::new();
        match std::env::var(ABORT_AT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(n) if n > 0 => Arc::new(Self {
                inner,
                abort_at: n,
                writes: WRITES.get_or_init(Arc::default).clone(),
            }),
            _ => inner,
        }
    }

    fn step(&self, what: &str, path: &Path) {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.abort_at {
            eprintln!("{ABORT_AT_ENV}: aborting at write {n} ({what} {path})");
            std::process::abort();
        }
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
                let n = writes.fetch_add(1, Ordering::SeqCst) + 1;
                if n >= abort_at {
                    let shown = p.as_ref().map(|p| p.to_string()).unwrap_or_default();
                    eprintln!("{ABORT_AT_ENV}: aborting at write {n} (delete {shown})");
                    std::process::abort();
                }
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
