//! The HTTP API under `/api/v1` (JSON; errors are `{error, detail}`), health and metrics, and the
//! OpenAPI 3.1 document generated from these handlers.
// Helpers return a finished error `Response` as their `Err` (128 bytes); boxing each would only add
// noise to handlers that turn it straight into the answer.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use datafusion::prelude::{col, lit};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::auth::Principal;
use super::{start_job, AppState, AuditNote, StartError};
use crate::pipeline::{Job, Trigger};
use crate::sql::SqlError;

/// An error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// A stable code (`unauthenticated`, `forbidden`, `invalid_sql`, `not_found`, …).
    pub error: String,
    /// What happened and what to do, for people.
    pub detail: String,
}

/// An error response.
pub fn error(status: StatusCode, code: &str, detail: &str) -> Response {
    let mut r = (
        status,
        Json(ApiError {
            error: code.to_string(),
            detail: detail.to_string(),
        }),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"threatlake\""),
        );
    }
    r
}

fn sql_error(e: SqlError) -> Response {
    let detail = e.to_string();
    if e.is_out_of_memory() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "resources_exhausted",
            &format!("{detail}; the query needs more memory than server.sql.memory_mb allows: aggregate, filter or add a LIMIT"),
        );
    }
    match e {
        SqlError::NotAQuery { .. } | SqlError::ReadOnly { .. } => {
            error(StatusCode::BAD_REQUEST, "not_a_query", &detail)
        }
        SqlError::Timeout { .. } => error(StatusCode::UNPROCESSABLE_ENTITY, "timeout", &detail),
        SqlError::TooDeep { .. } => error(StatusCode::BAD_REQUEST, "too_deep", &detail),
        SqlError::DataFusion(d) => error(StatusCode::BAD_REQUEST, "invalid_sql", &d.to_string()),
        SqlError::Lake(l)
            if matches!(
                *l,
                crate::lake::LakeError::AsOf { .. } | crate::lake::LakeError::NoTable { .. }
            ) =>
        {
            error(StatusCode::BAD_REQUEST, "invalid_sql", &l.to_string())
        }
        other => {
            tracing::error!("query failed: {other}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "lake_unavailable",
                "the lake could not be read; see the server log",
            )
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!("{what}: {e}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        &format!("{what} failed; see the server log"),
    )
}

/// Rows as JSON objects (arrow-json: strings escaped, nulls explicit).
pub(super) fn rows_json(
    batches: &[RecordBatch],
) -> Result<Vec<serde_json::Value>, arrow::error::ArrowError> {
    let mut w = arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::JsonArray>(Vec::new());
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    let bytes = w.into_inner();
    if bytes.is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_slice(&bytes).map_err(|e| arrow::error::ArrowError::JsonError(e.to_string()))
}

/// A JSON body whose rejection (bad JSON, wrong fields, wrong content type, too large) is an
/// [`ApiError`] like every other error.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => {
                let status = match e.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(error(status, "invalid_request", &e.body_text()))
            }
        }
    }
}

/// Query parameters whose rejection is an [`ApiError`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &e.body_text(),
            )),
        }
    }
}

/// Route table of `/api/v1`.
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/openapi.json", get(openapi))
        .route("/session", get(session))
        .route("/sql", post(sql))
        .route("/map", post(map))
        .route("/map/report", post(map_report))
        .route("/techniques/{id}", get(technique))
        .route("/threat-model", get(threat_model))
        .route("/threat-model/diff", get(threat_model_diff))
        .route("/items", get(items))
        .route("/items/{id}", get(item))
        .route("/reports/{file}", get(report))
        .route("/runs", post(start_run).get(list_runs))
        .route("/runs/{id}", get(get_run))
        .route("/auth/tokens", get(list_tokens))
        .route("/auth/users", get(list_users))
}

/// Unknown path.
pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /api/v1/openapi.json",
    )
}

/// Liveness.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness checks.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready` or `not_ready`.
    pub status: String,
    /// The lake answered a listing.
    pub lake: bool,
    /// A mapping model is loaded.
    pub model: bool,
    /// What is missing.
    pub detail: Option<String>,
}

/// Ready to serve: the lake is reachable and a mapping model is loaded.
#[utoipa::path(get, path = "/readyz", security(()), responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let engine = state.engine();
    let lake = tokio::time::timeout(Duration::from_secs(10), engine.lake.tables())
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let mapper = engine.mapper.clone();
    let model = tokio::task::spawn_blocking(move || mapper.get().is_ok())
        .await
        .unwrap_or(false);
    let detail = match (lake, model) {
        (true, true) => None,
        (false, _) => Some("the lake cannot be listed; check lake.root and the store".to_string()),
        (true, false) => Some(format!(
            "no {} mapping model under lake.models; run `threatlake run` or `threatlake model build`",
            state.settings.mapping.domain
        )),
    };
    let status = if detail.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Ready {
            status: if detail.is_none() {
                "ready"
            } else {
                "not_ready"
            }
            .into(),
            lake,
            model,
            detail,
        }),
    )
        .into_response()
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"), (status = 401, body = ApiError)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json"), (status = 401, body = ApiError)))]
pub async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

/// Who is calling.
#[derive(Serialize, ToSchema)]
pub struct SessionInfo {
    /// User or `token:NAME`.
    pub user: String,
    /// Role.
    pub role: super::auth::Role,
    /// The CSRF token browser sessions send as `X-CSRF-Token` (null for API tokens).
    pub csrf_token: Option<String>,
}

/// The caller's identity (and, for browser sessions, the CSRF token).
#[utoipa::path(get, path = "/api/v1/session", responses((status = 200, body = SessionInfo), (status = 401, body = ApiError)))]
pub async fn session(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Json<SessionInfo> {
    let csrf = p
        .session
        .as_deref()
        .and_then(|id| state.sessions.get(id))
        .map(|s| s.csrf);
    Json(SessionInfo {
        user: p.name,
        role: p.role,
        csrf_token: csrf,
    })
}

/// A query.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One SELECT (or WITH … SELECT, EXPLAIN SELECT) over the lake's tables and views.
    pub sql: String,
}

/// Result format.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SqlParams {
    /// json (default), csv (formula-neutralised), arrow (Arrow IPC stream).
    pub format: Option<SqlFormat>,
}

/// `format=`.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SqlFormat {
    /// JSON object with columns and rows.
    Json,
    /// CSV with a header.
    Csv,
    /// Arrow IPC stream.
    Arrow,
}

/// A column of a result.
#[derive(Serialize, ToSchema)]
pub struct Column {
    /// Name.
    pub name: String,
    /// Arrow data type.
    #[serde(rename = "type")]
    pub data_type: String,
}

/// A JSON query result.
#[derive(Serialize, ToSchema)]
pub struct SqlResult {
    /// Columns.
    pub columns: Vec<Column>,
    /// Rows as objects.
    #[schema(value_type = Vec<Object>)]
    pub rows: Vec<serde_json::Value>,
    /// Rows returned.
    pub row_count: usize,
    /// More rows existed than server.sql.max_rows.
    pub truncated: bool,
    /// Milliseconds.
    pub elapsed_ms: u64,
}

/// Run one read-only query (row, time and memory limits from `server.sql`).
#[utoipa::path(post, path = "/api/v1/sql", params(SqlParams), request_body = SqlRequest,
    responses((status = 200, body = SqlResult, description = "JSON; with format=csv text/csv, with format=arrow an Arrow IPC stream"),
              (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
              (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub async fn sql(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<SqlParams>,
    ApiJson(req): ApiJson<SqlRequest>,
) -> Response {
    let note = AuditNote {
        sql: Some(req.sql.chars().take(10_000).collect()),
        ..Default::default()
    };
    let mut r = run_sql(&state, params.format.unwrap_or(SqlFormat::Json), &req.sql).await;
    r.extensions_mut().insert(note);
    r
}

async fn run_sql(state: &AppState, format: SqlFormat, text: &str) -> Response {
    let limits = &state.settings.server.sql;
    let engine = state.engine();
    let t = Instant::now();
    let (max_rows, limit) = (
        limits.max_rows,
        Duration::from_secs(limits.timeout_secs.max(1)),
    );
    let text = text.to_string();
    let run = state
        .on_query_threads(limit + Duration::from_secs(1), async move {
            engine.query(&text, max_rows, limit).await
        })
        .await;
    let (res, truncated) = match run {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return sql_error(e),
        Err(super::QueryAborted::Timeout(_)) => {
            return sql_error(SqlError::Timeout {
                secs: limit.as_secs(),
            })
        }
        Err(super::QueryAborted::Failed(e)) => return internal("the query", e),
    };
    let elapsed_ms = t.elapsed().as_millis() as u64;
    let trunc = if truncated { "true" } else { "false" };
    match format {
        SqlFormat::Json => match rows_json(&res.batches) {
            Ok(rows) => Json(SqlResult {
                columns: res
                    .schema
                    .fields()
                    .iter()
                    .map(|f| Column {
                        name: f.name().clone(),
                        data_type: f.data_type().to_string(),
                    })
                    .collect(),
                row_count: rows.len(),
                rows,
                truncated,
                elapsed_ms,
            })
            .into_response(),
            Err(e) => internal("encoding the result", e),
        },
        SqlFormat::Csv => {
            let mut out = Vec::new();
            match crate::sql::output::write(
                &mut out,
                crate::sql::output::OutputFormat::Csv,
                &res.schema,
                &res.batches,
                0,
            ) {
                Ok(()) => (
                    [
                        (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                        (
                            header::HeaderName::from_static("x-threatlake-truncated"),
                            trunc,
                        ),
                    ],
                    out,
                )
                    .into_response(),
                Err(e) => internal("encoding the result", e),
            }
        }
        SqlFormat::Arrow => {
            let mut out = Vec::new();
            let w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &res.schema).and_then(
                |mut w| {
                    for b in &res.batches {
                        w.write(b)?;
                    }
                    w.finish()
                },
            );
            match w {
                Ok(()) => (
                    [
                        (header::CONTENT_TYPE, "application/vnd.apache.arrow.stream"),
                        (
                            header::HeaderName::from_static("x-threatlake-truncated"),
                            trunc,
                        ),
                    ],
                    out,
                )
                    .into_response(),
                Err(e) => internal("encoding the result", e),
            }
        }
    }
}

/// Texts to map.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapRequest {
    /// 1 to 1000 texts.
    pub texts: Vec<String>,
    /// Techniques per text (1-50; default mapping.top_k).
    pub top_k: Option<usize>,
    /// Also say which words drove the best match.
    #[serde(default)]
    pub explain: bool,
}

/// A technique and its score.
#[derive(Serialize, ToSchema)]
pub struct Scored {
    /// `T1059.001`.
    pub technique_id: String,
    /// Name.
    pub name: String,
    /// Tactics.
    pub tactics: Vec<String>,
    /// Calibrated score in [0, 1].
    pub score: f64,
}

/// One text's result.
#[derive(Serialize, ToSchema)]
pub struct Mapped {
    /// Best first.
    pub techniques: Vec<Scored>,
    /// With `explain`: the evidence of the best match above the threshold.
    pub evidence: Option<String>,
}

/// The mapping answer.
#[derive(Serialize, ToSchema)]
pub struct MapResponse {
    /// The model used (`enterprise-18.1`).
    pub model: String,
    /// One per text, in order.
    pub results: Vec<Mapped>,
}

/// Map texts to ATT&CK techniques (top-k with calibrated scores).
#[utoipa::path(post, path = "/api/v1/map", request_body = MapRequest,
    responses((status = 200, body = MapResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
              (status = 403, body = ApiError), (status = 503, body = ApiError)))]
pub async fn map(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<MapRequest>,
) -> Response {
    if req.texts.is_empty() || req.texts.len() > 1000 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "send 1 to 1000 texts",
        );
    }
    if req.texts.iter().any(|t| t.len() > 100_000) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "each text may be at most 100,000 bytes",
        );
    }
    let k = req.top_k.unwrap_or(state.settings.mapping.top_k);
    if !(1..=50).contains(&k) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "top_k must be 1 to 50",
        );
    }
    let engine = state.engine();
    let configured = state.settings.mapping.threshold;
    let res = tokio::task::spawn_blocking(move || {
        let m = engine.mapper.get()?;

        let ranked = threatlake_udfs::mapping_kernels::par_top_k(&m, &req.texts, k);
        let results = ranked
            .iter()
            .enumerate()
            .map(|(i, r)| Mapped {
                techniques: r
                    .iter()
                    .map(|x| {
                        let t = &m.model.techniques[x.technique];
                        Scored {
                            technique_id: t.id.clone(),
                            name: t.name.clone(),
                            tactics: t.tactics.clone(),
                            score: x.score,
                        }
                    })
                    .collect(),
                evidence: req
                    .explain
                    .then(|| {
                        let mut s = threatlake_udfs::mapper::Scratch::default();
                        m.explain(&req.texts[i], configured, &mut s)
                    })
                    .flatten(),
            })
            .collect();
        Ok::<_, String>(MapResponse {
            model: format!("{}-{}", m.model.domain, m.model.attack_version),
            results,
        })
    })
    .await;
    mapping_answer(res)
}

/// A mapping handler's answer: the result, 503 without a model, 500 if the blocking task failed.
fn mapping_answer<T: Serialize>(
    res: Result<Result<T, String>, tokio::task::JoinError>,
) -> Response {
    match res {
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            &format!("{e}; run `threatlake run` or `threatlake model build`"),
        ),
        Err(e) => internal("mapping", e),
    }
}

/// Whole reports to map, sentence by sentence.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapReportRequest {
    /// 1 to 100 reports: plain text, markdown, HTML or text extracted from a PDF (the request as a
    /// whole at most `server.max_body_kb`).
    pub texts: Vec<String>,
}

/// A technique a report describes.
#[derive(Serialize, ToSchema)]
pub struct ReportTechnique {
    /// `T1059.001`.
    pub technique_id: String,
    /// Name.
    pub name: String,
    /// Tactics.
    pub tactics: Vec<String>,
    /// Probability that it is one of the report's techniques, in [0, 1]: the chance that at least
    /// one of its sentences is a correct mention, calibrated on labelled reports (see the README's
    /// `map_report`).
    pub score: f64,
    /// Sentences (and technique-table rows) behind it: those that name it among their best three
    /// candidates (scored at least 0.05, or their best) or, for a parent technique, one of its
    /// sub-techniques.
    pub sentences: usize,
    /// Its best sentence (or row).
    pub sentence: String,
}

/// One report's techniques, strongest first.
#[derive(Serialize, ToSchema)]
pub struct MappedReport {
    /// Every technique whose report score reaches the threshold.
    pub techniques: Vec<ReportTechnique>,
}

/// The report mapping answer.
#[derive(Serialize, ToSchema)]
pub struct MapReportResponse {
    /// The model used (`enterprise-18.1`).
    pub model: String,
    /// One per report, in order.
    pub results: Vec<MappedReport>,
}

/// Map whole reports (`map_report`): prose sentences mapped one by one (markup, lists, code and
/// indicator lines left out; technique-table rows count for the ids they cite), each technique with
/// its report score, its sentence count and best sentence.
#[utoipa::path(post, path = "/api/v1/map/report", request_body = MapReportRequest,
    responses((status = 200, body = MapReportResponse), (status = 400, body = ApiError), (status = 401, body = ApiError),
              (status = 403, body = ApiError), (status = 413, body = ApiError), (status = 503, body = ApiError)))]
pub async fn map_report(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<MapReportRequest>,
) -> Response {
    if req.texts.is_empty() || req.texts.len() > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "send 1 to 100 reports",
        );
    }
    let engine = state.engine();
    let configured = state.settings.mapping.threshold;
    let res = tokio::task::spawn_blocking(move || {
        let m = engine.mapper.get()?;
        let found =
            threatlake_udfs::mapping_kernels::par_documents(&m, req.texts.len(), configured, |i| {
                Some(req.texts[i].as_str())
            });
        let results = found
            .into_iter()
            .map(|f| MappedReport {
                techniques: f
                    .unwrap_or_default()
                    .into_iter()
                    .map(|x| {
                        let t = &m.model.techniques[x.technique];
                        ReportTechnique {
                            technique_id: t.id.clone(),
                            name: t.name.clone(),
                            tactics: t.tactics.clone(),
                            score: x.score,
                            sentences: x.sentences,
                            sentence: x.sentence,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok::<_, String>(MapReportResponse {
            model: format!("{}-{}", m.model.domain, m.model.attack_version),
            results,
        })
    })
    .await;
    mapping_answer(res)
}

/// Collect `df` on the query threads (bounded by server.sql.timeout_secs) as JSON rows.
async fn frame_rows(
    state: &AppState,
    df: datafusion::prelude::DataFrame,
) -> Result<Vec<serde_json::Value>, Response> {
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
    let batches = match state.on_query_threads(limit, df.collect()).await {
        Ok(r) => r.map_err(|e| sql_error(e.into()))?,
        Err(super::QueryAborted::Timeout(s)) => {
            return Err(sql_error(SqlError::Timeout { secs: s }))
        }
        Err(super::QueryAborted::Failed(e)) => return Err(internal("the query", e)),
    };
    rows_json(&batches).map_err(|e| internal("encoding rows", e))
}

async fn table(state: &AppState, name: &str) -> Result<datafusion::prelude::DataFrame, Response> {
    state
        .engine()
        .ctx
        .table(name)
        .await
        .map_err(|e| sql_error(e.into()))
}

/// A technique of the current ATT&CK release (any JSON object of `attack_techniques_current`).
#[utoipa::path(get, path = "/api/v1/techniques/{id}", params(("id" = String, Path, description = "Technique id, e.g. T1059.001")),
    responses((status = 200, body = Object), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn technique(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let df = match table(&state, "attack_techniques_current").await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let df = match df.filter(col("technique_id").eq(lit(id.clone()))) {
        Ok(d) => d,
        Err(e) => return sql_error(e.into()),
    };
    match frame_rows(&state, df).await {
        Ok(rows) if rows.is_empty() => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such technique in the current ATT&CK release",
        ),
        Ok(rows) => Json(serde_json::Value::Array(rows)).into_response(),
        Err(r) => r,
    }
}

/// `?run=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelParams {
    /// A threat-model run id (default: the newest).
    pub run: Option<String>,
}

/// A threat-model snapshot.
#[derive(Serialize, ToSchema)]
pub struct ThreatModel {
    /// Run id.
    pub run_id: String,
    /// Techniques with score and evidence.
    #[schema(value_type = Vec<Object>)]
    pub techniques: Vec<serde_json::Value>,
}

async fn model_runs(state: &AppState) -> Result<Vec<String>, Response> {
    let engine = state.engine();
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
    match state
        .on_query_threads(
            limit,
            async move { crate::feeds::intel::runs(&engine).await },
        )
        .await
    {
        Ok(r) => r.map_err(|e| internal("listing threat-model runs", e)),
        Err(e) => Err(internal("listing threat-model runs", format!("{e:?}"))),
    }
}

/// The threat model (newest snapshot, or `run`).
#[utoipa::path(get, path = "/api/v1/threat-model", params(ModelParams),
    responses((status = 200, body = ThreatModel), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn threat_model(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<ModelParams>,
) -> Response {
    let runs = match model_runs(&state).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let run = match p.run {
        Some(r) if runs.contains(&r) => r,
        Some(_) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such threat-model run; GET /api/v1/runs lists runs",
            )
        }
        None => match runs.last() {
            Some(r) => r.clone(),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no threat-model snapshot yet; start the run job",
                )
            }
        },
    };
    let df = match table(&state, "threat_model").await.and_then(|d| {
        d.filter(col("run_id").eq(lit(run.clone())))
            .and_then(|d| {
                d.sort(vec![
                    col("score").sort(false, true),
                    col("technique_id").sort(true, true),
                ])
            })
            .map_err(|e| sql_error(e.into()))
    }) {
        Ok(d) => d,
        Err(r) => return r,
    };
    match frame_rows(&state, df).await {
        Ok(techniques) => Json(ThreatModel {
            run_id: run,
            techniques,
        })
        .into_response(),
        Err(r) => r,
    }
}

/// `?from=&to=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffParams {
    /// Older run (default: the one before `to`).
    pub from: Option<String>,
    /// Newer run (default: the newest).
    pub to: Option<String>,
    /// Also list steady techniques.
    #[serde(default)]
    pub all: bool,
}

/// A change between two snapshots.
#[derive(Serialize, ToSchema)]
pub struct ModelDiff {
    /// Older run.
    pub from: String,
    /// Newer run.
    pub to: String,
    /// new, rising, fading, gone (and steady with `all`).
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<serde_json::Value>,
}

/// Compare two threat-model snapshots.
#[utoipa::path(get, path = "/api/v1/threat-model/diff", params(DiffParams),
    responses((status = 200, body = ModelDiff), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn threat_model_diff(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<DiffParams>,
) -> Response {
    let runs = match model_runs(&state).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let to = p.to.or_else(|| runs.last().cloned());
    let Some(to) = to.filter(|t| runs.contains(t)) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such threat-model run (or none yet)",
        );
    };
    let from = p.from.or_else(|| {
        let i = runs.iter().position(|r| r == &to)?;
        i.checked_sub(1).map(|i| runs[i].clone())
    });
    let Some(from) = from.filter(|f| runs.contains(f)) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no earlier threat-model run to compare with",
        );
    };
    let engine = state.engine();
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
    let (f, t, all) = (from.clone(), to.clone(), p.all);
    let lines = state
        .on_query_threads(limit, async move {
            crate::feeds::intel::diff(&engine, &f, &t, all).await
        })
        .await
        .map_err(|e| format!("{e:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    match lines {
        Ok(lines) => Json(ModelDiff {
            from,
            to,
            changes: lines
                .iter()
                .filter_map(|l| serde_json::to_value(l).ok())
                .collect(),
        })
        .into_response(),
        Err(e) => internal("comparing threat models", e),
    }
}

/// Item filters.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ItemParams {
    /// otx or virustotal.
    pub source: Option<String>,
    /// Observed on or after (YYYY-MM-DD or RFC 3339).
    pub since: Option<String>,
    /// Observed before (YYYY-MM-DD or RFC 3339).
    pub until: Option<String>,
    /// Mapped to this technique (model or source-stated).
    pub technique: Option<String>,
    /// Country.
    pub country: Option<String>,
    /// Malware family or adversary.
    pub family: Option<String>,
    /// Words in the title or text (case-insensitive).
    pub q: Option<String>,
    /// Page size (1-500, default 50).
    pub limit: Option<usize>,
    /// Rows to skip.
    pub offset: Option<usize>,
}

/// A page of items.
#[derive(Serialize, ToSchema)]
pub struct ItemPage {
    /// Items, newest first.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
    /// Offset of the next page, when there may be one.
    pub next_offset: Option<usize>,
}

/// Escape LIKE wildcards so `q` matches literally.
pub(super) fn like_literal(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Threat items (every feed), filtered and paged.
#[utoipa::path(get, path = "/api/v1/items", params(ItemParams),
    responses((status = 200, body = ItemPage), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn items(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<ItemParams>,
) -> Response {
    use datafusion::logical_expr::JoinType;
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "limit must be 1 to 500",
        );
    }
    let offset = p.offset.unwrap_or(0);
    let when = |v: &Option<String>, name: &str| -> Result<Option<i64>, Response> {
        v.as_deref()
            .map(|s| {
                crate::reports::batch::parse_since(s)
                    .map(|t| t.timestamp_micros())
                    .map_err(|_| {
                        error(
                            StatusCode::BAD_REQUEST,
                            "invalid_request",
                            &format!("{name}: use YYYY-MM-DD or an RFC 3339 time"),
                        )
                    })
            })
            .transpose()
    };
    let (since, until) = match (when(&p.since, "since"), when(&p.until, "until")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let build = async {
        let mut df = table(&state, "threat_intelligence_data").await?;
        let e = |e: datafusion::error::DataFusionError| sql_error(e.into());
        let ts = |micros: i64| {
            lit(datafusion::scalar::ScalarValue::TimestampMicrosecond(
                Some(micros),
                Some("UTC".into()),
            ))
        };
        if let Some(s) = &p.source {
            df = df.filter(col("source").eq(lit(s.clone()))).map_err(e)?;
        }
        if let Some(s) = since {
            df = df.filter(col("observed_at").gt_eq(ts(s))).map_err(e)?;
        }
        if let Some(u) = until {
            df = df.filter(col("observed_at").lt(ts(u))).map_err(e)?;
        }
        if let Some(c) = &p.country {
            df = df.filter(col("country").eq(lit(c.clone()))).map_err(e)?;
        }
        if let Some(f) = &p.family {
            df = df.filter(col("family").eq(lit(f.clone()))).map_err(e)?;
        }
        if let Some(q) = &p.q {
            let pattern = lit(format!("%{}%", like_literal(q)));
            df = df
                .filter(
                    col("title")
                        .ilike(pattern.clone())
                        .or(col("text").ilike(pattern)),
                )
                .map_err(e)?;
        }
        if let Some(t) = &p.technique {
            let m = table(&state, "mapped_threat_data")
                .await?
                .filter(col("technique_id").eq(lit(t.clone())))
                .and_then(|d| {
                    d.select(vec![
                        col("item_id").alias("m_item_id"),
                        col("item_version").alias("m_item_version"),
                    ])
                })
                .map_err(e)?;
            df = df
                .join(
                    m,
                    JoinType::LeftSemi,
                    &["item_id", "item_version"],
                    &["m_item_id", "m_item_version"],
                    None,
                )
                .map_err(e)?;
        }
        df.select_columns(&[
            "item_id",
            "item_version",
            "source",
            "kind",
            "title",
            "observed_at",
            "country",
            "family",
            "tags",
            "text",
        ])
        .and_then(|d| {
            d.sort(vec![
                col("observed_at").sort(false, false),
                col("item_id").sort(true, true),
            ])
        })
        .and_then(|d| d.limit(offset, Some(limit + 1)))
        .map_err(e)
    };
    let df = match build.await {
        Ok(d) => d,
        Err(r) => return r,
    };
    match frame_rows(&state, df).await {
        Ok(mut items) => {
            let more = items.len() > limit;
            items.truncate(limit);
            Json(ItemPage {
                next_offset: more.then_some(offset + limit),
                items,
            })
            .into_response()
        }
        Err(r) => r,
    }
}

/// An item with its techniques.
#[derive(Serialize, ToSchema)]
pub struct ItemDetail {
    /// The item.
    #[schema(value_type = Object)]
    pub item: serde_json::Value,
    /// Its techniques (model and source-stated) with scores.
    #[schema(value_type = Vec<Object>)]
    pub techniques: Vec<serde_json::Value>,
}

/// One item (`otx:…`, `vt:…`).
#[utoipa::path(get, path = "/api/v1/items/{id}", params(("id" = String, Path, description = "Item id, e.g. otx:64e38336d783f91d6948a7b1")),
    responses((status = 200, body = ItemDetail), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn item(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let e = |e: datafusion::error::DataFusionError| sql_error(e.into());
    let item = match table(&state, "threat_intelligence_data")
        .await
        .and_then(|d| d.filter(col("item_id").eq(lit(id.clone()))).map_err(e))
    {
        Ok(d) => frame_rows(&state, d).await,
        Err(r) => return r,
    };
    let item = match item {
        Ok(mut rows) if !rows.is_empty() => rows.remove(0),
        Ok(_) => return error(StatusCode::NOT_FOUND, "not_found", "no such item"),
        Err(r) => return r,
    };
    let version = item
        .get("item_version")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let techniques = match table(&state, "mapped_threat_data").await.and_then(|d| {
        d.filter(
            col("item_id")
                .eq(lit(id.clone()))
                .and(col("item_version").eq(lit(version))),
        )
        .and_then(|d| {
            d.select_columns(&[
                "technique_id",
                "technique_name",
                "tactic",
                "score",
                "method",
            ])
        })
        .and_then(|d| {
            d.sort(vec![
                col("score").sort(false, true),
                col("technique_id").sort(true, true),
            ])
        })
        .map_err(e)
    }) {
        Ok(d) => frame_rows(&state, d).await,
        Err(r) => return r,
    };
    match techniques {
        Ok(techniques) => Json(ItemDetail { item, techniques }).into_response(),
        Err(r) => r,
    }
}

/// A report dataset rendered now: `{name}.{format}` with format html, pdf, csv, json, svg, png or
/// navigator.
#[utoipa::path(get, path = "/api/v1/reports/{file}", params(("file" = String, Path, description = "e.g. top_techniques.html")),
    responses((status = 200, description = "The report in that format"), (status = 400, body = ApiError),
              (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn report(State(state): State<Arc<AppState>>, Path(file): Path<String>) -> Response {
    let Some((name, ext)) = file.rsplit_once('.') else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "name the format: /api/v1/reports/NAME.html (html, pdf, csv, json, svg, png, navigator)");
    };
    let Some(format) = crate::reports::Format::parse(ext).filter(|f| {
        !matches!(
            f,
            crate::reports::Format::Stix | crate::reports::Format::MispFeed
        )
    }) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unknown format; use html, pdf, csv, json, svg, png or navigator",
        );
    };
    if crate::reports::select(&[name.to_string()]).is_err() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such report; `threatlake report --help` lists them",
        );
    }
    let engine = state.engine();
    let settings = state.settings.clone();
    let name_owned = name.to_string();
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1) * 4);
    let rendered = state
        .on_query_threads(limit, async move {
            crate::reports::batch::render_one(&settings, &engine, &name_owned, format)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("{e:?}"))
        .and_then(|r| r);
    match rendered {
        Ok(Some((bytes, media))) => (
            [
                (header::CONTENT_TYPE, media),
                // Reports hold attacker-written text: nothing in them may run.
                (header::CONTENT_SECURITY_POLICY, "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'unsafe-inline'"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "this report has no such output (no chart, or no technique ids for a Navigator layer)"),
        Err(e) => internal("rendering the report", e),
    }
}

/// Start a job.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// run, ingest_attack, ingest_otx, ingest_vt, ingest_taxii, map, snapshot, report, push.
    pub job: String,
}

/// A started run.
#[derive(Serialize, ToSchema)]
pub struct RunStarted {
    /// Run id (GET /api/v1/runs/{id}).
    pub run_id: String,
    /// Job.
    pub job: String,
    /// `running`.
    pub status: String,
}

/// Start a job now (single flight: 409 while a run of it is going).
#[utoipa::path(post, path = "/api/v1/runs", request_body = RunRequest,
    responses((status = 202, body = RunStarted), (status = 400, body = ApiError), (status = 401, body = ApiError),
              (status = 403, body = ApiError), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
pub async fn start_run(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<RunRequest>,
) -> Response {
    let Some(job) = Job::parse(&req.job) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("no such job; jobs: {}", Job::names()),
        );
    };
    match start_job(&state, job, Trigger::Api).await {
        Ok(run_id) => (
            StatusCode::ACCEPTED,
            Json(RunStarted {
                run_id,
                job: job.as_str().into(),
                status: "running".into(),
            }),
        )
            .into_response(),
        Err(StartError::Busy(id)) => error(
            StatusCode::CONFLICT,
            "already_running",
            &format!("run {id} of {job} is still going; this start was skipped and recorded"),
        ),
        Err(StartError::ShuttingDown) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the service is stopping",
        ),
    }
}

/// `?limit=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsParams {
    /// Newest first, at most this many (1-1000, default 100).
    pub limit: Option<usize>,
    /// Only this job.
    pub job: Option<String>,
}

/// Job runs.
#[derive(Serialize, ToSchema)]
pub struct RunList {
    /// Running now.
    #[schema(value_type = Vec<Object>)]
    pub running: Vec<serde_json::Value>,
    /// Recorded in job_runs, newest first.
    #[schema(value_type = Vec<Object>)]
    pub runs: Vec<serde_json::Value>,
}

pub(super) fn running_json(job: Job, r: &super::Running) -> serde_json::Value {
    let stages = r.stages.lock().map(|s| s.clone()).unwrap_or_default();
    serde_json::json!({
        "run_id": r.run_id, "job": job.as_str(), "trigger": r.trigger.as_str(), "status": "running",
        "started": crate::feeds::fixed(r.started), "stages": stages,
    })
}

async fn recorded_runs(
    state: &AppState,
    filter: Option<datafusion::prelude::Expr>,
    limit: usize,
) -> Result<Vec<serde_json::Value>, Response> {
    let mut df = table(state, crate::pipeline::runs::JOB_RUNS).await?;
    let e = |e: datafusion::error::DataFusionError| sql_error(e.into());
    if let Some(f) = filter {
        df = df.filter(f).map_err(e)?;
    }
    let df = df
        .sort(vec![
            col("started").sort(false, false),
            col("run_id").sort(false, false),
        ])
        .and_then(|d| d.limit(0, Some(limit)))
        .map_err(e)?;
    frame_rows(state, df).await
}

/// Job runs: running now and recorded.
#[utoipa::path(get, path = "/api/v1/runs", params(RunsParams),
    responses((status = 200, body = RunList), (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_runs(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<RunsParams>,
) -> Response {
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "limit must be 1 to 1000",
        );
    }
    let running = state
        .all_running()
        .iter()
        .filter(|(j, _)| p.job.as_deref().is_none_or(|x| x == j.as_str()))
        .map(|(j, r)| running_json(*j, r))
        .collect();
    let filter = p.job.map(|j| col("job").eq(lit(j)));
    match recorded_runs(&state, filter, limit).await {
        Ok(runs) => Json(RunList { running, runs }).into_response(),
        Err(r) => r,
    }
}

/// One run (running or recorded).
#[utoipa::path(get, path = "/api/v1/runs/{id}", params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = Object), (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_run(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if let Some((j, r)) = state.all_running().iter().find(|(_, r)| r.run_id == id) {
        return Json(running_json(*j, r)).into_response();
    }
    match recorded_runs(&state, Some(col("run_id").eq(lit(id))), 1).await {
        Ok(mut rows) if !rows.is_empty() => Json(rows.remove(0)).into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, "not_found", "no such run"),
        Err(r) => r,
    }
}

/// A token as listed (never its hash).
#[derive(Serialize, ToSchema)]
pub struct TokenInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: super::auth::Role,
    /// Created (RFC 3339).
    pub created: String,
    /// Expires.
    pub expires: Option<String>,
    /// Revoked.
    pub revoked: Option<String>,
}

/// API tokens (admin).
#[utoipa::path(get, path = "/api/v1/auth/tokens",
    responses((status = 200, body = Vec<TokenInfo>), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_tokens(State(state): State<Arc<AppState>>) -> Response {
    match state.verifier.data() {
        Ok(d) => Json(
            d.tokens
                .iter()
                .map(|t| TokenInfo {
                    name: t.name.clone(),
                    role: t.role,
                    created: crate::feeds::fixed(t.created),
                    expires: t.expires.map(crate::feeds::fixed),
                    revoked: t.revoked.map(crate::feeds::fixed),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal("reading the auth file", e),
    }
}

/// A user as listed.
#[derive(Serialize, ToSchema)]
pub struct UserInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: super::auth::Role,
    /// Created.
    pub created: String,
}

/// Users (admin).
#[utoipa::path(get, path = "/api/v1/auth/users",
    responses((status = 200, body = Vec<UserInfo>), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_users(State(state): State<Arc<AppState>>) -> Response {
    match state.verifier.data() {
        Ok(d) => Json(
            d.users
                .iter()
                .map(|u| UserInfo {
                    name: u.name.clone(),
                    role: u.role,
                    created: crate::feeds::fixed(u.created),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal("reading the auth file", e),
    }
}

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token from `threatlake auth token create`"))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("threatlake_session"))),
        );
        api.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("session", Vec::<String>::new()),
        ]);
    }
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "threatlake", description = "Threat intelligence mapped to MITRE ATT&CK: SQL over the lake, mapping, threat model, items, reports, jobs."),
    paths(healthz, readyz, metrics, openapi, session, sql, map, map_report, technique, threat_model, threat_model_diff, items, item, report, start_run, list_runs, get_run, list_tokens, list_users),
    components(schemas(SqlFormat)),
    modifiers(&Security)
)]
pub struct ApiDoc;
