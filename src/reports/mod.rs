//! Batch reports: each `sql/reports/*.sql` file is one named dataset (a `-- title:` / `-- description:` /
//! `-- chart:` header, then one query); `threatlake report` runs them and writes HTML, PDF, CSV, JSON,
//! chart images and ATT&CK Navigator layers, plus a STIX 2.1 bundle of the mapped intel.

pub mod batch;
pub mod html;
pub mod misp;
pub mod navigator;
pub mod pdf;
pub mod stix;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::charts::{self, Chart, ChartError, ChartSpec, Frame, ImageFormat};
use crate::sql::output::{self, OutputFormat};
use crate::sql::{Engine, SqlError};

/// Reports shipped in `sql/reports/`, in the order they are listed.
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "technique_frequency",
        include_str!("../../sql/reports/technique_frequency.sql"),
    ),
    (
        "tactic_coverage",
        include_str!("../../sql/reports/tactic_coverage.sql"),
    ),
    (
        "threats_over_time",
        include_str!("../../sql/reports/threats_over_time.sql"),
    ),
    (
        "threat_families",
        include_str!("../../sql/reports/threat_families.sql"),
    ),
    (
        "threats_by_country",
        include_str!("../../sql/reports/threats_by_country.sql"),
    ),
    (
        "top_mapped_techniques",
        include_str!("../../sql/reports/top_mapped_techniques.sql"),
    ),
    (
        "threat_model_diff",
        include_str!("../../sql/reports/threat_model_diff.sql"),
    ),
    (
        "attack_matrix",
        include_str!("../../sql/reports/attack_matrix.sql"),
    ),
    (
        "threat_clusters",
        include_str!("../../sql/reports/threat_clusters.sql"),
    ),
];

/// Errors running reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A report file lacks its header.
    #[error("report {name}: {message}; start the file with `-- title: …`, `-- description: …`, `-- chart: bar|hbar|line|heatmap|map|scatter`")]
    Header {
        /// Report name.
        name: String,
        /// What is missing.
        message: String,
    },
    /// No such report.
    #[error("no report named {name}; known reports: {known}")]
    Unknown {
        /// Name given.
        name: String,
        /// Names available.
        known: String,
    },
    /// The query failed.
    #[error("report {name}: {source}{}", memory_hint(source))]
    Sql {
        /// Report name.
        name: String,
        /// Error.
        source: SqlError,
    },
    /// Writing an output failed.
    #[error("writing {path}: {message}")]
    Write {
        /// File.
        path: String,
        /// Error.
        message: String,
    },
    /// A template failed to load or render.
    #[error(
        "HTML template {name}: {message}; fix the template or delete it to use the shipped one"
    )]
    Template {
        /// Template file.
        name: String,
        /// minijinja's message.
        message: String,
    },
    /// A report's `-- chart:` line is invalid.
    #[error("report {name}: {source}")]
    Chart {
        /// Report name.
        name: String,
        /// Error.
        source: crate::charts::ChartError,
    },
    /// A report option (format list, `--since`) is invalid.
    #[error("{option} {value:?}: {message}")]
    Option {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        message: String,
    },
    /// The result cannot be shown as a Navigator layer.
    #[error("report {name} cannot be a Navigator layer: {message}")]
    Navigator {
        /// Report name.
        name: String,
        /// Why.
        message: String,
    },
}

/// One report dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportDef {
    /// File stem.
    pub name: String,
    /// Title.
    pub title: String,
    /// One-line description.
    pub description: String,
    /// Default chart kind.
    pub chart: String,
    /// The query (header included; it is SQL comments).
    pub sql: String,
}

/// Parse a report file: `-- key: value` header lines, then the query.
pub fn parse_def(name: &str, text: &str) -> Result<ReportDef, ReportError> {
    let get = |key: &str| {
        text.lines()
            .take_while(|l| l.starts_with("--"))
            .find_map(|l| {
                l.trim_start_matches('-')
                    .trim()
                    .strip_prefix(key)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
            .ok_or_else(|| ReportError::Header {
                name: name.to_string(),
                message: format!("no `-- {key}:` line"),
            })
    };
    let def = ReportDef {
        name: name.to_string(),
        title: get("title")?,
        description: get("description")?,
        chart: get("chart")?,
        sql: text.to_string(),
    };
    def.chart_spec()?;
    Ok(def)
}

impl ReportDef {
    /// The parsed `-- chart:` line.
    pub fn chart_spec(&self) -> Result<ChartSpec, ReportError> {
        ChartSpec::parse(&self.chart).map_err(|source| ReportError::Chart {
            name: self.name.clone(),
            source,
        })
    }
}

/// The shipped reports.
pub fn shipped() -> Vec<ReportDef> {
    SHIPPED
        .iter()
        .map(|(n, t)| parse_def(n, t).expect("shipped report headers are valid"))
        .collect()
}

/// Pick reports by name (all when `names` is empty).
pub fn select(names: &[String]) -> Result<Vec<ReportDef>, ReportError> {
    let all = shipped();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            all.iter()
                .find(|d| &d.name == n)
                .cloned()
                .ok_or_else(|| ReportError::Unknown {
                    name: n.clone(),
                    known: all
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// Output formats of `threatlake report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Self-contained HTML page (minijinja, chart inlined as SVG, sortable table).
    Html,
    /// PDF (krilla): title, summary, chart, table, page numbers.
    Pdf,
    /// The chart alone as SVG.
    Svg,
    /// The chart alone as PNG.
    Png,
    /// arrow-csv, formula-neutralised.
    Csv,
    /// arrow-json array.
    Json,
    /// ATT&CK Navigator layer 4.5 (reports with `technique_id` and `score`).
    Navigator,
    /// One STIX 2.1 bundle of all mapped intel (not per report).
    Stix,
    /// A MISP feed directory of all mapped intel (not per report): manifest.json, hashes.csv and
    /// one event per threat item.
    MispFeed,
}

impl Format {
    /// Parse a format name.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "html" => Some(Format::Html),
            "pdf" => Some(Format::Pdf),
            "svg" => Some(Format::Svg),
            "png" => Some(Format::Png),
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "navigator" => Some(Format::Navigator),
            "stix" => Some(Format::Stix),
            "misp-feed" => Some(Format::MispFeed),
            _ => None,
        }
    }
}

/// A report's result.
pub struct Dataset {
    /// The definition.
    pub def: ReportDef,
    /// Result schema.
    pub schema: SchemaRef,
    /// Rows.
    pub batches: Vec<RecordBatch>,
}

impl Dataset {
    /// Row count.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// What to do when a report query ran out of its memory pool.
fn memory_hint(e: &SqlError) -> &'static str {
    if e.is_out_of_memory() {
        "\n(the report queries may hold reports.memory_mb of memory and this one needs more where DataFusion cannot spill: raise reports.memory_mb, e.g. THREATLAKE_REPORTS_MEMORY_MB=4096, or 0 for no bound)"
    } else {
        ""
    }
}

/// Run one report.
pub async fn run(engine: &Engine, def: &ReportDef) -> Result<Dataset, ReportError> {
    let err = |source| ReportError::Sql {
        name: def.name.clone(),
        source,
    };
    let mut r = engine.run(&def.sql).await.map_err(err)?;
    let q = r.pop().ok_or_else(|| ReportError::Header {
        name: def.name.clone(),
        message: "no query".into(),
    })?;
    Ok(Dataset {
        def: def.clone(),
        schema: q.schema,
        batches: q.batches,
    })
}

/// A report's result with its chart (or why the chart could not be drawn: a missing model or
/// ATT&CK release should not stop the other outputs).
pub struct Built {
    /// The result.
    pub data: Dataset,
    /// The result as columns (tables of HTML pages and PDFs).
    pub frame: Frame,
    /// The chart.
    pub chart: Result<Chart, ChartError>,
    /// The chart drawn as SVG and as PNG, each once however many outputs use it (the SVG file and
    /// the HTML page; the PNG file and the PDF).
    images: [OnceLock<Result<charts::Rendered, ChartError>>; 2],
}

impl Built {
    /// The chart drawn as `format` (drawn on first use).
    pub fn image(&self, format: ImageFormat) -> Result<charts::Rendered, ChartError> {
        let slot = &self.images[usize::from(format == ImageFormat::Png)];
        slot.get_or_init(|| match &self.chart {
            Ok(c) => c.render(format),
            Err(e) => Err(e.clone()),
        })
        .clone()
    }
}

/// Run one report and build its chart.
pub async fn build(engine: &Engine, def: &ReportDef, domain: &str) -> Result<Built, ReportError> {
    build_from(engine, run(engine, def).await?, domain).await
}

/// Build the chart of a result computed elsewhere (the dashboard's filtered matrix).
pub async fn build_from(
    engine: &Engine,
    data: Dataset,
    domain: &str,
) -> Result<Built, ReportError> {
    let def = &data.def;
    let spec = def.chart_spec()?;
    let frame = Frame::new(&data.schema, &data.batches);
    let chart = Chart::build(engine, &spec, &def.title, &frame, domain).await;
    Ok(Built {
        data,
        frame,
        chart,
        images: Default::default(),
    })
}

/// What every output of a report run shares.
pub struct Context<'a> {
    /// ATT&CK domain of the mapping.
    pub domain: &'a str,
    /// Its newest release in the lake.
    pub attack_version: &'a str,
    /// When the run started (RFC 3339).
    pub generated_at: String,
    /// The `--since` date, if any.
    pub since: Option<String>,
    /// HTML templates.
    pub templates: &'a html::Templates,
    /// Formats written in this run (for cross-links).
    pub formats: &'a [Format],
    /// The domain's platforms in its current release (Navigator layer filters).
    pub platforms: &'a [String],
}

/// Rows shown in HTML pages and PDFs (the CSV and JSON outputs hold all).
pub const HTML_ROWS: usize = 1000;
/// Rows shown in PDFs.
pub const PDF_ROWS: usize = 300;

fn file_name(name: &str, format: Format, built: &Built) -> Option<String> {
    let ext = match format {
        Format::Html => "html",
        Format::Pdf => "pdf",
        Format::Csv => "csv",
        Format::Json => "json",
        Format::Svg | Format::Png if built.chart.is_err() => return None,
        Format::Svg => "svg",
        Format::Png => "png",
        Format::Navigator if built.data.schema.index_of("technique_id").is_err() => return None,
        Format::Navigator => "layer.json",
        Format::Stix | Format::MispFeed => return None,
    };
    Some(format!("{name}.{ext}"))
}

/// The files a report gets in `formats`.
pub fn file_names(built: &Built, formats: &[Format]) -> Vec<String> {
    formats
        .iter()
        .filter_map(|f| file_name(&built.data.def.name, *f, built))
        .collect()
}

fn table_strings(frame: &Frame, max: usize) -> (Vec<(String, bool)>, Vec<Vec<String>>) {
    let columns = frame
        .names
        .iter()
        .zip(&frame.columns)
        .map(|(n, c)| (n.clone(), c.data_type().is_numeric()))
        .collect();
    let cols: Vec<Vec<String>> = (0..frame.columns.len())
        .map(|c| frame.strings(c).into_iter().take(max).collect())
        .collect();
    let rows = (0..frame.rows.min(max))
        .map(|r| cols.iter().map(|c| c[r].clone()).collect())
        .collect();
    (columns, rows)
}

/// Write `built` in `format` under `dir`; None when the format does not apply (a Navigator layer
/// needs technique ids; images need a chart; STIX is one bundle per run).
pub fn write(
    built: &Built,
    format: Format,
    dir: &Path,
    ctx: &Context,
) -> Result<Option<PathBuf>, ReportError> {
    let def = &built.data.def;
    let Some(name) = file_name(&def.name, format, built) else {
        return Ok(None);
    };
    let werr = |message: String| ReportError::Write {
        path: dir.join(&name).display().to_string(),
        message,
    };
    let path = dir.join(&name);
    let bytes = match format {
        Format::Csv | Format::Json => {
            // Batch by batch into the file, as `threatlake sql` prints them.
            let f = if format == Format::Csv {
                OutputFormat::Csv
            } else {
                OutputFormat::Json
            };
            let mut file = AtomicFile::create(&path)?;
            output::write(file.writer(), f, &built.data.schema, &built.data.batches, 0)
                .map_err(|e| werr(e.to_string()))?;
            file.commit()?;
            return Ok(Some(path));
        }
        Format::Navigator => {
            let layer =
                navigator::layer(&built.data, ctx.domain, ctx.attack_version, ctx.platforms)?;
            let mut v = serde_json::to_vec_pretty(&layer).expect("layer serialises");
            v.push(b'\n');
            v
        }
        Format::Svg | Format::Png => {
            let f = if format == Format::Svg {
                ImageFormat::Svg
            } else {
                ImageFormat::Png
            };
            built
                .image(f)
                .map_err(|source| ReportError::Chart {
                    name: def.name.clone(),
                    source,
                })?
                .bytes
        }
        Format::Html => html_page(built, ctx)?.into_bytes(),
        Format::Pdf => pdf::render(&def.title, &[pdf_section(built, ctx)?])?,
        Format::Stix | Format::MispFeed => unreachable!("file_name returns None"),
    };
    write_atomic(&path, &bytes)?;
    Ok(Some(path))
}

fn chart_image(built: &Built, format: ImageFormat) -> (Option<charts::Rendered>, Option<String>) {
    match built.image(format) {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

fn meta_line(built: &Built, ctx: &Context) -> Vec<String> {
    let mut m = vec![
        format!("Generated {}", ctx.generated_at),
        format!("ATT&CK {} {}", ctx.domain, ctx.attack_version),
    ];
    if let Some(s) = &ctx.since {
        m.push(format!("Intel since {s}"));
    }
    m.push(format!("{} rows", built.data.rows()));
    m
}

/// The report's HTML page.
pub fn html_page(built: &Built, ctx: &Context) -> Result<String, ReportError> {
    let def = &built.data.def;
    let frame = &built.frame;
    let (columns, table) = table_strings(frame, HTML_ROWS);
    let (svg, chart_error) = chart_image(built, ImageFormat::Svg);
    let files: Vec<String> = file_names(built, ctx.formats)
        .into_iter()
        .filter(|f| !f.ends_with(".html"))
        .collect();
    ctx.templates.render(
        "report.html.j2",
        serde_json::json!({
            "report": {"name": def.name, "title": def.title, "description": def.description, "chart": def.chart},
            "generated_at": ctx.generated_at, "domain": ctx.domain, "attack_version": ctx.attack_version,
            "since": ctx.since, "rows": frame.rows, "shown": table.len(),
            "columns": columns.iter().map(|(n, num)| serde_json::json!({"name": n, "numeric": num})).collect::<Vec<_>>(),
            "table": table,
            "chart_svg": svg.map(|r| String::from_utf8_lossy(&r.bytes).into_owned()),
            "chart_error": chart_error, "files": files,
            "sort_js": html::SORT_JS, "csp": html::csp(),
        }),
    )
}

/// The report as a PDF section.
pub fn pdf_section(built: &Built, ctx: &Context) -> Result<pdf::Section, ReportError> {
    let def = &built.data.def;
    let frame = &built.frame;
    let (columns, rows) = table_strings(frame, PDF_ROWS);
    let (png, chart_error) = chart_image(built, ImageFormat::Png);
    Ok(pdf::Section {
        title: def.title.clone(),
        description: def.description.clone(),
        meta: meta_line(built, ctx),
        chart_png: png.map(|r| (r.bytes, r.size)),
        chart_error,
        columns,
        rows,
        total_rows: frame.rows,
    })
}

/// The index page of a run: `reports` are (built, files written).
pub fn index_page(
    reports: &[(&Built, Vec<String>)],
    bundles: &[&str],
    ctx: &Context,
) -> Result<String, ReportError> {
    let list: Vec<serde_json::Value> = reports
        .iter()
        .map(|(b, files)| {
            let d = &b.data.def;
            serde_json::json!({
                "name": d.name, "title": d.title, "description": d.description, "rows": b.data.rows(),
                "html": files.iter().find(|f| f.ends_with(".html")),
                "files": files.iter().filter(|f| !f.ends_with(".html")).map(|f| {
                    let ext = f.split_once('.').map_or("", |(_, e)| e);
                    let label = match ext {
                        "layer.json" => "Navigator layer".to_string(),
                        e => e.to_uppercase(),
                    };
                    serde_json::json!({"href": f, "label": label})
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    ctx.templates.render(
        "index.html.j2",
        serde_json::json!({
            "generated_at": ctx.generated_at, "domain": ctx.domain, "attack_version": ctx.attack_version,
            "since": ctx.since, "reports": list, "bundles": bundles,
            "sort_js": html::SORT_JS, "csp": html::csp(),
        }),
    )
}

/// Write a file under a temporary name, then rename it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(write_err(path))?;
    }
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            write_err(path)(e)
        })
}

/// The temporary file beside `path` it is written as before it is renamed into place.
fn tmp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ))
}

/// A file written through a buffer into a temporary file beside it (so a large export never sits
/// in memory whole) and renamed into place by [`AtomicFile::commit`]; dropped uncommitted, the
/// temporary file is removed and the old file stays.
pub struct AtomicFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    w: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Start writing `path`.
    pub fn create(path: &Path) -> Result<Self, ReportError> {
        let err = write_err(path);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(err)?;
        }
        let tmp = tmp_path(path);
        let f = std::fs::File::create(&tmp).map_err(write_err(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            w: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
        })
    }

    /// The buffered writer.
    pub fn writer(&mut self) -> &mut std::io::BufWriter<std::fs::File> {
        self.w
            .as_mut()
            .expect("an AtomicFile is written until it is committed")
    }

    /// Flush and rename into place.
    pub fn commit(mut self) -> Result<(), ReportError> {
        let err = write_err(&self.path);
        let w = self.w.take().expect("committed once");
        w.into_inner().map_err(|e| err(e.into_error()))?;
        std::fs::rename(&self.tmp, &self.path).map_err(write_err(&self.path))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.w.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> ReportError + '_ {
    move |e| ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_reports_have_headers() {
        let all = shipped();
        assert_eq!(all.len(), SHIPPED.len());
        assert!(all
            .iter()
            .all(|d| !d.title.is_empty() && !d.chart.is_empty()));
        let e = parse_def("x", "SELECT 1").unwrap_err().to_string();
        assert!(e.contains("-- title:"), "{e}");
        assert!(select(&["nope".into()])
            .unwrap_err()
            .to_string()
            .contains("technique_frequency"));
    }
}
