//! Feed commands: `ingest otx`, `ingest vt`, `ingest taxii`, `map-intel`, `model diff` and `run` — thin layers over
//! [`threatlake::pipeline`].

use anyhow::{Context as _, Result};
use threatlake::feeds::{intel, otx, taxii, vt};
use threatlake::pipeline::{self, Context, Job, Observer, RunOptions, StageStatus, Trigger};
use threatlake::{Engine, Lake, Settings};

use super::progress::CliObserver;

/// `ingest otx`.
pub async fn ingest_otx(settings: &Settings) -> Result<otx::OtxReport> {
    let client = pipeline::require_otx(settings)?;
    let observer = CliObserver::plain();
    let cx = Context::open(settings, &observer)?;
    observer.started(pipeline::Stage::Otx);
    let r = pipeline::ingest_otx(&cx, &client).await;
    observer.clear();
    let r = r?;
    println!("{}", pipeline::otx_summary(&r));
    if let Some(w) = pipeline::otx_rejections(&r) {
        eprintln!("{w}");
    }
    Ok(r)
}

/// `ingest vt`: configured observables, the given ones, an IOC file, and OTX enrichment.
pub async fn ingest_vt(
    settings: &Settings,
    observables: Vec<String>,
    iocs: Option<String>,
) -> Result<vt::VtReport> {
    let client = pipeline::require_vt(settings)?;
    let mut extra = observables;
    let mut rejected = Vec::new();
    if let Some(f) = &iocs {
        let (ok, bad) = vt::read_iocs(f)?;
        extra.extend(ok);
        rejected = bad;
    }
    let observer = CliObserver::plain();
    let cx = Context::open(settings, &observer)?;
    observer.started(pipeline::Stage::Virustotal);
    let r = pipeline::ingest_vt(&cx, &client, &extra, &rejected).await;
    observer.clear();
    let (r, _) = r?;
    println!("{}", pipeline::vt_summary(&r));
    Ok(r)
}

/// `ingest taxii`: the given collections (default: `taxii.collections`).
pub async fn ingest_taxii(
    settings: &Settings,
    collections: Vec<String>,
    added_after: Option<String>,
    user: Option<String>,
) -> Result<Vec<taxii::TaxiiReport>> {
    let mut settings = settings.clone();
    if user.is_some() {
        settings.taxii.username = user;
    }
    let collections = if collections.is_empty() {
        settings.taxii.collections.clone()
    } else {
        collections
    };
    anyhow::ensure!(
        !collections.is_empty(),
        "no TAXII collection to pull: give --collection URL (…/collections/{{id}}/) or list them under taxii.collections in the settings"
    );
    let added_after = added_after
        .map(|a| {
            threatlake::reports::batch::parse_since(&a)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--added-after {a:?} is not a time: use an RFC 3339 time like 2026-01-31T00:00:00Z or a date like 2026-01-31"
                    )
                })
        })
        .transpose()?;
    let observer = CliObserver::plain();
    let cx = Context::open(&settings, &observer)?;
    observer.started(pipeline::Stage::Taxii);
    let r = pipeline::ingest_taxii(&cx, &collections, added_after).await;
    observer.clear();
    let r = r?;
    println!("{}", pipeline::taxii_summary(&r));
    Ok(r)
}

/// `map-intel`.
pub async fn map_intel(settings: &Settings) -> Result<intel::MapReport> {
    let observer = CliObserver::plain();
    let cx = Context::open(settings, &observer)?;
    observer.started(pipeline::Stage::Map);
    let r = pipeline::map_intel(&cx)
        .await
        .context("mapping threat items");
    observer.clear();
    let r = r?;
    println!("{}", pipeline::map_summary(settings, &r));
    Ok(r)
}

/// `model diff [A] [B]`.
pub async fn diff(
    settings: &Settings,
    a: Option<String>,
    b: Option<String>,
    all: bool,
) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open(&lake).await?;
    let runs = intel::runs(&engine).await?;
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        (Some(a), None) => (
            a,
            runs.last()
                .cloned()
                .context("no threat-model runs yet; run `threatlake run`")?,
        ),
        (None, _) => {
            anyhow::ensure!(
                runs.len() >= 2,
                "need two threat-model runs to compare, found {}; run `threatlake run` again later",
                runs.len()
            );
            (runs[runs.len() - 2].clone(), runs[runs.len() - 1].clone())
        }
    };
    for r in [&a, &b] {
        anyhow::ensure!(
            runs.contains(r),
            "no threat-model run {r}; known runs: {}",
            runs.join(", ")
        );
    }
    let lines = intel::diff(&engine, &a, &b, all).await?;
    println!("threat model {a} → {b}: {} change(s)", lines.len());
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    for l in lines {
        println!(
            "{:<7} {:<10} {:<50} score {:>6} → {:<6} evidence {} → {}",
            l.change,
            l.technique_id,
            l.technique_name
                .unwrap_or_default()
                .chars()
                .take(50)
                .collect::<String>(),
            f(l.score_a),
            f(l.score_b),
            l.evidence_a,
            l.evidence_b
        );
    }
    Ok(())
}

/// `run` (and the other jobs): the stages of `job` with `[i/n]` progress, recorded in `job_runs`.
pub async fn run(settings: &Settings, job: Job, options: RunOptions) -> Result<()> {
    let observer = CliObserver::numbered(job.stages(&options).len());
    let report = pipeline::run_job(
        settings,
        job,
        &pipeline::new_run_id(),
        Trigger::Cli,
        &options,
        &observer,
    )
    .await?;
    let count = |s: StageStatus| report.stages.iter().filter(|o| o.status == s).count();
    println!(
        "summary: {job} {}: {} stage(s) done, {} skipped, {} failed in {:.1} s",
        report.run_id,
        count(StageStatus::Ok),
        count(StageStatus::Skipped),
        count(StageStatus::Failed),
        report.seconds
    );
    match report.error {
        None => Ok(()),
        Some(e) => Err(anyhow::anyhow!(e)),
    }
}
