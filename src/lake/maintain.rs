//! Lake upkeep: `lake sync` (copy a lake between a directory and S3, either way, log-aware),
//! `lake optimize` (compact small files in one commit), `lake vacuum` (delete files no version
//! within the retention reads) and `lake upgrade` (plain-Parquet lake → Delta tables in place).

use std::collections::{BTreeMap, BTreeSet};

use deltalake_core::kernel::{DataType as DeltaType, StructField};
use deltalake_core::operations::convert_to_delta::{ConvertToDeltaBuilder, PartitionStrategy};
use deltalake_core::operations::vacuum::VacuumMode;
use deltalake_core::DeltaTable;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::ObjectMeta;
use serde::Deserialize;

use super::delta::{AsOf, DELTA_LOG};
use super::{Lake, LakeError, Location, STAGING};

/// Folder of the compaction journals older releases kept (rolled forward by `lake upgrade`).
pub const JOURNAL: &str = "_compact";

/// Objects that belong to one lake and not to another: staging files and held locks.
fn transient(rel: &str) -> bool {
    rel.starts_with(&format!("{STAGING}/")) || rel.starts_with(&format!("{}/", super::lock::LOCKS))
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// What a sync did (or would do, with `dry_run`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Objects copied.
    pub copied: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// Objects already present with the same size and not modified since.
    pub unchanged: usize,
    /// Objects deleted at the destination (gone from the source's tables).
    pub deleted: usize,
    /// Source objects that vanished while syncing (replaced by a concurrent writer).
    pub vanished: usize,
}

/// Relative path → object, for every object of a location except transient ones.
async fn inventory(loc: &Location) -> Result<BTreeMap<String, ObjectMeta>, LakeError> {
    Ok(loc
        .list("")
        .await?
        .into_iter()
        .map(|o| (loc.relative_parts(&o.location).join("/"), o))
        .filter(|(rel, _)| !rel.is_empty() && !transient(rel))
        .collect())
}

/// Copy `from` to `to`: every object missing at the destination, of a different size or modified
/// at the source after the destination's copy was written is copied
/// (each one atomically), then Parquet files that the source's tables no longer have are deleted at
/// the destination, so both sides answer queries the same. Objects outside the source's top-level
/// folders are left alone. The destination's writer locks are held throughout.
pub async fn sync(
    from: &Location,
    to: &Location,
    dry_run: bool,
    ttl: std::time::Duration,
) -> Result<SyncReport, LakeError> {
    under_all_locks(
        to,
        "lake sync",
        dry_run,
        ttl,
        sync_locked(from, to, dry_run),
    )
    .await
}

/// Run `work` holding every writer lock of `loc` (none for a dry run), releasing them after.
async fn under_all_locks<T>(
    loc: &Location,
    purpose: &str,
    dry_run: bool,
    ttl: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, LakeError>>,
) -> Result<T, LakeError> {
    if dry_run {
        return work.await;
    }
    loc.with_locks(&super::lock::ALL, purpose, ttl, work).await
}

async fn sync_locked(
    from: &Location,
    to: &Location,
    dry_run: bool,
) -> Result<SyncReport, LakeError> {
    let src = inventory(from).await?;
    let dst = inventory(to).await?;
    let mut report = SyncReport::default();
    let todo: Vec<(&String, &ObjectMeta)> = src
        .iter()
        .filter(|(rel, o)| match dst.get(*rel) {
            // Equal size is not enough: feed state and version rows are rewritten at the same
            // size. A copy is newer than its source, so a source modified after it is changed.
            // (ETags cannot be compared across stores: S3's are MD5s, the file system's are not.)
            Some(d) if d.size == o.size && d.last_modified >= o.last_modified => {
                report.unchanged += 1;
                false
            }
            _ => true,
        })
        .collect();
    let tops: BTreeSet<&str> = src.keys().filter_map(|k| k.split('/').next()).collect();
    let stale: Vec<&String> = dst
        .keys()
        .filter(|rel| !src.contains_key(*rel) && rel.ends_with(".parquet"))
        .filter(|rel| rel.split('/').next().is_some_and(|t| tops.contains(t)))
        .collect();
    if dry_run {
        report.copied = todo.len();
        report.bytes = todo.iter().map(|(_, o)| o.size).sum();
        report.deleted = stale.len();
        return Ok(report);
    }
    // Data files first, then each table's commit log in version order: a reader of the destination
    // sees a version only once every file it names is there.
    let (logs, data): (Vec<_>, Vec<_>) = todo
        .into_iter()
        .partition(|(rel, _)| rel.contains(&format!("/{DELTA_LOG}/")));
    let pb = progress((logs.len() + data.len()) as u64, &format!("sync → {to}"));
    let mut copied: Vec<Option<u64>> = futures::stream::iter(data)
        .map(|(rel, _)| {
            let pb = pb.clone();
            async move {
                let out = copy_object(from, to, rel).await?;
                pb.inc(1);
                Ok::<_, LakeError>(out)
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
    let mut logs = logs;
    // `_last_checkpoint` points at a checkpoint: after every numbered entry.
    logs.sort_by_key(|(rel, _)| (rel.ends_with("_last_checkpoint"), rel.to_string()));
    for (rel, _) in logs {
        copied.push(copy_object(from, to, rel).await?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    for c in copied {
        match c {
            Some(n) => {
                report.copied += 1;
                report.bytes += n;
            }
            None => report.vanished += 1,
        }
    }
    // Deletions last (files the source vacuumed): a crash before this point leaves extra files,
    // never missing ones.
    for rel in stale {
        to.delete(rel).await?;
        report.deleted += 1;
    }
    Ok(report)
}

/// Copy one object (atomically at the destination); its size, or None when it vanished at the source.
async fn copy_object(from: &Location, to: &Location, rel: &str) -> Result<Option<u64>, LakeError> {
    Ok(match from.get_opt(rel).await? {
        Some(bytes) => {
            let n = bytes.len() as u64;
            to.put_atomic(rel, bytes).await?;
            Some(n)
        }
        None => None,
    })
}

/// Every table of the lake at its latest version (refusing a lake that still needs `lake upgrade`).
async fn latest_tables(lake: &Lake) -> Result<Vec<(String, DeltaTable)>, LakeError> {
    let mut out = Vec::new();
    for name in lake.require_delta().await? {
        if let Some(t) = lake.delta_table(&name, &AsOf::Latest).await? {
            out.push((name, t));
        }
    }
    Ok(out)
}

/// What `lake optimize` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OptimizeReport {
    /// Tables rewritten.
    pub tables: usize,
    /// Files removed (merged into others).
    pub files_removed: u64,
    /// Files added.
    pub files_added: u64,
}

/// Compact every table's small files (feeds add one per batch) into files of up to `target_mb`,
/// one commit per table: readers see the table before or after, with the same rows.
pub async fn optimize(lake: &Lake, target_mb: u64) -> Result<OptimizeReport, LakeError> {
    let mut report = OptimizeReport::default();
    let target = std::num::NonZeroU64::new(target_mb.max(1) * 1024 * 1024).expect("nonzero");
    for (name, t) in latest_tables(lake).await? {
        let (_, m) = t
            .optimize()
            .with_target_size(target)
            .await
            .map_err(|e| LakeError::delta(&name, e))?;
        if m.num_files_removed > 0 {
            report.tables += 1;
        }
        report.files_removed += m.num_files_removed;
        report.files_added += m.num_files_added;
    }
    Ok(report)
}

/// What `lake vacuum` did (or would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VacuumReport {
    /// Files deleted (or that would be).
    pub files: usize,
    /// Tables with something to delete.
    pub tables: usize,
}

/// Delete every data file that no version committed within `retain` reads (replaced, compacted,
/// or left by a writer that died before committing). Time travel reaches back `retain`.
pub async fn vacuum(
    lake: &Lake,
    retain: std::time::Duration,
    dry_run: bool,
) -> Result<VacuumReport, LakeError> {
    let mut report = VacuumReport::default();
    let retain = chrono::Duration::from_std(retain).unwrap_or(chrono::Duration::MAX);
    for (name, t) in latest_tables(lake).await? {
        let (_, m) = t
            .vacuum()
            .with_retention_period(retain)
            .with_enforce_retention_duration(false)
            .with_mode(VacuumMode::Full)
            .with_dry_run(dry_run)
            .await
            .map_err(|e| LakeError::delta(&name, e))?;
        if !m.files_deleted.is_empty() {
            report.tables += 1;
        }
        report.files += m.files_deleted.len();
    }
    Ok(report)
}

/// A compaction journal of an older release.
#[derive(Debug, Deserialize)]
struct Journal {
    inputs: Vec<String>,
    output: String,
}

/// What `lake upgrade` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpgradeReport {
    /// Tables converted: (name, files).
    pub converted: Vec<(String, usize)>,
    /// Interrupted compactions of the old release finished first.
    pub recovered: usize,
    /// Staging leftovers removed.
    pub staging_removed: usize,
}

/// Convert a plain-Parquet lake (as releases before Delta wrote it) into Delta tables in place: the
/// Parquet files stay where they are and each table gets a commit log naming all of them (version 0).
/// Interrupted compactions are rolled forward first so no row is counted twice. Idempotent: tables
/// already converted are left alone, so an interrupted upgrade is finished by running it again.
pub async fn upgrade(lake: &Lake) -> Result<UpgradeReport, LakeError> {
    let loc = &lake.location;
    let mut report = UpgradeReport::default();
    for obj in loc.list(JOURNAL).await? {
        let rel = loc.relative_parts(&obj.location).join("/");
        let j: Option<Journal> = serde_json::from_slice(&loc.get(&rel).await?).ok();
        if let Some(j) = j {
            if loc.get_opt(&j.output).await?.is_some() {
                for input in &j.inputs {
                    loc.delete(input).await?;
                }
            } else {
                loc.delete(&j.output).await?;
            }
        }
        loc.delete(&rel).await?;
        report.recovered += 1;
    }
    for obj in loc.list(STAGING).await? {
        let rel = loc.relative_parts(&obj.location).join("/");
        loc.delete(&rel).await?;
        report.staging_removed += 1;
    }
    let (_, legacy) = lake.table_dirs().await?;
    for name in legacy {
        let files: Vec<Vec<String>> = loc
            .list(&name)
            .await?
            .iter()
            .filter(|o| o.location.extension() == Some("parquet"))
            .map(|o| loc.relative_parts(&o.location))
            .collect();
        let cols: Vec<String> = files
            .first()
            .map(|parts| {
                parts[1..parts.len() - 1]
                    .iter()
                    .filter_map(|m| m.split_once('=').map(|(k, _)| k.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let log_store = lake.log_store(&name)?;
        ConvertToDeltaBuilder::new()
            .with_log_store(log_store)
            .with_partition_strategy(PartitionStrategy::Hive)
            .with_partition_schema(
                cols.iter()
                    .map(|c| StructField::new(c.clone(), DeltaType::STRING, true)),
            )
            .await
            .map_err(|e| LakeError::Delta {
                table: name.clone(),
                message: format!("converting to Delta: {e}"),
            })?;
        report.converted.push((name, files.len()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::sync::Arc;

    fn batch(v: &[i64]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(v.to_vec()))])
            .unwrap();
        (schema, b)
    }

    /// Files and sorted values of `table` at `at`, read from the snapshot's files.
    async fn rows(lake: &Lake, table: &str, at: AsOf) -> (usize, Vec<i64>) {
        let snap = lake.snapshot(table, &at).await.unwrap().unwrap();
        let mut vals = Vec::new();
        for (f, _) in &snap.files {
            let bytes = lake.location.get(&format!("{table}/{f}")).await.unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                vals.extend(
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(
                        b.column_by_name("x").unwrap(),
                    )
                    .values()
                    .iter(),
                );
            }
        }
        vals.sort();
        (snap.files.len(), vals)
    }

    async fn parquet_objects(loc: &Location, dir: &str) -> usize {
        loc.list(dir)
            .await
            .unwrap()
            .iter()
            .filter(|o| o.location.extension() == Some("parquet"))
            .count()
    }

    #[tokio::test]
    async fn sync_copies_changes_of_equal_size() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Location::open(a.path().to_str().unwrap()).unwrap();
        let to = Location::open(b.path().to_str().unwrap()).unwrap();
        let ttl = std::time::Duration::from_secs(60);
        from.put_atomic(
            "notes/otx.json",
            Bytes::from_static(b"{\"w\":\"2024-01-01\"}"),
        )
        .await
        .unwrap();
        let r = sync(&from, &to, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.unchanged), (1, 0));
        let r = sync(&from, &to, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.unchanged), (0, 1));
        // The same size, new content: copied, not skipped.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        from.put_atomic(
            "notes/otx.json",
            Bytes::from_static(b"{\"w\":\"2024-02-02\"}"),
        )
        .await
        .unwrap();
        let r = sync(&from, &to, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.unchanged), (1, 0));
        assert_eq!(
            to.get_opt("notes/otx.json").await.unwrap().unwrap(),
            Bytes::from_static(b"{\"w\":\"2024-02-02\"}")
        );
    }

    #[tokio::test]
    async fn optimize_keeps_rows_and_history_vacuum_keeps_what_retention_asks() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        for v in [[1, 2], [3, 4], [5, 6]] {
            let (s, b) = batch(&v);
            lake.append("t", &[("d", "2024-01-01")], s, &[b], "test")
                .await
                .unwrap();
        }
        assert_eq!(
            rows(&lake, "t", AsOf::Latest).await,
            (3, vec![1, 2, 3, 4, 5, 6])
        );
        let r = optimize(&lake, 128).await.unwrap();
        assert_eq!((r.tables, r.files_removed, r.files_added), (1, 3, 1));
        assert_eq!(
            rows(&lake, "t", AsOf::Latest).await,
            (1, vec![1, 2, 3, 4, 5, 6])
        );
        // Time travel: version 0 created the table, version 1 is the first append.
        assert_eq!(rows(&lake, "t", AsOf::Version(0)).await, (0, vec![]));
        assert_eq!(rows(&lake, "t", AsOf::Version(1)).await, (1, vec![1, 2]));
        assert_eq!(parquet_objects(&lake.location, "t").await, 4);
        // A week's retention keeps everything written just now.
        let week = std::time::Duration::from_secs(7 * 86400);
        assert_eq!(vacuum(&lake, week, false).await.unwrap().files, 0);
        let dry = vacuum(&lake, std::time::Duration::ZERO, true)
            .await
            .unwrap();
        assert_eq!(dry.files, 3);
        assert_eq!(
            parquet_objects(&lake.location, "t").await,
            4,
            "dry run deletes nothing"
        );
        let r = vacuum(&lake, std::time::Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!((r.files, r.tables), (3, 1));
        assert_eq!(parquet_objects(&lake.location, "t").await, 1);
        assert_eq!(
            rows(&lake, "t", AsOf::Latest).await,
            (1, vec![1, 2, 3, 4, 5, 6])
        );
    }

    #[tokio::test]
    async fn sync_copies_tables_log_aware_and_mirrors_vacuum() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let src = Lake::open(a.path().to_str().unwrap()).unwrap();
        let dst = Lake::open(b.path().to_str().unwrap()).unwrap();
        for i in 0..3 {
            let (s, bt) = batch(&[i]);
            src.append("t", &[("d", "1")], s, &[bt], "test")
                .await
                .unwrap();
        }
        dst.location
            .put_atomic("notes/keep.txt", "mine".into())
            .await
            .unwrap();
        let ttl = std::time::Duration::from_secs(60);
        let r = sync(&src.location, &dst.location, false, ttl)
            .await
            .unwrap();
        assert_eq!(
            (r.copied, r.deleted, r.unchanged),
            (7, 0, 0),
            "3 files, 4 commits"
        );
        assert_eq!(rows(&dst, "t", AsOf::Latest).await, (3, vec![0, 1, 2]));
        let again = sync(&src.location, &dst.location, false, ttl)
            .await
            .unwrap();
        assert_eq!((again.copied, again.unchanged), (0, 7));
        optimize(&src, 128).await.unwrap();
        vacuum(&src, std::time::Duration::ZERO, false)
            .await
            .unwrap();
        let after = sync(&src.location, &dst.location, false, ttl)
            .await
            .unwrap();
        assert_eq!(after.deleted, 3, "{after:?}");
        assert_eq!(rows(&dst, "t", AsOf::Latest).await, (1, vec![0, 1, 2]));
        assert!(dst
            .location
            .get_opt("notes/keep.txt")
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn upgrade_converts_a_plain_parquet_lake_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        // The layout releases before Delta wrote, with an interrupted compaction: its output
        // landed and one input is still there.
        let put = |rel: &'static str, v: &'static [i64]| {
            let lake = lake.clone();
            async move {
                let (s, b) = batch(v);
                let bytes = crate::lake::encode_parquet(rel, s, &[b]).unwrap();
                lake.location.put_atomic(rel, bytes).await.unwrap();
            }
        };
        put("t/d=2024-01-01/part-a.parquet", &[1, 2]).await;
        put("t/d=2024-01-02/part-b.parquet", &[3]).await;
        put("u/part-merged.parquet", &[7, 8]).await;
        put("u/part-old.parquet", &[8]).await;
        lake.location
            .put_atomic(
                "_compact/j.json",
                serde_json::to_vec(&serde_json::json!({
                    "dir": "u", "inputs": ["u/part-old.parquet"], "output": "u/part-merged.parquet"
                }))
                .unwrap()
                .into(),
            )
            .await
            .unwrap();
        let e = lake.tables().await.unwrap_err().to_string();
        assert!(e.contains("lake upgrade") && e.contains("t, u"), "{e}");
        let (s, b) = batch(&[9]);
        let e = lake
            .append("t", &[("d", "x")], s, &[b], "x")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("lake upgrade"), "{e}");

        let r = upgrade(&lake).await.unwrap();
        assert_eq!(r.recovered, 1);
        assert_eq!(
            r.converted,
            vec![("t".to_string(), 2), ("u".to_string(), 1)]
        );
        assert_eq!(rows(&lake, "t", AsOf::Latest).await, (2, vec![1, 2, 3]));
        assert_eq!(rows(&lake, "u", AsOf::Latest).await, (1, vec![7, 8]));
        let tables = lake.tables().await.unwrap();
        assert_eq!(tables["t"].partition_cols, vec!["d"]);
        assert!(
            upgrade(&lake).await.unwrap().converted.is_empty(),
            "idempotent"
        );
    }
}
