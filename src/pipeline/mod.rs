//! The main job as library code: jobs made of stages (ATT&CK refresh, OTX, VirusTotal, model, map,
//! threat-model snapshot, reports), each reported through an [`Observer`] (the CLI draws progress
//! bars, the server records events) and every job run recorded in the lake table `job_runs`.

pub mod attack_release;
pub mod runs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::attack::{IngestError, IngestOptions, IngestReport};
use crate::feeds::http::FeedClient;
use crate::feeds::{intel, otx, taxii, vt, FeedError};
use crate::lake::{Lake, LakeError, Location};
use crate::mapping::MappingError;
use crate::reports::ReportError;
use crate::sql::{Engine, EngineOptions, SqlError};
use crate::{Domain, Settings};

pub use runs::{JobRun, RunStatus, Trigger};

/// Errors of a stage or a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The lake.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// A query the stage needed.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// OTX, VirusTotal, samples, mapping into the lake.
    #[error(transparent)]
    Feed(#[from] FeedError),
    /// An ATT&CK bundle.
    #[error("ingest of ATT&CK from {source_name} failed: {source}; the lake's current ATT&CK is unchanged (a release becomes current only when its version row lands, last); re-run to finish")]
    Attack {
        /// Bundle path or URL.
        source_name: String,
        /// Why (boxed: ingest errors are large).
        source: Box<IngestError>,
    },
    /// The release index of ATT&CK.
    #[error("ATT&CK release index {url}: {message}; check attack.index in config/settings.yaml and the network")]
    Index {
        /// Index URL or path.
        url: String,
        /// Why.
        message: String,
    },
    /// Building the mapping model.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// Reports.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A feed without its key.
    #[error("no {service} API key: set {env} (or put it in config/secrets.yaml)")]
    NoKey {
        /// OTX or VirusTotal.
        service: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// Offline with nothing to work on.
    #[error("offline: the lake has no ATT&CK release; run `threatlake ingest attack --from BUNDLE` first")]
    OfflineWithoutAttack,
    /// A setting the job needs is wrong.
    #[error("{setting}: {message}")]
    Setting {
        /// `section.key`.
        setting: String,
        /// What is wrong and the fix.
        message: String,
    },
    /// Stopped at a safe point (the service is shutting down).
    #[error("stopped before the {stage} stage: the service is shutting down; the stages before it are stored, the next run continues")]
    Stopped {
        /// The stage not started.
        stage: Stage,
    },
    /// Pushing to the integrations failed as a whole (the lake, not a target).
    #[error(transparent)]
    Push(#[from] crate::integrations::IntegrationError),
    /// Some targets stopped on an error; the others were served.
    #[error("{0}")]
    Targets(String),
    /// Some stages failed; the others ran.
    #[error("{failed} stage(s) failed ({names}); what they stored before failing is kept, re-run to continue")]
    StagesFailed {
        /// How many.
        failed: usize,
        /// Which.
        names: String,
    },
}

/// One step of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// ATT&CK: ingest a release newer than the lake's (or the first one).
    Attack,
    /// Recorded sample feed responses (`run --samples`).
    Samples,
    /// AlienVault OTX pulses.
    Otx,
    /// VirusTotal lookups.
    Virustotal,
    /// TAXII 2.1 collections (`taxii.collections`).
    Taxii,
    /// The mapping model of the lake's current ATT&CK release (built when missing or older).
    Model,
    /// Map new items to techniques.
    Map,
    /// Snapshot the threat model.
    Snapshot,
    /// Deliver new mappings to the configured SIEM/SOAR targets.
    Push,
    /// Write the report datasets.
    Reports,
}

impl Stage {
    /// Its name in `job_runs`, logs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Attack => "attack",
            Stage::Samples => "samples",
            Stage::Otx => "otx",
            Stage::Virustotal => "virustotal",
            Stage::Taxii => "taxii",
            Stage::Model => "model",
            Stage::Map => "map",
            Stage::Snapshot => "snapshot",
            Stage::Push => "push",
            Stage::Reports => "reports",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job: what `run`, the schedule and `POST /runs` start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// The main job: every stage.
    Run,
    /// ATT&CK only (a newer release, if MITRE published one).
    IngestAttack,
    /// OTX only.
    IngestOtx,
    /// VirusTotal only.
    IngestVt,
    /// The configured TAXII collections only.
    IngestTaxii,
    /// Model (if needed) and mapping of new items.
    Map,
    /// Threat-model snapshot.
    Snapshot,
    /// Report datasets.
    Report,
    /// Deliver new mappings to the `integrations:` targets.
    Push,
}

impl Job {
    /// Every job, in help order.
    pub const ALL: [Job; 9] = [
        Job::Run,
        Job::IngestAttack,
        Job::IngestOtx,
        Job::IngestVt,
        Job::IngestTaxii,
        Job::Map,
        Job::Snapshot,
        Job::Report,
        Job::Push,
    ];

    /// Its name in settings (`schedule.jobs`), the API and `job_runs`.
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Run => "run",
            Job::IngestAttack => "ingest_attack",
            Job::IngestOtx => "ingest_otx",
            Job::IngestVt => "ingest_vt",
            Job::IngestTaxii => "ingest_taxii",
            Job::Map => "map",
            Job::Snapshot => "snapshot",
            Job::Report => "report",
            Job::Push => "push",
        }
    }

    /// Parse a job name.
    pub fn parse(name: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.as_str() == name)
    }

    /// Every job name, comma-separated (for error messages).
    pub fn names() -> String {
        Job::ALL.map(Job::as_str).join(", ")
    }

    /// Its stages, in order.
    pub fn stages(self, options: &RunOptions) -> Vec<Stage> {
        match self {
            Job::Run => {
                let mut s = vec![Stage::Attack];
                if options.samples.is_some() {
                    s.push(Stage::Samples);
                }
                s.extend([
                    Stage::Otx,
                    Stage::Virustotal,
                    Stage::Taxii,
                    Stage::Model,
                    Stage::Map,
                    Stage::Snapshot,
                    Stage::Push,
                ]);
                if options.reports {
                    s.push(Stage::Reports);
                }
                s
            }
            Job::IngestAttack => vec![Stage::Attack],
            Job::IngestOtx => vec![Stage::Otx],
            Job::IngestVt => vec![Stage::Virustotal],
            Job::IngestTaxii => vec![Stage::Taxii],
            Job::Map => vec![Stage::Model, Stage::Map],
            Job::Snapshot => vec![Stage::Snapshot],
            Job::Report => vec![Stage::Reports],
            Job::Push => vec![Stage::Push],
        }
    }
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// It ran and stored what it had.
    Ok,
    /// Nothing to do (no key, offline, already current).
    Skipped,
    /// It failed; later stages still ran unless they needed it.
    Failed,
}

/// The outcome of one stage: what it counted, how long it took, one line for people.
#[derive(Debug, Clone, Serialize)]
pub struct StageOutcome {
    /// Which stage.
    pub stage: Stage,
    /// How it ended.
    pub status: StageStatus,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Rows written or items handled, by name (`pulses`, `items`, `techniques`…).
    pub counts: BTreeMap<String, u64>,
    /// One line for a person.
    pub summary: String,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// Receives progress of a job. Every method has a no-op default.
pub trait Observer: Send + Sync {
    /// A stage starts.
    fn started(&self, _stage: Stage) {}
    /// A stage says what it is doing now (a spinner message).
    fn progress(&self, _stage: Stage, _message: &str) {}
    /// A line worth keeping (a release ingested, a warning).
    fn note(&self, _stage: Stage, _line: &str) {}
    /// A stage ended.
    fn finished(&self, _outcome: &StageOutcome) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Asks a running job to stop at its next safe point (between stages; every stage commits
/// atomically, so stopping there leaves no half-written stage).
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Ask to stop.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Was stopping asked for?
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Options of a job run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No network: use what the lake and raw store hold.
    pub offline: bool,
    /// Also load recorded sample feed responses from this directory.
    pub samples: Option<PathBuf>,
    /// `run` also writes the reports (the `report` job always does).
    pub reports: bool,
    /// Stop between stages when set.
    pub stop: StopFlag,
}

/// What a job run did.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// Its id (sortable by start time).
    pub run_id: String,
    /// The job.
    pub job: Job,
    /// Stage outcomes, in order.
    pub stages: Vec<StageOutcome>,
    /// The job's error (a fatal stage, a stop, or failed stages).
    pub error: Option<String>,
    /// Stopped at a safe point (shutdown) rather than failed.
    pub stopped: bool,
    /// Seconds in all.
    pub seconds: f64,
}

/// Everything the stages share.
pub struct Context<'a> {
    /// Settings.
    pub settings: &'a Settings,
    /// The lake.
    pub lake: Lake,
    /// The raw store.
    pub raw: Location,
    /// Progress receiver.
    pub observer: &'a dyn Observer,
}

impl<'a> Context<'a> {
    /// Open the lake and raw store of `settings`.
    pub fn open(settings: &'a Settings, observer: &'a dyn Observer) -> Result<Self, PipelineError> {
        Ok(Self {
            settings,
            lake: Lake::from_settings(&settings.lake)?,
            raw: crate::lake::raw_from_settings(&settings.lake)?,
            observer,
        })
    }

    /// Run `work` holding the writer locks `names` (released whether it succeeds or not).
    pub async fn locked<T>(
        &self,
        names: &[&str],
        purpose: &str,
        work: impl std::future::Future<Output = Result<T, PipelineError>>,
    ) -> Result<T, PipelineError> {
        let ttl = crate::lake::lock_ttl(&self.settings.lake);
        self.lake
            .location
            .with_locks(names, purpose, ttl, work)
            .await
    }

    async fn engine(&self) -> Result<Engine, PipelineError> {
        Ok(Engine::open_with(&self.lake, &EngineOptions::from_settings(self.settings)).await?)
    }
}

/// What a stage function returns: counts and one summary line, or `skipped` with the reason.
struct Done {
    status: StageStatus,
    counts: BTreeMap<String, u64>,
    summary: String,
}

impl Done {
    fn ok(summary: String, counts: &[(&str, usize)]) -> Self {
        Self {
            status: StageStatus::Ok,
            counts: counts
                .iter()
                .map(|(k, v)| (k.to_string(), *v as u64))
                .collect(),
            summary,
        }
    }
    fn skipped(summary: impl Into<String>) -> Self {
        Self {
            status: StageStatus::Skipped,
            counts: BTreeMap::new(),
            summary: summary.into(),
        }
    }
}

/// Run `job` now and record it in `job_runs` (trigger says who started it). The report is returned
/// whether the job succeeded or not; a failed job also has `error` set. Only a failure to record
/// the run is an `Err`.
pub async fn run_job(
    settings: &Settings,
    job: Job,
    run_id: &str,
    trigger: Trigger,
    options: &RunOptions,
    observer: &dyn Observer,
) -> Result<JobReport, PipelineError> {
    let started = chrono::Utc::now();
    let report = execute(settings, job, run_id, options, observer).await;
    let finished = chrono::Utc::now();
    let lake = Lake::from_settings(&settings.lake)?;
    runs::record(
        &lake,
        &JobRun::from_report(&report, trigger, started, finished),
    )
    .await?;
    Ok(report)
}

/// A new run id: UTC start time plus a random suffix (sortable).
pub fn new_run_id() -> String {
    crate::feeds::new_batch_id(chrono::Utc::now())
}

/// Run the stages of `job` (not recorded; [`run_job`] records).
pub async fn execute(
    settings: &Settings,
    job: Job,
    run_id: &str,
    options: &RunOptions,
    observer: &dyn Observer,
) -> JobReport {
    let t = Instant::now();
    let mut stages = Vec::new();
    let (error, stopped) = match Context::open(settings, observer) {
        Err(e) => (Some(e.to_string()), false),
        Ok(cx) => match run_stages(&cx, job, options, &mut stages).await {
            Ok(()) => (None, false),
            Err(e) => (
                Some(e.to_string()),
                matches!(e, PipelineError::Stopped { .. }),
            ),
        },
    };
    JobReport {
        run_id: run_id.to_string(),
        job,
        stages,
        error,
        stopped,
        seconds: t.elapsed().as_secs_f64(),
    }
}

async fn run_stages(
    cx: &Context<'_>,
    job: Job,
    options: &RunOptions,
    out: &mut Vec<StageOutcome>,
) -> Result<(), PipelineError> {
    for stage in job.stages(options) {
        if options.stop.requested() {
            return Err(PipelineError::Stopped { stage });
        }
        cx.observer.started(stage);
        let t = Instant::now();
        let r = run_stage(cx, stage, options).await;
        let seconds = t.elapsed().as_secs_f64();
        let outcome = StageOutcome {
            stage,
            status: r.as_ref().map_or(StageStatus::Failed, |d| d.status),
            seconds,
            counts: r.as_ref().map(|d| d.counts.clone()).unwrap_or_default(),
            summary: match &r {
                Ok(d) => d.summary.clone(),
                Err(_) => format!("{stage}: failed"),
            },
            error: r.as_ref().err().map(|e| e.to_string()),
        };
        cx.observer.finished(&outcome);
        out.push(outcome);
        // Feeds and reports fail alone (the other feed and the later stages still run on what is
        // stored); anything else stops the job, since later stages depend on it.
        if let Err(e) = r {
            if !matches!(
                stage,
                Stage::Otx | Stage::Virustotal | Stage::Taxii | Stage::Reports | Stage::Push
            ) {
                return Err(e);
            }
        }
    }
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| o.status == StageStatus::Failed)
        .map(|o| o.stage.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PipelineError::StagesFailed {
            failed: failed.len(),
            names: failed.join(", "),
        })
    }
}

async fn run_stage(
    cx: &Context<'_>,
    stage: Stage,
    options: &RunOptions,
) -> Result<Done, PipelineError> {
    match stage {
        Stage::Attack => attack_stage(cx, options.offline).await,
        Stage::Samples => {
            let dir = options
                .samples
                .as_deref()
                .unwrap_or(Path::new("data/samples"));
            samples_stage(cx, dir).await
        }
        Stage::Otx if options.offline => Ok(Done::skipped("OTX: offline, not contacted")),
        Stage::Otx => match otx_client(cx.settings)? {
            None => Ok(Done::skipped(format!(
                "OTX skipped: no API key ({} not set)",
                otx::KEY_ENV
            ))),
            Some(c) => ingest_otx(cx, &c).await.map(|r| otx_done(&r)),
        },
        Stage::Virustotal if options.offline => {
            Ok(Done::skipped("VirusTotal: offline, not contacted"))
        }
        Stage::Virustotal => match vt_client(cx.settings)? {
            None => Ok(Done::skipped(format!(
                "VirusTotal skipped: no API key ({} not set)",
                vt::KEY_ENV
            ))),
            Some(c) => ingest_vt(cx, &c, &[], &[]).await.map(|(r, _)| vt_done(&r)),
        },
        Stage::Taxii if options.offline => Ok(Done::skipped("TAXII: offline, not contacted")),
        Stage::Taxii if cx.settings.taxii.collections.is_empty() => Ok(Done::skipped(
            "TAXII skipped: no collections (taxii.collections)",
        )),
        Stage::Taxii => {
            let reports = ingest_taxii(cx, &cx.settings.taxii.collections, None).await?;
            Ok(taxii_done(&reports))
        }
        Stage::Model => model_stage(cx).await,
        Stage::Map => map_intel(cx).await.map(|r| map_done(cx.settings, &r)),
        Stage::Snapshot => snapshot(cx).await.map(|(run, n)| {
            Done::ok(
                format!("threat model {run}: {n} technique(s)"),
                &[("techniques", n)],
            )
        }),
        Stage::Push => push_stage(cx, options).await,
        Stage::Reports => {
            let r = crate::reports::batch::write_all(
                cx.settings,
                &crate::reports::batch::BatchOptions::from_settings(cx.settings),
                &|m: &str| cx.observer.progress(Stage::Reports, m),
            )
            .await?;
            Ok(Done::ok(
                format!("{} report(s) written to {}", r.reports, r.out_dir.display()),
                &[("reports", r.reports), ("files", r.files)],
            ))
        }
    }
}

/// Deliver what is new to every enabled target (skipped when none is configured or offline).
async fn push_stage(cx: &Context<'_>, options: &RunOptions) -> Result<Done, PipelineError> {
    if !cx.settings.integrations.iter().any(|t| t.enabled) {
        return Ok(Done::skipped("push: no integrations configured"));
    }
    if options.offline {
        return Ok(Done::skipped("push: offline, no target contacted"));
    }
    let r = crate::integrations::push(
        cx.settings,
        &cx.lake,
        &crate::integrations::PushOptions::default(),
        &|m: &str| cx.observer.progress(Stage::Push, m),
    )
    .await?;
    let sum = |f: fn(&crate::integrations::TargetReport) -> usize| -> usize {
        r.targets.iter().map(f).sum()
    };
    let summary = r
        .targets
        .iter()
        .map(push_line)
        .collect::<Vec<_>>()
        .join("; ");
    for t in &r.targets {
        if let Some(e) = &t.error {
            cx.observer.note(Stage::Push, &format!("{}: {e}", t.name));
        }
    }
    if r.any_failed() {
        return Err(PipelineError::Targets(format!("push: {summary}")));
    }
    Ok(Done::ok(
        format!("push: {summary}"),
        &[
            ("queued", sum(|t| t.queued)),
            ("delivered", sum(|t| t.delivered)),
            ("failed", sum(|t| t.failed)),
            ("dead", sum(|t| t.dead)),
        ],
    ))
}

/// One target's push outcome in one phrase.
pub fn push_line(t: &crate::integrations::TargetReport) -> String {
    let mut s = format!("{} {} queued, {} delivered", t.name, t.queued, t.delivered);
    for (n, what) in [
        (t.failed, "failed"),
        (t.dead, "dead-lettered"),
        (t.waiting, "waiting"),
        (t.superseded, "superseded"),
    ] {
        if n > 0 {
            s.push_str(&format!(", {n} {what}"));
        }
    }
    if t.error.is_some() {
        s.push_str(" (stopped: target error)");
    }
    s
}

/// The OTX client, when a key is set.
pub fn otx_client(settings: &Settings) -> Result<Option<FeedClient>, PipelineError> {
    let Some(key) = settings.otx.api_key.expose() else {
        return Ok(None);
    };
    Ok(Some(FeedClient::new(
        "OTX",
        &settings.otx.base_url,
        "X-OTX-API-KEY",
        key,
        otx::KEY_ENV,
        settings.otx.http.policy(),
        None,
    )?))
}

/// The VirusTotal client, when a key is set.
pub fn vt_client(settings: &Settings) -> Result<Option<FeedClient>, PipelineError> {
    let Some(key) = settings.virustotal.api_key.expose() else {
        return Ok(None);
    };
    Ok(Some(FeedClient::new(
        "VirusTotal",
        &settings.virustotal.base_url,
        "x-apikey",
        key,
        vt::KEY_ENV,
        settings.virustotal.http.policy(),
        Some(settings.virustotal.requests_per_minute),
    )?))
}

/// The OTX client, or the error naming the key's variable.
pub fn require_otx(settings: &Settings) -> Result<FeedClient, PipelineError> {
    otx_client(settings)?.ok_or(PipelineError::NoKey {
        service: "OTX",
        env: otx::KEY_ENV,
    })
}

/// The VirusTotal client, or the error naming the key's variable.
pub fn require_vt(settings: &Settings) -> Result<FeedClient, PipelineError> {
    vt_client(settings)?.ok_or(PipelineError::NoKey {
        service: "VirusTotal",
        env: vt::KEY_ENV,
    })
}

/// Pull OTX pulses modified since the last run.
pub async fn ingest_otx(
    cx: &Context<'_>,
    client: &FeedClient,
) -> Result<otx::OtxReport, PipelineError> {
    let progress = |m: &str| cx.observer.progress(Stage::Otx, m);
    cx.locked(&["otx"], "ingest otx", async {
        Ok(otx::ingest(
            &cx.lake,
            &cx.raw,
            client,
            cx.settings.otx.page_size,
            &progress,
        )
        .await?)
    })
    .await
}

/// Pull each collection's objects added since its watermark (or since `added_after`). A collection
/// that fails stops the pull after the collections before it were stored.
pub async fn ingest_taxii(
    cx: &Context<'_>,
    collections: &[String],
    added_after: Option<String>,
) -> Result<Vec<taxii::TaxiiReport>, PipelineError> {
    let progress = |m: &str| cx.observer.progress(Stage::Taxii, m);
    cx.locked(&["taxii"], "ingest taxii", async {
        let mut out = Vec::new();
        for c in collections {
            let client = taxii::client(&cx.settings.taxii, c)?;
            out.push(
                taxii::ingest(
                    &cx.lake,
                    &cx.raw,
                    &client,
                    cx.settings.taxii.page_size,
                    added_after.clone(),
                    &progress,
                )
                .await?,
            );
        }
        Ok(out)
    })
    .await
}

fn taxii_done(reports: &[taxii::TaxiiReport]) -> Done {
    let mut lines = Vec::new();
    let sum = |f: fn(&taxii::TaxiiReport) -> usize| reports.iter().map(f).sum::<usize>();
    for r in reports {
        lines.push(format!(
            "TAXII {}: {} page(s), {} new or revised object(s) ({} report(s)/indicator(s)), {} unchanged; added_after {} → {}",
            r.collection,
            r.pages,
            r.objects,
            r.items,
            r.unchanged,
            r.added_after.as_deref().unwrap_or("(first run)"),
            r.watermark.as_deref().unwrap_or("-")
        ));
        if r.rejected > 0 {
            lines.push(rejected_line(
                "  TAXII",
                "object",
                r.rejected,
                &r.rejections,
            ));
        }
    }
    Done::ok(
        lines.join("\n"),
        &[
            ("collections", reports.len()),
            ("pages", sum(|r| r.pages)),
            ("objects", sum(|r| r.objects)),
            ("items", sum(|r| r.items)),
            ("rejected", sum(|r| r.rejected)),
        ],
    )
}

/// The TAXII reports as the lines `ingest taxii` prints.
pub fn taxii_summary(reports: &[taxii::TaxiiReport]) -> String {
    taxii_done(reports).summary
}

fn otx_done(r: &otx::OtxReport) -> Done {
    let mut summary = format!(
        "OTX: {} page(s), {} new or revised pulse(s), {} unchanged, {} indicator(s); modified_since {} → {}",
        r.pages,
        r.pulses,
        r.unchanged,
        r.indicators,
        r.since.as_deref().unwrap_or("(first run)"),
        r.watermark.as_deref().unwrap_or("-")
    );
    if let Some(w) = otx_rejections(r) {
        summary.push('\n');
        summary.push_str(&w);
    }
    Done::ok(
        summary,
        &[
            ("pages", r.pages),
            ("pulses", r.pulses),
            ("indicators", r.indicators),
            ("rejected", r.rejected),
        ],
    )
}

/// Look up the configured observables, `extra` ones, and indicators of the newest OTX pulses in
/// VirusTotal. `invalid` inputs (from an IOC file) are reported with the result.
pub async fn ingest_vt(
    cx: &Context<'_>,
    client: &FeedClient,
    extra: &[String],
    invalid: &[String],
) -> Result<(vt::VtReport, usize), PipelineError> {
    let settings = cx.settings;
    let mut all = settings.virustotal.observables.clone();
    all.extend(extra.iter().cloned());
    if settings.virustotal.enrich_from_otx > 0 {
        let engine = cx.engine().await?;
        all.extend(vt::otx_observables(&engine, settings.virustotal.enrich_from_otx).await?);
    }
    let quota = vt::Quota {
        daily_budget: settings.virustotal.daily_budget,
        cache_ttl_hours: settings.virustotal.cache_ttl_hours,
    };
    let progress = |m: &str| cx.observer.progress(Stage::Virustotal, m);
    let mut r = cx
        .locked(&["virustotal"], "ingest vt", async {
            Ok(vt::ingest(&cx.lake, &cx.raw, client, &all, quota, &progress).await?)
        })
        .await?;
    r.invalid.extend(invalid.iter().cloned());
    let n = all.len();
    Ok((r, n))
}

fn vt_done(r: &vt::VtReport) -> Done {
    let mut summary = format!(
        "VirusTotal: {} looked up ({} not found), {} fresh in the lake, {} deferred by the daily budget, {} technique row(s), {} request(s)",
        r.looked_up, r.not_found, r.cached, r.deferred, r.techniques, r.requests
    );
    if !r.invalid.is_empty() {
        summary.push_str(&format!(
            "\n  {} input(s) are not a hash, URL, domain or IP and were skipped, e.g. {:?}",
            r.invalid.len(),
            r.invalid[0]
        ));
    }
    Done::ok(
        summary,
        &[
            ("looked_up", r.looked_up),
            ("not_found", r.not_found),
            ("deferred", r.deferred),
            ("techniques", r.techniques),
            ("requests", r.requests as usize),
        ],
    )
}

/// The vt report as a stage outcome line (the `ingest vt` command prints it).
pub fn vt_summary(r: &vt::VtReport) -> String {
    vt_done(r).summary
}

/// The OTX report's main line (the `ingest otx` command prints it).
pub fn otx_summary(r: &otx::OtxReport) -> String {
    otx_done(r)
        .summary
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The warning about pulses rejected for wrongly typed fields, if any.
pub fn otx_rejections(r: &otx::OtxReport) -> Option<String> {
    (r.rejected > 0).then(|| rejected_line("OTX", "pulse", r.rejected, &r.rejections))
}

/// "OTX: 2 pulse(s) rejected for …, e.g. <reasons>".
fn rejected_line(service: &str, what: &str, n: usize, reasons: &[String]) -> String {
    format!(
        "{service}: {n} {what}(s) rejected for fields of the wrong type and not stored (the raw pages are kept), e.g. {}",
        reasons.join("; ")
    )
}

async fn samples_stage(cx: &Context<'_>, dir: &Path) -> Result<Done, PipelineError> {
    let r = cx
        .locked(&["otx", "virustotal"], "load samples", async {
            Ok(crate::feeds::samples::load(&cx.lake, &cx.raw, dir).await?)
        })
        .await?;
    Ok(Done::ok(
        format!(
            "samples: {} new or revised pulse(s) from {} OTX file(s), {} VirusTotal report(s), {} sandbox technique row(s)",
            r.pulses, r.otx_files, r.lookups, r.techniques
        ),
        &[
            ("pulses", r.pulses),
            ("lookups", r.lookups),
            ("techniques", r.techniques),
        ],
    ))
}

/// The newest model of the mapping domain: its directory name (`enterprise-18.1`), if any.
pub fn model_version(settings: &Settings) -> Option<String> {
    let root = Path::new(&settings.lake.models);
    threatlake_udfs::mapper::find_latest(root, settings.mapping.domain.as_str())
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
}

async fn model_stage(cx: &Context<'_>) -> Result<Done, PipelineError> {
    let domain = cx.settings.mapping.domain;
    let have = model_version(cx.settings);
    let engine = cx.engine().await?;
    let current = attack_release::lake_versions(&engine).await?;
    let want = current.get(&domain).map(|v| format!("{domain}-{v}"));
    // A model of an older build's format cannot be loaded: build it again.
    let stale = have.as_ref().and_then(|h| {
        let found =
            threatlake_udfs::mapper::manifest_format(&Path::new(&cx.settings.lake.models).join(h))?;
        (found != threatlake_udfs::mapper::FORMAT_VERSION).then_some(found)
    });
    if have.is_some() && stale.is_none() && (want.is_none() || have == want) {
        return Ok(Done::skipped(format!("using {}", have.unwrap_or_default())));
    }
    if let (Some(h), Some(found)) = (&have, stale) {
        cx.observer.note(
            Stage::Model,
            &format!(
                "{h} was built by an older threatlake (model format {found}, this one reads {}); building a new model",
                threatlake_udfs::mapper::FORMAT_VERSION
            ),
        );
    } else if let Some(h) = &have {
        cx.observer.note(
            Stage::Model,
            &format!(
                "{h} is older than the lake's ATT&CK {domain} {}; building a new model",
                current.get(&domain).map(String::as_str).unwrap_or("?")
            ),
        );
    }
    cx.observer
        .progress(Stage::Model, "building the mapping model");
    let b = build_model(cx.settings, &engine, domain, BuildOptions::default()).await?;
    Ok(Done::ok(b.summary, &[("techniques", b.techniques)]))
}

/// A model built (and published beside an S3 lake).
pub struct BuiltModel {
    /// One line for people.
    pub summary: String,
    /// Where it was saved.
    pub dir: PathBuf,
    /// Techniques it knows.
    pub techniques: usize,
    /// Files published to `lake.models` on S3, if remote.
    pub published: Option<(String, usize)>,
}

/// How `model build` fits.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// General-English vectors overriding `mapping.pretrained_vectors`.
    pub pretrained: Option<String>,
    /// Ignore `mapping.pretrained_vectors`.
    pub no_pretrained: bool,
    /// Leave out the sentences analysts labelled in the mapping workbench.
    pub no_feedback: bool,
}

/// Fit the mapper on the lake's newest `domain` release, save it under `lake.models` and publish it
/// when the models live on S3. Analysts' accepted and corrected workbench decisions are learnt as
/// procedure examples unless `options.no_feedback`.
pub async fn build_model(
    settings: &Settings,
    engine: &Engine,
    domain: Domain,
    options: BuildOptions,
) -> Result<BuiltModel, PipelineError> {
    let pre = if options.no_pretrained {
        None
    } else {
        options
            .pretrained
            .or_else(|| settings.mapping.pretrained_vectors.clone())
    };
    if let Some(p) = &pre {
        if !Path::new(p).is_file() {
            return Err(PipelineError::Setting {
                setting: "mapping.pretrained_vectors".into(),
                message: format!(
                    "pretrained vectors {p} not found; fix mapping.pretrained_vectors or pass --no-pretrained"
                ),
            });
        }
    }
    // An optional `mapping.*` setting read by `read`, its error naming the setting.
    fn setting<T>(
        name: &str,
        value: Option<&str>,
        read: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, PipelineError> {
        value
            .map(|v| {
                read(v).map_err(|message| PipelineError::Setting {
                    setting: name.into(),
                    message,
                })
            })
            .transpose()
    }
    let calibration = setting(
        "mapping.calibration",
        settings.mapping.calibration.as_deref(),
        crate::mapping::calibration_setting,
    )?;
    let examples = setting(
        "mapping.examples",
        settings.mapping.examples.as_deref(),
        crate::mapping::examples_setting,
    )?
    .unwrap_or_default();
    let holdout = settings.mapping.feedback_holdout;
    if !(0.0..=0.9).contains(&holdout) {
        return Err(PipelineError::Setting {
            setting: "mapping.feedback_holdout".into(),
            message: format!(
                "{holdout} is not a share of the workbench's reports to hold out; set it from 0 (learn them all) to 0.9, e.g. 0.2"
            ),
        });
    }
    let t = Instant::now();
    let report = crate::mapping::build_model(
        engine,
        domain,
        Path::new(&settings.lake.models),
        pre.as_deref().map(Path::new),
        threatlake_udfs::mapper::MapperParams::default(),
        calibration,
        crate::mapping::Learn {
            feedback: !options.no_feedback,
            feedback_holdout: holdout,
            examples,
        },
    )
    .await?;
    let m = &report.manifest;
    let stages: Vec<String> = report
        .timings
        .iter()
        .map(|(n, d)| format!("{n} {:.1} s", d.as_secs_f64()))
        .collect();
    let mut summary = format!(
        "model {} ATT&CK {}: {} techniques, {} training texts, {} prototypes, {} words × {} dims{} — {:.1} MB in {:.1} s ({})\nsaved to {}",
        m.domain,
        m.attack_version,
        m.techniques,
        m.units,
        m.prototypes,
        m.words,
        m.dims,
        m.pretrained.as_ref().map(|p| format!(" (+ {p})")).unwrap_or_default(),
        report.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        stages.join(", "),
        report.dir.display()
    );
    if m.feedback > 0 {
        summary.push_str(&format!(
            "\nlearnt {} sentence(s) analysts labelled in the mapping workbench (mapping_feedback)",
            m.feedback
        ));
    }
    let held = report.feedback;
    if held.held_out > 0 {
        summary.push_str(&format!(
            "\nheld out {} labelled sentence(s) of {} workbench report(s) (mapping.feedback_holdout {holdout}): \
             `model feedback export` then `model eval --input` measures the model on them",
            held.held_out, held.held_out_reports
        ));
    }
    if m.examples > 0 {
        summary.push_str(&format!(
            "\nlearnt {} labelled report sentence(s) of mapping.examples ({})",
            m.examples,
            settings.mapping.examples.as_deref().unwrap_or_default()
        ));
    }
    let calibrated = report
        .dir
        .join(threatlake_udfs::mapper::CALIBRATION_FILE)
        .is_file();
    summary.push_str(&match (&settings.mapping.calibration, calibrated) {
        (Some(p), true) => format!("\nscores: text calibration of {p}"),
        (Some(p), false) => format!(
            "\nscores: {p} is for another domain; scores calibrated on ATT&CK procedures only"
        ),
        (None, _) => "\nscores: calibrated on ATT&CK procedures only (mapping.calibration is null)"
            .to_string(),
    });
    let mut published = None;
    if let Some(remote) = &settings.lake.models_remote {
        let n = crate::models::publish(&settings.lake, remote, &report.dir).await?;
        summary.push_str(&format!("\npublished {n} file(s) to {remote}"));
        published = Some((remote.clone(), n));
    }
    Ok(BuiltModel {
        summary,
        dir: report.dir.clone(),
        techniques: m.techniques,
        published,
    })
}

/// Map items not mapped yet into `mapped_threat_data`.
pub async fn map_intel(cx: &Context<'_>) -> Result<intel::MapReport, PipelineError> {
    let engine = cx.engine().await?;
    let version = model_version(cx.settings);
    cx.observer
        .progress(Stage::Map, "map_techniques over new items");
    cx.locked(&["intel"], "map-intel", async {
        Ok(intel::map_intel(
            &cx.lake,
            &engine,
            cx.settings.mapping.top_k,
            cx.settings.mapping.threshold,
            version.clone(),
            cx.settings.mapping.items_per_commit,
        )
        .await?)
    })
    .await
}

fn map_done(settings: &Settings, r: &intel::MapReport) -> Done {
    Done::ok(
        format!(
            "map-intel: {} item(s) mapped with model {}: {} model row(s), {} source-stated row(s)",
            r.items,
            model_version(settings).as_deref().unwrap_or("(none)"),
            r.model_rows,
            r.source_rows
        ),
        &[
            ("items", r.items),
            ("model_rows", r.model_rows),
            ("source_rows", r.source_rows),
        ],
    )
}

/// The map report as a stage outcome line (the `map-intel` command prints it).
pub fn map_summary(settings: &Settings, r: &intel::MapReport) -> String {
    map_done(settings, r).summary
}

/// Snapshot the threat model: (run id, techniques).
pub async fn snapshot(cx: &Context<'_>) -> Result<(String, usize), PipelineError> {
    let engine = cx.engine().await?;
    cx.observer.progress(Stage::Snapshot, "snapshot");
    cx.locked(&["intel"], "threat-model snapshot", async {
        Ok(intel::snapshot(&cx.lake, &engine).await?)
    })
    .await
}

/// Ingest ATT&CK bundles (`(expected domain, path or URL)` each) under the `attack` lock, one
/// release after the other; each finished release is a note line.
pub async fn ingest_attack(
    cx: &Context<'_>,
    jobs: &[(Option<Domain>, String)],
    options: &IngestOptions,
) -> Result<Vec<IngestReport>, PipelineError> {
    cx.locked(&["attack"], "ingest attack", async {
        let mut out = Vec::new();
        for (d, src) in jobs {
            cx.observer.progress(
                Stage::Attack,
                &format!(
                    "ingesting {}",
                    d.map_or("bundle".to_string(), |d| d.to_string())
                ),
            );
            let options = IngestOptions {
                expected: *d,
                ..options.clone()
            };
            let report = crate::attack::ingest(&cx.lake, &cx.raw, src, &options)
                .await
                .map_err(|source| PipelineError::Attack {
                    source_name: src.clone(),
                    source: Box::new(source),
                })?;
            cx.observer
                .note(Stage::Attack, &attack_line(&report, &cx.raw));
            out.push(report);
        }
        Ok(out)
    })
    .await
}

fn attack_line(report: &IngestReport, raw: &Location) -> String {
    let total: f64 = report.timings.iter().map(|(_, t)| t.as_secs_f64()).sum();
    let r = |t: &str| report.rows.get(t).copied().unwrap_or(0);
    format!(
        "{} ATT&CK {}: {} techniques, {} tactics, {} groups, {} software, {} campaigns, {} mitigations, {} relationships, {} procedures ({:.1} s; raw kept at {}/{})",
        report.domain,
        report.attack_version,
        r("mitre_attack_techniques"),
        r("mitre_attack_tactics"),
        r("mitre_attack_groups"),
        r("mitre_attack_software"),
        r("mitre_attack_campaigns"),
        r("mitre_attack_mitigations"),
        r("mitre_attack_relationships"),
        r("mitre_attack_procedures"),
        total,
        raw,
        report.raw_path
    )
}

/// The ingest options of settings.
pub fn attack_options(settings: &Settings) -> IngestOptions {
    IngestOptions {
        expected: None,
        version_override: None,
        timeout: Duration::from_secs(settings.attack.http_timeout_secs),
        limits: settings.attack.limits(),
        force: false,
    }
}

async fn attack_stage(cx: &Context<'_>, offline: bool) -> Result<Done, PipelineError> {
    let engine = cx.engine().await?;
    let current = attack_release::lake_versions(&engine).await?;
    drop(engine);
    if offline {
        if current.is_empty() {
            return Err(PipelineError::OfflineWithoutAttack);
        }
        return Ok(Done::skipped(format!(
            "offline: using {}",
            attack_release::describe(&current)
        )));
    }
    let domains = cx.settings.attack.domains.clone();
    let index_url = cx.settings.attack.index.as_deref().unwrap_or("").trim();
    let index = if index_url.is_empty() {
        None
    } else {
        cx.observer
            .progress(Stage::Attack, "checking for a newer ATT&CK release");
        Some(attack_release::fetch_index(&cx.settings.attack).await)
    };
    let plan = match index {
        Some(Ok(index)) => attack_release::plan(&index, &domains, &current),
        // No index (unset or unreachable) but a release in the lake: work with it.
        None if !current.is_empty() => {
            return Ok(Done::skipped(format!(
                "{} in the lake (attack.index unset: no check for newer releases)",
                attack_release::describe(&current)
            )))
        }
        Some(Err(e)) if !current.is_empty() => {
            cx.observer.note(
                Stage::Attack,
                &format!(
                    "warning: {e}; keeping {}",
                    attack_release::describe(&current)
                ),
            );
            return Ok(Done::skipped(format!(
                "release index unreachable; kept {}",
                attack_release::describe(&current)
            )));
        }
        // An empty lake without an index: the configured bundle URLs.
        unreachable => {
            if let Some(Err(e)) = unreachable {
                cx.observer.note(
                    Stage::Attack,
                    &format!("warning: {e}; using attack.sources"),
                );
            }
            domains
                .iter()
                .map(|d| {
                    let src = cx.settings.attack.sources.get(d).cloned().ok_or_else(|| {
                        PipelineError::Setting {
                            setting: format!("attack.sources.{d}"),
                            message: "no bundle URL; add MITRE's bundle URL or pass --from".into(),
                        }
                    })?;
                    Ok(attack_release::Planned {
                        domain: *d,
                        version: None,
                        url: src,
                    })
                })
                .collect::<Result<Vec<_>, PipelineError>>()?
        }
    };
    if plan.is_empty() {
        return Ok(Done::skipped(format!(
            "up to date: {}",
            attack_release::describe(&current)
        )));
    }
    let jobs: Vec<(Option<Domain>, String)> = plan
        .iter()
        .map(|p| (Some(p.domain), p.url.clone()))
        .collect();
    let reports = ingest_attack(cx, &jobs, &attack_options(cx.settings)).await?;
    let lines: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {}", r.domain, r.attack_version))
        .collect();
    let techniques: usize = reports
        .iter()
        .map(|r| r.rows.get("mitre_attack_techniques").copied().unwrap_or(0))
        .sum();
    Ok(Done::ok(
        format!("ingested ATT&CK {}", lines.join(", ")),
        &[("releases", reports.len()), ("techniques", techniques)],
    ))
}
