//! `threatlake serve`: the service — jobs on a cron schedule, the HTTP API under `/api/v1` with its
//! OpenAPI document, access control (API tokens, user sessions, roles, CSRF, login limits), audit
//! log, health and metrics, graceful shutdown. A thin layer over [`crate::pipeline`] and
//! [`crate::sql`].

pub mod api;
pub mod audit;
pub mod auth;
pub mod dashboard;
pub mod metrics;
mod pages;
pub mod schedule;
pub mod taxii;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::pipeline::{self, Job, JobReport, RunOptions, StageOutcome, StopFlag, Trigger};
use crate::sql::{Engine, EngineOptions};
use crate::{Lake, Settings};
use audit::{Audit, AuditRow};
use auth::{Principal, Role, Sessions, TokenRefusal, Verifier};

/// Errors starting or running the service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The bind address.
    #[error("--bind {addr}: {message}")]
    Bind {
        /// Address given.
        addr: String,
        /// Why.
        message: String,
    },
    /// TLS certificate or key.
    #[error("TLS: {0}; pass a PEM certificate chain with --tls-cert and its PEM private key with --tls-key")]
    Tls(String),
    /// Auth file.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// A schedule entry.
    #[error("schedule.jobs.{job}: {message}")]
    Schedule {
        /// Job name.
        job: String,
        /// Why.
        message: String,
    },
    /// The lake or SQL session.
    #[error(transparent)]
    Sql(#[from] crate::sql::SqlError),
    /// The lake.
    #[error(transparent)]
    Lake(#[from] crate::lake::LakeError),
    /// Serving failed.
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listen address (port 0: any free port; the address is printed).
    pub bind: String,
    /// PEM certificate chain and private key.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Allow plain HTTP on a non-loopback address.
    pub insecure_http: bool,
}

/// A job running now.
#[derive(Clone)]
pub struct Running {
    /// Run id.
    pub run_id: String,
    /// Who started it.
    pub trigger: Trigger,
    /// When.
    pub started: chrono::DateTime<chrono::Utc>,
    /// Stages finished so far.
    pub stages: Arc<Mutex<Vec<StageOutcome>>>,
}

/// Records stage outcomes of a running job and logs them.
struct JobObserver {
    job: Job,
    run_id: String,
    stages: Arc<Mutex<Vec<StageOutcome>>>,
}

impl pipeline::Observer for JobObserver {
    fn started(&self, stage: pipeline::Stage) {
        tracing::info!(job = %self.job, run = %self.run_id, %stage, "stage started");
    }
    fn note(&self, stage: pipeline::Stage, line: &str) {
        tracing::info!(job = %self.job, run = %self.run_id, %stage, "{line}");
    }
    fn finished(&self, o: &StageOutcome) {
        tracing::info!(job = %self.job, run = %self.run_id, stage = %o.stage, status = ?o.status, seconds = o.seconds, "{}", o.summary);
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(o.clone());
    }
}

/// Shared state of the service.
pub struct AppState {
    /// Settings.
    pub settings: Settings,
    engine: RwLock<Arc<Engine>>,
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    /// Queries run on their own threads, so a CPU-heavy query cannot starve request handling,
    /// health checks or the timers that end it.
    query_rt: tokio::runtime::Handle,
    verifier: Verifier,
    sessions: Sessions,
    limiter: auth::LoginLimiter,
    /// Metrics.
    pub metrics: metrics::Metrics,
    audit: Audit,
    running: Mutex<HashMap<Job, Running>>,
    tasks: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    stop: StopFlag,
    tls: bool,
    /// Answers of the dashboard's own queries for the current lake snapshot.
    pub(crate) page_cache: dashboard::PageCache,
}

impl AppState {
    /// The current SQL session (re-opened after jobs and every `server.refresh_secs`).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn refresh(&self) -> Result<(), crate::sql::SqlError> {
        let e = open_engine(&self.settings, &self.runtime).await?;
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(e);
        Ok(())
    }

    fn lake(&self) -> Lake {
        self.engine().lake.clone()
    }

    /// Run `work` (DataFusion execution) on the query threads; it is aborted after `limit`.
    pub async fn on_query_threads<T: Send + 'static>(
        &self,
        limit: Duration,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, QueryAborted> {
        let h = self.query_rt.spawn(work);
        let abort = h.abort_handle();
        match tokio::time::timeout(limit, h).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(QueryAborted::Failed(e.to_string())),
            Err(_) => {
                abort.abort();
                Err(QueryAborted::Timeout(limit.as_secs()))
            }
        }
    }

    /// The job running now, if any.
    pub fn running(&self, job: Job) -> Option<Running> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&job)
            .cloned()
    }

    /// Every running job.
    pub fn all_running(&self) -> Vec<(Job, Running)> {
        let m = self.running.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(j, r)| (*j, r.clone())).collect()
    }
}

/// A query that did not finish on the query threads.
#[derive(Debug)]
pub enum QueryAborted {
    /// Ran past its limit (seconds) and was stopped.
    Timeout(u64),
    /// Panicked or was cancelled.
    Failed(String),
}

/// Why a job did not start.
#[derive(Debug)]
pub enum StartError {
    /// The previous run is still going (its run id); the skip was recorded.
    Busy(String),
    /// The service is shutting down.
    ShuttingDown,
}

/// Start `job` in the background unless a run of it is still going (single flight). A skip is
/// recorded in `job_runs`.
pub async fn start_job(
    state: &Arc<AppState>,
    job: Job,
    trigger: Trigger,
) -> Result<String, StartError> {
    if state.stop.requested() {
        return Err(StartError::ShuttingDown);
    }
    let run_id = pipeline::new_run_id();
    let stages = Arc::new(Mutex::new(Vec::new()));
    let busy = {
        let mut m = state.running.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&job) {
            Some(r) => Some(r.run_id.clone()),
            None => {
                m.insert(
                    job,
                    Running {
                        run_id: run_id.clone(),
                        trigger,
                        started: chrono::Utc::now(),
                        stages: stages.clone(),
                    },
                );
                None
            }
        }
    };
    if let Some(busy) = busy {
        let why = format!("skipped: run {busy} of {job} was still going");
        tracing::warn!(%job, trigger = trigger.as_str(), "{why}");
        let row = pipeline::JobRun::skipped(job, trigger, chrono::Utc::now(), &why);
        if let Err(e) = pipeline::runs::record(&state.lake(), &row).await {
            tracing::warn!("recording the skipped run: {e}");
        }
        return Err(StartError::Busy(busy));
    }
    let st = state.clone();
    let id = run_id.clone();
    let mut tasks = state.tasks.lock().await;
    // Reap finished runs so the set does not grow with uptime.
    while tasks.try_join_next().is_some() {}
    tasks.spawn(async move {
        let observer = JobObserver {
            job,
            run_id: id.clone(),
            stages,
        };
        let options = RunOptions {
            stop: st.stop.clone(),
            ..Default::default()
        };
        tracing::info!(%job, run = %id, trigger = trigger.as_str(), "job started");
        match pipeline::run_job(&st.settings, job, &id, trigger, &options, &observer).await {
            Ok(report) => finished(&st, &report),
            Err(e) => tracing::error!(%job, run = %id, "recording the run in job_runs failed: {e}"),
        }
        if let Err(e) = st.refresh().await {
            tracing::warn!("re-reading the lake after {job}: {e}");
        }
        st.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job);
    });
    Ok(run_id)
}

fn finished(state: &AppState, r: &JobReport) {
    let status = match (&r.error, r.stopped) {
        (None, _) => "ok",
        (Some(_), true) => "stopped",
        (Some(_), false) => "failed",
    };
    state.metrics.job(r, status);
    match &r.error {
        None => tracing::info!(job = %r.job, run = %r.run_id, seconds = r.seconds, "job finished"),
        Some(e) => tracing::warn!(job = %r.job, run = %r.run_id, "job {status}: {e}"),
    }
}

/// One memory pool for every session the server opens (sessions are re-opened on refresh; queries
/// on the old and the new one share the pool).
fn runtime(
    settings: &Settings,
) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>, crate::sql::SqlError> {
    crate::sql::bounded_runtime(settings.server.sql.memory_mb)
}

async fn open_engine(
    settings: &Settings,
    runtime: &Arc<datafusion::execution::runtime_env::RuntimeEnv>,
) -> Result<Engine, crate::sql::SqlError> {
    let lake = Lake::from_settings(&settings.lake)?;
    let mut options = EngineOptions::from_settings(settings);
    options.runtime = Some(runtime.clone());
    Engine::open_with(&lake, &options).await
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serve until SIGTERM/SIGINT; then stop taking requests, let running jobs reach a safe point
/// (at most `server.shutdown_grace_secs`), release locks, flush the audit log, return. The bound
/// address is printed once listening.
pub async fn serve(settings: Settings, options: ServeOptions) -> Result<(), ServerError> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    serve_until(settings, options, wait_for_signal(), move |a| {
        println!("threatlake serve: listening on {scheme}://{a}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
    .await
}

/// [`serve`] until `stop` completes, telling `listening` the bound address (benchmarks, embedding).
pub async fn serve_until(
    settings: Settings,
    options: ServeOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr) + Send + 'static,
) -> Result<(), ServerError> {
    let addr: SocketAddr = tokio::net::lookup_host(&options.bind)
        .await
        .map_err(|e| ServerError::Bind {
            addr: options.bind.clone(),
            message: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ServerError::Bind {
            addr: options.bind.clone(),
            message: "resolves to no address".into(),
        })?;
    if options.tls.is_none() && !is_loopback(&addr) && !options.insecure_http {
        return Err(ServerError::Bind {
            addr: options.bind.clone(),
            message: "refusing plain HTTP on a non-loopback address: sessions and tokens would cross the network in clear. Pass --tls-cert and --tls-key, or --insecure-http behind a TLS-terminating proxy".into(),
        });
    }
    let schedules = schedule::parse(&settings.schedule)?;
    let verifier = Verifier::new(&settings.server.auth_file)?;
    let runtime = runtime(&settings)?;
    let query_rt = tokio::runtime::Builder::new_multi_thread()
        // Twice the cores: a query runs about one task per core (target_partitions), and some
        // operators (cross joins) produce output without yielding, so one runaway query must not
        // hold every query thread while it waits for its abort.
        .worker_threads(2 * std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name("threatlake-query")
        .enable_all()
        .build()?;
    let engine = open_engine(&settings, &runtime).await?;
    let lake = engine.lake.clone();
    let s = &settings.server;
    let state = Arc::new(AppState {
        sessions: Sessions::new(
            Duration::from_secs(s.session.idle_minutes.max(1) * 60),
            Duration::from_secs(s.session.max_hours.max(1) * 3600),
        ),
        limiter: auth::LoginLimiter::new(
            s.login.max_failures,
            Duration::from_secs(s.login.window_minutes.max(1) * 60),
        ),
        verifier,
        metrics: metrics::Metrics::default(),
        audit: Audit::new(lake),
        running: Mutex::new(HashMap::new()),
        tasks: tokio::sync::Mutex::new(tokio::task::JoinSet::new()),
        stop: StopFlag::default(),
        tls: options.tls.is_some(),
        page_cache: dashboard::PageCache::new(settings.server.page_cache_mb << 20),
        engine: RwLock::new(Arc::new(engine)),
        runtime,
        query_rt: query_rt.handle().clone(),
        settings: settings.clone(),
    });
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let (quit_tx, quit_rx) = tokio::sync::watch::channel(false);

    // Background: audit flushes, lake refresh, the schedule.
    let bg = {
        let st = state.clone();
        let mut quit = quit_rx.clone();
        tokio::spawn(async move {
            let flush = Duration::from_secs(st.settings.server.audit_flush_secs.max(1));
            let refresh = Duration::from_secs(st.settings.server.refresh_secs.max(1));
            let mut last_refresh = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(flush) => {}
                    _ = quit.changed() => break,
                }
                if let Err(e) = st.audit.flush().await {
                    tracing::warn!("audit log flush failed (rows kept for the next try): {e}");
                }
                if last_refresh.elapsed() >= refresh {
                    last_refresh = Instant::now();
                    if let Err(e) = st.refresh().await {
                        tracing::warn!("re-reading the lake: {e}");
                    }
                }
            }
        })
    };
    let sched = tokio::spawn(schedule::run(state.clone(), schedules, quit_rx.clone()));

    // Signals: stop accepting, tell jobs to stop at their next safe point.
    {
        let handle = handle.clone();
        let st = state.clone();
        tokio::spawn(async move {
            stop.await;
            tracing::info!(
                "shutting down: no new requests; running jobs stop at their next safe point"
            );
            st.stop.request();
            let _ = quit_tx.send(true);
            handle.graceful_shutdown(Some(Duration::from_secs(10)));
        });
    }
    // Say the bound address (port 0 picks one) once listening.
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            if let Some(a) = handle.listening().await {
                listening(a);
            }
        });
    }
    match &options.tls {
        Some((cert, key)) => {
            // The same provider the rest of the build (reqwest, delta-rs) links; already set is fine.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| {
                    ServerError::Tls(format!("{} / {}: {e}", cert.display(), key.display()))
                })?;
            axum_server::bind_rustls(addr, config)
                .handle(handle)
                .serve(app)
                .await?
        }
        None => axum_server::bind(addr).handle(handle).serve(app).await?,
    }
    // Requests are done; wait for jobs to reach a safe point.
    let grace = Duration::from_secs(settings.server.shutdown_grace_secs);
    let mut tasks = std::mem::take(&mut *state.tasks.lock().await);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            "jobs still running after {} s (server.shutdown_grace_secs): stopping them; each stage commits atomically, so the lake keeps the stages before",
            grace.as_secs()
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        release_own_locks(&state.lake()).await;
    }
    sched.abort();
    let _ = bg.await;
    if let Err(e) = state.audit.flush().await {
        tracing::error!("audit log: the last rows could not be written: {e}");
    }
    query_rt.shutdown_background();
    tracing::info!("stopped");
    Ok(())
}

/// Remove the writer locks this process holds (after aborting a job that held them).
async fn release_own_locks(lake: &Lake) {
    let me = std::process::id();
    let host = crate::lake::lock::host();
    if let Ok(locks) = lake.location.locks().await {
        for h in locks {
            if h.pid == me && h.host == host {
                let _ = lake.location.unlock(&h.name).await;
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The router: pages, health, metrics, the API.
pub fn router(state: Arc<AppState>) -> axum::Router {
    use axum::routing::{get, post};
    let max_body = state.settings.server.max_body_kb.max(1) << 10;
    axum::Router::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .merge(dashboard::routes())
        .nest("/api/v1", api::routes())
        .merge(taxii::routes())
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The role a route needs; None: anonymous.
fn required_role(method: &Method, route: &str) -> Option<Role> {
    match (method.as_str(), route) {
        (_, "/healthz" | "/readyz" | "/login" | "/assets/{file}" | "/favicon.ico") => None,
        ("POST", "/api/v1/runs" | "/jobs" | "/workbench/feedback") => Some(Role::Analyst),
        (_, r) if r.starts_with("/api/v1/auth/") => Some(Role::Admin),
        _ => Some(Role::Reader),
    }
}

/// A page for people (the dashboard), as opposed to the API, TAXII and metrics: without a session
/// it sends the browser to the sign-in page.
fn is_page(route: &str) -> bool {
    !(route.starts_with("/api/")
        || route.starts_with("/taxii2/")
        || route == "/metrics"
        || route == "(unmatched)")
}

/// The session cookie's name (`__Host-` prefix under TLS).
pub fn cookie_name(tls: bool) -> &'static str {
    if tls {
        "__Host-threatlake_session"
    } else {
        "threatlake_session"
    }
}

fn session_id(headers: &HeaderMap, tls: bool) -> Option<String> {
    let name = cookie_name(tls);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

/// What a handler adds to the audit row (the SQL text of `/sql`, a login event).
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    /// SQL text.
    pub sql: Option<String>,
    /// Event name.
    pub event: Option<String>,
    /// The user name a login tried.
    pub who: Option<String>,
}

/// The client address of a request.
fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// Authentication, authorisation, CSRF, then metrics and the audit row for every request.
async fn guard(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let t = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "(unmatched)".to_string());
    let path = req.uri().path().to_string();
    let client = client_ip(&req);
    let mut principal: Option<Principal> = None;
    let mut event = None;
    // Anonymous routes (health, sign-in) answer whatever credentials come along.
    let auth = match required_role(&method, &route) {
        None => Ok(None),
        Some(_) => authenticate(&state, &req),
    };
    let response = match auth {
        Err((status, refusal)) => {
            event = Some(refusal.to_string());
            api::error(status, refusal, "send `Authorization: Bearer <token>` (see `threatlake auth token create`) or sign in at /login").into_response()
        }
        Ok(p) => {
            let need = required_role(&method, &route);
            match (&p, need) {
                (_, None) => {
                    principal = p;
                    next.run(req).await
                }
                (None, Some(_)) => {
                    if method == Method::GET && is_page(&route) {
                        axum::response::Redirect::to("/login").into_response()
                    } else {
                        api::error(
                            StatusCode::UNAUTHORIZED,
                            "unauthenticated",
                            "send `Authorization: Bearer <token>` or sign in at /login",
                        )
                        .into_response()
                    }
                }
                (Some(p), Some(role)) if p.role < role => {
                    principal = Some(p.clone());
                    api::error(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        &format!(
                            "this needs the {} role; you have {}",
                            role.as_str(),
                            p.role.as_str()
                        ),
                    )
                    .into_response()
                }
                (Some(p), Some(_)) => {
                    let p = p.clone();
                    let csrf_ok = csrf_ok(&state, &p, &method, &route, req.headers());
                    principal = Some(p.clone());
                    if !csrf_ok {
                        event = Some("csrf_refused".to_string());
                        api::error(StatusCode::FORBIDDEN, "csrf", "state-changing requests from a browser session need the X-CSRF-Token header (GET /api/v1/session gives it)").into_response()
                    } else {
                        req.extensions_mut().insert(p);
                        next.run(req).await
                    }
                }
            }
        }
    };
    let status = response.status();
    let note = response
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_default();
    state.metrics.request(
        method.as_str(),
        &route,
        status.as_u16(),
        t.elapsed().as_secs_f64(),
    );
    // Health probes and the dashboard's static files would only flood the audit log.
    if !matches!(
        route.as_str(),
        "/healthz" | "/readyz" | "/assets/{file}" | "/favicon.ico"
    ) {
        state.audit.push(AuditRow {
            at: crate::feeds::fixed(chrono::Utc::now()),
            who: note
                .who
                .clone()
                .or_else(|| principal.as_ref().map(|p| p.name.clone()))
                .unwrap_or_default(),
            role: principal.as_ref().map(|p| p.role.as_str().to_string()),
            method: method.to_string(),
            route,
            path,
            status: status.as_u16() as i32,
            client: client.to_string(),
            sql: note.sql,
            event: note
                .event
                .or(event)
                .unwrap_or_else(|| "request".to_string()),
        });
    }
    response
}

/// Who the request is: a bearer token, a session cookie, or nobody. A bad token is an error
/// (401); a stale cookie is nobody.
fn authenticate(
    state: &AppState,
    req: &Request<Body>,
) -> Result<Option<Principal>, (StatusCode, &'static str)> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or_default();
        if let Some(basic) = v.strip_prefix("Basic ") {
            return basic_auth(state, req, basic.trim()).map(Some);
        }
        let token = v
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or((StatusCode::UNAUTHORIZED, "invalid_token"))?;
        return match state.verifier.token(token) {
            Ok(p) => Ok(Some(p)),
            Err(TokenRefusal::Unknown) => Err((StatusCode::UNAUTHORIZED, "invalid_token")),
            Err(TokenRefusal::Revoked) => Err((StatusCode::UNAUTHORIZED, "token_revoked")),
            Err(TokenRefusal::Expired) => Err((StatusCode::UNAUTHORIZED, "token_expired")),
        };
    }
    Ok(session_id(req.headers(), state.tls).and_then(|id| {
        state.sessions.get(&id).map(|s| Principal {
            name: s.user,
            role: s.role,
            session: Some(id),
        })
    }))
}

/// HTTP Basic, as TAXII clients send credentials: a user's name and password, or any name with an
/// API token as the password. Failed passwords count against the sign-in limit.
fn basic_auth(
    state: &AppState,
    req: &Request<Body>,
    value: &str,
) -> Result<Principal, (StatusCode, &'static str)> {
    use base64::Engine as _;
    let refused = (StatusCode::UNAUTHORIZED, "invalid_credentials");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(refused)?;
    let (user, password) = decoded.split_once(':').ok_or(refused)?;
    if let Ok(p) = state.verifier.token(password) {
        return Ok(p);
    }
    let ip = client_ip(req);
    if state.limiter.blocked(user, ip) {
        return Err((StatusCode::TOO_MANY_REQUESTS, "too_many_failures"));
    }
    match state.verifier.password(user, password) {
        Some(role) => {
            state.limiter.succeed(user);
            Ok(Principal {
                name: user.to_string(),
                role,
                session: None,
            })
        }
        None => {
            state.limiter.fail(user, ip);
            Err(refused)
        }
    }
}

/// Tokens are not sent by browsers on their own, so only session requests need the CSRF token;
/// reads (GET/HEAD) never change state. `/logout` checks its form field itself.
fn csrf_ok(
    state: &AppState,
    p: &Principal,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
) -> bool {
    let Some(id) = &p.session else {
        return true;
    };
    if matches!(*method, Method::GET | Method::HEAD) || dashboard::FORM_CSRF_ROUTES.contains(&route)
    {
        return true;
    }
    headers
        .get("x-csrf-token")
        .is_some_and(|v| state.sessions.csrf_matches(id, v.as_bytes()))
}
