//! An `ObjectStore` wrapper that counts requests by kind and the distinct objects read: how the
//! benchmarks show that partition pruning keeps a query away from most of an S3 lake.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Request counts.
#[derive(Debug, Default)]
pub struct Counts {
    /// GET (whole or ranged) requests.
    pub gets: AtomicU64,
    /// HEAD requests.
    pub heads: AtomicU64,
    /// Recursive LIST calls.
    pub lists: AtomicU64,
    /// LIST calls with a delimiter (one directory level).
    pub list_dirs: AtomicU64,
    /// PUTs (and multipart uploads).
    pub puts: AtomicU64,
    /// Deletes.
    pub deletes: AtomicU64,
    /// Copies and renames.
    pub copies: AtomicU64,
    /// Distinct objects read by GET.
    pub objects_read: Mutex<BTreeSet<String>>,
}

impl Counts {
    fn counters(&self) -> [&AtomicU64; 7] {
        [
            &self.gets,
            &self.heads,
            &self.lists,
            &self.list_dirs,
            &self.puts,
            &self.deletes,
            &self.copies,
        ]
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        self.counters()
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Number of distinct objects read.
    pub fn distinct_read(&self) -> usize {
        self.objects_read.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Zero every counter.
    pub fn reset(&self) {
        for c in self.counters() {
            c.store(0, Ordering::Relaxed);
        }
        if let Ok(mut s) = self.objects_read.lock() {
            s.clear();
        }
    }

    /// One-line summary.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} requests: {} GET ({} distinct objects), {} HEAD, {} LIST, {} LIST-dir, {} PUT, {} DELETE, {} COPY",
            self.total(),
            g(&self.gets),
            self.distinct_read(),
            g(&self.heads),
            g(&self.lists),
            g(&self.list_dirs),
            g(&self.puts),
            g(&self.deletes),
            g(&self.copies)
        )
    }
}

/// Counts the requests made to `inner`.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    /// The counters (shared).
    pub counts: Arc<Counts>,
}

impl CountingStore {
    /// Wrap a store.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            counts: Arc::default(),
        }
    }
}

impl super::Lake {
    /// The same lake with every request counted.
    pub fn counted(&self) -> (super::Lake, Arc<Counts>) {
        let store = CountingStore::new(self.location.store.clone());
        let counts = store.counts.clone();
        let mut lake = self.clone();
        lake.location.store = Arc::new(store);
        (lake, counts)
    }
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        bump(&self.counts.puts);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        bump(&self.counts.puts);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if options.head {
            bump(&self.counts.heads);
        } else {
            bump(&self.counts.gets);
            if let Ok(mut s) = self.counts.objects_read.lock() {
                s.insert(location.to_string());
            }
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        // The inner store makes one request per coalesced range.
        let n = count_coalesced(ranges);
        self.counts.gets.fetch_add(n, Ordering::Relaxed);
        if let Ok(mut s) = self.counts.objects_read.lock() {
            s.insert(location.to_string());
        }
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let counts = self.counts.clone();
        self.inner
            .delete_stream(locations.inspect(move |_| bump(&counts.deletes)).boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        bump(&self.counts.lists);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        bump(&self.counts.lists);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        bump(&self.counts.list_dirs);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        bump(&self.counts.copies);
        self.inner.copy_opts(from, to, options).await
    }
}

/// Requests `get_ranges` makes: ranges closer than the default coalescing gap merge into one.
fn count_coalesced(ranges: &[Range<u64>]) -> u64 {
    let mut sorted: Vec<&Range<u64>> = ranges.iter().collect();
    sorted.sort_by_key(|r| r.start);
    let mut n = 0u64;
    let mut end: Option<u64> = None;
    for r in sorted {
        match end {
            Some(e) if r.start <= e + COALESCE_GAP => {
                end = Some(e.max(r.end));
            }
            _ => {
                n += 1;
                end = Some(r.end);
            }
        }
    }
    n
}

/// object_store's default gap below which ranged reads merge (1 MiB).
const COALESCE_GAP: u64 = 1024 * 1024;
