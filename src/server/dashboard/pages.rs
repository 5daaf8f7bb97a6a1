//! The dashboard's page handlers: each checks its parameters, runs its parameterised queries on the
//! query threads and renders one template.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use datafusion::scalar::ScalarValue;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error_page, render, rows, Filter, Frame, PageError, Params};
use crate::server::auth::Principal;
use crate::server::{AppState, AuditNote};

type State_ = State<Arc<AppState>>;

/// The join every technique count uses: a mapping of the current version of an item.
const MAPPED: &str = "mapped_threat_data m JOIN threat_intelligence_data t \
    ON m.item_id = t.item_id AND m.item_version = t.item_version";

fn text(s: &str) -> ScalarValue {
    ScalarValue::Utf8(Some(s.to_string()))
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn num_of(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or_default()
}

/// A count as the pages show it (no decimals).
fn count_of(v: &Value, k: &str) -> u64 {
    num_of(v, k).max(0.0) as u64
}

/// Heat class 1–5 of `n` against `max` (0: none).
fn heat(n: f64, max: f64) -> u8 {
    if n <= 0.0 || max <= 0.0 {
        0
    } else {
        1 + ((n / max) * 4.0).round().clamp(0.0, 4.0) as u8
    }
}

fn finish(state: &AppState, p: &Principal, r: Result<Response, PageError>) -> Response {
    r.unwrap_or_else(|e| error_page(state, p, e))
}

/// `GET /`: counts, threats over time, families, top techniques, new and rising techniques.
pub async fn overview(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        let f = Filter::parse(&params)?;
        let q = |sql: &str| {
            let mut v = Vec::new();
            let c = f.condition(&mut v);
            (sql.replace("{c}", &c), v)
        };
        let (s1, p1) = q(
            "SELECT t.source, count(*) AS items FROM threat_intelligence_data t \
             WHERE {c} GROUP BY t.source ORDER BY t.source",
        );
        let (s2, p2) = q(&format!(
            "SELECT count(DISTINCT m.technique_id) AS n FROM {MAPPED} WHERE {{c}}"
        ));
        let (s3, p3) = q(
            "SELECT CAST(CAST(t.observed_at AS DATE) AS VARCHAR) AS day, count(*) AS items \
             FROM threat_intelligence_data t WHERE {c} AND t.observed_at IS NOT NULL \
             GROUP BY 1 ORDER BY 1",
        );
        let (s4, p4) = q(
            "SELECT t.family, count(*) AS items FROM threat_intelligence_data t \
             WHERE {c} AND t.family IS NOT NULL GROUP BY 1 ORDER BY items DESC, 1 LIMIT 12",
        );
        let (s5, p5) = q(&format!(
            "SELECT m.technique_id, max(m.technique_name) AS name, count(DISTINCT m.item_id) AS items, \
             round(max(m.score), 3) AS best FROM {MAPPED} WHERE {{c}} \
             GROUP BY 1 ORDER BY items DESC, 1 LIMIT 15"
        ));
        let (s6, p6) = q(
            "SELECT t.kind, count(*) AS items FROM threat_intelligence_data t \
             WHERE {c} GROUP BY 1 ORDER BY items DESC, 1",
        );
        let last = "SELECT run_id, job, status, CAST(started AS VARCHAR) AS started, seconds \
             FROM job_runs ORDER BY started DESC, run_id DESC LIMIT 1"
            .to_string();
        let (sources, seen, days, families, top, kinds, last) = tokio::try_join!(
            rows(&state, s1, p1),
            rows(&state, s2, p2),
            rows(&state, s3, p3),
            rows(&state, s4, p4),
            rows(&state, s5, p5),
            rows(&state, s6, p6),
            rows(&state, last, vec![]),
        )?;
        let changes = model_changes(&state).await?;
        let total: u64 = sources.iter().map(|r| count_of(r, "items")).sum();
        let families: Vec<Value> = families
            .iter()
            .map(|r| {
                let fam = str_of(r, "family");
                json!({"label": fam, "n": count_of(r, "items"), "href": f.link("/", "family", Some(fam))})
            })
            .collect();
        let kinds: Vec<Value> = kinds
            .iter()
            .map(|r| {
                let kind = str_of(r, "kind");
                json!({"label": kind, "n": count_of(r, "items"), "href": f.link("/", "kind", Some(kind))})
            })
            .collect();
        let top: Vec<Value> = top
            .iter()
            .map(|r| {
                let mut r = r.clone();
                let id = str_of(&r, "technique_id").to_string();
                r["href"] = json!(f.link(&format!("/techniques/{id}"), "technique", None));
                r
            })
            .collect();
        let frame = Frame::new(&state, &p, "overview", "Overview".into(), Some((&f, "/")));
        Ok(render(
            "overview.html",
            frame,
            minijinja::context! {
                sources, total, seen => seen.first().map(|r| count_of(r, "n")).unwrap_or_default(),
                days, families, kinds, top, last => last.first().cloned(), changes,
            },
        ))
    };
    finish(&state, &p, r.await)
}

/// New and rising techniques between the two newest threat-model snapshots.
async fn model_changes(state: &AppState) -> Result<Vec<Value>, PageError> {
    let engine = state.engine();
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
    let work = async move {
        let runs = crate::feeds::intel::runs(&engine).await?;
        if runs.len() < 2 {
            return Ok(vec![]);
        }
        let (a, b) = (&runs[runs.len() - 2], &runs[runs.len() - 1]);
        crate::feeds::intel::diff(&engine, a, b, false).await
    };
    match state.on_query_threads(limit, work).await {
        Ok(Ok(lines)) => Ok(lines
            .iter()
            .filter(|l| matches!(l.change, "new" | "rising"))
            .take(20)
            .filter_map(|l| serde_json::to_value(l).ok())
            .collect()),
        Ok(Err(e)) => {
            tracing::error!("threat-model diff: {e}");
            Ok(vec![])
        }
        Err(e) => {
            tracing::error!("threat-model diff: {e:?}");
            Ok(vec![])
        }
    }
}

/// `GET /map`: countries coloured by the items that target them.
pub async fn map(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        let f = Filter::parse(&params)?;
        let mut v = Vec::new();
        let c = f.condition(&mut v);
        let counts = rows(
            &state,
            format!(
                "SELECT t.country, count(*) AS items FROM threat_intelligence_data t \
                 WHERE {c} AND t.country IS NOT NULL GROUP BY 1 ORDER BY items DESC, 1"
            ),
            v,
        )
        .await?;
        // Per shape: the items of every spelling that names it; links use its commonest spelling.
        let mut per: BTreeMap<String, (f64, String)> = BTreeMap::new();
        let mut unplaced = Vec::new();
        let mut table = Vec::new();
        for r in &counts {
            let (name, n) = (str_of(r, "country"), num_of(r, "items"));
            table.push(json!({"country": name, "items": n as u64, "href": f.link("/items", "country", Some(name))}));
            match crate::charts::world::country_id(name) {
                Some(id) => {
                    let e = per.entry(id).or_insert((0.0, name.to_string()));
                    e.0 += n;
                }
                None => unplaced.push(name.to_string()),
            }
        }
        let max = per.values().map(|v| v.0).fold(0.0, f64::max);
        let shapes: Vec<Value> = crate::charts::world::countries()
            .iter()
            .map(|c| {
                let (n, spelling) = per.get(&c.id).cloned().unwrap_or_default();
                json!({
                    "name": c.name, "items": n as u64, "heat": heat(n, max), "d": svg_path(&c.rings),
                    "href": (n > 0.0).then(|| f.link("/items", "country", Some(&spelling))),
                })
            })
            .collect();
        let frame = Frame::new(&state, &p, "map", "Map".into(), Some((&f, "/map")));
        Ok(render(
            "map.html",
            frame,
            minijinja::context! { shapes, table, unplaced },
        ))
    };
    finish(&state, &p, r.await)
}

/// Equirectangular outline of a country in a 960 × 400 box (latitudes 84 to -66).
fn svg_path(rings: &[Vec<(f64, f64)>]) -> String {
    use std::fmt::Write;
    let k = 960.0 / 360.0;
    let mut d = String::new();
    for ring in rings {
        for (i, (lon, lat)) in ring.iter().enumerate() {
            let (x, y) = ((lon + 180.0) * k, (84.0 - lat) * k);
            let _ = write!(d, "{}{x:.1},{y:.1}", if i == 0 { "M" } else { "L" });
        }
        d.push('Z');
    }
    d
}

/// `SELECT …` of the technique counts behind the matrix: per technique, and rolled up to parents.
fn matrix_counts(f: &Filter, rolled: bool) -> (String, Vec<ScalarValue>) {
    let mut v = Vec::new();
    let c = f.condition(&mut v);
    let id = if rolled {
        "split_part(m.technique_id, '.', 1)"
    } else {
        "m.technique_id"
    };
    (
        format!(
            "SELECT {id} AS technique_id, max(m.technique_name) AS technique_name, \
             count(DISTINCT m.item_id) AS items FROM {MAPPED} WHERE {c} GROUP BY 1 ORDER BY 1"
        ),
        v,
    )
}

/// `GET /matrix`: tactics in matrix order, techniques coloured by the items mapped to them.
pub async fn matrix(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        let f = Filter::parse(&params)?;
        let expand = params.sub.as_deref() == Some("1");
        let domain = state.settings.mapping.domain.as_str();
        let (s1, p1) = matrix_counts(&f, false);
        let (s2, p2) = matrix_counts(&f, true);
        let (cells, exact, rolled) = tokio::try_join!(
            rows(
                &state,
                "SELECT tactic, tactic_name, matrix_order, technique_id, technique_name, \
                 is_subtechnique, parent_id FROM attack_technique_tactics WHERE domain = $1 \
                 ORDER BY matrix_order, technique_name, technique_id"
                    .into(),
                vec![text(domain)],
            ),
            rows(&state, s1, p1),
            rows(&state, s2, p2),
        )?;
        let count = |rows: &[Value]| -> BTreeMap<String, f64> {
            rows.iter()
                .map(|r| (str_of(r, "technique_id").to_string(), num_of(r, "items")))
                .collect()
        };
        let (exact, rolled) = (count(&exact), count(&rolled));
        let max = rolled.values().copied().fold(0.0, f64::max);
        // Tactic columns in matrix order; each a list of parents, each with its sub-techniques.
        let mut columns: Vec<(String, String, Vec<Value>)> = Vec::new();
        let mut subs: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for r in &cells {
            let tactic = str_of(r, "tactic").to_string();
            if columns.last().is_none_or(|c| c.0 != tactic) {
                columns.push((tactic.clone(), str_of(r, "tactic_name").to_string(), vec![]));
            }
            let id = str_of(r, "technique_id").to_string();
            let is_sub = r
                .get("is_subtechnique")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let n = if is_sub {
                exact.get(&id).copied().unwrap_or_default()
            } else {
                rolled.get(&id).copied().unwrap_or_default()
            };
            let cell = json!({
                "id": id, "name": str_of(r, "technique_name"), "items": n as u64, "heat": heat(n, max),
                "href": f.link(&format!("/techniques/{id}"), "technique", None),
            });
            if is_sub {
                let parent = id.split('.').next().unwrap_or_default().to_string();
                subs.entry((tactic, parent)).or_default().push(cell);
            } else if let Some(col) = columns.last_mut() {
                col.2.push(cell);
            }
        }
        let columns: Vec<Value> = columns
            .into_iter()
            .map(|(tactic, name, mut cells)| {
                for c in cells.iter_mut() {
                    let id = str_of(c, "id").to_string();
                    let s = subs.remove(&(tactic.clone(), id)).unwrap_or_default();
                    c["subs"] = json!(s.len());
                    if expand {
                        c["children"] = json!(s);
                    }
                }
                json!({"tactic": tactic, "name": name, "cells": cells})
            })
            .collect();
        let q = f.query();
        let with = |path: &str| {
            if q.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{q}")
            }
        };
        let toggle = {
            let base = f.query();
            let sub = if expand { "" } else { "sub=1" };
            match (base.is_empty(), sub.is_empty()) {
                (_, true) => with("/matrix"),
                (true, false) => format!("/matrix?{sub}"),
                (false, false) => format!("/matrix?{base}&{sub}"),
            }
        };
        let frame = Frame::new(
            &state,
            &p,
            "matrix",
            "ATT&CK matrix".into(),
            Some((&f, "/matrix")),
        );
        Ok(render(
            "matrix.html",
            frame,
            minijinja::context! {
                columns, expand, toggle, domain,
                layer => with("/matrix/layer.json"), svg => with("/matrix/matrix.svg"),
            },
        ))
    };
    finish(&state, &p, r.await)
}

/// The matrix's counts as the `attack_matrix` report's dataset (what its layer and SVG draw).
async fn matrix_dataset(
    state: &AppState,
    f: &Filter,
) -> Result<crate::reports::Dataset, PageError> {
    let (sql, v) = matrix_counts(f, false);
    let sql = format!("SELECT technique_id, technique_name, items, items AS score FROM ({sql}) ORDER BY items DESC, technique_id");
    let (schema, batches) = super::query(state, sql, v).await?;
    let def = crate::reports::select(&["attack_matrix".to_string()])
        .ok()
        .and_then(|mut d| d.pop())
        .ok_or_else(|| PageError::not_found("the attack_matrix report is not shipped"))?;
    Ok(crate::reports::Dataset {
        def,
        schema,
        batches,
    })
}

fn download(bytes: Vec<u8>, media: &'static str, name: &'static str) -> Response {
    let mut r = bytes.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
    super::harden(&mut r);
    r
}

/// `GET /matrix/layer.json` (an ATT&CK Navigator layer) and `GET /matrix/matrix.svg` (the
/// `attack_matrix` report's chart): the current view.
pub async fn matrix_download(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Path(file): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        let svg = match file.as_str() {
            "layer.json" => false,
            "matrix.svg" => true,
            _ => {
                return Err(PageError::not_found(
                    "the matrix downloads are layer.json and matrix.svg",
                ))
            }
        };
        let f = Filter::parse(&params)?;
        let data = matrix_dataset(&state, &f).await?;
        let domain = state.settings.mapping.domain.as_str();
        let engine = state.engine();
        let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
        let bytes = state
            .on_query_threads(limit, async move {
                if svg {
                    let built = crate::reports::build_from(&engine, data, domain).await?;
                    return built
                        .image(crate::charts::ImageFormat::Svg)
                        .map(|r| r.bytes)
                        .map_err(|e| crate::reports::ReportError::Chart {
                            name: "attack_matrix".into(),
                            source: e,
                        });
                }
                let version = crate::reports::batch::current_version(&engine, domain).await?;
                let platforms = crate::reports::batch::domain_platforms(&engine, domain).await?;
                let layer = crate::reports::navigator::layer(&data, domain, &version, &platforms)?;
                Ok(serde_json::to_vec_pretty(&layer).unwrap_or_default())
            })
            .await
            .map_err(|e| PageError::bad(format!("{e:?}")))?
            .map_err(|e| PageError::bad(e.to_string()))?;
        Ok(if svg {
            download(
                bytes,
                "image/svg+xml",
                "attachment; filename=\"threatlake-matrix.svg\"",
            )
        } else {
            download(
                bytes,
                "application/json",
                "attachment; filename=\"threatlake-matrix-layer.json\"",
            )
        })
    };
    finish(&state, &p, r.await)
}

/// `GET /techniques/{id}`: the technique, its items with score, method and evidence, its trend,
/// and the ATT&CK groups and software known to use it.
pub async fn technique(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        if !crate::reports::navigator::is_technique_id(&id) {
            return Err(PageError::not_found(
                "not an ATT&CK technique id (T1234 or T1234.567)",
            ));
        }
        let f = Filter::parse(&params)?;
        let domain = state.settings.mapping.domain.as_str();
        let with_technique = |sql: &str| {
            let mut v = Vec::new();
            let c = f.condition(&mut v);
            v.push(text(&id));
            let tc = super::technique_match("m", &format!("${}", v.len()));
            (sql.replace("{c}", &c).replace("{tc}", &tc), v)
        };
        // The evidence is explained for the 100 rows shown only.
        let (s_items, p_items) = with_technique(&format!(
            "SELECT t.item_id, t.title, t.source, CAST(t.observed_at AS VARCHAR) AS observed_at, \
             m.technique_id, round(m.score, 3) AS score, m.method, t.text \
             FROM {MAPPED} WHERE {{c}} AND {{tc}} ORDER BY 6 DESC, 1 LIMIT 100"
        ));
        let (s_count, p_count) = with_technique(&format!(
            "SELECT count(DISTINCT m.item_id) AS n FROM {MAPPED} WHERE {{c}} AND {{tc}}"
        ));
        let (s_trend, p_trend) = with_technique(&format!(
            "SELECT CAST(CAST(t.observed_at AS DATE) AS VARCHAR) AS day, count(DISTINCT m.item_id) AS items \
             FROM {MAPPED} WHERE {{c}} AND {{tc}} AND t.observed_at IS NOT NULL GROUP BY 1 ORDER BY 1"
        ));
        let (info, items, count, trend, users) = tokio::try_join!(
            rows(
                &state,
                "SELECT technique_id, name, description, tactics, platforms, is_subtechnique, parent_id \
                 FROM attack_techniques_current WHERE technique_id = $1 AND domain = $2"
                    .into(),
                vec![text(&id), text(domain)],
            ),
            with_evidence(&state, s_items, p_items, false),
            rows(&state, s_count, p_count),
            rows(&state, s_trend, p_trend),
            rows(
                &state,
                "SELECT DISTINCT source_type, source_attack_id, source_name FROM attack_procedures_current \
                 WHERE technique_id = $1 AND domain = $2 ORDER BY source_type, source_name LIMIT 300"
                    .into(),
                vec![text(&id), text(domain)],
            ),
        )?;
        let Some(info) = info.into_iter().next() else {
            return Err(PageError::not_found(
                "no such technique in the current ATT&CK release of the mapping domain",
            ));
        };
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut r| {
                let item = str_of(&r, "item_id").to_string();
                r["href"] = json!(format!("/items/{}", encode_path(&item)));
                r
            })
            .collect();
        let groups: Vec<&Value> = users
            .iter()
            .filter(|u| str_of(u, "source_type") == "intrusion-set")
            .collect();
        let software: Vec<&Value> = users
            .iter()
            .filter(|u| str_of(u, "source_type") != "intrusion-set")
            .collect();
        let frame = Frame::new(
            &state,
            &p,
            "matrix",
            format!("{} {}", id, str_of(&info, "name")),
            Some((&f, format!("/techniques/{id}").as_str())),
        );
        Ok(render(
            "technique.html",
            frame,
            minijinja::context! {
                info, items, trend, groups, software,
                count => count.first().map(|r| count_of(r, "n")).unwrap_or_default(),
                items_link => f.link("/items", "technique", Some(&id)),
            },
        ))
    };
    finish(&state, &p, r.await)
}

/// Rows of `sql` (kept like every dashboard query's) with `evidence`: what `explain_mapping` says
/// of each row's `text` (rows whose `method` is not `model` get none), the `text` column dropped
/// unless `keep_text`. Without a mapping model (none built yet) the rows come without evidence: the
/// page still shows the rest.
async fn with_evidence(
    state: &AppState,
    sql: String,
    params: Vec<ScalarValue>,
    keep_text: bool,
) -> Result<Vec<Value>, PageError> {
    let mut found = rows(state, sql, params).await?;
    let engine = state.engine();
    let threshold = state.settings.mapping.threshold;
    tokio::task::spawn_blocking(move || {
        let m = engine
            .mapper
            .get()
            .inspect_err(|e| tracing::warn!("mapping evidence left out: {e}"))
            .ok();
        let mut scratch = threatlake_udfs::mapper::Scratch::default();
        for r in &mut found {
            let model = r.get("method").is_none_or(|v| v == "model");
            let evidence = match (&m, r.get("text").and_then(Value::as_str)) {
                (Some(m), Some(t)) if model => m.explain(t, threshold, &mut scratch),
                _ => None,
            };
            if let Some(o) = r.as_object_mut() {
                if !keep_text {
                    o.remove("text");
                }
                o.insert("evidence".into(), json!(evidence));
            }
        }
        found
    })
    .await
    .map_err(|e| {
        tracing::error!("explaining mappings: {e}");
        PageError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "explaining the mappings failed; see the server log".into(),
        }
    })
}

/// A path segment, percent-encoded.
fn encode_path(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Items per page.
const PAGE: usize = 50;

/// `GET /items`: filtered, paged items.
pub async fn items(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        let f = Filter::parse(&params)?;
        let offset = params.offset.unwrap_or(0).min(1_000_000);
        let mut v = Vec::new();
        let c = f.condition(&mut v);
        let list = format!(
            "SELECT t.item_id, t.source, t.kind, t.title, CAST(t.observed_at AS VARCHAR) AS observed, \
             t.country, t.family FROM threat_intelligence_data t WHERE {c} \
             ORDER BY t.observed_at DESC NULLS LAST, t.item_id LIMIT {} OFFSET {offset}",
            PAGE + 1
        );
        let count = format!("SELECT count(*) AS n FROM threat_intelligence_data t WHERE {c}");
        let sources = "SELECT DISTINCT source FROM threat_intelligence_data ORDER BY 1".to_string();
        let kinds = "SELECT DISTINCT kind FROM threat_intelligence_data ORDER BY 1".to_string();
        let (mut list, count, sources, kinds) = tokio::try_join!(
            rows(&state, list, v.clone()),
            rows(&state, count, v),
            rows(&state, sources, vec![]),
            rows(&state, kinds, vec![]),
        )?;
        let more = list.len() > PAGE;
        list.truncate(PAGE);
        for r in list.iter_mut() {
            let item = str_of(r, "item_id").to_string();
            r["href"] = json!(format!("/items/{}", encode_path(&item)));
        }
        let page_link = |o: usize| {
            let base = f.query();
            let o = format!("offset={o}");
            if base.is_empty() {
                format!("/items?{o}")
            } else {
                format!("/items?{base}&{o}")
            }
        };
        let frame = Frame::new(&state, &p, "items", "Items".into(), Some((&f, "/items")));
        Ok(render(
            "items.html",
            frame,
            minijinja::context! {
                items => list, offset, shown_to => offset + PAGE,
                total => count.first().map(|r| count_of(r, "n")).unwrap_or_default(),
                next => more.then(|| page_link(offset + PAGE)),
                prev => (offset > 0).then(|| page_link(offset.saturating_sub(PAGE))),
                sources => sources.iter().map(|r| str_of(r, "source").to_string()).collect::<Vec<_>>(),
                kinds => kinds.iter().map(|r| str_of(r, "kind").to_string()).collect::<Vec<_>>(),
                values => json!({
                    "since": params.since, "until": params.until, "source": params.source, "kind": params.kind,
                    "family": params.family, "country": params.country,
                    "technique": params.technique, "q": params.q,
                }),
            },
        ))
    };
    finish(&state, &p, r.await)
}

/// Split `text` into runs, marking words that start with one of the model's evidence terms.
fn highlight(text: &str, terms: &[String]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut plain = String::new();
    let mut word = String::new();
    let flush_word = |word: &mut String, plain: &mut String, out: &mut Vec<Value>| {
        if word.is_empty() {
            return;
        }
        let lower = word.to_lowercase();
        if terms
            .iter()
            .any(|t| t.len() >= 3 && lower.starts_with(t.as_str()))
        {
            if !plain.is_empty() {
                out.push(json!({"text": std::mem::take(plain), "mark": false}));
            }
            out.push(json!({"text": std::mem::take(word), "mark": true}));
        } else {
            plain.push_str(word);
            word.clear();
        }
    };
    for ch in text.chars() {
        if ch.is_alphanumeric() {
            word.push(ch);
        } else {
            flush_word(&mut word, &mut plain, &mut out);
            plain.push(ch);
        }
    }
    flush_word(&mut word, &mut plain, &mut out);
    if !plain.is_empty() {
        out.push(json!({"text": plain, "mark": false}));
    }
    out
}

/// The terms of an `explain_mapping` line (`… terms [a, b, c]; …`).
fn evidence_terms(explanation: &str) -> Vec<String> {
    explanation
        .split_once("terms [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| {
            list.split(',')
                .map(|t| t.trim().to_lowercase())
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /items/{id}`: the item, its text with the words that drove the mapping marked, its
/// techniques.
pub async fn item(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let (found, techniques) = tokio::try_join!(
            with_evidence(
                &state,
                "SELECT t.item_id, t.item_version, t.source, t.kind, t.title, t.text, \
                 CAST(t.observed_at AS VARCHAR) AS observed_at, t.country, t.family, t.tags, \
                 t.raw_ref FROM threat_intelligence_data t WHERE t.item_id = $1"
                    .into(),
                vec![text(&id)],
                true,
            ),
            rows(
                &state,
                format!(
                    "SELECT m.technique_id, m.technique_name, m.tactic, round(m.score, 3) AS score, m.method \
                     FROM {MAPPED} WHERE t.item_id = $1 ORDER BY 4 DESC, 1"
                ),
                vec![text(&id)],
            ),
        )?;
        let Some(mut item) = found.into_iter().next() else {
            return Err(PageError::not_found("no such item"));
        };
        item["raw_href"] = json!(format!("/items/{}/raw", encode_path(&id)));
        let evidence = str_of(&item, "evidence").to_string();
        let runs = highlight(str_of(&item, "text"), &evidence_terms(&evidence));
        let techniques: Vec<Value> = techniques
            .into_iter()
            .map(|mut r| {
                let t = str_of(&r, "technique_id").to_string();
                r["href"] = json!(format!("/techniques/{t}"));
                r
            })
            .collect();
        let frame = Frame::new(
            &state,
            &p,
            "items",
            str_of(&item, "title").to_string(),
            None,
        );
        Ok(render(
            "item.html",
            frame,
            minijinja::context! { item, runs, techniques, evidence },
        ))
    };
    finish(&state, &p, r.await)
}

/// `GET /items/{id}/raw`: the response the item was parsed from, as the feed sent it (JSON,
/// unpacked from the raw store; a page of several items is shown whole).
pub async fn item_raw(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let found = rows(
            &state,
            "SELECT raw_ref FROM threat_intelligence_data WHERE item_id = $1".into(),
            vec![text(&id)],
        )
        .await?;
        let Some(item) = found.first() else {
            return Err(PageError::not_found("no such item"));
        };
        let rel = str_of(item, "raw_ref").to_string();
        // The lake names a file under the raw store; nothing else is read.
        if !crate::feeds::is_raw_ref(&rel) {
            return Err(PageError::not_found("the item has no raw response kept"));
        }
        let unavailable = |e: String| {
            tracing::error!("raw response {rel}: {e}");
            PageError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the raw response could not be read; see the server log".into(),
            }
        };
        let raw = crate::lake::raw_from_settings(&state.settings.lake)
            .map_err(|e| unavailable(e.to_string()))?;
        let Some(body) = crate::feeds::read_raw(&raw, &rel)
            .await
            .map_err(|e| unavailable(e.to_string()))?
        else {
            return Err(PageError::not_found(
                "the raw response is no longer in the raw store (removed by retention?)",
            ));
        };
        let name: String = rel
            .rsplit('/')
            .next()
            .unwrap_or("raw.json.gz")
            .trim_end_matches(".gz")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .collect();
        let mut r = body.into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        super::harden(&mut r);
        Ok(r)
    };
    finish(&state, &p, r.await)
}

/// `GET /threat-model`: the snapshots and the change between any two.
pub async fn threat_model(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let r = async {
        let engine = state.engine();
        let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
        let (from, to) = (params.from.clone(), params.to.clone());
        let result = state
            .on_query_threads(limit, async move {
                let runs = crate::feeds::intel::runs(&engine).await?;
                let to = to
                    .filter(|t| runs.contains(t))
                    .or_else(|| runs.last().cloned());
                let from = from.filter(|f| runs.contains(f)).or_else(|| {
                    let i = runs.iter().position(|r| Some(r) == to.as_ref())?;
                    i.checked_sub(1).map(|i| runs[i].clone())
                });
                let lines = match (&from, &to) {
                    (Some(a), Some(b)) => crate::feeds::intel::diff(&engine, a, b, false).await?,
                    _ => vec![],
                };
                Ok::<_, crate::feeds::FeedError>((runs, from, to, lines))
            })
            .await
            .map_err(|e| PageError::bad(format!("{e:?}")))?
            .map_err(|e| PageError::bad(e.to_string()))?;
        let (runs, from, to, lines) = result;
        if params
            .from
            .as_ref()
            .is_some_and(|f| Some(f) != from.as_ref())
            || params.to.as_ref().is_some_and(|t| Some(t) != to.as_ref())
        {
            return Err(PageError::not_found(
                "no such threat-model run; pick one from the list",
            ));
        }
        let changes: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::to_value(l).ok())
            .collect();
        let frame = Frame::new(&state, &p, "threat-model", "Threat model".into(), None);
        Ok(render(
            "threat_model.html",
            frame,
            minijinja::context! { runs => runs.iter().rev().collect::<Vec<_>>(), from, to, changes },
        ))
    };
    finish(&state, &p, r.await)
}

/// Rows shown per SQL console page.
const SQL_PAGE: usize = 100;

/// `GET /sql?sql=…`: the query through the API's read-only path, a page of rows, a quick chart.
pub async fn sql_console(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let sql = params.sql.clone().unwrap_or_default();
    let offset = params.offset.unwrap_or(0);
    let r = async {
        let mut ctx = minijinja::context! { sql => sql.clone() };
        if !sql.trim().is_empty() {
            let (result, more) = run_query(&state, &sql, offset + SQL_PAGE).await?;
            let columns: Vec<String> = result
                .schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            let mut table: Vec<Vec<String>> = Vec::new();
            let mut numeric_second = result.schema.fields().len() >= 2
                && result.schema.field(1).data_type().is_numeric();
            let options = arrow::util::display::FormatOptions::default().with_null("NULL");
            for b in &result.batches {
                let fmt: Vec<_> = b
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options))
                    .collect::<Result<_, _>>()
                    .map_err(|e| PageError::bad(e.to_string()))?;
                for r in 0..b.num_rows() {
                    table.push(fmt.iter().map(|f| f.value(r).to_string()).collect());
                }
            }
            let total = table.len();
            let page: Vec<Vec<String>> = table.into_iter().skip(offset).take(SQL_PAGE).collect();
            let chart: Vec<Value> = if numeric_second {
                page.iter()
                    .take(50)
                    .map(|r| json!({"label": r[0], "n": r[1].parse::<f64>().unwrap_or_default()}))
                    .collect()
            } else {
                vec![]
            };
            numeric_second &= !chart.is_empty();
            let link = |o: usize| {
                let o = o.to_string();
                super::encode([("sql", sql.as_str()), ("offset", o.as_str())].into_iter())
            };
            ctx = minijinja::context! {
                sql => sql.clone(), columns, rows => page, offset, total,
                chart => numeric_second.then_some(chart),
                next => (more || total > offset + SQL_PAGE).then(|| format!("/sql?{}", link(offset + SQL_PAGE))),
                prev => (offset > 0).then(|| format!("/sql?{}", link(offset.saturating_sub(SQL_PAGE)))),
                csv => format!("/sql/result.csv?{}", super::encode([("sql", sql.as_str())].into_iter())),
            };
        }
        let frame = Frame::new(&state, &p, "sql", "SQL".into(), None);
        Ok::<_, PageError>(render("sql.html", frame, ctx))
    };
    let mut resp = match r.await {
        Ok(r) => r,
        Err(e) => {
            // SQL errors belong on the console, next to the query.
            let frame = Frame::new(&state, &p, "sql", "SQL".into(), None);
            let mut r = render(
                "sql.html",
                frame,
                minijinja::context! { sql => sql.clone(), error => e.message },
            );
            *r.status_mut() = e.status;
            r
        }
    };
    resp.extensions_mut().insert(AuditNote {
        sql: (!sql.is_empty()).then_some(sql),
        event: None,
        who: None,
    });
    resp
}

/// Run untrusted SQL read-only, bounded in rows and time (`server.sql`).
async fn run_query(
    state: &AppState,
    sql: &str,
    want: usize,
) -> Result<(crate::sql::QueryResult, bool), PageError> {
    let engine = state.engine();
    let settings = &state.settings.server.sql;
    let max = want.min(settings.max_rows.max(1));
    let timeout = Duration::from_secs(settings.timeout_secs.max(1));
    let text = sql.to_string();
    let out = state
        .on_query_threads(timeout + Duration::from_secs(1), async move {
            engine.query(&text, max, timeout).await
        })
        .await;
    match out {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(PageError::bad(e.to_string())),
        Err(e) => Err(PageError::bad(format!("the query was stopped: {e:?}"))),
    }
}

/// `GET /sql/result.csv?sql=…`: the query's rows (up to `server.sql.max_rows`) as CSV.
pub async fn sql_csv(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Query(params): Query<Params>,
) -> Response {
    let sql = params.sql.clone().unwrap_or_default();
    let r = async {
        let (result, _) = run_query(&state, &sql, usize::MAX).await?;
        let mut out = Vec::new();
        crate::sql::output::write(
            &mut out,
            crate::sql::output::OutputFormat::Csv,
            &result.schema,
            &result.batches,
            0,
        )
        .map_err(|e| PageError::bad(e.to_string()))?;
        Ok(download(
            out,
            "text/csv; charset=utf-8",
            "attachment; filename=\"threatlake-query.csv\"",
        ))
    };
    let mut resp = finish(&state, &p, r.await);
    resp.extensions_mut().insert(AuditNote {
        sql: Some(sql),
        event: None,
        who: None,
    });
    resp
}

/// `GET /jobs`: running jobs, the run history, and (analyst and up) the start form.
pub async fn jobs(State(state): State_, Extension(p): Extension<Principal>) -> Response {
    let r = async {
        let runs = rows(
            &state,
            "SELECT run_id, job, trigger, status, CAST(started AS VARCHAR) AS started, \
             round(seconds, 1) AS seconds, error FROM job_runs ORDER BY started DESC, run_id DESC LIMIT 100"
                .into(),
            vec![],
        )
        .await?;
        let running = running(&state);
        let frame = Frame::new(&state, &p, "jobs", "Jobs".into(), None);
        Ok(render(
            "jobs.html",
            frame,
            minijinja::context! {
                runs, running,
                jobs => crate::pipeline::Job::ALL.iter().map(|j| j.as_str()).collect::<Vec<_>>(),
            },
        ))
    };
    finish(&state, &p, r.await)
}

fn running(state: &AppState) -> Vec<Value> {
    state
        .all_running()
        .iter()
        .map(|(j, r)| crate::server::api::running_json(*j, r))
        .collect()
}

/// The start form.
#[derive(Deserialize)]
pub struct StartForm {
    csrf_token: String,
    job: String,
}

/// `POST /jobs` (analyst and up; the session's CSRF token in the form): start a job, back to
/// `/jobs`.
pub async fn start_job(
    State(state): State_,
    Extension(p): Extension<Principal>,
    Form(form): Form<StartForm>,
) -> Response {
    if let Err(e) = super::form_csrf(&state, &p, &form.csrf_token) {
        return error_page(&state, &p, e);
    }
    let Some(job) = crate::pipeline::Job::parse(&form.job) else {
        return error_page(
            &state,
            &p,
            PageError::bad(format!(
                "no such job; jobs: {}",
                crate::pipeline::Job::names()
            )),
        );
    };
    match crate::server::start_job(&state, job, crate::pipeline::Trigger::Api).await {
        Ok(_) => Redirect::to("/jobs").into_response(),
        Err(crate::server::StartError::Busy(id)) => error_page(
            &state,
            &p,
            PageError {
                status: StatusCode::CONFLICT,
                message: format!("run {id} of {job} is still going; wait for it to finish"),
            },
        ),
        Err(crate::server::StartError::ShuttingDown) => error_page(
            &state,
            &p,
            PageError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the service is stopping".into(),
            },
        ),
    }
}

/// `GET /jobs/events`: the running jobs every second as server-sent events (`running`, a JSON
/// array); the stream ends after ten minutes and the browser reconnects.
pub async fn job_events(State(state): State_) -> Response {
    let ticks = 600u32;
    let stream = futures::stream::unfold(0u32, move |i| {
        let state = state.clone();
        async move {
            if i >= ticks {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let data = serde_json::to_string(&running(&state)).unwrap_or_else(|_| "[]".into());
            Some((
                Ok::<_, Infallible>(Event::default().event("running").data(data)),
                i + 1,
            ))
        }
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    super::harden(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlight_marks_words_by_evidence_stem_and_keeps_all_text() {
        let text = "The actor used PowerShell to download <script>x</script> payloads.";
        let runs = highlight(
            text,
            &evidence_terms(
                "T1059.001 PowerShell (score 0.91): terms [powershel, download]; lexical 0.5",
            ),
        );
        let joined: String = runs.iter().map(|r| str_of(r, "text")).collect();
        assert_eq!(joined, text);
        let marked: Vec<&str> = runs
            .iter()
            .filter(|r| r["mark"] == json!(true))
            .map(|r| str_of(r, "text"))
            .collect();
        assert_eq!(marked, ["PowerShell", "download"]);
        assert!(highlight("", &[]).is_empty());
    }

    #[test]
    fn heat_classes_scale_to_the_maximum() {
        assert_eq!(heat(0.0, 10.0), 0);
        assert_eq!(heat(10.0, 10.0), 5);
        assert_eq!(heat(1.0, 10.0), 1);
        assert_eq!(heat(5.0, 0.0), 0);
    }

    #[test]
    fn country_outlines_are_svg_paths() {
        let d = svg_path(&[vec![(-180.0, 84.0), (180.0, -66.0), (0.0, 0.0)]]);
        assert_eq!(d, "M0.0,0.0L960.0,400.0L480.0,224.0Z");
    }
}
