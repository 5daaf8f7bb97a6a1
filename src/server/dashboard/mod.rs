//! The dashboard: server-rendered pages (minijinja, auto-escaped) over the same SQL as the API,
//! with vendored ECharts and htmx served from the binary under a strict Content-Security-Policy.
//! Page state lives in the URL; filter values reach SQL only as query parameters.

mod assets;
mod cache;
mod pages;
mod workbench;

pub use cache::PageCache;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use datafusion::common::ParamValues;
use datafusion::scalar::ScalarValue;
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::AppState;

/// Every dashboard response carries this policy: scripts and styles only from the server's own
/// files, no inline script or style, no eval, nothing from another host, no framing.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Dashboard routes (all need a signed-in reader or better; `/assets/` is public).
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/", get(pages::overview))
        .route("/map", get(pages::map))
        .route("/matrix", get(pages::matrix))
        .route("/matrix/{file}", get(pages::matrix_download))
        .route("/techniques/{id}", get(pages::technique))
        .route("/items", get(pages::items))
        .route("/items/{id}", get(pages::item))
        .route("/items/{id}/raw", get(pages::item_raw))
        .route("/threat-model", get(pages::threat_model))
        .route("/sql", get(pages::sql_console))
        .route("/sql/result.csv", get(pages::sql_csv))
        .route("/jobs", get(pages::jobs).post(pages::start_job))
        .route("/jobs/events", get(pages::job_events))
        .route(
            "/workbench",
            get(workbench::form).post(workbench::submit).layer(
                // A report upload may be larger than the API's server.max_body_kb.
                axum::extract::DefaultBodyLimit::max(crate::extract::MAX_REPORT_BYTES + (64 << 10)),
            ),
        )
        .route("/workbench/feedback", post(workbench::decide))
        .route("/assets/{file}", get(assets::serve))
        .route("/favicon.ico", get(assets::no_icon))
}

/// Routes whose POST form carries the CSRF token as a field (checked by the handler).
pub const FORM_CSRF_ROUTES: [&str; 4] = ["/logout", "/jobs", "/workbench", "/workbench/feedback"];

/// The CSRF check of [`FORM_CSRF_ROUTES`]: a session's form must carry its token (compared in
/// constant time); token-authenticated calls have no session and need none.
pub fn form_csrf(state: &AppState, p: &Principal, token: &str) -> Result<(), PageError> {
    let ok = match &p.session {
        None => true,
        Some(id) => state.sessions.csrf_matches(id, token.as_bytes()),
    };
    if ok {
        Ok(())
    } else {
        Err(PageError {
            status: StatusCode::FORBIDDEN,
            message: "the form's CSRF token does not match your session; reload the page".into(),
        })
    }
}

/// Query parameters of every page (each page reads the ones it uses). The filter fields narrow
/// every count, chart and list, and travel in every link.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Params {
    /// Observed on or after (YYYY-MM-DD or RFC 3339).
    pub since: Option<String>,
    /// Observed before.
    pub until: Option<String>,
    /// Feed (otx, virustotal, taxii).
    pub source: Option<String>,
    /// Item kind (pulse, file, domain, ip_address, url, report, indicator).
    pub kind: Option<String>,
    /// Malware family or adversary.
    pub family: Option<String>,
    /// Country as the feed states it.
    pub country: Option<String>,
    /// Mapped to this technique (or one of its sub-techniques).
    pub technique: Option<String>,
    /// Words in the title or text.
    pub q: Option<String>,
    /// Rows to skip (lists).
    pub offset: Option<usize>,
    /// Matrix: show sub-techniques (`1`).
    pub sub: Option<String>,
    /// Threat model: older run.
    pub from: Option<String>,
    /// Threat model: newer run.
    pub to: Option<String>,
    /// SQL console: the query.
    pub sql: Option<String>,
}

/// The filter part of [`Params`], checked.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    since: Option<(String, i64)>,
    until: Option<(String, i64)>,
    source: Option<String>,
    kind: Option<String>,
    family: Option<String>,
    country: Option<String>,
    technique: Option<String>,
    q: Option<String>,
}

/// An active filter as the page shows it: name, value, and the link that drops it.
#[derive(Serialize)]
pub struct Chip {
    name: &'static str,
    value: String,
    drop: String,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.chars().take(200).collect())
}

impl Filter {
    /// Check the filter values: dates must parse, a technique must be an ATT&CK id.
    pub fn parse(p: &Params) -> Result<Filter, PageError> {
        let when = |v: &Option<String>, name: &str| -> Result<Option<(String, i64)>, PageError> {
            nonempty(v)
                .map(|s| {
                    crate::reports::batch::parse_since(&s)
                        .map(|t| (s.clone(), t.timestamp_micros()))
                        .map_err(|_| {
                            PageError::bad(format!(
                                "{name}={s}: not a date; use YYYY-MM-DD or an RFC 3339 time"
                            ))
                        })
                })
                .transpose()
        };
        let technique = nonempty(&p.technique);
        if let Some(t) = &technique {
            if !crate::reports::navigator::is_technique_id(t) {
                return Err(PageError::bad(format!(
                    "technique={t}: not an ATT&CK technique id (T1234 or T1234.567)"
                )));
            }
        }
        Ok(Filter {
            since: when(&p.since, "since")?,
            until: when(&p.until, "until")?,
            source: nonempty(&p.source),
            kind: nonempty(&p.kind),
            family: nonempty(&p.family),
            country: nonempty(&p.country),
            technique,
            q: nonempty(&p.q),
        })
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        let mut add = |k: &'static str, s: &Option<String>| {
            if let Some(s) = s {
                v.push((k, s.clone()));
            }
        };
        add("since", &self.since.as_ref().map(|s| s.0.clone()));
        add("until", &self.until.as_ref().map(|s| s.0.clone()));
        add("source", &self.source);
        add("kind", &self.kind);
        add("family", &self.family);
        add("country", &self.country);
        add("technique", &self.technique);
        add("q", &self.q);
        v
    }

    /// The filter as a query string (`a=b&c=d`, encoded; empty when no filter is set).
    pub fn query(&self) -> String {
        encode(self.pairs().iter().map(|(k, v)| (*k, v.as_str())))
    }

    /// `path` with this filter, `key` set to `value` (or dropped when None).
    pub fn link(&self, path: &str, key: &str, value: Option<&str>) -> String {
        let mut pairs: Vec<(&str, String)> = self
            .pairs()
            .into_iter()
            .filter(|(k, _)| *k != key)
            .collect();
        if let Some(v) = value {
            pairs.push((key, v.to_string()));
        }
        with_query(path, &encode(pairs.iter().map(|(k, v)| (*k, v.as_str()))))
    }

    /// The active filters with links that drop each.
    pub fn chips(&self, path: &str) -> Vec<Chip> {
        self.pairs()
            .into_iter()
            .map(|(name, value)| Chip {
                name,
                drop: self.link(path, name, None),
                value,
            })
            .collect()
    }

    /// A SQL condition over `threat_intelligence_data` aliased `t` (and `mapped_threat_data` for
    /// the technique filter) with `$n` placeholders; the values are pushed onto `params`.
    pub fn condition(&self, params: &mut Vec<ScalarValue>) -> String {
        let mut parts = vec!["TRUE".to_string()];
        // Every `?` of a condition reads the one value.
        let mut add = |cond: &str, v: ScalarValue, parts: &mut Vec<String>| {
            params.push(v);
            parts.push(cond.replace('?', &format!("${}", params.len())));
        };
        let ts = |m: i64| ScalarValue::TimestampMicrosecond(Some(m), Some("UTC".into()));
        let s = |v: &String| ScalarValue::Utf8(Some(v.clone()));
        if let Some((_, m)) = &self.since {
            add("t.observed_at >= ?", ts(*m), &mut parts);
        }
        if let Some((_, m)) = &self.until {
            add("t.observed_at < ?", ts(*m), &mut parts);
        }
        if let Some(v) = &self.source {
            add("t.source = ?", s(v), &mut parts);
        }
        if let Some(v) = &self.kind {
            add("t.kind = ?", s(v), &mut parts);
        }
        if let Some(v) = &self.family {
            add("t.family = ?", s(v), &mut parts);
        }
        if let Some(v) = &self.country {
            add("t.country = ?", s(v), &mut parts);
        }
        if let Some(v) = &self.q {
            let pattern = format!("%{}%", super::api::like_literal(v));
            add(
                "(t.title ILIKE ? OR t.text ILIKE ?)",
                ScalarValue::Utf8(Some(pattern)),
                &mut parts,
            );
        }
        if let Some(v) = &self.technique {
            let matched = technique_match("f", "?");
            add(
                &format!(
                    "EXISTS (SELECT 1 FROM mapped_threat_data f WHERE f.item_id = t.item_id \
                     AND f.item_version = t.item_version AND {matched})"
                ),
                s(v),
                &mut parts,
            );
        }
        parts.join(" AND ")
    }
}

/// The condition "the `mapped_threat_data` row aliased `alias` is of the technique in placeholder
/// `value`", where a parent technique includes its sub-techniques.
pub fn technique_match(alias: &str, value: &str) -> String {
    format!(
        "split_part({alias}.technique_id, '.', 1) = split_part({value}, '.', 1) \
         AND ({alias}.technique_id = {value} OR strpos({value}, '.') = 0)"
    )
}

/// `k=v&…`, form-encoded.
pub fn encode<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn with_query(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

/// A page that could not be shown: status and a message for people.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    /// 400 with `message`.
    pub fn bad(message: String) -> Self {
        PageError {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    /// 404 with `message`.
    pub fn not_found(message: &str) -> Self {
        PageError {
            status: StatusCode::NOT_FOUND,
            message: message.to_string(),
        }
    }

    fn from_sql(e: crate::sql::SqlError) -> Self {
        if e.is_out_of_memory() {
            return PageError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("{e}; narrow the filter"),
            };
        }
        match e {
            crate::sql::SqlError::Timeout { .. } => PageError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("{e}; narrow the filter"),
            },
            other => {
                tracing::error!("dashboard query failed: {other}");
                PageError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: "the lake could not be read; see the server log".into(),
                }
            }
        }
    }
}

/// Run one of the dashboard's own queries with its parameters on the query threads.
pub async fn query(
    state: &AppState,
    sql: String,
    params: Vec<ScalarValue>,
) -> Result<(SchemaRef, Vec<RecordBatch>), PageError> {
    let engine = state.engine();
    // The same query over the same table versions has the same answer.
    let key = PageCache::cacheable(&sql).then(|| PageCache::key(&sql, &params));
    if let Some(hit) = key
        .as_ref()
        .and_then(|k| state.page_cache.get(engine.versions(), k))
    {
        return Ok(hit);
    }
    let versions = key.as_ref().map(|_| engine.versions().clone());
    let limit = Duration::from_secs(state.settings.server.sql.timeout_secs.max(1));
    let work = async move {
        let df = engine.ctx.sql(&sql).await?;
        let df = if params.is_empty() {
            df
        } else {
            df.with_param_values(ParamValues::List(
                params.into_iter().map(Into::into).collect(),
            ))?
        };
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok::<_, datafusion::error::DataFusionError>((schema, batches))
    };
    match state.on_query_threads(limit, work).await {
        Ok(Ok(r)) => {
            if let (Some(k), Some(v)) = (key, versions) {
                state.page_cache.put(&v, k, &r);
            }
            Ok(r)
        }
        Ok(Err(e)) => Err(PageError::from_sql(e.into())),
        Err(super::QueryAborted::Timeout(secs)) => {
            Err(PageError::from_sql(crate::sql::SqlError::Timeout { secs }))
        }
        Err(super::QueryAborted::Failed(e)) => {
            tracing::error!("dashboard query failed: {e}");
            Err(PageError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "the query failed; see the server log".into(),
            })
        }
    }
}

/// [`query`] as JSON objects, one per row.
pub async fn rows(
    state: &AppState,
    sql: String,
    params: Vec<ScalarValue>,
) -> Result<Vec<serde_json::Value>, PageError> {
    let (_, batches) = query(state, sql, params).await?;
    super::api::rows_json(&batches).map_err(|e| {
        tracing::error!("encoding rows: {e}");
        PageError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "encoding the result failed; see the server log".into(),
        }
    })
}

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    // Every name ends in .html: auto-escaped.
    for (name, source) in [
        (
            "base.html",
            include_str!("../../../config/templates/dashboard/base.html.j2"),
        ),
        (
            "overview.html",
            include_str!("../../../config/templates/dashboard/overview.html.j2"),
        ),
        (
            "map.html",
            include_str!("../../../config/templates/dashboard/map.html.j2"),
        ),
        (
            "matrix.html",
            include_str!("../../../config/templates/dashboard/matrix.html.j2"),
        ),
        (
            "technique.html",
            include_str!("../../../config/templates/dashboard/technique.html.j2"),
        ),
        (
            "items.html",
            include_str!("../../../config/templates/dashboard/items.html.j2"),
        ),
        (
            "item.html",
            include_str!("../../../config/templates/dashboard/item.html.j2"),
        ),
        (
            "threat_model.html",
            include_str!("../../../config/templates/dashboard/threat_model.html.j2"),
        ),
        (
            "sql.html",
            include_str!("../../../config/templates/dashboard/sql.html.j2"),
        ),
        (
            "jobs.html",
            include_str!("../../../config/templates/dashboard/jobs.html.j2"),
        ),
        (
            "workbench.html",
            include_str!("../../../config/templates/dashboard/workbench.html.j2"),
        ),
        (
            "decided.html",
            include_str!("../../../config/templates/dashboard/decided.html.j2"),
        ),
        (
            "workbench_decided.html",
            include_str!("../../../config/templates/dashboard/workbench_decided.html.j2"),
        ),
        (
            "error.html",
            include_str!("../../../config/templates/dashboard/error.html.j2"),
        ),
    ] {
        env.add_template(name, source)
            .expect("shipped dashboard templates parse");
    }
    env
});

/// What every page shows around its content.
#[derive(Serialize)]
pub struct Frame {
    user: String,
    role: &'static str,
    csrf: String,
    page: &'static str,
    title: String,
    chips: Vec<Chip>,
    query: String,
    can_run: bool,
}

impl Frame {
    /// The frame of `page` for `p`, with the filter's chips when the page is filtered.
    pub fn new(
        state: &AppState,
        p: &Principal,
        page: &'static str,
        title: String,
        filter: Option<(&Filter, &str)>,
    ) -> Frame {
        let csrf = p
            .session
            .as_deref()
            .and_then(|id| state.sessions.get(id))
            .map(|s| s.csrf)
            .unwrap_or_default();
        Frame {
            user: p.name.clone(),
            role: p.role.as_str(),
            csrf,
            page,
            title,
            chips: filter.map(|(f, path)| f.chips(path)).unwrap_or_default(),
            query: filter.map(|(f, _)| f.query()).unwrap_or_default(),
            can_run: p.role >= super::auth::Role::Analyst,
        }
    }
}

/// Headers of every dashboard page.
pub fn harden(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Render `template` with the frame and the page's values.
pub fn render(template: &str, frame: Frame, ctx: minijinja::Value) -> Response {
    let out = TEMPLATES.get_template(template).and_then(|t| {
        t.render(minijinja::context! { frame => minijinja::Value::from_serialize(&frame), ..ctx })
    });
    let mut r = match out {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!("rendering {template}: {e:#}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the page failed",
            )
                .into_response()
        }
    };
    harden(&mut r);
    r
}

/// The error page.
pub fn error_page(state: &AppState, p: &Principal, e: PageError) -> Response {
    let frame = Frame::new(state, p, "", "Error".into(), None);
    let mut r = render(
        "error.html",
        frame,
        minijinja::context! { status => e.status.as_u16(), message => e.message },
    );
    *r.status_mut() = e.status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        let q = encode(pairs.iter().copied());
        serde_urlencoded_like(&q)
    }

    fn serde_urlencoded_like(q: &str) -> Params {
        axum::extract::Query::<Params>::try_from_uri(&format!("/x?{q}").parse().unwrap())
            .unwrap()
            .0
    }

    #[test]
    fn filter_values_become_parameters_never_sql_text() {
        let hostile = "x' OR 1=1; DROP TABLE otx_data; --";
        let f = Filter::parse(&params(&[
            ("family", hostile),
            ("q", "100%_done"),
            ("technique", "T1059.001"),
            ("since", "2024-01-01"),
        ]))
        .unwrap();
        let mut p = Vec::new();
        let cond = f.condition(&mut p);
        assert!(!cond.contains("DROP") && !cond.contains("100"), "{cond}");
        assert_eq!(p.len(), 4, "{cond}");
        assert!(p.contains(&ScalarValue::Utf8(Some(hostile.into()))));
        assert!(p.contains(&ScalarValue::Utf8(Some("%100\\%\\_done%".into()))));
        assert!(
            cond.contains("t.title ILIKE $3 OR t.text ILIKE $3"),
            "{cond}"
        );
        assert!(cond.contains("split_part($4, '.', 1)"), "{cond}");
    }

    #[test]
    fn bad_filter_values_are_refused_with_the_fix() {
        let e = Filter::parse(&params(&[("since", "last tuesday")])).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("YYYY-MM-DD"), "{}", e.message);
        let e = Filter::parse(&params(&[("technique", "<script>")])).unwrap_err();
        assert!(e.message.contains("T1234"), "{}", e.message);
    }

    #[test]
    fn links_keep_the_filter_and_encode_values() {
        let f = Filter::parse(&params(&[("family", "a&b=c"), ("source", "otx")])).unwrap();
        assert_eq!(f.query(), "source=otx&family=a%26b%3Dc");
        assert_eq!(
            f.link("/items", "country", Some("US")),
            "/items?source=otx&family=a%26b%3Dc&country=US"
        );
        assert_eq!(f.link("/", "family", None), "/?source=otx");
        let chips = f.chips("/map");
        assert_eq!(chips.len(), 2);
        assert_eq!(chips[1].drop, "/map?source=otx");
    }
}
