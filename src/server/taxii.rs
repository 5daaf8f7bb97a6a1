//! A read-only TAXII 2.1 server under `/taxii2/`: discovery, one API root, two collections (mapped
//! intel as STIX reports with relationships to attack-patterns; the ATT&CK attack-patterns), and
//! objects, manifest and versions with `added_after`, `limit`, `next` and `match[type|id|version]`.
//! Behind serve's access control (Bearer tokens, or HTTP Basic as TAXII clients send it).
// As in `api.rs`: helpers return the finished error `Response` as their `Err`.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::AppState;
use crate::reports::stix::{self, Dated};

/// TAXII's media type.
pub const MEDIA: &str = "application/taxii+json;version=2.1";
/// STIX's media type.
pub const STIX_MEDIA: &str = "application/stix+json;version=2.1";
/// Objects per page when `limit` is not given, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
const NS: uuid::Uuid = uuid::Uuid::from_u128(0x0c4f_25a8_7e9b_4d3c_b1a6_2f8e_5d7c_9a10);

/// The collections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// Mapped intel: reports, relationships, attack-patterns.
    Mapped,
    /// ATT&CK attack-patterns of the current releases.
    Attack,
}

impl Collection {
    /// Its id (stable).
    pub fn id(self) -> String {
        let name = match self {
            Collection::Mapped => "mapped-intel",
            Collection::Attack => "attack-patterns",
        };
        uuid::Uuid::new_v5(&NS, name.as_bytes()).to_string()
    }

    fn all() -> [Collection; 2] {
        [Collection::Mapped, Collection::Attack]
    }

    fn find(id: &str) -> Option<Collection> {
        Self::all().into_iter().find(|c| c.id() == id)
    }

    fn resource(self) -> Value {
        let (title, description) = match self {
            Collection::Mapped => (
                "threatlake mapped intel",
                "Threat items as STIX reports, related to the ATT&CK techniques threatlake mapped them to (score and method on each relationship).",
            ),
            Collection::Attack => (
                "ATT&CK attack-patterns",
                "The attack-pattern objects of the lake's current MITRE ATT&CK releases.",
            ),
        };
        json!({
            "id": self.id(), "title": title, "description": description,
            "can_read": true, "can_write": false, "media_types": [STIX_MEDIA]
        })
    }
}

/// The TAXII routes, under `/taxii2/`.
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::get;
    axum::Router::new()
        .route("/taxii2/", get(discovery))
        .route("/taxii2/api/", get(api_root))
        .route("/taxii2/api/collections/", get(collections))
        .route("/taxii2/api/collections/{id}/", get(collection))
        .route("/taxii2/api/collections/{id}/objects/", get(objects))
        .route(
            "/taxii2/api/collections/{id}/objects/{object}/",
            get(object),
        )
        .route(
            "/taxii2/api/collections/{id}/objects/{object}/versions/",
            get(versions),
        )
        .route("/taxii2/api/collections/{id}/manifest/", get(manifest))
}

fn taxii(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(MEDIA));
    r
}

/// A TAXII error message.
pub fn error(status: StatusCode, title: &str, description: &str) -> Response {
    taxii(
        status,
        json!({"title": title, "description": description, "http_status": status.as_u16().to_string()}),
    )
}

/// Clients must accept TAXII 2.1 JSON (`*/*` and no Accept header are taken as yes).
fn acceptable(headers: &HeaderMap) -> Result<(), Response> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let ok = accept.split(',').any(|a| {
        let a = a.trim().to_ascii_lowercase().replace(' ', "");
        a.starts_with("*/*")
            || a.starts_with("application/*")
            || a == "application/taxii+json"
            || a.starts_with("application/taxii+json;version=2.1")
    });
    if ok {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_ACCEPTABLE,
            "not acceptable",
            "this server speaks TAXII 2.1: send Accept: application/taxii+json;version=2.1",
        ))
    }
}

fn base(headers: &HeaderMap, state: &AppState) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("localhost");
    let scheme = if state.tls { "https" } else { "http" };
    format!("{scheme}://{host}/taxii2")
}

async fn discovery(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = acceptable(&headers) {
        return r;
    }
    let root = format!("{}/api/", base(&headers, &state));
    taxii(
        StatusCode::OK,
        json!({
            "title": "threatlake TAXII 2.1",
            "description": "Mapped threat intelligence and MITRE ATT&CK, read-only.",
            "default": root, "api_roots": [root]
        }),
    )
}

async fn api_root(headers: HeaderMap) -> Response {
    if let Err(r) = acceptable(&headers) {
        return r;
    }
    taxii(
        StatusCode::OK,
        json!({
            "title": "threatlake", "description": "Mapped intel and ATT&CK collections.",
            "versions": [MEDIA], "max_content_length": 10_485_760
        }),
    )
}

async fn collections(headers: HeaderMap) -> Response {
    if let Err(r) = acceptable(&headers) {
        return r;
    }
    let list: Vec<Value> = Collection::all().iter().map(|c| c.resource()).collect();
    taxii(StatusCode::OK, json!({ "collections": list }))
}

async fn collection(headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = acceptable(&headers) {
        return r;
    }
    match Collection::find(&id) {
        Some(c) => taxii(StatusCode::OK, c.resource()),
        None => not_found(),
    }
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not found",
        "no such collection: GET /taxii2/api/collections/ lists them",
    )
}

/// The collection's objects, sorted by (date added, id).
async fn load(state: &Arc<AppState>, c: Collection) -> Result<Vec<Dated>, Response> {
    let engine = state.engine();
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
    let rows_per_pass = state.settings.reports.rows_per_pass;
    let work = async move {
        match c {
            Collection::Mapped => stix::mapped_objects(&engine, rows_per_pass).await,
            Collection::Attack => stix::attack_patterns(&engine)
                .await
                .map(|m| m.into_values().collect()),
        }
    };
    let failed = |e: String| {
        tracing::warn!(error = %e, "taxii: reading the collection failed");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "collection unavailable",
            "reading the collection from the lake failed; see the server log",
        )
    };
    let mut v = match state.on_query_threads(limit, work).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(super::QueryAborted::Failed(e)) => return Err(failed(e)),
        Err(super::QueryAborted::Timeout(secs)) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "collection unavailable",
                &format!(
                    "reading the collection took longer than {secs} s (server.sql.timeout_secs)"
                ),
            ))
        }
    };
    v.sort_by(stix::by_date_added);
    Ok(v)
}

fn ts(d: DateTime<Utc>) -> String {
    d.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Query parameters of objects and manifest.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Filter {
    added_after: Option<String>,
    limit: Option<String>,
    next: Option<String>,
    #[serde(rename = "match[type]")]
    match_type: Option<String>,
    #[serde(rename = "match[id]")]
    match_id: Option<String>,
    #[serde(rename = "match[version]")]
    match_version: Option<String>,
    #[serde(rename = "match[spec_version]")]
    match_spec_version: Option<String>,
}

/// One page of matching objects: (page, more, next token).
fn page(all: &[Dated], f: &Filter) -> Result<(Vec<Dated>, bool, Option<String>), Response> {
    let bad = |what: &str| error(StatusCode::BAD_REQUEST, "bad request", what);
    let after = match &f.added_after {
        None => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    bad("added_after must be an RFC 3339 timestamp, e.g. 2026-01-01T00:00:00.000Z")
                })?
                .with_timezone(&Utc),
        ),
    };
    let limit = match &f.limit {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("limit must be a positive integer"))?
            .min(MAX_LIMIT),
    };
    // `next` is where the previous page stopped: (date added in µs, id), opaque to clients.
    let resume = match &f.next {
        None => None,
        Some(s) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| bad("next is not a value this server gave"))?;
            let (micros, id) = raw
                .split_once('|')
                .ok_or_else(|| bad("next is not a value this server gave"))?;
            let micros: i64 = micros
                .parse()
                .map_err(|_| bad("next is not a value this server gave"))?;
            Some((micros, id.to_string()))
        }
    };
    let list = |v: &Option<String>| -> Vec<String> {
        v.as_deref()
            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
            .unwrap_or_default()
    };
    let (types, ids) = (list(&f.match_type), list(&f.match_id));
    if let Some(v) = &f.match_spec_version {
        if !v.split(',').any(|x| x.trim() == "2.1") {
            return Ok((vec![], false, None));
        }
    }
    // One version per object here, so first/last/all/that version all give it.
    let versions = list(&f.match_version);
    let matching = all.iter().filter(|d| {
        let id = d.object["id"].as_str().unwrap_or_default();
        let ty = d.object["type"].as_str().unwrap_or_default();
        after.is_none_or(|a| d.added > a)
            && (types.is_empty() || types.iter().any(|t| t == ty))
            && (ids.is_empty() || ids.iter().any(|i| i == id))
            && (versions.is_empty()
                || versions.iter().any(|v| {
                    matches!(v.as_str(), "first" | "last" | "all")
                        || Some(v.as_str()) == d.object["modified"].as_str()
                }))
            && resume
                .as_ref()
                .is_none_or(|(m, rid)| (d.added.timestamp_micros(), id) > (*m, rid.as_str()))
    });
    let mut out: Vec<Dated> = matching.take(limit + 1).cloned().collect();
    let more = out.len() > limit;
    out.truncate(limit);
    let next = more.then(|| {
        let last = out.last().expect("a full page");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}|{}",
            last.added.timestamp_micros(),
            last.object["id"].as_str().unwrap_or_default()
        ))
    });
    Ok((out, more, next))
}

fn dated_headers(mut r: Response, page: &[Dated]) -> Response {
    if let (Some(first), Some(last)) = (page.first(), page.last()) {
        for (name, d) in [
            ("x-taxii-date-added-first", first.added),
            ("x-taxii-date-added-last", last.added),
        ] {
            if let Ok(v) = HeaderValue::from_str(&ts(d)) {
                r.headers_mut().insert(name, v);
            }
        }
    }
    r
}

/// What a listing endpoint returns.
#[derive(Clone, Copy)]
enum Listing {
    /// The objects (`/objects/`, `/objects/{id}/`).
    Objects,
    /// Their versions (`/objects/{id}/versions/`).
    Versions,
    /// Their manifest entries (`/manifest/`).
    Manifest,
}

/// Every listing: check Accept and the collection, read it, page it, shape the page.
async fn list(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    collection: &str,
    object: Option<String>,
    mut f: Filter,
    what: Listing,
) -> Response {
    if let Err(r) = acceptable(headers) {
        return r;
    }
    let Some(c) = Collection::find(collection) else {
        return not_found();
    };
    let all = match load(state, c).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let one = object.is_some();
    if one {
        f.match_id = object;
    }
    let (p, more, next) = match page(&all, &f) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if one && p.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "not found",
            "no such object in this collection",
        );
    }
    let mut body = match what {
        Listing::Objects => {
            json!({"more": more, "objects": p.iter().map(|d| d.object.clone()).collect::<Vec<_>>()})
        }
        Listing::Versions => {
            json!({"more": more, "versions": p.iter().map(|d| d.object["modified"].clone()).collect::<Vec<_>>()})
        }
        Listing::Manifest => {
            let objects: Vec<Value> = p
                .iter()
                .map(|d| {
                    json!({
                        "id": d.object["id"], "date_added": ts(d.added),
                        "version": d.object["modified"], "media_type": STIX_MEDIA
                    })
                })
                .collect();
            json!({"more": more, "objects": objects})
        }
    };
    if let Some(n) = next {
        body["next"] = json!(n);
    }
    dated_headers(taxii(StatusCode::OK, body), &p)
}

async fn objects(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<Filter>,
) -> Response {
    list(&state, &headers, &id, None, f, Listing::Objects).await
}

async fn object(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, object)): Path<(String, String)>,
    Query(f): Query<Filter>,
) -> Response {
    list(&state, &headers, &id, Some(object), f, Listing::Objects).await
}

async fn versions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, object)): Path<(String, String)>,
    Query(f): Query<Filter>,
) -> Response {
    list(&state, &headers, &id, Some(object), f, Listing::Versions).await
}

async fn manifest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(f): Query<Filter>,
) -> Response {
    list(&state, &headers, &id, None, f, Listing::Manifest).await
}
