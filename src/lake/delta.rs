//! Lake tables as Delta Lake tables: every write is one commit in the table's `_delta_log`, readers
//! see one snapshot (a version), and history gives time travel.
//!
//! The tables live under the lake root with the names and hive partition columns they always had;
//! delta-rs writes and commits through the lake's own object store ([`Location::store`]), so counting
//! and fault-injecting wrappers see every request. A commit is a conditional create of the next
//! `_delta_log/<version>.json` (no-clobber on disk, `If-None-Match: *` on S3): two writers can never
//! both commit the same version, and a writer that dies before its commit leaves only unreferenced
//! data files that `lake vacuum` removes.

use std::collections::HashMap;
use std::sync::{Arc, Once};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::catalog::{Session, TableProvider};
use datafusion::prelude::{col, lit, Expr};
use deltalake_core::delta_datafusion::{DeltaScanConfig, DeltaScanNext};
use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake_core::kernel::transaction::CommitProperties;
use deltalake_core::kernel::StructType;
use deltalake_core::logstore::{
    default_logstore, logstore_factories, LogStore, LogStoreFactory, StorageConfig,
};
use deltalake_core::operations::write::SchemaMode;
use deltalake_core::protocol::SaveMode;
use deltalake_core::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::TryStreamExt;
use object_store::ObjectStore;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use url::Url;

use super::{partition_dir, Lake, LakeError, Location};

/// Folder of a Delta table's commit log.
pub const DELTA_LOG: &str = "_delta_log";

/// Which version of a table to read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AsOf {
    /// The newest commit.
    Latest,
    /// A commit version (0, 1, …).
    Version(u64),
    /// The newest commit at or before an instant.
    Time(DateTime<Utc>),
}

impl std::fmt::Display for AsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsOf::Latest => f.write_str("the latest version"),
            AsOf::Version(v) => write!(f, "version {v}"),
            AsOf::Time(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%SZ")),
        }
    }
}

impl std::str::FromStr for AsOf {
    type Err = String;

    /// `latest`, a version number, or an RFC 3339 instant / a date (`2026-12-01` = its start, UTC).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("latest") {
            return Ok(AsOf::Latest);
        }
        if let Ok(v) = s.parse::<u64>() {
            return Ok(AsOf::Version(v));
        }
        if s.parse::<i64>().is_ok() {
            return Err(format!("version {s} is negative; versions count from 0"));
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(AsOf::Time(t.with_timezone(&Utc)));
        }
        if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return Ok(AsOf::Time(
                d.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
            ));
        }
        Err(format!(
            "'{s}' is neither a version number nor a time; give e.g. 3, 2026-12-01 or 2026-12-01T06:00:00Z"
        ))
    }
}

/// How a write changes a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Add rows (a feed batch, a snapshot): commutes with other appends.
    Append,
    /// Replace the rows of exactly the given partition (an ATT&CK release, a feed's state).
    ReplacePartition,
}

/// One commit of a table's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Version it created.
    pub version: u64,
    /// When (commit time).
    pub timestamp: Option<DateTime<Utc>>,
    /// Delta operation (WRITE, OPTIMIZE, VACUUM START, CONVERT, …).
    pub operation: String,
    /// What threatlake did (e.g. `ingest attack enterprise 18.1`), when it said.
    pub purpose: Option<String>,
    /// Rows and files it added and removed, as the writer recorded them.
    pub metrics: String,
}

/// What a table holds at one version: the files a reader of that snapshot reads.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The version.
    pub version: u64,
    /// Hive partition columns, in path order.
    pub partition_cols: Vec<String>,
    /// Data files: paths relative to the table directory, with their sizes.
    pub files: Vec<(String, u64)>,
}

/// Register the default (conditional-put) log store for `s3://` tables: threatlake hands delta-rs
/// its own S3 client, and S3 refuses a second create of the same commit file (`If-None-Match`).
fn register_s3_log_store() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[derive(Debug)]
        struct ConditionalPut;
        impl LogStoreFactory for ConditionalPut {
            fn with_options(
                &self,
                prefixed: Arc<dyn ObjectStore>,
                root: Arc<dyn ObjectStore>,
                location: &Url,
                options: &StorageConfig,
            ) -> deltalake_core::DeltaResult<Arc<dyn LogStore>> {
                Ok(default_logstore(prefixed, root, location, options))
            }
        }
        logstore_factories().insert(
            Url::parse("s3://").expect("static URL"),
            Arc::new(ConditionalPut),
        );
    });
}

impl Location {
    /// URL of the table directory `name` (trailing slash).
    pub fn table_url(&self, name: &str) -> Result<Url, LakeError> {
        Url::parse(&self.dir_url(name)).map_err(|e| LakeError::Location {
            spec: self.to_string(),
            reason: e.to_string(),
        })
    }
}

impl LakeError {
    /// A delta-rs error on `table`, said so that a user can act on it (see [`describe`]).
    pub(crate) fn delta(table: &str, source: DeltaTableError) -> Self {
        LakeError::Delta {
            table: table.to_string(),
            message: describe(&source),
        }
    }
}

/// A delta-rs error as a user can act on it: conflicts say to re-run, a missing version says which
/// exist.
fn describe(e: &DeltaTableError) -> String {
    use deltalake_core::kernel::transaction::TransactionError;
    match e {
        DeltaTableError::Transaction { source } => match source {
            TransactionError::VersionAlreadyExists(v) => format!(
                "another writer committed version {v} of this table first and the retries ran out; nothing of this write was committed, re-run it"
            ),
            TransactionError::CommitConflict(c) => format!(
                "a concurrent write conflicts with this one ({c}); nothing of this write was committed, re-run it"
            ),
            other => other.to_string(),
        },
        other => {
            let text = other.to_string();
            format!(
                "{}{}",
                super::s3::condense_text(&text),
                super::s3::hint_text(&format!("{other:?} {text}"), false)
            )
        }
    }
}

impl Lake {
    fn builder(&self, name: &str) -> Result<DeltaTableBuilder, LakeError> {
        register_s3_log_store();
        let url = self.location.table_url(name)?;
        Ok(DeltaTableBuilder::from_url(url.clone())
            .map_err(|e| LakeError::delta(name, e))?
            .with_storage_backend(self.location.store.clone(), url))
    }

    /// The log store (commit log and data files) of table `name`.
    pub fn log_store(&self, name: &str) -> Result<Arc<dyn LogStore>, LakeError> {
        self.builder(name)?
            .build_storage()
            .map_err(|e| LakeError::delta(name, e))
    }

    /// Whether `name` has a commit log.
    pub async fn is_delta(&self, name: &str) -> Result<bool, LakeError> {
        let log = self.location.list(&format!("{name}/{DELTA_LOG}")).await?;
        Ok(log.iter().any(|o| o.location.extension() == Some("json")))
    }

    /// The Delta table `name` as of `at`, or None when the lake has no such table.
    pub async fn delta_table(
        &self,
        name: &str,
        at: &AsOf,
    ) -> Result<Option<DeltaTable>, LakeError> {
        if !self.is_delta(name).await? {
            return Ok(None);
        }
        let b = self.builder(name)?;
        let b = match at {
            AsOf::Latest => b,
            AsOf::Version(v) => b.with_version(*v),
            AsOf::Time(t) => b.with_timestamp(*t),
        };
        match b.load().await {
            Ok(t) => {
                if let AsOf::Time(when) = at {
                    // delta-rs answers an instant before the first commit with version 0.
                    let first = t
                        .snapshot()
                        .ok()
                        .filter(|s| s.version() == 0)
                        .and_then(|s| s.version_timestamp(0))
                        .and_then(DateTime::<Utc>::from_timestamp_millis);
                    if let Some(first) = first.filter(|f| f > when) {
                        return Err(LakeError::AsOf {
                            table: name.to_string(),
                            at: at.to_string(),
                            reason: format!(
                                "its first commit is at {}",
                                first.format("%Y-%m-%dT%H:%M:%SZ")
                            ),
                        });
                    }
                }
                Ok(Some(t))
            }
            Err(e) if *at != AsOf::Latest => Err(LakeError::AsOf {
                table: name.to_string(),
                at: at.to_string(),
                reason: format!(
                    "{}; `threatlake lake history {name}` lists the versions kept",
                    describe(&e)
                ),
            }),
            Err(e) => Err(LakeError::delta(name, e)),
        }
    }

    /// The files a reader of `name` at `at` reads, or None when there is no such table.
    pub async fn snapshot(&self, name: &str, at: &AsOf) -> Result<Option<Snapshot>, LakeError> {
        let Some(t) = self.delta_table(name, at).await? else {
            return Ok(None);
        };
        snapshot_of(name, &t).map(Some)
    }

    /// A DataFusion table over `name` at `at` (delta-rs's scan of that snapshot), or None.
    pub async fn provider(
        &self,
        name: &str,
        at: &AsOf,
        session: &dyn Session,
    ) -> Result<Option<Arc<dyn TableProvider>>, LakeError> {
        Ok(self
            .versioned_provider(name, at, session)
            .await?
            .map(|(p, _)| p))
    }

    /// [`Lake::provider`] with the version of the snapshot it reads.
    pub async fn versioned_provider(
        &self,
        name: &str,
        at: &AsOf,
        session: &dyn Session,
    ) -> Result<Option<(Arc<dyn TableProvider>, u64)>, LakeError> {
        let Some(t) = self.delta_table(name, at).await? else {
            return Ok(None);
        };
        // The session reads the table's files through the lake's store.
        t.update_datafusion_session(session)
            .map_err(|e| LakeError::delta(name, e))?;
        let state = t.snapshot().map_err(|e| LakeError::delta(name, e))?;
        // Partition values as plain text (as the lake always exposed them), and plain Utf8 columns:
        // the same types whichever engine reads the table.
        let config = DeltaScanConfig::new().with_wrap_partition_values(false);
        let config = DeltaScanConfig {
            schema_force_view_types: false,
            ..config
        };
        let scan =
            DeltaScanNext::new(state.snapshot().clone(), config).map_err(|e| LakeError::Delta {
                table: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Some((Arc::new(scan), state.version())))
    }

    /// Commit `batches` (of `schema`, without the partition columns) to `table` in one transaction,
    /// with the partition columns set to `partition`; `purpose` is recorded in the commit. Creates
    /// the table on first write. Returns the version committed.
    pub async fn commit(
        &self,
        table: &str,
        partition: &[(&str, &str)],
        schema: SchemaRef,
        batches: &[RecordBatch],
        mode: WriteMode,
        purpose: &str,
    ) -> Result<u64, LakeError> {
        partition_dir(table, partition)?;
        let (full, mut batches) = with_partition_columns(table, partition, &schema, batches)?;
        if batches.is_empty() {
            // Still one commit (a run with nothing to add is part of the history), and the table
            // exists with its schema afterwards.
            batches.push(RecordBatch::new_empty(full.clone()));
        }
        let current = self.delta_table(table, &AsOf::Latest).await?;
        let t = match current {
            Some(t) => t,
            None => {
                let old = self.location.list(table).await?;
                if old
                    .iter()
                    .any(|o| o.location.extension() == Some("parquet"))
                {
                    return Err(LakeError::NeedsUpgrade {
                        lake: self.location.to_string(),
                        tables: table.to_string(),
                    });
                }
                self.create(table, &full, partition).await?
            }
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).map_err(
                |source| LakeError::Parquet {
                    path: table.to_string(),
                    source,
                },
            )?))
            .set_created_by(format!("threatlake {}", env!("CARGO_PKG_VERSION")))
            .build();
        let meta = HashMap::from([(
            "threatlake".to_string(),
            serde_json::Value::String(purpose.to_string()),
        )]);
        let mut w = t
            .write(batches)
            .with_partition_columns(partition.iter().map(|(k, _)| k.to_string()))
            .with_writer_properties(props)
            .with_schema_mode(SchemaMode::Merge)
            .with_commit_properties(CommitProperties::default().with_metadata(meta))
            .with_save_mode(match mode {
                WriteMode::Append => SaveMode::Append,
                WriteMode::ReplacePartition => SaveMode::Overwrite,
            });
        if mode == WriteMode::ReplacePartition {
            let pred = partition
                .iter()
                .map(|(k, v)| col(*k).eq(lit(*v)))
                .reduce(Expr::and)
                .unwrap_or_else(|| lit(true));
            w = w.with_replace_where(pred);
        }
        let t = w.await.map_err(|e| LakeError::delta(table, e))?;
        Ok(t.version().unwrap_or(0))
    }

    /// Create `table` (schema and partition columns, no rows) as version 0, so that data files only
    /// ever land in a table with a commit log: a directory of Parquet without `_delta_log` is then
    /// always a lake from before Delta, never a first write that died before its commit.
    async fn create(
        &self,
        table: &str,
        schema: &Schema,
        partition: &[(&str, &str)],
    ) -> Result<DeltaTable, LakeError> {
        let st: StructType = schema.try_into_kernel().map_err(|e| LakeError::Delta {
            table: table.to_string(),
            message: format!("schema not representable in Delta: {e}"),
        })?;
        let t = self
            .builder(table)?
            .build()
            .map_err(|e| LakeError::delta(table, e))?;
        let created = t
            .create()
            .with_columns(st.fields().cloned())
            .with_partition_columns(partition.iter().map(|(k, _)| k.to_string()))
            .with_save_mode(SaveMode::Ignore)
            .await;
        match created {
            Ok(t) => Ok(t),
            // Another writer created it first.
            Err(e) => match self.delta_table(table, &AsOf::Latest).await? {
                Some(t) => Ok(t),
                None => Err(LakeError::delta(table, e)),
            },
        }
    }

    /// The commits of `table`, newest first (at most `limit`).
    pub async fn history(
        &self,
        table: &str,
        limit: Option<usize>,
    ) -> Result<Vec<Commit>, LakeError> {
        let Some(t) = self.delta_table(table, &AsOf::Latest).await? else {
            return Err(LakeError::NoTable {
                table: table.to_string(),
            });
        };
        let latest = t.version().unwrap_or(0);
        let infos: Vec<_> = t
            .history(limit)
            .try_collect()
            .await
            .map_err(|e| LakeError::delta(table, e))?;
        Ok(infos
            .into_iter()
            .enumerate()
            .map(|(i, c)| Commit {
                // Newest first, one per version (the commit info has no version of its own;
                // `readVersion` is what the writer read, older than its own after a retry).
                version: latest.saturating_sub(i as u64),
                timestamp: c.timestamp.and_then(DateTime::<Utc>::from_timestamp_millis),
                operation: c.operation.clone().unwrap_or_default(),
                purpose: c
                    .info
                    .get("threatlake")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                metrics: c
                    .info
                    .get("operationMetrics")
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            })
            .collect())
    }
}

/// The snapshot (files, partition columns) a loaded table reads.
pub fn snapshot_of(name: &str, t: &DeltaTable) -> Result<Snapshot, LakeError> {
    let state = t.snapshot().map_err(|e| LakeError::delta(name, e))?;
    let files = state
        .log_data()
        .into_iter()
        .map(|add| (add.path().to_string(), add.size().max(0) as u64))
        .collect();
    Ok(Snapshot {
        version: state.version(),
        partition_cols: state.metadata().partition_columns().to_vec(),
        files,
    })
}

/// `batches` with the partition columns appended as constant text columns.
fn with_partition_columns(
    table: &str,
    partition: &[(&str, &str)],
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(SchemaRef, Vec<RecordBatch>), LakeError> {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(
        partition
            .iter()
            .map(|(k, _)| Field::new(*k, DataType::Utf8, false)),
    );
    let full = Arc::new(Schema::new(fields));
    let out = batches
        .iter()
        .map(|b| {
            let mut cols: Vec<ArrayRef> = b.columns().to_vec();
            cols.extend(
                partition
                    .iter()
                    .map(|(_, v)| Arc::new(StringArray::from(vec![*v; b.num_rows()])) as ArrayRef),
            );
            RecordBatch::try_new(full.clone(), cols).map_err(|e| LakeError::Delta {
                table: table.to_string(),
                message: format!("batch does not match the table's schema: {e}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((full, out))
}
