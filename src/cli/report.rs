//! `threatlake report`: run the report datasets in batch and write each in every asked format, plus
//! an `index.json` of what was written.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use threatlake::reports::{self, Format};
use threatlake::{Engine, Lake, Settings};

/// Run `names` (all when empty) into `out` in `formats` (comma-separated names).
pub async fn report(
    settings: &Settings,
    names: Vec<String>,
    formats: &str,
    out: Option<PathBuf>,
) -> Result<()> {
    let formats: Vec<Format> = formats
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            Format::parse(f).with_context(|| {
                format!(
                    "unknown report format {f:?}; use csv, json, navigator, stix (comma-separated)"
                )
            })
        })
        .collect::<Result<_>>()?;
    if formats.is_empty() {
        bail!("no report format given; use --format csv,json,navigator");
    }
    let defs = reports::select(&names)?;
    let out = out.unwrap_or_else(|| PathBuf::from(&settings.reports.out_dir));
    let lake = Lake::open(&settings.lake.root)?;
    let engine = Engine::open(&lake).await?;
    let domain = settings.mapping.domain.as_str();
    let version = current_version(&engine, domain).await?;
    let bar = indicatif::ProgressBar::new(defs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {elapsed}")
            .expect("static template"),
    );
    let mut index = Vec::new();
    for def in &defs {
        bar.set_message(def.name.clone());
        let data = reports::run(&engine, def).await?;
        let rows: usize = data.batches.iter().map(|b| b.num_rows()).sum();
        let mut files = Vec::new();
        for f in &formats {
            if let Some(p) = reports::write(&data, *f, &out, domain, &version)? {
                files.push(
                    p.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                );
            }
        }
        index.push(serde_json::json!({
            "name": def.name, "title": def.title, "description": def.description,
            "chart": def.chart, "rows": rows, "files": files
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut extra = Vec::new();
    if formats.contains(&Format::Stix) {
        let b = reports::stix::bundle(&engine).await?;
        let mut bytes = serde_json::to_vec_pretty(&b)?;
        bytes.push(b'\n');
        reports::write_atomic(&out.join("mapped_intel.stix.json"), &bytes)?;
        extra.push("mapped_intel.stix.json");
    }
    let mut idx = serde_json::to_vec_pretty(&serde_json::json!({
        "generated_at": threatlake::feeds::fixed(chrono::Utc::now()),
        "domain": domain, "attack_version": version, "reports": index, "bundles": extra
    }))?;
    idx.push(b'\n');
    reports::write_atomic(&out.join("index.json"), &idx)?;
    println!(
        "{} report(s) written to {} (index.json lists them)",
        defs.len(),
        out.display()
    );
    Ok(())
}

async fn current_version(engine: &Engine, domain: &str) -> Result<String> {
    let r = engine
        .run("SELECT domain, attack_version FROM attack_versions_current")
        .await?;
    for b in &r[0].batches {
        let d = threatlake::feeds::column_strings(b, 0);
        let v = threatlake::feeds::column_strings(b, 1);
        for (d, v) in d.into_iter().zip(v) {
            if d.as_deref() == Some(domain) {
                return Ok(v.unwrap_or_default());
            }
        }
    }
    Ok(String::new())
}
