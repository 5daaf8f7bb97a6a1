//! `threatlake report` (run the report datasets in batch and write each in every asked format, plus
//! `index.html` and `index.json`) and `threatlake chart` (one ad-hoc chart from any query).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use threatlake::charts::{Chart, ChartKind, ChartSpec, Frame, ImageFormat};
use threatlake::reports;
use threatlake::sql::EngineOptions;
use threatlake::{Engine, Lake, Settings};

/// Every format, the default of `report --format`.
pub const ALL_FORMATS: &str = reports::batch::ALL_FORMATS;

/// Run `names` (all when empty) into `out` in `formats` (comma-separated names), counting only intel
/// observed on or after `since` (YYYY-MM-DD or RFC 3339).
pub async fn report(
    settings: &Settings,
    names: Vec<String>,
    formats: &str,
    out: Option<PathBuf>,
    since: Option<String>,
) -> Result<()> {
    let options = reports::batch::BatchOptions {
        names,
        formats: reports::batch::parse_formats(formats)?,
        out: out.unwrap_or_else(|| PathBuf::from(&settings.reports.out_dir)),
        since: since
            .as_deref()
            .map(reports::batch::parse_since)
            .transpose()?,
    };
    let defs = reports::select(&options.names)?;
    let bar = indicatif::ProgressBar::new(defs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {elapsed}")
            .expect("static template"),
    );
    // Position counts the reports started.
    let r = reports::batch::write_all(settings, &options, &|name: &str| {
        bar.inc(1);
        bar.set_message(name.to_string());
    })
    .await;
    bar.finish_and_clear();
    let r = r?;
    for (name, e) in &r.chart_errors {
        eprintln!("warning: report {name}: no chart: {e}");
    }
    println!(
        "{} report(s) written to {} (index.json{} lists them)",
        r.reports,
        r.out_dir.display(),
        if r.index_html { ", index.html" } else { "" }
    );
    Ok(())
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
