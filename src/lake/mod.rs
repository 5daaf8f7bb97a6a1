//! The lake: Delta Lake tables (hive-partitioned Parquet plus a commit log) and raw objects behind
//! `object_store`.
//!
//! Everything that touches lake storage goes through [`Location`]: a local directory or an
//! `s3://bucket/prefix`, the same code either way. Tables change only by Delta commits
//! ([`delta`]): each write is one transaction that readers see whole or not at all, queries read one
//! version, and history allows time travel. Raw responses are single objects written atomically (a
//! staged file renamed into place on disk, a PUT on S3). Writers that would duplicate each other's
//! work (two OTX pulls) exclude each other with [`lock`]s.

pub mod counting;
pub mod delta;
pub mod fault;
pub mod lock;
pub mod maintain;
pub mod s3;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use url::Url;

use crate::config::StoreSettings;

/// Name of the staging area under a root; names starting with `_` are never tables.
pub const STAGING: &str = "_staging";

/// Errors reading or writing the lake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LakeError {
    /// The lake location could not be understood.
    #[error("invalid lake location '{spec}': {reason}")]
    Location {
        /// What the user gave.
        spec: String,
        /// Why it is not usable.
        reason: String,
    },
    /// An object-store operation failed.
    #[error("lake I/O on {path}: {}{hint}", s3::condense(.error))]
    Store {
        /// Object path.
        path: String,
        /// Underlying error (shown condensed: not a `source`, whose chain would repeat S3's XML).
        error: object_store::Error,
        /// What to do about it (may be empty).
        hint: &'static str,
    },
    /// Another writer holds the lock.
    #[error(
        "{lake} is being written by {holder}; {}",
        if *expired { format!("that lock has expired but could not be taken over: if that process is gone, run `threatlake lake unlock {name}`") }
        else { format!("wait for it to finish and re-run (nothing was written), or, if that process is gone, run `threatlake lake unlock {name}`") }
    )]
    Locked {
        /// Lock name.
        name: String,
        /// The lake.
        lake: String,
        /// Who holds it.
        holder: String,
        /// Whether it is past its expiry.
        expired: bool,
    },
    /// Encoding Parquet failed.
    #[error("writing Parquet for {path}: {source}")]
    Parquet {
        /// Object path.
        path: String,
        /// Underlying error.
        source: parquet::errors::ParquetError,
    },
    /// delta-rs could not read or commit a table.
    #[error("Delta table {table}: {message}")]
    Delta {
        /// Table name.
        table: String,
        /// What went wrong, and what to do.
        message: String,
    },
    /// A time-travel target does not exist.
    #[error("table {table} has no snapshot at {at}: {reason}")]
    AsOf {
        /// Table name.
        table: String,
        /// The version or time asked for.
        at: String,
        /// Why, and where to look.
        reason: String,
    },
    /// The lake has no such table.
    #[error("the lake has no table {table}; `threatlake lake tables` lists them")]
    NoTable {
        /// Table name.
        table: String,
    },
    /// The lake was written by a threatlake before Delta Lake tables.
    #[error("{lake} holds plain Parquet tables ({tables}) from an older threatlake; run `threatlake lake upgrade` once to convert them to Delta Lake tables (no row is lost or duplicated), then re-run")]
    NeedsUpgrade {
        /// The lake.
        lake: String,
        /// Tables still in the old layout.
        tables: String,
    },
    /// A partition value cannot be used in a hive path.
    #[error("partition value {value:?} for {column} has characters other than letters, digits, '.', '_' and '-'")]
    PartitionValue {
        /// Partition column.
        column: String,
        /// The value.
        value: String,
    },
}

impl LakeError {
    /// An object-store error on `path` (as the user would write it), with a hint when the cause is
    /// recognisable.
    pub fn store(path: String, source: object_store::Error) -> Self {
        let hint = s3::hint(&source);
        LakeError::Store {
            path,
            error: source,
            hint,
        }
    }
}

/// A storage root (local directory or object-store URL) and the store that serves it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The object store.
    pub store: Arc<dyn ObjectStore>,
    /// Base URL the store is registered under in DataFusion (`file:///` or `s3://bucket/`).
    pub base_url: Url,
    /// Root path inside the store.
    pub root: Path,
    spec: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

impl Location {
    /// Open a location with default client settings (see [`Location::open_with`]).
    pub fn open(spec: &str) -> Result<Self, LakeError> {
        Self::open_with(spec, &StoreSettings::default())
    }

    /// Open a location: a local path (relative to the working directory), a `file://` URL, or
    /// `s3://bucket/prefix` (credentials, region and endpoint as the AWS CLI finds them).
    pub fn open_with(spec: &str, opts: &StoreSettings) -> Result<Self, LakeError> {
        Self::open_with_env(spec, opts, &std::env::vars().collect())
    }

    /// [`Location::open_with`] reading the AWS settings from `env` instead of the process environment.
    pub fn open_with_env(
        spec: &str,
        opts: &StoreSettings,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, LakeError> {
        let err = |reason: String| LakeError::Location {
            spec: spec.to_string(),
            reason,
        };
        if spec.trim().is_empty() {
            return Err(err("empty path".into()));
        }
        let local = if let Some(rest) = spec.strip_prefix("file://") {
            PathBuf::from(rest)
        } else if spec.starts_with("s3://") {
            let (bucket, prefix) = s3::parse(spec).map_err(err)?;
            let store = s3::store_with_env(&bucket, opts, env).map_err(err)?;
            return Ok(Self {
                store: fault::FaultStore::wrap_from_env(Arc::new(store)),
                base_url: Url::parse(&format!("s3://{bucket}/")).map_err(|e| err(e.to_string()))?,
                root: Path::parse(&prefix).map_err(|e| err(e.to_string()))?,
                spec: spec.trim_end_matches('/').to_string(),
            });
        } else if let Some((scheme, _)) = spec.split_once("://") {
            return Err(err(format!(
                "the '{scheme}://' scheme is not supported; use a local directory or s3://bucket/prefix"
            )));
        } else {
            PathBuf::from(spec)
        };
        let abs = absolute(&local).map_err(|e| err(e.to_string()))?;
        if abs.exists() && !abs.is_dir() {
            return Err(err(format!(
                "{} exists and is not a directory",
                abs.display()
            )));
        }
        let root = Path::from_absolute_path(&abs).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            store: fault::FaultStore::wrap_from_env(Arc::new(LocalFileSystem::new())),
            base_url: Url::parse("file:///").expect("static URL"),
            root,
            spec: spec.to_string(),
        })
    }

    /// The root as a local directory, when the location is local.
    pub fn local_path(&self) -> Option<PathBuf> {
        (self.base_url.scheme() == "file").then(|| PathBuf::from(format!("/{}", self.root)))
    }

    /// The root as other engines name it: a local directory, or `s3://bucket/prefix`.
    pub fn reader_root(&self) -> String {
        match self.local_path() {
            Some(p) => p.display().to_string().trim_end_matches('/').to_string(),
            None => format!("{}{}", self.base_url, self.root)
                .trim_end_matches('/')
                .to_string(),
        }
    }

    /// An object-store error on `p`, naming the object as the user would (`s3://bucket/key`, a path).
    pub fn error(&self, p: &Path, e: object_store::Error) -> LakeError {
        let shown = match self.local_path() {
            Some(_) => format!("/{p}"),
            None => format!("{}{p}", self.base_url),
        };
        LakeError::store(shown, e)
    }

    /// Object path of `rel` (a `/`-separated path) under the root.
    pub fn path(&self, rel: &str) -> Path {
        rel.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, s| p.join(s))
    }

    /// URL of a directory under the root, with trailing slash, as DataFusion's listing tables want it.
    pub fn dir_url(&self, rel: &str) -> String {
        let p = self.path(rel);
        format!("{}{}/", self.base_url, p)
    }

    /// Whether a single PUT is atomic here (S3: an object appears whole or not at all), so no staging
    /// key is needed.
    pub fn atomic_put(&self) -> bool {
        self.base_url.scheme() == "s3"
    }

    /// Write `bytes` to `rel` atomically: on S3 one PUT; on disk upload to a staging key, then
    /// rename over the target.
    pub async fn put_atomic(&self, rel: &str, bytes: Bytes) -> Result<(), LakeError> {
        let target = self.path(rel);
        if self.atomic_put() {
            self.store
                .put(&target, PutPayload::from(bytes))
                .await
                .map_err(|e| self.error(&target, e))?;
            return Ok(());
        }
        let name = target.filename().unwrap_or("object");
        let staging = self.path(&format!("{STAGING}/{}-{name}.tmp", uuid::Uuid::new_v4()));
        self.store
            .put(&staging, PutPayload::from(bytes))
            .await
            .map_err(|e| self.error(&staging, e))?;
        if let Err(e) = self.store.rename(&staging, &target).await {
            // Leave nothing half-done behind; the original error is what the user needs.
            let _ = self.store.delete(&staging).await;
            return Err(self.error(&target, e));
        }
        Ok(())
    }

    /// Delete an object (absent is fine).
    pub async fn delete(&self, rel: &str) -> Result<(), LakeError> {
        let p = self.path(rel);
        match self.store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&p, e)),
        }
    }

    /// Read a whole object.
    pub async fn get(&self, rel: &str) -> Result<Bytes, LakeError> {
        let p = self.path(rel);
        let r = self.store.get(&p).await.map_err(|e| self.error(&p, e))?;
        r.bytes().await.map_err(|e| self.error(&p, e))
    }

    /// Read a whole object, or None when it does not exist.
    pub async fn get_opt(&self, rel: &str) -> Result<Option<Bytes>, LakeError> {
        match self.get(rel).await {
            Ok(b) => Ok(Some(b)),
            Err(LakeError::Store {
                error: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object under `rel` (recursively); an absent directory is empty, not an error (a
    /// missing bucket is an error).
    pub async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>, LakeError> {
        let p = self.path(rel);
        match self.store.list(Some(&p)).try_collect::<Vec<_>>().await {
            Ok(v) => Ok(v),
            // S3 answers an absent prefix with an empty listing: NotFound there is the bucket.
            Err(e @ object_store::Error::NotFound { .. }) if self.atomic_put() => {
                Err(self.error(&p, e))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(self.error(&p, e)),
        }
    }

    /// Path of an object relative to the root, as `/`-separated parts.
    pub fn relative_parts(&self, p: &Path) -> Vec<String> {
        p.prefix_match(&self.root)
            .map(|parts| parts.map(|s| s.as_ref().to_string()).collect())
            .unwrap_or_default()
    }
}

/// `Path::from_absolute_path` needs an absolute, normalised path: resolve symlinks and `..` on the
/// part that exists and append the rest.
fn absolute(p: &std::path::Path) -> std::io::Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut existing = joined.as_path();
    let mut tail = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize()?;
    for name in tail.into_iter().rev() {
        out.push(name);
    }
    Ok(out)
}

/// A table found in the lake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Hive partition columns in path order.
    pub partition_cols: Vec<String>,
    /// Number of Parquet files in the current snapshot.
    pub files: usize,
    /// Total bytes.
    pub bytes: u64,
    /// Current Delta version.
    pub version: u64,
}

/// The processed lake: tables of hive-partitioned Parquet under one [`Location`].
#[derive(Debug, Clone)]
pub struct Lake {
    /// Where the lake lives.
    pub location: Location,
}

impl Lake {
    /// Open a lake root (see [`Location::open`]).
    pub fn open(spec: &str) -> Result<Self, LakeError> {
        Ok(Self {
            location: Location::open(spec)?,
        })
    }

    /// Open the lake of the settings (`lake.root` with `lake.store`).
    pub fn from_settings(s: &crate::config::LakeSettings) -> Result<Self, LakeError> {
        Ok(Self {
            location: Location::open_with(&s.root, &s.store)?,
        })
    }

    /// Replace one partition of `table` with `batches` in one commit: readers see the old rows or
    /// the new ones, never both or neither.
    pub async fn replace_partition(
        &self,
        table: &str,
        partition: &[(&str, &str)],
        schema: SchemaRef,
        batches: &[RecordBatch],
        purpose: &str,
    ) -> Result<u64, LakeError> {
        self.commit(
            table,
            partition,
            schema,
            batches,
            delta::WriteMode::ReplacePartition,
            purpose,
        )
        .await
    }

    /// Append `batches` to a partition of `table` in one commit (how log tables grow); `purpose`
    /// (e.g. the batch id) is recorded in the commit.
    pub async fn append(
        &self,
        table: &str,
        partition: &[(&str, &str)],
        schema: SchemaRef,
        batches: &[RecordBatch],
        purpose: &str,
    ) -> Result<u64, LakeError> {
        self.commit(
            table,
            partition,
            schema,
            batches,
            delta::WriteMode::Append,
            purpose,
        )
        .await
    }

    /// Top-level table directories: (Delta tables, plain-Parquet tables of an older release).
    pub async fn table_dirs(&self) -> Result<(Vec<String>, Vec<String>), LakeError> {
        let root = &self.location.root;
        let listing = match self.location.store.list_with_delimiter(Some(root)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) if !self.location.atomic_put() => {
                return Ok(Default::default())
            }
            Err(e) => return Err(self.location.error(root, e)),
        };
        let (mut delta, mut legacy) = (Vec::new(), Vec::new());
        for dir in listing.common_prefixes {
            let Some(name) = dir.filename().map(str::to_string) else {
                continue;
            };
            if name.starts_with(['_', '.']) {
                continue;
            }
            if self.is_delta(&name).await? {
                delta.push(name);
            } else if self
                .location
                .list(&name)
                .await?
                .iter()
                .any(|o| o.location.extension() == Some("parquet"))
            {
                legacy.push(name);
            }
        }
        Ok((delta, legacy))
    }

    /// Fail with [`LakeError::NeedsUpgrade`] when the lake still has plain-Parquet tables.
    pub async fn require_delta(&self) -> Result<Vec<String>, LakeError> {
        let (delta, legacy) = self.table_dirs().await?;
        if legacy.is_empty() {
            Ok(delta)
        } else {
            Err(LakeError::NeedsUpgrade {
                lake: self.location.to_string(),
                tables: legacy.join(", "),
            })
        }
    }

    /// Tables present in the lake (their current snapshots), by name.
    pub async fn tables(&self) -> Result<BTreeMap<String, TableInfo>, LakeError> {
        let mut out = BTreeMap::new();
        for name in self.require_delta().await? {
            if let Some(s) = self.snapshot(&name, &delta::AsOf::Latest).await? {
                out.insert(
                    name,
                    TableInfo {
                        partition_cols: s.partition_cols,
                        files: s.files.len(),
                        bytes: s.files.iter().map(|(_, b)| b).sum(),
                        version: s.version,
                    },
                );
            }
        }
        Ok(out)
    }
}

/// Lock expiry from the settings.
pub fn lock_ttl(s: &crate::config::LakeSettings) -> std::time::Duration {
    std::time::Duration::from_secs_f64((s.store.lock_ttl_minutes * 60.0).max(1.0))
}

/// The raw store of the settings (`lake.raw` with `lake.store`).
pub fn raw_from_settings(s: &crate::config::LakeSettings) -> Result<Location, LakeError> {
    Location::open_with(&s.raw, &s.store)
}

/// `table/k1=v1/k2=v2`, rejecting values that would need escaping.
pub fn partition_dir(table: &str, partition: &[(&str, &str)]) -> Result<String, LakeError> {
    let mut dir = table.to_string();
    for (k, v) in partition {
        let ok = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(LakeError::PartitionValue {
                column: k.to_string(),
                value: v.to_string(),
            });
        }
        dir.push_str(&format!("/{k}={v}"));
    }
    Ok(dir)
}

/// Encode batches as one zstd-compressed Parquet file in memory.
pub fn encode_parquet(
    label: &str,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> Result<Bytes, LakeError> {
    let perr = |source| LakeError::Parquet {
        path: label.to_string(),
        source,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).map_err(perr)?))
        .set_created_by(format!("threatlake {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut buf = Vec::with_capacity(1 << 16);
    let mut w = ArrowWriter::try_new(&mut buf, schema, Some(props)).map_err(perr)?;
    for b in batches {
        w.write(b).map_err(perr)?;
    }
    w.close().map_err(perr)?;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    #[tokio::test]
    async fn replace_partition_is_idempotent_and_lists_tables() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![1, 2]))])
            .unwrap();
        for _ in 0..2 {
            lake.replace_partition(
                "t",
                &[("domain", "enterprise"), ("v", "1.0")],
                schema.clone(),
                std::slice::from_ref(&b),
                "test",
            )
            .await
            .unwrap();
        }
        let tables = lake.tables().await.unwrap();
        assert_eq!(
            tables["t"].files, 1,
            "the second replace removed the first file"
        );
        assert_eq!(tables["t"].version, 2, "created, then replaced twice");
        assert_eq!(tables["t"].partition_cols, vec!["domain", "v"]);
    }

    #[test]
    fn hostile_partition_values_are_rejected() {
        assert!(partition_dir("t", &[("d", "../../etc")]).is_err());
        assert!(partition_dir("t", &[("d", "")]).is_err());
        assert_eq!(partition_dir("t", &[("d", "18.1")]).unwrap(), "t/d=18.1");
    }

    #[test]
    fn unsupported_scheme_is_explained() {
        let e = Location::open("gopher://x/y").unwrap_err().to_string();
        assert!(e.contains("gopher"), "{e}");
    }
}
