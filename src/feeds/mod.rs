//! Threat feeds (AlienVault OTX, VirusTotal v3, TAXII 2.1 collections): a polite HTTP client, raw-response keeping, feed state
//! (watermarks, budgets) and the Parquet tables the normalised rows land in.
//!
//! Every feed table is an append-only log partitioned by ingest date (`*_log`); the tables users query
//! (`otx_data`, `virustotal_data`, …) are views in `sql/views/` that keep the newest version of each
//! item, so a revised pulse replaces its older row without rewriting history.

pub mod http;
pub mod intel;
pub mod otx;
pub mod samples;
pub mod taxii;
pub mod vt;

use std::io::Write;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::lake::{Lake, LakeError, Location};

/// Errors from feed ingestion. Every variant names the input and says what to do; none carries an API key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    /// The service rejected the API key.
    #[error("{service} rejected the API key (HTTP {status} from {url}); set {env} to a valid key (the key is not shown)")]
    Auth {
        /// OTX or VirusTotal.
        service: &'static str,
        /// HTTP status.
        status: u16,
        /// Request URL (keys travel in headers, never in URLs).
        url: String,
        /// Environment variable that holds the key.
        env: &'static str,
    },
    /// Transport error, timeout, or a status that stayed bad after the retries.
    #[error("{service}: request to {url} failed after {attempts} attempt(s): {message}; check the network and {service} status, then re-run (pages already saved are kept)")]
    Http {
        /// OTX or VirusTotal.
        service: &'static str,
        /// Request URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        message: String,
    },
    /// The body is not the JSON the API documents.
    #[error("{service}: malformed response from {url}: {message}; the response was kept under the raw store for inspection, no row from it was stored (pages before it were) — re-run later")]
    Malformed {
        /// OTX or VirusTotal.
        service: &'static str,
        /// Request URL.
        url: String,
        /// Parser message.
        message: String,
    },
    /// Paging does not end (a repeated or runaway `next` link).
    #[error("{service}: stopped paging at {url}: {message}; the pages fetched before it were stored and the watermark was not moved — re-run later or report the feed")]
    Paging {
        /// OTX or TAXII.
        service: &'static str,
        /// The link that was not followed.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A paging link points somewhere else (the key would be sent to another host).
    #[error("{service}: refusing to follow 'next' link {url}: it is not under the configured base URL {base}")]
    ForeignLink {
        /// OTX or VirusTotal.
        service: &'static str,
        /// The link.
        url: String,
        /// The configured base.
        base: String,
    },
    /// The service redirected outside the configured base URL; not followed, so the key stayed here.
    #[error("{service}: {url} redirected to {to}, which is not under the configured base URL {base}; the redirect was not followed and the API key was not sent there. If the service moved, set the base URL to its new address")]
    ForeignRedirect {
        /// OTX or VirusTotal.
        service: &'static str,
        /// The request.
        url: String,
        /// The redirect target.
        to: String,
        /// The configured base.
        base: String,
    },
    /// A response body exceeded the configured cap.
    #[error("{service}: the response from {url} is larger than {limit_mb} MB; nothing from it was stored. If it is genuine, raise http.max_body_mb in the feed's settings")]
    TooLarge {
        /// OTX or VirusTotal.
        service: &'static str,
        /// Request URL.
        url: String,
        /// The cap.
        limit_mb: f64,
    },
    /// A local input file (IOC list, sample) is unreadable or malformed.
    #[error("{path}: {message}")]
    Input {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Lake I/O.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// Building Arrow batches.
    #[error("building {table} rows: {message}")]
    Arrow {
        /// Table.
        table: &'static str,
        /// Message.
        message: String,
    },
    /// SQL over the lake (mapping, threat model).
    #[error(transparent)]
    Sql(#[from] crate::sql::SqlError),
}

/// Progress callback of long feed work ("page 12, 600 pulses"); front ends draw it (e.g. a spinner).
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// A run's id: UTC timestamp plus a random suffix, sortable and safe as a partition value and file name.
pub fn new_batch_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{}",
        now.format("%Y%m%dT%H%M%S%.3fZ")
            .to_string()
            .replace('.', ""),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Timestamp column type used by every feed table.
pub fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// `List<Utf8>`.
pub fn strings() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// Partition column of every feed log table.
pub const FEED_PARTITION_COLS: [&str; 1] = ["ingest_date"];

/// Known feed tables and their schemas (registered empty when absent so views always resolve).
pub fn table_schemas() -> Vec<(&'static str, SchemaRef, &'static [&'static str])> {
    vec![
        (otx::PULSE_LOG, otx::pulse_schema(), &FEED_PARTITION_COLS),
        (
            otx::INDICATOR_LOG,
            otx::indicator_schema(),
            &FEED_PARTITION_COLS,
        ),
        (vt::LOOKUP_LOG, vt::lookup_schema(), &FEED_PARTITION_COLS),
        (
            vt::TECHNIQUE_LOG,
            vt::technique_schema(),
            &FEED_PARTITION_COLS,
        ),
        (
            intel::MAPPED,
            intel::mapped_schema(),
            &intel::MAPPED_PARTITION,
        ),
        (
            intel::MAPPED_ITEMS,
            intel::mapped_items_schema(),
            &intel::MAPPED_PARTITION,
        ),
        (
            intel::THREAT_MODEL,
            intel::threat_model_schema(),
            &intel::THREAT_MODEL_PARTITION,
        ),
        (
            taxii::OBJECT_LOG,
            taxii::object_schema(),
            &FEED_PARTITION_COLS,
        ),
        (STATE, state_schema(), &STATE_PARTITION),
    ]
}

/// A string column of a query result as owned strings (Utf8, LargeUtf8 or Utf8View).
pub fn column_strings(b: &RecordBatch, i: usize) -> Vec<Option<String>> {
    array_strings(b.column(i))
}

/// An array's values as owned strings (any type arrow casts to text; nulls where it cannot).
pub fn array_strings(a: &arrow::array::ArrayRef) -> Vec<Option<String>> {
    let col = arrow::compute::cast(a, &DataType::Utf8)
        .unwrap_or_else(|_| arrow::array::new_null_array(&DataType::Utf8, a.len()));
    arrow::array::AsArray::as_string::<i32>(&col)
        .iter()
        .map(|x| x.map(str::to_string))
        .collect()
}

/// A batch as rows of nullable strings (every column cast to text), for code that reads a few
/// columns per row.
pub fn rows_of(b: &RecordBatch) -> Vec<Vec<Option<String>>> {
    let cols: Vec<Vec<Option<String>>> =
        (0..b.num_columns()).map(|i| column_strings(b, i)).collect();
    (0..b.num_rows())
        .map(|r| cols.iter().map(|c| c[r].clone()).collect())
        .collect()
}

/// A list-of-structs column as, per row, its entries as rows of nullable strings (each struct
/// field cast to text once for the whole batch: per-row slices of view-typed children cost time in
/// the number of their buffers); None for a null list, no rows for a column of another type.
pub fn struct_list_rows(lists: &arrow::array::ListArray) -> Vec<Option<Vec<Vec<Option<String>>>>> {
    use arrow::array::Array;
    let Some(s) = arrow::array::AsArray::as_struct_opt(lists.values()) else {
        return vec![None; lists.len()];
    };
    let cols: Vec<Vec<Option<String>>> = s.columns().iter().map(array_strings).collect();
    let offsets = lists.value_offsets();
    (0..lists.len())
        .map(|r| {
            lists.is_valid(r).then(|| {
                (offsets[r] as usize..offsets[r + 1] as usize)
                    .map(|e| cols.iter().map(|c| c[e].clone()).collect())
                    .collect()
            })
        })
        .collect()
}

/// The newest stored `modified` of every id of a feed log, in the fixed RFC 3339 form (so text
/// order is time order); None where no version of the id has one. A pull compares what comes
/// again with it. `table` and `id` are the caller's constants, never input.
pub async fn newest_modified(
    engine: &crate::sql::Engine,
    table: &str,
    id: &str,
) -> Result<Vec<(String, Option<String>)>, FeedError> {
    let r = engine
        .run(&format!(
            "SELECT {id}, CAST(max(modified) AS VARCHAR) FROM {table} GROUP BY {id}"
        ))
        .await?;
    let mut out = Vec::new();
    for b in &r[0].batches {
        for (id, m) in column_strings(b, 0).into_iter().zip(column_strings(b, 1)) {
            if let Some(id) = id {
                let m =
                    m.map(|m| rfc3339(Some(&serde_json::Value::String(m.clone()))).unwrap_or(m));
                out.push((id, m));
            }
        }
    }
    Ok(out)
}

/// Serde rows → one Arrow batch of `schema` (arrow-json does the typing: timestamps, lists, nulls).
pub fn to_batch<T: Serialize>(
    table: &'static str,
    schema: &SchemaRef,
    rows: &[T],
) -> Result<RecordBatch, FeedError> {
    let err = |e: arrow::error::ArrowError| FeedError::Arrow {
        table,
        message: e.to_string(),
    };
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .build_decoder()
        .map_err(err)?;
    decoder.serialize(rows).map_err(err)?;
    Ok(decoder
        .flush()
        .map_err(err)?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

/// Append `rows` to a log table in today's partition: one commit, recorded with the batch id.
pub async fn append<T: Serialize>(
    lake: &Lake,
    table: &'static str,
    schema: &SchemaRef,
    partition: &[(&str, &str)],
    file_id: &str,
    rows: &[T],
) -> Result<(), FeedError> {
    if rows.is_empty() {
        return Ok(());
    }
    let batch = to_batch(table, schema, rows)?;
    lake.append(table, partition, schema.clone(), &[batch], file_id)
        .await?;
    Ok(())
}

/// Keep a response body as received: `<source>/<date>/<name>.json.gz` under the raw store.
pub async fn keep_raw(
    raw: &Location,
    source: &str,
    date: &str,
    name: &str,
    body: &[u8],
) -> Result<String, FeedError> {
    let rel = format!("{source}/{date}/{name}.json.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body)
        .and_then(|_| gz.flush())
        .map_err(|e| FeedError::Input {
            path: rel.clone(),
            message: format!("compressing the raw response: {e}"),
        })?;
    let bytes = gz.finish().map_err(|e| FeedError::Input {
        path: rel.clone(),
        message: format!("compressing the raw response: {e}"),
    })?;
    raw.put_atomic(&rel, Bytes::from(bytes)).await?;
    Ok(rel)
}

/// Whether `rel` can name a response [`keep_raw`] kept: a relative `.json.gz` path inside the raw
/// store (no empty, `.` or `..` segment). `raw_ref` values are checked before they are read.
pub fn is_raw_ref(rel: &str) -> bool {
    rel.ends_with(".json.gz")
        && !rel.starts_with('/')
        && rel
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// A response [`keep_raw`] kept, unpacked; None when it is no longer in the raw store.
pub async fn read_raw(raw: &Location, rel: &str) -> Result<Option<Vec<u8>>, FeedError> {
    let Some(gz) = raw.get_opt(rel).await? else {
        return Ok(None);
    };
    let failed = |e: String| FeedError::Input {
        path: rel.to_string(),
        message: format!("unpacking the raw response: {e}"),
    };
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out)
            .map(|_| out)
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map(Some)
    .map_err(|e| failed(e.to_string()))
}

/// Feed state table: small key/value facts per source (watermarks, daily budget use).
pub const STATE: &str = "feed_state";
const STATE_PARTITION: [&str; 1] = ["source"];

fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
        Field::new("updated_at", ts(), false),
    ]))
}

#[derive(Serialize)]
struct StateRow<'a> {
    key: &'a str,
    value: &'a str,
    updated_at: String,
}

/// Read a source's state (empty when none is stored).
pub async fn read_state(
    lake: &Lake,
    source: &str,
) -> Result<std::collections::BTreeMap<String, String>, FeedError> {
    let mut out = std::collections::BTreeMap::new();
    let Some(snap) = lake
        .snapshot(STATE, &crate::lake::delta::AsOf::Latest)
        .await?
    else {
        return Ok(out);
    };
    let prefix = format!("source={source}/");
    for (file, _) in snap.files.iter().filter(|(f, _)| f.starts_with(&prefix)) {
        let rel = format!("{STATE}/{file}");
        let unreadable = |e: &dyn std::fmt::Display| {
            FeedError::Input {
            path: rel.clone(),
            message: format!(
                "unreadable feed state ({e}); `threatlake lake history {STATE}` and time travel show the last good state"
            ),
        }
        };
        let bytes = lake.location.get(&rel).await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| unreadable(&e))?;
        for b in reader {
            let b = b.map_err(|e| unreadable(&e))?;
            let (Some(k), Some(v)) = (
                b.column_by_name("key")
                    .and_then(|c| c.as_string_opt::<i32>()),
                b.column_by_name("value")
                    .and_then(|c| c.as_string_opt::<i32>()),
            ) else {
                return Err(unreadable(&"no key/value text columns"));
            };
            for i in 0..b.num_rows() {
                out.insert(k.value(i).to_string(), v.value(i).to_string());
            }
        }
    }
    Ok(out)
}

/// Replace a source's state (atomic).
pub async fn write_state(
    lake: &Lake,
    source: &str,
    state: &std::collections::BTreeMap<String, String>,
) -> Result<(), FeedError> {
    let now = fixed(Utc::now());
    let rows: Vec<StateRow> = state
        .iter()
        .map(|(k, v)| StateRow {
            key: k,
            value: v,
            updated_at: now.clone(),
        })
        .collect();
    let schema = state_schema();
    let batch = to_batch(STATE, &schema, &rows)?;
    lake.replace_partition(
        STATE,
        &[("source", source)],
        schema,
        &[batch],
        &format!("feed state {source}"),
    )
    .await?;
    Ok(())
}

/// Parse the timestamp shapes the APIs use (`2023-08-22T09:43:18.855000`, with or without zone,
/// or Unix seconds) into RFC 3339 UTC; None when absent or unparseable.
pub fn rfc3339(v: Option<&serde_json::Value>) -> Option<String> {
    use chrono::NaiveDateTime;
    match v? {
        serde_json::Value::String(s) => {
            let s = s.trim();
            if s.is_empty() {
                return None;
            }
            if let Ok(d) = DateTime::parse_from_rfc3339(s) {
                return Some(fixed(d.with_timezone(&Utc)));
            }
            for f in [
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M:%S",
            ] {
                if let Ok(d) = NaiveDateTime::parse_from_str(s, f) {
                    return Some(fixed(d.and_utc()));
                }
            }
            None
        }
        serde_json::Value::Number(n) => n
            .as_i64()
            .and_then(|t| DateTime::from_timestamp(t, 0))
            .map(fixed),
        _ => None,
    }
}

/// Fixed-width RFC 3339 (microseconds, `Z`): text order is time order.
pub fn fixed(d: DateTime<Utc>) -> String {
    d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A JSON array of strings (non-strings skipped; absent → empty).
pub fn string_list(v: Option<&serde_json::Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => o
                        .get("name")
                        .or_else(|| o.get("display_name"))
                        .and_then(|n| n.as_str())
                        .map(str::to_string),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A string field (numbers rendered; null/absent → None; empty → None).
pub fn text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kept_response_paths_are_raw_refs() {
        assert!(is_raw_ref("otx/2026-12-02/b1-p00001.json.gz"));
        for bad in [
            "",
            "../otx/x.json.gz",
            "otx/../../etc/x.json.gz",
            "/etc/x.json.gz",
            "otx//x.json.gz",
            "otx/./x.json.gz",
            "otx/x.json",
        ] {
            assert!(!is_raw_ref(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_of_both_pulse_formats_parse() {
        let j = |s: &str| serde_json::Value::String(s.into());
        assert_eq!(
            rfc3339(Some(&j("2023-08-22T09:43:18.855000"))).unwrap(),
            "2023-08-22T09:43:18.855000Z"
        );
        assert_eq!(
            rfc3339(Some(&j("2015-09-02T09:21:53"))).unwrap(),
            "2015-09-02T09:21:53.000000Z"
        );
        assert!(rfc3339(Some(&j("yesterday"))).is_none());
        assert!(rfc3339(Some(&serde_json::json!(1700000000))).is_some());
    }

    #[test]
    fn batch_ids_are_safe_partition_values_and_sort_by_time() {
        let a = new_batch_id(DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        let b = new_batch_id(DateTime::from_timestamp(1_700_000_001, 0).unwrap());
        assert!(a < b);
        assert!(crate::lake::partition_dir("t", &[("run", &a)]).is_ok());
    }
}
