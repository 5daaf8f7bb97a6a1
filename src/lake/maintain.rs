//! Lake upkeep: `lake sync` (copy a lake between a directory and S3, either way) and `lake compact`
//! (merge the many small files long-running feeds leave in a partition).
//!
//! Compaction swaps several files for one, which no object store can do atomically, so it keeps a
//! journal: `_compact/<id>.json` names the inputs and the output before anything changes. The output
//! lands (atomically), then the inputs are deleted, then the journal. A crash before the output lands
//! leaves the inputs untouched; a crash after it leaves a journal that the next `compact` rolls
//! forward (deleting the inputs). Until then a query could count those rows twice, never lose them.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::{RecordBatch, RecordBatchReader};
use arrow::datatypes::SchemaRef;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::ObjectMeta;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use super::{encode_parquet, LakeError, Location, STAGING};

/// Folder of compaction journals under a lake root.
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
    let pb = progress(todo.len() as u64, &format!("sync → {to}"));
    let copied: Vec<Option<u64>> = futures::stream::iter(todo)
        .map(|(rel, _)| {
            let pb = pb.clone();
            async move {
                let out = match from.get_opt(rel).await? {
                    Some(bytes) => {
                        let n = bytes.len() as u64;
                        to.put_atomic(rel, bytes).await?;
                        Some(n)
                    }
                    None => None,
                };
                pb.inc(1);
                Ok::<_, LakeError>(out)
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
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
    // Deletions last: a crash before this point leaves extra files, never missing ones.
    for rel in stale {
        to.delete(rel).await?;
        report.deleted += 1;
    }
    Ok(report)
}

/// A compaction in progress, written before anything changes.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    /// Partition folder (relative to the root).
    dir: String,
    /// Files being merged (relative paths).
    inputs: Vec<String>,
    /// The merged file (relative path).
    output: String,
}

/// What a compaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// Partitions merged.
    pub partitions: usize,
    /// Files before.
    pub files_in: usize,
    /// Files after.
    pub files_out: usize,
    /// Rows rewritten.
    pub rows: usize,
    /// Bytes before / after.
    pub bytes_in: u64,
    /// Bytes after.
    pub bytes_out: u64,
    /// Journals of interrupted compactions finished.
    pub recovered: usize,
    /// Partitions left alone because their files' schemas differ: (folder, reason).
    pub skipped: Vec<(String, String)>,
}

/// Merge every partition holding at least `min_files` Parquet files into one file, under all of
/// the lake's writer locks. Interrupted compactions are finished first.
pub async fn compact(
    loc: &Location,
    min_files: usize,
    dry_run: bool,
    ttl: std::time::Duration,
) -> Result<CompactReport, LakeError> {
    let work = compact_locked(loc, min_files.max(2), dry_run);
    under_all_locks(loc, "lake compact", dry_run, ttl, work).await
}

async fn compact_locked(
    loc: &Location,
    min_files: usize,
    dry_run: bool,
) -> Result<CompactReport, LakeError> {
    let mut report = CompactReport::default();
    if !dry_run {
        report.recovered = recover(loc).await?;
    }
    let mut groups: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for obj in loc.list("").await? {
        let parts = loc.relative_parts(&obj.location);
        let [table, .., file] = parts.as_slice() else {
            continue;
        };
        if parts.len() < 2 || table.starts_with(['_', '.']) || !file.ends_with(".parquet") {
            continue;
        }
        groups
            .entry(parts[..parts.len() - 1].join("/"))
            .or_default()
            .push(obj);
    }
    let work: Vec<(String, Vec<ObjectMeta>)> = groups
        .into_iter()
        .filter(|(_, files)| files.len() >= min_files)
        .collect();
    let pb = progress(work.len() as u64, "compact");
    for (dir, files) in work {
        pb.inc(1);
        let inputs: Vec<String> = files
            .iter()
            .map(|o| loc.relative_parts(&o.location).join("/"))
            .collect();
        let bytes_in: u64 = files.iter().map(|o| o.size).sum();
        let (schema, batches) = match read_all(loc, &inputs).await? {
            Ok(x) => x,
            Err(reason) => {
                report.skipped.push((dir, reason));
                continue;
            }
        };
        report.partitions += 1;
        report.files_in += files.len();
        report.files_out += 1;
        report.bytes_in += bytes_in;
        report.rows += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
        if dry_run {
            continue;
        }
        let id = crate::feeds::new_batch_id(chrono::Utc::now());
        let output = format!("{dir}/part-c{id}.parquet");
        let bytes = encode_parquet(&output, schema, &batches)?;
        report.bytes_out += bytes.len() as u64;
        let journal_rel = format!("{JOURNAL}/{id}.json");
        let journal = Journal {
            dir: dir.clone(),
            inputs: inputs.clone(),
            output: output.clone(),
        };
        loc.put_atomic(
            &journal_rel,
            serde_json::to_vec(&journal)
                .expect("journal serialises")
                .into(),
        )
        .await?;
        loc.put_atomic(&output, bytes).await?;
        for rel in &inputs {
            loc.delete(rel).await?;
        }
        loc.delete(&journal_rel).await?;
    }
    pb.finish_and_clear();
    Ok(report)
}

/// Every batch of the given Parquet files, or why they cannot be merged (differing schemas).
async fn read_all(
    loc: &Location,
    rels: &[String],
) -> Result<Result<(SchemaRef, Vec<RecordBatch>), String>, LakeError> {
    let mut schema: Option<SchemaRef> = None;
    let mut out = Vec::new();
    for rel in rels {
        let bytes = loc.get(rel).await?;
        let perr = |source| LakeError::Parquet {
            path: rel.clone(),
            source,
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(perr)?;
        let s = reader.schema();
        match &schema {
            None => schema = Some(s.clone()),
            Some(first) if first.fields() != s.fields() => {
                return Ok(Err(format!(
                    "{rel} has a different schema from the partition's other files"
                )));
            }
            Some(_) => {}
        }
        for b in reader {
            out.push(b.map_err(|e| perr(e.into()))?);
        }
    }
    Ok(Ok((schema.expect("at least one file"), out)))
}

/// Finish interrupted compactions: when the output landed, delete the inputs; then the journal.
async fn recover(loc: &Location) -> Result<usize, LakeError> {
    let mut n = 0;
    for obj in loc.list(JOURNAL).await? {
        let rel = loc.relative_parts(&obj.location).join("/");
        let Some(bytes) = loc.get_opt(&rel).await? else {
            continue;
        };
        if let Ok(j) = serde_json::from_slice::<Journal>(&bytes) {
            if loc.get_opt(&j.output).await?.is_some() {
                for input in &j.inputs {
                    loc.delete(input).await?;
                }
            }
        }
        loc.delete(&rel).await?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use bytes::Bytes;
    use std::sync::Arc;

    fn batch(v: &[i64]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(v.to_vec()))])
            .unwrap();
        (schema, b)
    }

    async fn rows(lake: &super::super::Lake, dir: &str) -> (usize, Vec<i64>) {
        let mut files = 0;
        let mut vals = Vec::new();
        for o in lake.location.list(dir).await.unwrap() {
            files += 1;
            let rel = lake.location.relative_parts(&o.location).join("/");
            let bytes = lake.location.get(&rel).await.unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                vals.extend(
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0))
                        .values()
                        .iter(),
                );
            }
        }
        vals.sort();
        (files, vals)
    }

    #[tokio::test]
    async fn sync_copies_changes_of_equal_size() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Location::open(a.path().to_str().unwrap()).unwrap();
        let to = Location::open(b.path().to_str().unwrap()).unwrap();
        let ttl = std::time::Duration::from_secs(60);
        from.put_atomic(
            "feed_state/otx.json",
            Bytes::from_static(b"{\"w\":\"2024-01-01\"}"),
        )
        .await
        .unwrap();
        let r = sync(&from, &to, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.unchanged), (1, 0));
        let r = sync(&from, &to, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.unchanged), (0, 1));
        // The same size, new content (fixed-width state): copied, not skipped.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        from.put_atomic(
            "feed_state/otx.json",
            Bytes::from_static(b"{\"w\":\"2024-02-02\"}"),
        )
        .await
        .unwrap();
        let r = sync(&from, &to, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.unchanged), (1, 0));
        assert_eq!(
            to.get_opt("feed_state/otx.json").await.unwrap().unwrap(),
            Bytes::from_static(b"{\"w\":\"2024-02-02\"}")
        );
    }

    #[tokio::test]
    async fn compaction_merges_and_recovers_an_interrupted_swap() {
        let dir = tempfile::tempdir().unwrap();
        let lake = super::super::Lake::open(dir.path().to_str().unwrap()).unwrap();
        for (i, v) in [[1, 2], [3, 4], [5, 6]].iter().enumerate() {
            let (s, b) = batch(v);
            lake.write_file("t", &[("d", "2024-01-01")], &i.to_string(), s, &[b])
                .await
                .unwrap();
        }
        let (s, b) = batch(&[9]);
        lake.write_file("t", &[("d", "2024-01-02")], "0", s, &[b])
            .await
            .unwrap();
        // An interrupted swap: the output landed, one input is still there.
        let (s, b) = batch(&[7]);
        lake.write_file("u", &[("d", "x")], "merged", s.clone(), &[b])
            .await
            .unwrap();
        let (_, b) = batch(&[7]);
        lake.write_file("u", &[("d", "x")], "old", s, &[b])
            .await
            .unwrap();
        let j = Journal {
            dir: "u/d=x".into(),
            inputs: vec!["u/d=x/part-old.parquet".into()],
            output: "u/d=x/part-merged.parquet".into(),
        };
        lake.location
            .put_atomic("_compact/j.json", serde_json::to_vec(&j).unwrap().into())
            .await
            .unwrap();

        let ttl = std::time::Duration::from_secs(60);
        let dry = compact(&lake.location, 2, true, ttl).await.unwrap();
        assert_eq!((dry.partitions, dry.files_in), (2, 5));
        assert_eq!(
            rows(&lake, "t/d=2024-01-01").await.0,
            3,
            "dry run changes nothing"
        );

        let r = compact(&lake.location, 2, false, ttl).await.unwrap();
        assert_eq!(r.recovered, 1);
        assert_eq!(
            (r.partitions, r.files_in, r.files_out, r.rows),
            (1, 3, 1, 6)
        );
        assert_eq!(
            rows(&lake, "t/d=2024-01-01").await,
            (1, vec![1, 2, 3, 4, 5, 6])
        );
        assert_eq!(rows(&lake, "t/d=2024-01-02").await, (1, vec![9]));
        assert_eq!(
            rows(&lake, "u/d=x").await,
            (1, vec![7]),
            "rolled forward, no duplicate"
        );
        assert!(lake.location.list(JOURNAL).await.unwrap().is_empty());
        assert!(lake.location.locks().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn sync_copies_then_mirrors_deletions_within_tables() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let src = super::super::Lake::open(a.path().to_str().unwrap()).unwrap();
        let dst = Location::open(b.path().to_str().unwrap()).unwrap();
        for i in 0..3 {
            let (s, bt) = batch(&[i]);
            src.write_file("t", &[("d", "1")], &i.to_string(), s, &[bt])
                .await
                .unwrap();
        }
        dst.put_atomic("notes/keep.txt", "mine".into())
            .await
            .unwrap();
        let ttl = std::time::Duration::from_secs(60);
        let r = sync(&src.location, &dst, false, ttl).await.unwrap();
        assert_eq!((r.copied, r.deleted, r.unchanged), (3, 0, 0));
        let again = sync(&src.location, &dst, false, ttl).await.unwrap();
        assert_eq!((again.copied, again.unchanged), (0, 3));
        compact(&src.location, 2, false, ttl).await.unwrap();
        let after = sync(&src.location, &dst, false, ttl).await.unwrap();
        assert_eq!((after.copied, after.deleted), (1, 3));
        let left: Vec<String> = dst
            .list("")
            .await
            .unwrap()
            .iter()
            .map(|o| dst.relative_parts(&o.location).join("/"))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&"notes/keep.txt".to_string()));
    }
}
