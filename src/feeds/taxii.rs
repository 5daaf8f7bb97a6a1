//! TAXII 2.1 client feed: pull a collection's STIX objects page by page (`next`), resuming from the
//! newest `X-TAXII-Date-Added-Last` already stored; keep every page raw and append the objects to
//! `taxii_object_log`. Reports and indicators reach `threat_intelligence_data` through the views.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use url::Url;

use super::http::{FeedClient, Fetched};
use super::otx::describe;
use super::{append, keep_raw, read_state, rfc3339, string_list, strings, text, ts, write_state};
use super::{FeedError, Progress};
use crate::config::TaxiiSettings;
use crate::lake::{Lake, Location};

/// Every object version received from any collection.
pub const OBJECT_LOG: &str = "taxii_object_log";
/// Environment variable of the HTTP Basic password.
pub const PASSWORD_ENV: &str = "THREATLAKE_TAXII_PASSWORD";
/// Environment variable of a bearer token.
pub const TOKEN_ENV: &str = "THREATLAKE_TAXII_TOKEN";
/// The media type TAXII 2.1 servers answer with.
pub const MEDIA_TYPE: &str = "application/taxii+json;version=2.1";
/// Objects buffered before a file is written.
const FLUSH_OBJECTS: usize = 20_000;
/// Hard stop for runaway paging.
const MAX_PAGES: usize = 1_000_000;
/// Consecutive pages without an object new to this run, though `more` is true, before paging is
/// taken to be runaway.
const MAX_STALE_PAGES: usize = 3;
/// Source name in `feed_state`.
const STATE_SOURCE: &str = "taxii";

/// Schema of [`OBJECT_LOG`] (the `taxii_data` view has the same columns).
pub fn object_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("collection", DataType::Utf8, false),
        Field::new("object_id", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("spec_version", DataType::Utf8, true),
        Field::new("created", ts(), true),
        Field::new("modified", ts(), true),
        Field::new("name", DataType::Utf8, true),
        Field::new("description", DataType::Utf8, true),
        Field::new("labels", strings(), true),
        Field::new("types", strings(), true),
        Field::new("pattern", DataType::Utf8, true),
        Field::new("pattern_type", DataType::Utf8, true),
        Field::new("valid_from", ts(), true),
        Field::new("published", ts(), true),
        Field::new("object_refs", strings(), true),
        Field::new("relationship_type", DataType::Utf8, true),
        Field::new("source_ref", DataType::Utf8, true),
        Field::new("target_ref", DataType::Utf8, true),
        Field::new("attack_ids", strings(), true),
        Field::new("created_by_ref", DataType::Utf8, true),
        Field::new("confidence", DataType::Int64, true),
        Field::new("revoked", DataType::Boolean, true),
        Field::new("object", DataType::Utf8, false),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("raw_ref", DataType::Utf8, false),
        Field::new("ingested_at", ts(), false),
    ]))
}

/// One STIX object version.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ObjectRow {
    pub collection: String,
    pub object_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub spec_version: Option<String>,
    pub created: Option<String>,
    pub modified: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub labels: Vec<String>,
    /// `report_types`, `indicator_types`, `malware_types`, … (whichever the type has).
    pub types: Vec<String>,
    pub pattern: Option<String>,
    pub pattern_type: Option<String>,
    pub valid_from: Option<String>,
    pub published: Option<String>,
    pub object_refs: Vec<String>,
    pub relationship_type: Option<String>,
    pub source_ref: Option<String>,
    pub target_ref: Option<String>,
    /// ATT&CK ids of the object's `mitre-attack` (mobile, ics) external references.
    pub attack_ids: Vec<String>,
    pub created_by_ref: Option<String>,
    pub confidence: Option<i64>,
    pub revoked: Option<bool>,
    /// The object as received (JSON).
    pub object: String,
    pub batch_id: String,
    pub raw_ref: String,
    pub ingested_at: String,
}

/// Where a parsed object came from and which run it belongs to.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// The collection URL.
    pub collection: String,
    /// Run id.
    pub batch_id: String,
    /// Raw page it was parsed from.
    pub raw_ref: String,
    /// Ingest time (RFC 3339).
    pub ingested_at: String,
}

/// Parse one STIX 2.x object. Errors name the object and the field.
pub fn parse_object(v: &Value, p: &Provenance) -> Result<ObjectRow, String> {
    let o = v.as_object().ok_or("an object is not a JSON object")?;
    let id = match o.get("id") {
        Some(Value::String(s)) if s.contains("--") => s.clone(),
        other => {
            return Err(format!(
                "an object's 'id' is {}, expected a STIX id (type--uuid)",
                describe(other)
            ))
        }
    };
    let wrong = |field: &str, expected: &str| {
        format!(
            "object {id}: '{field}' is {}, expected {expected}",
            describe(o.get(field))
        )
    };
    let kind = match o.get("type") {
        Some(Value::String(t)) if id.starts_with(&format!("{t}--")) => t.clone(),
        _ => return Err(wrong("type", "the type its id starts with")),
    };
    let time = |field: &str| -> Result<Option<String>, String> {
        match o.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::String(_)) => rfc3339(Some(v))
                .map(Some)
                .ok_or_else(|| wrong(field, "an RFC 3339 timestamp")),
            Some(_) => Err(wrong(field, "an RFC 3339 timestamp string")),
        }
    };
    for field in [
        "name",
        "description",
        "spec_version",
        "pattern",
        "pattern_type",
        "relationship_type",
        "source_ref",
        "target_ref",
        "created_by_ref",
    ] {
        if !matches!(o.get(field), None | Some(Value::Null | Value::String(_))) {
            return Err(wrong(field, "a string"));
        }
    }
    for field in ["labels", "object_refs", "external_references"] {
        if !matches!(o.get(field), None | Some(Value::Null | Value::Array(_))) {
            return Err(wrong(field, "an array"));
        }
    }
    let confidence = match o.get("confidence") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some_and(|c| (0..=100).contains(&c)) => n.as_i64(),
        Some(_) => return Err(wrong("confidence", "a whole number 0-100")),
    };
    let revoked = match o.get("revoked") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(wrong("revoked", "a boolean")),
    };
    let types = o
        .iter()
        .filter(|(k, _)| k.ends_with("_types"))
        .flat_map(|(_, v)| string_list(Some(v)))
        .collect();
    let attack_ids = o
        .get("external_references")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|r| {
            r.get("source_name")
                .and_then(Value::as_str)
                .is_some_and(|s| s.starts_with("mitre-") && s.ends_with("attack"))
        })
        .filter_map(|r| r.get("external_id").and_then(Value::as_str))
        .map(|s| s.trim().to_ascii_uppercase())
        .filter(|s| !s.is_empty())
        .collect();
    Ok(ObjectRow {
        collection: p.collection.clone(),
        object_id: id.clone(),
        kind,
        spec_version: text(o.get("spec_version")),
        created: time("created")?,
        modified: time("modified")?,
        name: text(o.get("name")),
        description: text(o.get("description")),
        labels: string_list(o.get("labels")),
        types,
        pattern: text(o.get("pattern")),
        pattern_type: text(o.get("pattern_type")),
        valid_from: time("valid_from")?,
        published: time("published")?,
        object_refs: string_list(o.get("object_refs")),
        relationship_type: text(o.get("relationship_type")),
        source_ref: text(o.get("source_ref")),
        target_ref: text(o.get("target_ref")),
        attack_ids,
        created_by_ref: text(o.get("created_by_ref")),
        confidence,
        revoked,
        object: v.to_string(),
        batch_id: p.batch_id.clone(),
        raw_ref: p.raw_ref.clone(),
        ingested_at: p.ingested_at.clone(),
    })
}

/// A TAXII 2.1 envelope: its objects, `more` and `next`. An empty body object (`{}`) is an empty
/// page, as the specification allows.
pub fn parse_envelope(body: &[u8]) -> Result<(Vec<Value>, bool, Option<String>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(mut o) = v else {
        return Err("expected a TAXII envelope (a JSON object with 'objects')".into());
    };
    let objects = match o.remove("objects") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(format!(
                "'objects' is {}, expected an array (is the URL a TAXII 2.1 collection?)",
                describe(Some(&other))
            ))
        }
    };
    if objects.is_empty() && (o.contains_key("title") || o.contains_key("api_roots")) {
        return Err("this is a discovery or API-root document, not a collection's objects: give the collection URL (…/collections/{id}/)".into());
    }
    let more = matches!(o.get("more"), Some(Value::Bool(true)));
    let next = match o.get("next") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok((objects, more, next))
}

/// What a TAXII pull did.
#[derive(Debug, Default, Clone)]
pub struct TaxiiReport {
    /// Run id.
    pub batch_id: String,
    /// The collection URL.
    pub collection: String,
    /// Pages fetched.
    pub pages: usize,
    /// Objects stored (new or revised).
    pub objects: usize,
    /// Of them, reports and indicators (they become threat items).
    pub items: usize,
    /// Objects seen again unchanged (skipped).
    pub unchanged: usize,
    /// Objects rejected for fields of the wrong type (logged; not stored).
    pub rejected: usize,
    /// The first rejection reasons.
    pub rejections: Vec<String>,
    /// `added_after` used.
    pub added_after: Option<String>,
    /// Watermark after the run (`X-TAXII-Date-Added-Last` of the newest page).
    pub watermark: Option<String>,
}

/// A client for one collection: Basic auth (user + THREATLAKE_TAXII_PASSWORD), a bearer token
/// (THREATLAKE_TAXII_TOKEN), or none. Credentials are only ever sent under the collection URL.
pub fn client(settings: &TaxiiSettings, collection: &str) -> Result<FeedClient, FeedError> {
    use base64::Engine as _;
    let (value, env) = match (
        settings.token.expose(),
        settings.username.as_deref(),
        settings.password.expose(),
    ) {
        (Some(t), _, _) => (format!("Bearer {t}"), TOKEN_ENV),
        (None, Some(u), p) => (
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{u}:{}", p.unwrap_or_default()))
            ),
            PASSWORD_ENV,
        ),
        (None, None, _) => (
            String::new(),
            "THREATLAKE_TAXII_PASSWORD (with taxii.username) or THREATLAKE_TAXII_TOKEN",
        ),
    };
    let url = Url::parse(collection).map_err(|e| FeedError::Input {
        path: collection.to_string(),
        message: format!("not a URL ({e}); give a TAXII 2.1 collection URL such as https://host/api1/collections/ID/"),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(FeedError::Input {
            path: collection.to_string(),
            message: "a TAXII collection URL must be http(s)://host/…/collections/ID/".into(),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FeedError::Input {
            path: "(the collection URL)".into(),
            message: format!(
                "credentials in the URL are refused (they would end up in logs); set taxii.username and {PASSWORD_ENV}"
            ),
        });
    }
    Ok(FeedClient::new(
        "TAXII",
        collection,
        "authorization",
        &value,
        env,
        settings.http.policy(),
        None,
    )?
    .with_accept(MEDIA_TYPE))
}

fn state_key(collection: &str) -> String {
    format!("added_after {collection}")
}

fn later(a: &str, b: &str) -> bool {
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).ok();
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x > y,
        _ => a > b,
    }
}

/// Pull a collection's objects added after the stored watermark (or `added_after` when given).
/// Pages are kept raw before parsing; rows are written in chunks; the watermark moves only when
/// every page was stored, so a failed run is simply repeated.
pub async fn ingest(
    lake: &Lake,
    raw: &Location,
    client: &FeedClient,
    page_size: u32,
    added_after: Option<String>,
    progress: Progress<'_>,
) -> Result<TaxiiReport, FeedError> {
    let collection = client.base.to_string();
    let engine = crate::sql::Engine::open(lake).await?;
    // Newest stored `modified` per object id (None for objects without versions, e.g. observables).
    let known: HashMap<String, Option<String>> =
        super::newest_modified(&engine, OBJECT_LOG, "object_id")
            .await?
            .into_iter()
            .collect();
    let mut state = read_state(lake, STATE_SOURCE).await?;
    let since = added_after.or_else(|| state.get(&state_key(&collection)).cloned());
    let now = Utc::now();
    let batch = super::new_batch_id(now);
    let date = now.format("%Y-%m-%d").to_string();
    let mut report = TaxiiReport {
        batch_id: batch.clone(),
        collection: collection.clone(),
        added_after: since.clone(),
        ..Default::default()
    };
    let mut rows: Vec<ObjectRow> = Vec::new();
    let mut chunk = 0usize;
    let mut newest: Option<String> = None;
    let part = [("ingest_date", date.as_str())];
    let objects_url = client.url("objects/")?;
    let page_url = |after: Option<&str>, next: Option<&str>| {
        let mut u = objects_url.clone();
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("limit", &page_size.max(1).to_string());
            if let Some(a) = after {
                q.append_pair("added_after", a);
            }
            if let Some(n) = next {
                q.append_pair("next", n);
            }
        }
        u
    };
    let mut after = since.clone();
    let mut url = page_url(after.as_deref(), None);
    let pulled: Result<(), FeedError> = async {
        let mut seen: HashSet<(String, Option<String>)> = HashSet::new();
        let mut stale = 0usize;
        loop {
            report.pages += 1;
            if report.pages > MAX_PAGES {
                return Err(FeedError::Paging {
                    service: "TAXII",
                    url: url.to_string(),
                    message: format!("more than {MAX_PAGES} pages"),
                });
            }
            let (body, headers) = match client.get_with_headers(&url).await? {
                (Fetched::Body(b), h) => (b, h),
                (Fetched::NotFound, _) => {
                    return Err(FeedError::Http {
                        service: "TAXII",
                        url: url.to_string(),
                        attempts: 1,
                        message: "HTTP 404: no such collection, or it is not readable by this user; check the collection URL (…/collections/{id}/, from the server's API root)".into(),
                    })
                }
            };
            let raw_ref = keep_raw(
                raw,
                "taxii",
                &date,
                &format!("{batch}-p{:05}", report.pages),
                &body,
            )
            .await?;
            let (objects, more, next) =
                parse_envelope(&body).map_err(|message| FeedError::Malformed {
                    service: "TAXII",
                    url: url.to_string(),
                    message: format!("{message} (kept as {raw_ref})"),
                })?;
            let last = headers
                .get("x-taxii-date-added-last")
                .and_then(|v| v.to_str().ok())
                .filter(|v| DateTime::parse_from_rfc3339(v).is_ok())
                .map(str::to_string);
            if let Some(l) = &last {
                if newest.as_deref().is_none_or(|n| later(l, n)) {
                    newest = Some(l.clone());
                }
            }
            let prov = Provenance {
                collection: collection.clone(),
                batch_id: batch.clone(),
                raw_ref: raw_ref.clone(),
                ingested_at: super::fixed(now),
            };
            let mut fresh = 0usize;
            for v in &objects {
                let row = match parse_object(v, &prov) {
                    Ok(r) => r,
                    Err(reason) => {
                        tracing::warn!(raw = %raw_ref, "TAXII object rejected: {reason}");
                        report.rejected += 1;
                        if report.rejections.len() < 10 {
                            report.rejections.push(reason);
                        }
                        continue;
                    }
                };
                if !seen.insert((row.object_id.clone(), row.modified.clone())) {
                    report.unchanged += 1;
                    continue;
                }
                fresh += 1;
                let unchanged = match known.get(&row.object_id) {
                    None => false,
                    Some(k) => match (&row.modified, k) {
                        (Some(m), Some(k)) => m <= k,
                        (None, _) => true,
                        (Some(_), None) => false,
                    },
                };
                if unchanged {
                    report.unchanged += 1;
                    continue;
                }
                report.objects += 1;
                if matches!(row.kind.as_str(), "report" | "indicator") {
                    report.items += 1;
                }
                rows.push(row);
            }
            if rows.len() >= FLUSH_OBJECTS {
                append(lake, OBJECT_LOG, &object_schema(), &part, &format!("{batch}-{chunk:04}"), &rows).await?;
                chunk += 1;
                rows.clear();
            }
            progress(&format!(
                "page {}: {} new or revised object(s)",
                report.pages, report.objects
            ));
            if !more {
                break;
            }
            stale = if fresh == 0 { stale + 1 } else { 0 };
            if stale >= MAX_STALE_PAGES {
                return Err(FeedError::Paging {
                    service: "TAXII",
                    url: url.to_string(),
                    message: format!("{MAX_STALE_PAGES} pages in a row brought no new object but said 'more'"),
                });
            }
            url = match (next, last) {
                (Some(n), _) => page_url(after.as_deref(), Some(&n)),
                // Servers without `next` page by date: ask for what was added after this page.
                (None, Some(l)) => {
                    after = Some(l);
                    page_url(after.as_deref(), None)
                }
                (None, None) => {
                    return Err(FeedError::Paging {
                        service: "TAXII",
                        url: url.to_string(),
                        message: "the server said 'more' but gave neither 'next' nor X-TAXII-Date-Added-Last".into(),
                    })
                }
            };
        }
        Ok(())
    }
    .await;
    append(
        lake,
        OBJECT_LOG,
        &object_schema(),
        &part,
        &format!("{batch}-{chunk:04}"),
        &rows,
    )
    .await?;
    pulled?;
    if let Some(n) = newest {
        if since.as_deref().is_none_or(|s| later(&n, s)) {
            state.insert(state_key(&collection), n);
        }
    }
    state.insert("last_batch".into(), batch.clone());
    write_state(lake, STATE_SOURCE, &state).await?;
    report.watermark = state.get(&state_key(&collection)).cloned();
    tracing::info!(
        pages = report.pages,
        objects = report.objects,
        "TAXII pull done"
    );
    Ok(report)
}

/// The watermark of every collection pulled so far (collection URL → `added_after`).
pub async fn watermarks(lake: &Lake) -> Result<BTreeMap<String, String>, FeedError> {
    Ok(read_state(lake, STATE_SOURCE)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("added_after ")?.to_string(), v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov() -> Provenance {
        Provenance {
            collection: "http://x/api1/collections/c/".into(),
            batch_id: "b".into(),
            raw_ref: "r".into(),
            ingested_at: "2026-01-01T00:00:00.000000Z".into(),
        }
    }

    #[test]
    fn reports_indicators_and_relationships_parse() {
        let rep = serde_json::json!({
            "type": "report", "spec_version": "2.1", "id": "report--0b1a7b2a-7c0a-4b2e-9d4b-0f0c9a3e8f11",
            "created": "2026-01-02T03:04:05.678Z", "modified": "2026-01-03T00:00:00Z", "name": "APT x",
            "description": "They used PowerShell.", "report_types": ["threat-report"], "published": "2026-01-03T00:00:00Z",
            "object_refs": ["attack-pattern--1", "indicator--2"], "labels": ["apt"], "confidence": 80,
            "external_references": [{"source_name": "mitre-attack", "external_id": "t1059.001"}, {"source_name": "cve", "external_id": "CVE-1"}]
        });
        let r = parse_object(&rep, &prov()).unwrap();
        assert_eq!(r.kind, "report");
        assert_eq!(r.types, vec!["threat-report"]);
        assert_eq!(r.attack_ids, vec!["T1059.001"]);
        assert_eq!(r.modified.as_deref(), Some("2026-01-03T00:00:00.000000Z"));
        assert_eq!(r.object_refs.len(), 2);
        assert_eq!(r.confidence, Some(80));
        let rel = serde_json::json!({"type": "relationship", "id": "relationship--1", "relationship_type": "indicates",
            "source_ref": "indicator--2", "target_ref": "attack-pattern--1", "created": "2026-01-01T00:00:00Z", "modified": "2026-01-01T00:00:00Z"});
        let r = parse_object(&rel, &prov()).unwrap();
        assert_eq!(
            (r.source_ref.as_deref(), r.relationship_type.as_deref()),
            (Some("indicator--2"), Some("indicates"))
        );
        // Observables have no versions.
        let sco =
            serde_json::json!({"type": "ipv4-addr", "id": "ipv4-addr--1", "value": "1.2.3.4"});
        assert_eq!(parse_object(&sco, &prov()).unwrap().modified, None);
    }

    #[test]
    fn objects_with_wrong_fields_are_rejected_by_name() {
        let base = serde_json::json!({"type": "indicator", "id": "indicator--9", "modified": "2026-01-01T00:00:00Z"});
        let cases = [
            ("type", serde_json::json!("report")),
            ("modified", serde_json::json!("yesterday")),
            ("name", serde_json::json!(["x"])),
            ("labels", serde_json::json!("a,b")),
            ("confidence", serde_json::json!(101)),
            ("revoked", serde_json::json!("no")),
        ];
        for (field, bad) in cases {
            let mut v = base.clone();
            v[field] = bad.clone();
            let e = parse_object(&v, &prov()).unwrap_err();
            assert!(
                e.contains(field) && e.contains("indicator--9"),
                "{field}={bad}: {e}"
            );
        }
        assert!(
            parse_object(&serde_json::json!({"type": "x", "id": 3}), &prov())
                .unwrap_err()
                .contains("'id'")
        );
    }

    #[test]
    fn envelopes_page_and_discovery_is_refused() {
        let (o, more, next) =
            parse_envelope(br#"{"more": true, "next": "abc", "objects": [{"id": "x--1"}]}"#)
                .unwrap();
        assert_eq!((o.len(), more, next.as_deref()), (1, true, Some("abc")));
        let (o, more, _) = parse_envelope(b"{}").unwrap();
        assert!(o.is_empty() && !more);
        assert!(parse_envelope(br#"{"title": "d", "api_roots": []}"#)
            .unwrap_err()
            .contains("collection URL"));
        assert!(parse_envelope(b"<html>").unwrap_err().contains("not JSON"));
        assert!(parse_envelope(br#"{"objects": {}}"#)
            .unwrap_err()
            .contains("array"));
    }

    #[test]
    fn watermarks_compare_as_times() {
        assert!(later(
            "2026-12-02T03:20:08.2Z",
            "2026-12-02T03:20:08.141351Z"
        ));
        assert!(!later(
            "2026-12-02T03:20:08Z",
            "2026-12-02T03:20:08.141351Z"
        ));
    }
}
