//! Feed commands: `ingest otx`, `ingest vt`, `map-intel`, `model diff` and the `run` pipeline.

use anyhow::{Context, Result};
use threatlake::feeds::http::FeedClient;
use threatlake::feeds::{intel, otx, vt};
use threatlake::sql::{Engine, EngineOptions};
use threatlake::{Lake, Settings};

fn otx_client(settings: &Settings) -> Result<Option<FeedClient>> {
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

fn vt_client(settings: &Settings) -> Result<Option<FeedClient>> {
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

/// A spinner on stderr for one stage (hidden when stderr is not a terminal).
fn spinner(prefix: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} {elapsed}")
            .expect("static template"),
    );
    bar.set_prefix(prefix.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn no_key(service: &str, env: &str) -> anyhow::Error {
    anyhow::anyhow!("no {service} API key: set {env} (or put it in config/secrets.yaml)")
}

/// `ingest otx`.
pub async fn ingest_otx(settings: &Settings) -> Result<otx::OtxReport> {
    let client = otx_client(settings)?.ok_or_else(|| no_key("OTX", otx::KEY_ENV))?;
    let lake = Lake::from_settings(&settings.lake)?;
    let raw = threatlake::lake::raw_from_settings(&settings.lake)?;
    let bar = spinner("OTX");
    let r = super::locked(&lake, settings, &["otx"], "ingest otx", async {
        Ok(
            otx::ingest(&lake, &raw, &client, settings.otx.page_size, &|m| {
                bar.set_message(m.to_string())
            })
            .await?,
        )
    })
    .await;
    bar.finish_and_clear();
    let r = r?;
    println!(
        "OTX: {} page(s), {} new or revised pulse(s), {} unchanged, {} indicator(s); modified_since {} → {}",
        r.pages,
        r.pulses,
        r.unchanged,
        r.indicators,
        r.since.as_deref().unwrap_or("(first run)"),
        r.watermark.as_deref().unwrap_or("-")
    );
    if r.rejected > 0 {
        eprintln!(
            "OTX: {} pulse(s) rejected for fields of the wrong type and not stored (the raw pages are kept), e.g. {}",
            r.rejected,
            r.rejections.join("; ")
        );
    }
    Ok(r)
}

/// `ingest vt`: configured observables, the given ones, an IOC file, and OTX enrichment.
pub async fn ingest_vt(
    settings: &Settings,
    observables: Vec<String>,
    iocs: Option<String>,
) -> Result<vt::VtReport> {
    let client = vt_client(settings)?.ok_or_else(|| no_key("VirusTotal", vt::KEY_ENV))?;
    let lake = Lake::from_settings(&settings.lake)?;
    let raw = threatlake::lake::raw_from_settings(&settings.lake)?;
    let mut all = settings.virustotal.observables.clone();
    all.extend(observables);
    let mut rejected = Vec::new();
    if let Some(f) = &iocs {
        let (ok, bad) = vt::read_iocs(f)?;
        all.extend(ok);
        rejected = bad;
    }
    if settings.virustotal.enrich_from_otx > 0 {
        let engine = Engine::open(&lake).await?;
        all.extend(vt::otx_observables(&engine, settings.virustotal.enrich_from_otx).await?);
    }
    let quota = vt::Quota {
        daily_budget: settings.virustotal.daily_budget,
        cache_ttl_hours: settings.virustotal.cache_ttl_hours,
    };
    let bar = spinner("VirusTotal");
    let r = super::locked(&lake, settings, &["virustotal"], "ingest vt", async {
        Ok(vt::ingest(&lake, &raw, &client, &all, quota, &|m| {
            bar.set_message(m.to_string())
        })
        .await?)
    })
    .await;
    bar.finish_and_clear();
    let mut r = r?;
    r.invalid.extend(rejected);
    println!(
        "VirusTotal: {} looked up ({} not found), {} fresh in the lake, {} deferred by the daily budget, {} technique row(s), {} request(s)",
        r.looked_up, r.not_found, r.cached, r.deferred, r.techniques, r.requests
    );
    if !r.invalid.is_empty() {
        println!(
            "  {} input(s) are not a hash, URL, domain or IP and were skipped, e.g. {:?}",
            r.invalid.len(),
            r.invalid[0]
        );
    }
    Ok(r)
}

fn model_version(settings: &Settings) -> Option<String> {
    let root = std::path::Path::new(&settings.lake.models);
    threatlake_udfs::mapper::find_latest(root, settings.mapping.domain.as_str())
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
}

/// `map-intel`.
pub async fn map_intel(settings: &Settings) -> Result<intel::MapReport> {
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open_with(&lake, &EngineOptions::from_settings(settings)).await?;
    let version = model_version(settings);
    let bar = spinner("map-intel");
    bar.set_message("map_techniques over new items");
    let r = super::locked(&lake, settings, &["intel"], "map-intel", async {
        intel::map_intel(
            &lake,
            &engine,
            settings.mapping.top_k,
            settings.mapping.threshold,
            version.clone(),
        )
        .await
        .context("mapping threat items")
    })
    .await;
    bar.finish_and_clear();
    let r = r?;
    println!(
        "map-intel: {} item(s) mapped with model {}: {} model row(s), {} source-stated row(s)",
        r.items,
        version.as_deref().unwrap_or("(none)"),
        r.model_rows,
        r.source_rows
    );
    Ok(r)
}

/// Snapshot the threat model.
pub async fn snapshot(settings: &Settings) -> Result<(String, usize)> {
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open(&lake).await?;
    let bar = spinner("threat model");
    bar.set_message("snapshot");
    let r = super::locked(
        &lake,
        settings,
        &["intel"],
        "threat-model snapshot",
        async { Ok(intel::snapshot(&lake, &engine).await?) },
    )
    .await;
    bar.finish_and_clear();
    let (run, n) = r?;
    println!("threat model {run}: {n} technique(s)");
    Ok((run, n))
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

/// `run`: ATT&CK if the lake has none, OTX and VirusTotal when keyed (not `offline`), the samples when
/// asked, model if missing, map, snapshot.
pub async fn run(
    settings: &Settings,
    offline: bool,
    samples: Option<std::path::PathBuf>,
) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let mut errors: Vec<String> = Vec::new();
    let engine = Engine::open(&lake).await?;
    let versions = engine
        .run("SELECT count(*) FROM mitre_attack_versions")
        .await?;
    let have_attack = versions[0].batches.iter().any(|b| {
        arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0)).value(0) > 0
    });
    println!("[1/5] ATT&CK");
    if have_attack {
        println!("  already in the lake (refresh with `threatlake ingest attack`)");
    } else if offline {
        anyhow::bail!(
            "--offline: the lake has no ATT&CK release; run `threatlake ingest attack --from BUNDLE` first"
        );
    } else {
        crate::ingest_attack_default(settings).await?;
    }
    println!("[2/5] feeds");
    let mut new_items = 0;
    if let Some(dir) = &samples {
        let raw = threatlake::lake::raw_from_settings(&settings.lake)?;
        let r = super::locked(
            &lake,
            settings,
            &["otx", "virustotal"],
            "load samples",
            async {
                threatlake::feeds::samples::load(&lake, &raw, dir)
                    .await
                    .with_context(|| format!("loading samples from {}", dir.display()))
            },
        )
        .await?;
        println!(
            "  samples: {} new or revised pulse(s) from {} OTX file(s), {} VirusTotal report(s), {} sandbox technique row(s)",
            r.pulses, r.otx_files, r.lookups, r.techniques
        );
        new_items += r.pulses + r.lookups;
    }
    if offline {
        println!("  --offline: OTX and VirusTotal not contacted");
    } else {
        new_items += pull_feeds(settings, &mut errors).await?;
    }
    println!("[3/5] model");
    match model_version(settings) {
        None => crate::cli::model::build(settings, settings.mapping.domain, None, false).await?,
        Some(v) => println!("  using {v}"),
    }
    println!("[4/5] map");
    let m = map_intel(settings).await?;
    println!("[5/5] threat model");
    let (run, n) = snapshot(settings).await?;
    println!(
        "summary: {new_items} new item(s), {} item(s) mapped, threat model {run} with {n} technique(s), {} error(s)",
        m.items,
        errors.len()
    );
    for e in &errors {
        println!("  error: {e}");
    }
    if !errors.is_empty() {
        anyhow::bail!(
            "{} feed(s) failed; what they fetched before failing is stored, re-run to continue",
            errors.len()
        );
    }
    Ok(())
}

/// OTX and VirusTotal, each when keyed; a failing feed is reported, not fatal (the other still runs).
async fn pull_feeds(settings: &Settings, errors: &mut Vec<String>) -> Result<usize> {
    let mut new_items = 0;
    match otx_client(settings)? {
        None => println!("  OTX skipped: no API key ({} not set)", otx::KEY_ENV),
        Some(_) => match ingest_otx(settings).await {
            Ok(r) => new_items += r.pulses,
            Err(e) => errors.push(format!("OTX: {e:#}")),
        },
    }
    match vt_client(settings)? {
        None => println!("  VirusTotal skipped: no API key ({} not set)", vt::KEY_ENV),
        Some(_) => match ingest_vt(settings, vec![], None).await {
            Ok(r) => new_items += r.looked_up,
            Err(e) => errors.push(format!("VirusTotal: {e:#}")),
        },
    }
    Ok(new_items)
}
