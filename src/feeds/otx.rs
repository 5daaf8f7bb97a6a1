//! AlienVault OTX: pull subscribed pulses page by page (`modified_since` watermark), keep each page raw,
//! and append pulses and indicators to the lake.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use url::Url;

use super::http::{FeedClient, Fetched};
use super::FeedError;
use super::{append, keep_raw, read_state, rfc3339, string_list, strings, text, ts, write_state};
use crate::lake::{Lake, Location};

/// Every pulse version received.
pub const PULSE_LOG: &str = "otx_pulse_log";
/// Every indicator of every pulse version received.
pub const INDICATOR_LOG: &str = "otx_indicator_log";
/// Environment variable of the key.
pub const KEY_ENV: &str = "THREATLAKE_OTX_API_KEY";
/// Pulses buffered before a file is written (bounds memory on large pulls).
const FLUSH_PULSES: usize = 5_000;
/// Hard stop for runaway paging.
const MAX_PAGES: usize = 1_000_000;
/// Consecutive empty pages that still link a next page before paging is taken to be runaway.
const MAX_EMPTY_PAGES: usize = 3;

/// Schema of [`PULSE_LOG`] (the `otx_data` view has the same columns).
pub fn pulse_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pulse_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("description", DataType::Utf8, true),
        Field::new("author", DataType::Utf8, true),
        Field::new("created", ts(), true),
        Field::new("modified", ts(), true),
        Field::new("revision", DataType::Int64, true),
        Field::new("tlp", DataType::Utf8, true),
        Field::new("tags", strings(), true),
        Field::new("reference_urls", strings(), true),
        Field::new("targeted_countries", strings(), true),
        Field::new("industries", strings(), true),
        Field::new("malware_families", strings(), true),
        Field::new("adversary", DataType::Utf8, true),
        Field::new("attack_ids", strings(), true),
        Field::new("indicator_count", DataType::Int64, false),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("raw_ref", DataType::Utf8, false),
        Field::new("ingested_at", ts(), false),
    ]))
}

/// Schema of [`INDICATOR_LOG`].
pub fn indicator_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pulse_id", DataType::Utf8, false),
        Field::new("pulse_modified", ts(), true),
        Field::new("indicator_id", DataType::Utf8, true),
        Field::new("type", DataType::Utf8, true),
        Field::new("indicator", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, true),
        Field::new("description", DataType::Utf8, true),
        Field::new("created", ts(), true),
        Field::new("expiration", ts(), true),
        Field::new("is_active", DataType::Boolean, true),
        Field::new("role", DataType::Utf8, true),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("ingested_at", ts(), false),
    ]))
}

/// One pulse version.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PulseRow {
    pub pulse_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub author: Option<String>,
    pub created: Option<String>,
    pub modified: Option<String>,
    pub revision: Option<i64>,
    pub tlp: Option<String>,
    pub tags: Vec<String>,
    pub reference_urls: Vec<String>,
    pub targeted_countries: Vec<String>,
    pub industries: Vec<String>,
    pub malware_families: Vec<String>,
    pub adversary: Option<String>,
    pub attack_ids: Vec<String>,
    pub indicator_count: i64,
    pub batch_id: String,
    pub raw_ref: String,
    pub ingested_at: String,
}

/// One indicator of a pulse version.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IndicatorRow {
    pub pulse_id: String,
    pub pulse_modified: Option<String>,
    pub indicator_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub indicator: String,
    pub title: Option<String>,
    pub description: Option<String>,
    pub created: Option<String>,
    pub expiration: Option<String>,
    pub is_active: Option<bool>,
    pub role: Option<String>,
    pub batch_id: String,
    pub ingested_at: String,
}

/// Where a parsed pulse came from (for `raw_ref`) and which run it belongs to.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// Run id.
    pub batch_id: String,
    /// Raw object it was parsed from.
    pub raw_ref: String,
    /// Ingest time (RFC 3339).
    pub ingested_at: String,
}

/// Parse one pulse object, current or old (2015) format. Errors say which field is wrong.
pub fn parse_pulse(v: &Value, p: &Provenance) -> Result<(PulseRow, Vec<IndicatorRow>), String> {
    let o = v.as_object().ok_or("a pulse is not a JSON object")?;
    let id = match o.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("a pulse has no 'id' (a string)".into()),
    };
    let wrong = |field: &str, expected: &str| {
        format!(
            "pulse {id}: '{field}' is {}, expected {expected}",
            describe(o.get(field))
        )
    };
    let time = |field: &str| -> Result<Option<String>, String> {
        match o.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(v @ Value::String(_)) => rfc3339(Some(v))
                .map(Some)
                .ok_or_else(|| wrong(field, "an ISO 8601 timestamp")),
            Some(_) => Err(wrong(field, "an ISO 8601 timestamp string")),
        }
    };
    let created = time("created")?;
    let modified = time("modified")?.or_else(|| created.clone());
    for field in ["name", "description", "author_name", "tlp", "adversary"] {
        if !matches!(o.get(field), None | Some(Value::Null | Value::String(_))) {
            return Err(wrong(field, "a string"));
        }
    }
    for field in [
        "tags",
        "references",
        "targeted_countries",
        "industries",
        "malware_families",
        "attack_ids",
        "indicators",
    ] {
        if !matches!(o.get(field), None | Some(Value::Null | Value::Array(_))) {
            return Err(wrong(field, "an array"));
        }
    }
    let revision = match o.get("revision") {
        None | Some(Value::Null) => None,
        // The 2015 format writes whole numbers as floats (`2.0`).
        Some(Value::Number(n))
            if n.as_f64()
                .is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15) =>
        {
            n.as_f64().map(|f| f as i64)
        }
        Some(_) => return Err(wrong("revision", "a whole number")),
    };
    let attack_ids: Vec<String> = o
        .get("attack_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.trim().to_ascii_uppercase()),
                    Value::Object(m) => m.get("id").and_then(Value::as_str).map(str::to_string),
                    _ => None,
                })
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let indicators = o.get("indicators").and_then(Value::as_array);
    let mut rows = Vec::new();
    for (i, ind) in indicators.into_iter().flatten().enumerate() {
        let Some(io) = ind.as_object() else {
            return Err(format!("pulse {id}: indicator {i} is not an object"));
        };
        let Some(value) = text(io.get("indicator")) else {
            continue;
        };
        rows.push(IndicatorRow {
            pulse_id: id.clone(),
            pulse_modified: modified.clone(),
            indicator_id: text(io.get("id")).or_else(|| text(io.get("_id"))),
            kind: text(io.get("type")),
            indicator: value,
            title: text(io.get("title")),
            description: text(io.get("description")),
            created: rfc3339(io.get("created")),
            expiration: rfc3339(io.get("expiration")),
            is_active: io.get("is_active").and_then(|a| match a {
                Value::Bool(b) => Some(*b),
                Value::Number(n) => n.as_i64().map(|n| n != 0),
                _ => None,
            }),
            role: text(io.get("role")),
            batch_id: p.batch_id.clone(),
            ingested_at: p.ingested_at.clone(),
        });
    }
    let count = o
        .get("indicator_count")
        .and_then(Value::as_i64)
        .unwrap_or(indicators.map_or(0, |a| a.len() as i64));
    let pulse = PulseRow {
        pulse_id: id,
        name: text(o.get("name")),
        description: text(o.get("description")),
        author: text(o.get("author_name")).or_else(|| {
            o.get("author")
                .and_then(|a| a.get("username"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }),
        created,
        modified,
        revision,
        tlp: text(o.get("tlp")).or_else(|| text(o.get("TLP"))),
        tags: string_list(o.get("tags")),
        reference_urls: string_list(o.get("references")),
        targeted_countries: string_list(o.get("targeted_countries")),
        industries: string_list(o.get("industries")),
        malware_families: string_list(o.get("malware_families")),
        adversary: text(o.get("adversary")),
        attack_ids,
        indicator_count: count,
        batch_id: p.batch_id.clone(),
        raw_ref: p.raw_ref.clone(),
        ingested_at: p.ingested_at.clone(),
    };
    Ok((pulse, rows))
}

/// A JSON value's kind and (short) content for rejection messages.
pub(crate) fn describe(v: Option<&Value>) -> String {
    match v {
        None => "absent".into(),
        Some(Value::String(s)) => {
            let short: String = s.chars().take(40).collect();
            format!("the string {short:?}")
        }
        Some(Value::Number(n)) => format!("the number {n}"),
        Some(Value::Bool(b)) => format!("the boolean {b}"),
        Some(Value::Array(_)) => "an array".into(),
        Some(Value::Object(_)) => "an object".into(),
        Some(Value::Null) => "null".into(),
    }
}

/// A page of `/api/v1/pulses/subscribed`: its pulses and the `next` link. A bare array of pulses
/// (what `OTXv2.getall()` saves) is accepted too.
pub fn parse_page(body: &[u8]) -> Result<(Vec<Value>, Option<String>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    match v {
        Value::Array(a) => Ok((a, None)),
        Value::Object(mut o) => {
            let results = match o.remove("results") {
                Some(Value::Array(a)) => a,
                _ => return Err("no 'results' array (is the base URL an OTX API?)".into()),
            };
            let next = o.get("next").and_then(Value::as_str).map(str::to_string);
            Ok((results, next))
        }
        _ => Err("expected a JSON object with 'results'".into()),
    }
}

/// What an OTX pull did.
#[derive(Debug, Default, Clone)]
pub struct OtxReport {
    /// Run id.
    pub batch_id: String,
    /// Pages fetched.
    pub pages: usize,
    /// Pulses stored (new or revised).
    pub pulses: usize,
    /// Pulses seen again unchanged (skipped).
    pub unchanged: usize,
    /// Indicators stored.
    pub indicators: usize,
    /// Pulses rejected for fields of the wrong type (logged; not stored).
    pub rejected: usize,
    /// The first rejection reasons.
    pub rejections: Vec<String>,
    /// `modified_since` used.
    pub since: Option<String>,
    /// Watermark after the run.
    pub watermark: Option<String>,
}

/// Buffers parsed rows and writes them as files of the log tables.
pub struct OtxWriter<'a> {
    lake: &'a Lake,
    batch_id: String,
    date: String,
    chunk: usize,
    pulses: Vec<PulseRow>,
    indicators: Vec<IndicatorRow>,
    seen: HashSet<(String, Option<String>)>,
    known: BTreeMap<String, String>,
    /// Counters.
    pub report: OtxReport,
    newest: Option<String>,
}

impl<'a> OtxWriter<'a> {
    /// Write into the `ingest_date` partition `date` (YYYY-MM-DD) instead of today's (backfills,
    /// benchmarks).
    pub fn with_date(mut self, date: &str) -> Self {
        self.date = date.to_string();
        self
    }

    /// A writer for one run; `known` maps pulse id → newest stored `modified` (to skip unchanged pulses).
    pub fn new(lake: &'a Lake, batch_id: &str, known: BTreeMap<String, String>) -> Self {
        Self {
            lake,
            batch_id: batch_id.to_string(),
            date: Utc::now().format("%Y-%m-%d").to_string(),
            chunk: 0,
            pulses: Vec::new(),
            indicators: Vec::new(),
            seen: HashSet::new(),
            known,
            report: OtxReport {
                batch_id: batch_id.to_string(),
                ..Default::default()
            },
            newest: None,
        }
    }

    /// Parse and buffer a page's pulses; flushes when the buffer is large. A pulse with fields of
    /// the wrong type is rejected (counted and logged with its reason), not coerced.
    pub async fn add(&mut self, pulses: &[Value], p: &Provenance) -> Result<(), FeedError> {
        let mut parsed = Vec::with_capacity(pulses.len());
        for v in pulses {
            match parse_pulse(v, p) {
                Ok(x) => parsed.push(x),
                Err(reason) => {
                    tracing::warn!(raw = %p.raw_ref, "OTX pulse rejected: {reason}");
                    self.report.rejected += 1;
                    if self.report.rejections.len() < 10 {
                        self.report.rejections.push(reason);
                    }
                }
            }
        }
        for (pulse, inds) in parsed {
            let key = (pulse.pulse_id.clone(), pulse.modified.clone());
            let unchanged = match (&pulse.modified, self.known.get(&pulse.pulse_id)) {
                (Some(m), Some(k)) => m <= k,
                _ => false,
            };
            if unchanged || !self.seen.insert(key) {
                self.report.unchanged += 1;
                continue;
            }
            if pulse.modified > self.newest {
                self.newest = pulse.modified.clone();
            }
            self.report.pulses += 1;
            self.report.indicators += inds.len();
            self.pulses.push(pulse);
            self.indicators.extend(inds);
        }
        if self.pulses.len() >= FLUSH_PULSES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write buffered rows (indicators first, so a pulse row never lacks its indicators).
    pub async fn flush(&mut self) -> Result<(), FeedError> {
        if self.pulses.is_empty() {
            return Ok(());
        }
        let id = format!("{}-{:04}", self.batch_id, self.chunk);
        let part = [("ingest_date", self.date.as_str())];
        append(
            self.lake,
            INDICATOR_LOG,
            &indicator_schema(),
            &part,
            &id,
            &self.indicators,
        )
        .await?;
        append(
            self.lake,
            PULSE_LOG,
            &pulse_schema(),
            &part,
            &id,
            &self.pulses,
        )
        .await?;
        self.chunk += 1;
        self.pulses.clear();
        self.indicators.clear();
        Ok(())
    }

    /// Newest `modified` stored by this run.
    pub fn newest(&self) -> Option<&String> {
        self.newest.as_ref()
    }
}

/// Newest stored `modified` per pulse id (to skip pulses that come again unchanged).
pub async fn known_versions(
    engine: &crate::sql::Engine,
) -> Result<BTreeMap<String, String>, FeedError> {
    Ok(super::newest_modified(engine, PULSE_LOG, "pulse_id")
        .await?
        .into_iter()
        .filter_map(|(id, m)| Some((id, m?)))
        .collect())
}

/// Pull subscribed pulses modified since the stored watermark. Pages are kept raw before parsing;
/// rows are written in chunks; the watermark advances only when every page was stored, so a failed
/// run is simply repeated.
pub async fn ingest(
    lake: &Lake,
    raw: &Location,
    client: &FeedClient,
    page_size: u32,
    progress: super::Progress<'_>,
) -> Result<OtxReport, FeedError> {
    let engine = crate::sql::Engine::open(lake).await?;
    let known = known_versions(&engine).await?;
    let mut state = read_state(lake, "otx").await?;
    let since = state.get("modified_since").cloned();
    let now = Utc::now();
    let batch = super::new_batch_id(now);
    let date = now.format("%Y-%m-%d").to_string();
    let mut w = OtxWriter::new(lake, &batch, known);
    w.report.since = since.clone();
    let mut url = client.url("api/v1/pulses/subscribed")?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("limit", &page_size.max(1).to_string());
        q.append_pair("page", "1");
        if let Some(s) = &since {
            q.append_pair("modified_since", s);
        }
    }
    // Pages are pulled inside this block so that, whatever fails, the pages before it are written.
    let pulled: Result<(), FeedError> = async {
        let mut page = 0usize;
        let mut visited: HashSet<String> = HashSet::new();
        let mut empty_pages = 0usize;
        loop {
            if !visited.insert(url.to_string()) {
                return Err(FeedError::Paging {
                    service: "OTX",
                    url: url.to_string(),
                    message: format!(
                        "the 'next' link of page {page} repeats a page already fetched (a paging loop)"
                    ),
                });
            }
            page += 1;
            if page > MAX_PAGES {
                return Err(FeedError::Paging {
                    service: "OTX",
                    url: url.to_string(),
                    message: format!("more than {MAX_PAGES} pages"),
                });
            }
            let body = match client.get(&url).await? {
                Fetched::Body(b) => b,
                Fetched::NotFound => {
                    return Err(FeedError::Http {
                        service: "OTX",
                        url: url.to_string(),
                        attempts: 1,
                        message:
                            "HTTP 404: check otx.base_url (expected https://otx.alienvault.com)"
                                .into(),
                    })
                }
            };
            let raw_ref =
                keep_raw(raw, "otx", &date, &format!("{batch}-p{page:05}"), &body).await?;
            let malformed = |message: String| FeedError::Malformed {
                service: "OTX",
                url: url.to_string(),
                message: format!("{message} (kept as {raw_ref})"),
            };
            let (pulses, next) = parse_page(&body).map_err(malformed)?;
            let prov = Provenance {
                batch_id: batch.clone(),
                raw_ref: raw_ref.clone(),
                ingested_at: super::fixed(now),
            };
            empty_pages = if pulses.is_empty() { empty_pages + 1 } else { 0 };
            if empty_pages >= MAX_EMPTY_PAGES && next.as_deref().is_some_and(|n| !n.is_empty()) {
                return Err(FeedError::Paging {
                    service: "OTX",
                    url: url.to_string(),
                    message: format!(
                        "{MAX_EMPTY_PAGES} pages in a row had no pulses but a 'next' link"
                    ),
                });
            }
            w.add(&pulses, &prov).await?;
            w.report.pages = page;
            progress(&format!(
                "page {page}: {} new or revised pulse(s), {} indicator(s)",
                w.report.pulses, w.report.indicators
            ));
            match next {
                Some(n) if !n.is_empty() => {
                    url = Url::parse(&n).map_err(|e| FeedError::Malformed {
                        service: "OTX",
                        url: n.clone(),
                        message: format!("invalid 'next' link: {e}"),
                    })?;
                }
                _ => break,
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = pulled {
        w.flush().await?;
        return Err(e);
    }
    w.flush().await?;
    if let Some(newest) = w.newest().cloned() {
        if since.as_ref().is_none_or(|s| &newest > s) {
            state.insert("modified_since".into(), newest);
        }
    }
    state.insert("last_batch".into(), batch.clone());
    write_state(lake, "otx", &state).await?;
    w.report.watermark = state.get("modified_since").cloned();
    tracing::info!(
        pages = w.report.pages,
        pulses = w.report.pulses,
        "OTX pull done"
    );
    Ok(w.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov() -> Provenance {
        Provenance {
            batch_id: "b".into(),
            raw_ref: "r".into(),
            ingested_at: "2026-01-01T00:00:00+00:00".into(),
        }
    }

    #[test]
    fn current_and_old_pulse_formats_parse() {
        let new = serde_json::json!({
            "id": "64e3", "name": "Sample", "description": "", "author_name": "u",
            "modified": "2023-08-22T09:43:18.855000", "created": "2023-08-22T09:43:18.855000",
            "revision": 1, "tlp": "white", "adversary": "", "tags": ["a"],
            "targeted_countries": ["Iran"], "malware_families": [{"id": "x", "display_name": "WHIRLPOOL"}],
            "attack_ids": ["T1531", {"id": "T1059", "name": "x"}], "references": ["https://x"],
            "industries": [], "indicators": [{"id": 3689509382u64, "indicator": "177add", "type": "FileHash-MD5",
              "created": "2023-08-22T09:43:18", "title": "t", "description": "", "expiration": null,
              "is_active": 1, "role": null}]
        });
        let (p, i) = parse_pulse(&new, &prov()).unwrap();
        assert_eq!(p.attack_ids, vec!["T1531", "T1059"]);
        assert_eq!(p.malware_families, vec!["WHIRLPOOL"]);
        assert_eq!(p.description, None);
        assert_eq!(i[0].indicator_id.as_deref(), Some("3689509382"));
        assert_eq!(i[0].is_active, Some(true));
        let old = serde_json::json!({
            "id": "55e6", "name": "Old", "modified": "2015-09-02T09:22:22.976000", "revision": 2.0,
            "author_name": "AlienVault", "tags": [], "references": [],
            "indicators": [{"_id": "55e6bf", "indicator": "http://x/", "type": "URL", "description": "",
              "created": "2015-09-02T09:21:53.093"}]
        });
        let (p, i) = parse_pulse(&old, &prov()).unwrap();
        assert_eq!((p.revision, p.tlp, p.attack_ids.len()), (Some(2), None, 0));
        assert_eq!(i[0].indicator_id.as_deref(), Some("55e6bf"));
        assert!(parse_pulse(&serde_json::json!({"name": "no id"}), &prov())
            .unwrap_err()
            .contains("'id'"));
    }

    #[test]
    fn pages_need_results() {
        assert!(parse_page(br#"{"results": [], "next": null}"#)
            .unwrap()
            .0
            .is_empty());
        assert!(parse_page(b"<html>").unwrap_err().contains("not JSON"));
        assert!(parse_page(br#"{"detail": "x"}"#)
            .unwrap_err()
            .contains("results"));
    }

    #[test]
    fn fields_of_the_wrong_type_reject_the_pulse() {
        let cases = [
            ("modified", serde_json::json!(12345)),
            ("created", serde_json::json!("yesterday")),
            ("revision", serde_json::json!("3")),
            ("revision", serde_json::json!(2.7)),
            ("tags", serde_json::json!("a,b")),
            ("name", serde_json::json!({"x": 1})),
            ("indicators", serde_json::json!({"indicator": "1.2.3.4"})),
        ];
        for (field, bad) in cases {
            let mut v = serde_json::json!({"id": "p1", "name": "n", "modified": "2023-08-22T09:43:18.855000"});
            v[field] = bad.clone();
            let e = parse_pulse(&v, &prov()).unwrap_err();
            assert!(e.contains(field) && e.contains("p1"), "{field}={bad}: {e}");
        }
        let ok = serde_json::json!({"id": "p1", "modified": null, "created": "", "revision": 3, "tags": null});
        let (row, _) = parse_pulse(&ok, &prov()).unwrap();
        assert_eq!((row.modified, row.revision), (None, Some(3)));
    }
}
