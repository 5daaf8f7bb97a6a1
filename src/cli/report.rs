//! `threatlake report` (run the report datasets in batch and write each in every asked format, plus
//! `index.html` and `index.json`) and `threatlake chart` (one ad-hoc chart from any query).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use threatlake::charts::{Chart, ChartKind, ChartSpec, Frame, ImageFormat};
use threatlake::reports::{self, Format};
use threatlake::sql::EngineOptions;
use threatlake::{Engine, Lake, Settings};

/// Every format, the default of `report --format`.
pub const ALL_FORMATS: &str = "html,pdf,csv,json,navigator,stix,svg,png";

/// Run `names` (all when empty) into `out` in `formats` (comma-separated names), counting only intel
/// observed on or after `since` (YYYY-MM-DD or RFC 3339).
pub async fn report(
    settings: &Settings,
    names: Vec<String>,
    formats: &str,
    out: Option<PathBuf>,
    since: Option<String>,
) -> Result<()> {
    let formats: Vec<Format> = formats
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            Format::parse(f).with_context(|| {
                format!("unknown report format {f:?}; use any of {ALL_FORMATS} (comma-separated)")
            })
        })
        .collect::<Result<_>>()?;
    if formats.is_empty() {
        bail!("no report format given; use --format {ALL_FORMATS}");
    }
    let since_at = since.as_deref().map(parse_since).transpose()?;
    let defs = reports::select(&names)?;
    let out = out.unwrap_or_else(|| PathBuf::from(&settings.reports.out_dir));
    let lake = Lake::from_settings(&settings.lake)?;
    let mut options = EngineOptions::from_settings(settings);
    options.since = since_at;
    let engine = Engine::open_with(&lake, &options).await?;
    let domain = settings.mapping.domain.as_str();
    let version = current_version(&engine, domain).await?;
    let platforms = domain_platforms(&engine, domain).await?;
    let templates = reports::html::Templates::load(Path::new(&settings.reports.templates))?;
    let ctx = reports::Context {
        domain,
        attack_version: &version,
        generated_at: threatlake::feeds::fixed(chrono::Utc::now()),
        since: since_at.map(|s| s.format("%Y-%m-%d %H:%M UTC").to_string()),
        templates: &templates,
        formats: &formats,
        platforms: &platforms,
    };
    let bar = indicatif::ProgressBar::new(defs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {elapsed}")
            .expect("static template"),
    );
    let mut built = Vec::new();
    let mut index = Vec::new();
    for def in &defs {
        bar.set_message(def.name.clone());
        let b = reports::build(&engine, def, domain).await?;
        if let Err(e) = &b.chart {
            bar.suspend(|| eprintln!("warning: report {}: no chart: {e}", def.name));
        }
        let mut files = Vec::new();
        for f in &formats {
            if let Some(p) = reports::write(&b, *f, &out, &ctx)? {
                files.push(
                    p.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                );
            }
        }
        index.push(serde_json::json!({
            "name": def.name, "title": def.title, "description": def.description,
            "chart": def.chart, "rows": b.data.rows(), "files": files,
            "chart_error": b.chart.as_ref().err().map(|e| e.to_string()),
        }));
        built.push((b, files));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut bundles = Vec::new();
    if formats.contains(&Format::Stix) {
        let b = reports::stix::bundle(&engine).await?;
        let mut bytes = serde_json::to_vec_pretty(&b)?;
        bytes.push(b'\n');
        reports::write_atomic(&out.join("mapped_intel.stix.json"), &bytes)?;
        bundles.push("mapped_intel.stix.json");
    }
    let mut idx = serde_json::to_vec_pretty(&serde_json::json!({
        "generated_at": ctx.generated_at, "since": ctx.since,
        "domain": domain, "attack_version": version, "reports": index, "bundles": bundles
    }))?;
    idx.push(b'\n');
    reports::write_atomic(&out.join("index.json"), &idx)?;
    if formats.contains(&Format::Html) {
        let list: Vec<_> = built.iter().map(|(b, f)| (b, f.clone())).collect();
        let page = reports::index_page(&list, &bundles, &ctx)?;
        reports::write_atomic(&out.join("index.html"), page.as_bytes())?;
    }
    println!(
        "{} report(s) written to {} (index.json{} lists them)",
        defs.len(),
        out.display(),
        if formats.contains(&Format::Html) {
            ", index.html"
        } else {
            ""
        }
    );
    Ok(())
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 instant.
pub fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|d| d.with_timezone(&chrono::Utc))
        .with_context(|| format!("--since {s:?}: use a date like 2026-01-31 or an RFC 3339 time"))
}

/// Options of `threatlake chart`.
#[derive(Debug, clap::Args)]
pub struct ChartArgs {
    /// The query (its last statement is charted).
    pub sql: String,
    /// bar, hbar, line, heatmap (ATT&CK matrix), map (world) or scatter.
    #[arg(long, default_value = "bar")]
    pub kind: String,
    /// Output file: .svg or .png.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Label / x / country / technique-id column (default: picked by type).
    #[arg(long)]
    pub x: Option<String>,
    /// Value column (default: the first numeric one).
    #[arg(long)]
    pub y: Option<String>,
    /// Series (colour) column; for heatmaps `subtechniques` lists sub-techniques.
    #[arg(long)]
    pub series: Option<String>,
    /// Scatter: lay this text column out in 2-D with the mapping model (PCA).
    #[arg(long)]
    pub project: Option<String>,
    /// Chart title (default: the query).
    #[arg(long)]
    pub title: Option<String>,
    /// Bars shown at most; the rest are left out (and the axis says so).
    #[arg(long, default_value_t = 30)]
    pub limit: usize,
}

/// Draw one chart from a query into a file.
pub async fn chart(settings: &Settings, a: ChartArgs) -> Result<()> {
    let kind = ChartKind::parse(&a.kind).with_context(|| {
        format!(
            "unknown chart kind {:?}; use bar, hbar, line, heatmap, map or scatter",
            a.kind
        )
    })?;
    let ext = a
        .out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let format = ImageFormat::from_extension(ext)
        .with_context(|| format!("--out {}: name an .svg or .png file", a.out.display()))?;
    let mut spec = ChartSpec::of(kind);
    spec.x = a.x;
    spec.y = a.y;
    spec.series = a.series;
    spec.project = a.project;
    spec.limit = a.limit.max(1);
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open_with(&lake, &EngineOptions::from_settings(settings)).await?;
    let mut results = engine.run(&a.sql).await?;
    let Some(r) = results.pop() else {
        bail!("the SQL holds no statement");
    };
    let frame = Frame::new(&r.schema, &r.batches);
    let title = a.title.unwrap_or_else(|| {
        let one_line = a.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        threatlake::charts::clip(&one_line, 90)
    });
    let c = Chart::build(
        &engine,
        &spec,
        &title,
        &frame,
        settings.mapping.domain.as_str(),
    )
    .await?;
    let img = c.render(format)?;
    reports::write_atomic(&a.out, &img.bytes)?;
    println!(
        "{} chart of {} row(s), {} mark(s), written to {} ({}x{})",
        kind.name(),
        frame.rows,
        img.marks,
        a.out.display(),
        img.size.0,
        img.size.1
    );
    Ok(())
}

/// The platforms of `domain`'s current techniques, sorted.
async fn domain_platforms(engine: &Engine, domain: &str) -> Result<Vec<String>> {
    domain_values(
        engine,
        "SELECT DISTINCT domain, unnest(platforms) AS p FROM attack_techniques_current ORDER BY 2",
        domain,
    )
    .await
}

async fn current_version(engine: &Engine, domain: &str) -> Result<String> {
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
async fn domain_values(engine: &Engine, sql: &str, domain: &str) -> Result<Vec<String>> {
    let r = engine.run(sql).await?;
    let mut out = Vec::new();
    for b in &r[0].batches {
        let d = threatlake::feeds::column_strings(b, 0);
        let v = threatlake::feeds::column_strings(b, 1);
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
