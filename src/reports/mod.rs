//! Batch reports: each `sql/reports/*.sql` file is one named dataset (a `-- title:` / `-- description:` /
//! `-- chart:` header, then one query); `threatlake report` runs them and writes CSV, JSON and ATT&CK
//! Navigator layers, plus a STIX 2.1 bundle of the mapped intel (charts, HTML and PDF come next).

pub mod navigator;
pub mod stix;

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

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
    #[error("report {name}: {source}")]
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
    Ok(ReportDef {
        name: name.to_string(),
        title: get("title")?,
        description: get("description")?,
        chart: get("chart")?,
        sql: text.to_string(),
    })
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
    /// arrow-csv, formula-neutralised.
    Csv,
    /// arrow-json array.
    Json,
    /// ATT&CK Navigator layer 4.5 (reports with `technique_id` and `score`).
    Navigator,
    /// One STIX 2.1 bundle of all mapped intel (not per report).
    Stix,
}

impl Format {
    /// Parse a format name.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "navigator" => Some(Format::Navigator),
            "stix" => Some(Format::Stix),
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

/// Write `data` in `format` under `dir` as `<name>.<ext>`; None when the format does not apply (a
/// Navigator layer needs technique ids). `domain` and `attack_version` label Navigator layers.
pub fn write(
    data: &Dataset,
    format: Format,
    dir: &Path,
    domain: &str,
    attack_version: &str,
) -> Result<Option<PathBuf>, ReportError> {
    let (ext, bytes) = match format {
        Format::Csv | Format::Json => {
            let mut buf = Vec::new();
            let f = if format == Format::Csv {
                OutputFormat::Csv
            } else {
                OutputFormat::Json
            };
            output::write(&mut buf, f, &data.schema, &data.batches, 0).map_err(|e| {
                ReportError::Write {
                    path: data.def.name.clone(),
                    message: e.to_string(),
                }
            })?;
            (if format == Format::Csv { "csv" } else { "json" }, buf)
        }
        Format::Stix => return Ok(None),
        Format::Navigator => {
            if data.schema.index_of("technique_id").is_err() {
                return Ok(None);
            }
            let layer = navigator::layer(data, domain, attack_version)?;
            let mut v = serde_json::to_vec_pretty(&layer).expect("layer serialises");
            v.push(b'\n');
            ("layer.json", v)
        }
    };
    let path = dir.join(format!("{}.{ext}", data.def.name));
    write_atomic(&path, &bytes)?;
    Ok(Some(path))
}

/// Write a file under a temporary name, then rename it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let err = |e: std::io::Error| ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
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
