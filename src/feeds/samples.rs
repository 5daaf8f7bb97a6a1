//! Offline feed input: OTX pages and VirusTotal responses saved as files (e.g. `data/samples/`), loaded
//! through the same parsers as live responses and kept raw the same way.

use std::path::Path;

use chrono::Utc;

use super::{fixed, keep_raw, otx, vt, FeedError};
use crate::lake::{Lake, Location};

/// What was loaded.
#[derive(Debug, Default, Clone)]
pub struct SampleReport {
    /// OTX files read.
    pub otx_files: usize,
    /// Pulses stored (new or revised).
    pub pulses: usize,
    /// VirusTotal reports stored.
    pub lookups: usize,
    /// Technique rows stored.
    pub techniques: usize,
}

fn files(dir: &Path, suffix: &str) -> Result<Vec<std::path::PathBuf>, FeedError> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(vec![]);
    };
    let mut v: Vec<_> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    Ok(v)
}

fn read(p: &Path) -> Result<Vec<u8>, FeedError> {
    std::fs::read(p).map_err(|e| FeedError::Input {
        path: p.display().to_string(),
        message: format!("cannot read the sample: {e}"),
    })
}

/// Load `<dir>/otx/*.json` and `<dir>/virustotal/<observable>.report.json` (+ sandbox files).
pub async fn load(lake: &Lake, raw: &Location, dir: &Path) -> Result<SampleReport, FeedError> {
    let engine = crate::sql::Engine::open(lake).await?;
    let now = Utc::now();
    let batch = super::new_batch_id(now);
    let date = now.format("%Y-%m-%d").to_string();
    let mut report = SampleReport::default();

    let mut w = otx::OtxWriter::new(lake, &batch, otx::known_versions(&engine).await?);
    for (i, p) in files(&dir.join("otx"), ".json")?.iter().enumerate() {
        let body = read(p)?;
        let bad = |message: String| {
            FeedError::Input {
            path: p.display().to_string(),
            message: format!("{message}; an OTX sample is a /api/v1/pulses/subscribed page or an array of pulses"),
        }
        };
        let (pulses, _) = otx::parse_page(&body).map_err(bad)?;
        let raw_ref = keep_raw(raw, "otx", &date, &format!("{batch}-sample{i:03}"), &body).await?;
        let prov = otx::Provenance {
            batch_id: batch.clone(),
            raw_ref,
            ingested_at: fixed(now),
        };
        w.add(&pulses, &prov).await?;
        report.otx_files += 1;
    }
    w.flush().await?;
    report.pulses = w.report.pulses;

    // Everything already looked up (a century counts as forever).
    let known = vt::fresh_observables(&engine, 24 * 365 * 100).await?;
    let at = fixed(now);
    let (mut lookups, mut techniques) = (Vec::new(), Vec::new());
    let vdir = dir.join("virustotal");
    for (i, p) in files(&vdir, ".report.json")?.iter().enumerate() {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let obs = name.trim_end_matches(".report.json");
        let Some((kind, obs)) = vt::classify(obs) else {
            return Err(FeedError::Input {
                path: p.display().to_string(),
                message: "name the file <hash|domain|ip>.report.json".into(),
            });
        };
        if known.contains(&obs) {
            continue;
        }
        let body = read(p)?;
        let raw_ref = keep_raw(
            raw,
            "virustotal",
            &date,
            &format!("{batch}-sample{i:03}-report"),
            &body,
        )
        .await?;
        let mut row = vt::LookupRow::new(kind, &obs, &batch, &at);
        row.raw_ref = Some(raw_ref);
        vt::parse_report(&body, &mut row).map_err(|m| FeedError::Input {
            path: p.display().to_string(),
            message: m,
        })?;
        for (endpoint, parse) in vt::SANDBOX_ENDPOINTS {
            let f = vdir.join(format!("{obs}.{endpoint}.json"));
            if f.is_file() {
                let body = read(&f)?;
                techniques.extend(parse(&body, &obs, &batch, &at).map_err(|m| {
                    FeedError::Input {
                        path: f.display().to_string(),
                        message: m,
                    }
                })?);
            }
        }
        lookups.push(row);
    }
    report.lookups = lookups.len();
    report.techniques = techniques.len();
    vt::store(lake, &date, &batch, &lookups, &techniques).await?;
    Ok(report)
}
