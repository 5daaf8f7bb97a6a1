//! Running report datasets in batch: every asked report in every asked format into one directory,
//! plus `index.html` and `index.json` (what `threatlake report`, the `report` job and the API use).

use std::path::{Path, PathBuf};

use super::{Format, ReportError};
use crate::sql::{Engine, EngineOptions, SqlError};
use crate::{Lake, Settings};

/// Every format, the default of `report --format`.
pub const ALL_FORMATS: &str = "html,pdf,csv,json,navigator,stix,svg,png";

/// What to run.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Report names (all when empty).
    pub names: Vec<String>,
    /// Formats.
    pub formats: Vec<Format>,
    /// Output directory.
    pub out: PathBuf,
    /// Only intel observed on or after this instant.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl BatchOptions {
    /// Every report in every format into `reports.out_dir`.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            names: vec![],
            formats: parse_formats(ALL_FORMATS).unwrap_or_default(),
            out: PathBuf::from(&settings.reports.out_dir),
            since: None,
        }
    }
}

/// What a batch wrote.
#[derive(Debug, Clone)]
pub struct BatchReport {
    /// Reports run.
    pub reports: usize,
    /// Files written (index files included).
    pub files: usize,
    /// Where.
    pub out_dir: PathBuf,
    /// Reports whose chart could not be drawn: (name, why).
    pub chart_errors: Vec<(String, String)>,
    /// Whether index.html was written.
    pub index_html: bool,
}

/// Parse a comma-separated format list.
pub fn parse_formats(list: &str) -> Result<Vec<Format>, ReportError> {
    let formats: Vec<Format> = list
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            Format::parse(f).ok_or_else(|| ReportError::Option {
                option: "--format",
                value: f.to_string(),
                message: format!(
                    "unknown report format; use any of {ALL_FORMATS},misp-feed (comma-separated)"
                ),
            })
        })
        .collect::<Result<_, _>>()?;
    if formats.is_empty() {
        return Err(ReportError::Option {
            option: "--format",
            value: list.to_string(),
            message: format!("no report format given; use any of {ALL_FORMATS}"),
        });
    }
    Ok(formats)
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 instant.
pub fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, ReportError> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|d| d.with_timezone(&chrono::Utc))
        .map_err(|_| ReportError::Option {
            option: "--since",
            value: s.to_string(),
            message: "use a date like 2026-01-31 or an RFC 3339 time".into(),
        })
}

fn meta_err(source: SqlError) -> ReportError {
    ReportError::Sql {
        name: "(report metadata)".into(),
        source,
    }
}

/// Run the reports of `options`, telling `progress` the name of each as it starts.
pub async fn write_all(
    settings: &Settings,
    options: &BatchOptions,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<BatchReport, ReportError> {
    let defs = super::select(&options.names)?;
    let formats = &options.formats;
    let out = &options.out;
    let lake = Lake::from_settings(&settings.lake).map_err(|e| meta_err(e.into()))?;
    let mut engine_options = EngineOptions::from_settings(settings)
        .with_memory_mb(settings.reports.memory_mb)
        .map_err(meta_err)?;
    engine_options.since = options.since;
    let engine = Engine::open_with(&lake, &engine_options)
        .await
        .map_err(meta_err)?;
    let domain = settings.mapping.domain.as_str();
    let version = current_version(&engine, domain).await?;
    let platforms = domain_platforms(&engine, domain).await?;
    let templates = super::html::Templates::load(Path::new(&settings.reports.templates))?;
    let ctx = super::Context {
        domain,
        attack_version: &version,
        generated_at: crate::feeds::fixed(chrono::Utc::now()),
        since: options
            .since
            .map(|s| s.format("%Y-%m-%d %H:%M UTC").to_string()),
        templates: &templates,
        formats,
        platforms: &platforms,
    };
    let mut built = Vec::new();
    let mut index = Vec::new();
    let mut chart_errors = Vec::new();
    let mut files_written = 0;
    for def in &defs {
        progress(&def.name);
        let b = super::build(&engine, def, domain).await?;
        if let Err(e) = &b.chart {
            chart_errors.push((def.name.clone(), e.to_string()));
        }
        let mut files = Vec::new();
        for f in formats {
            if let Some(p) = super::write(&b, *f, out, &ctx)? {
                files.push(
                    p.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                );
            }
        }
        files_written += files.len();
        index.push(serde_json::json!({
            "name": def.name, "title": def.title, "description": def.description,
            "chart": def.chart, "rows": b.data.rows(), "files": files,
            "chart_error": b.chart.as_ref().err().map(|e| e.to_string()),
        }));
        built.push((b, files));
    }
    let json_err = |e: serde_json::Error| ReportError::Write {
        path: out.display().to_string(),
        message: e.to_string(),
    };
    let mut bundles = Vec::new();
    if formats.contains(&Format::Stix) {
        let mut file = super::AtomicFile::create(&out.join("mapped_intel.stix.json"))?;
        super::stix::write_bundle(&engine, settings.reports.rows_per_pass, file.writer()).await?;
        file.commit()?;
        bundles.push("mapped_intel.stix.json");
        files_written += 1;
    }
    if formats.contains(&Format::MispFeed) {
        let events = super::misp::write_feed(&engine, &out.join(super::misp::DIR)).await?;
        bundles.push("misp-feed/manifest.json");
        files_written += events + 2;
    }
    let mut idx = serde_json::to_vec_pretty(&serde_json::json!({
        "generated_at": ctx.generated_at, "since": ctx.since,
        "domain": domain, "attack_version": version, "reports": index, "bundles": bundles
    }))
    .map_err(json_err)?;
    idx.push(b'\n');
    super::write_atomic(&out.join("index.json"), &idx)?;
    files_written += 1;
    let index_html = formats.contains(&Format::Html);
    if index_html {
        let list: Vec<_> = built.iter().map(|(b, f)| (b, f.clone())).collect();
        let page = super::index_page(&list, &bundles, &ctx)?;
        super::write_atomic(&out.join("index.html"), page.as_bytes())?;
        files_written += 1;
    }
    Ok(BatchReport {
        reports: defs.len(),
        files: files_written,
        out_dir: out.clone(),
        chart_errors,
        index_html,
    })
}

/// The platforms of `domain`'s current techniques, sorted.
pub async fn domain_platforms(engine: &Engine, domain: &str) -> Result<Vec<String>, ReportError> {
    domain_values(
        engine,
        "SELECT DISTINCT domain, unnest(platforms) AS p FROM attack_techniques_current ORDER BY 2",
        domain,
    )
    .await
}

/// The lake's current ATT&CK release of `domain` ("" when none).
pub async fn current_version(engine: &Engine, domain: &str) -> Result<String, ReportError> {
    let v = domain_values(
        engine,
        "SELECT domain, attack_version FROM attack_versions_current",
        domain,
    )
    .await?;
    Ok(v.into_iter().next().unwrap_or_default())
}

/// The second column of `sql`'s rows whose first column is `domain` (filtered here, so the domain
/// is never spliced into SQL).
async fn domain_values(
    engine: &Engine,
    sql: &str,
    domain: &str,
) -> Result<Vec<String>, ReportError> {
    let r = engine.run(sql).await.map_err(meta_err)?;
    let mut out = Vec::new();
    for b in &r[0].batches {
        let d = crate::feeds::column_strings(b, 0);
        let v = crate::feeds::column_strings(b, 1);
        for (d, v) in d.into_iter().zip(v) {
            if let (Some(d), Some(v)) = (d, v) {
                if d == domain {
                    out.push(v);
                }
            }
        }
    }
    Ok(out)
}

/// One report in one format, rendered through a scratch directory: (bytes, media type), or None
/// when the format does not apply to it (no chart, no technique ids, STIX).
pub async fn render_one(
    settings: &Settings,
    engine: &Engine,
    name: &str,
    format: Format,
) -> Result<Option<(Vec<u8>, &'static str)>, ReportError> {
    let def = super::select(&[name.to_string()])?.remove(0);
    let domain = settings.mapping.domain.as_str();
    let version = current_version(engine, domain).await?;
    let platforms = domain_platforms(engine, domain).await?;
    let templates = super::html::Templates::load(Path::new(&settings.reports.templates))?;
    let formats = [format];
    let ctx = super::Context {
        domain,
        attack_version: &version,
        generated_at: crate::feeds::fixed(chrono::Utc::now()),
        since: None,
        templates: &templates,
        formats: &formats,
        platforms: &platforms,
    };
    let b = super::build(engine, &def, domain).await?;
    let dir = tempfile::tempdir().map_err(|e| ReportError::Write {
        path: std::env::temp_dir().display().to_string(),
        message: e.to_string(),
    })?;
    let Some(path) = super::write(&b, format, dir.path(), &ctx)? else {
        return Ok(None);
    };
    let bytes = std::fs::read(&path).map_err(|e| ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let media = match format {
        Format::Html => "text/html; charset=utf-8",
        Format::Pdf => "application/pdf",
        Format::Svg => "image/svg+xml",
        Format::Png => "image/png",
        Format::Csv => "text/csv; charset=utf-8",
        Format::Json | Format::Navigator | Format::Stix | Format::MispFeed => "application/json",
    };
    Ok(Some((bytes, media)))
}
