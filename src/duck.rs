//! Embedded DuckDB over the same Parquet lake: a view per lake table (`read_parquet` with hive
//! partitioning), empty tables for known tables the lake lacks, the compatibility macros of
//! `sql/duckdb/`, the shipped views of `sql/views/`, and threatlake's functions backed by the same
//! Arrow kernels as DataFusion. Results come back as arrow-59 batches, so output is shared.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StructArray};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use duckdb::Connection;
use threatlake_udfs::duckdb_adapter;
use threatlake_udfs::LazyMapper;

use crate::sql::{EngineOptions, QueryResult};
use crate::Lake;

/// Errors of the embedded DuckDB engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DuckError {
    /// DuckDB rejected a statement or failed to run it.
    #[error("{0}")]
    DuckDb(#[from] duckdb::Error),
    /// The lake is not a local directory.
    #[error("the DuckDB engine reads local lakes only, not {0}; use the DataFusion engine (the default) or `lake sync` the lake to a local directory")]
    NotLocal(String),
    /// Listing the lake failed.
    #[error(transparent)]
    Lake(#[from] crate::lake::LakeError),
    /// A setup statement (lake view, empty table, shipped view) failed.
    #[error("setting up the lake in DuckDB at `{sql}`: {source}")]
    Setup {
        /// First line of the statement.
        sql: String,
        /// DuckDB's error.
        source: duckdb::Error,
    },
    /// A statement that would write (same message as on DataFusion).
    #[error(transparent)]
    ReadOnly(crate::sql::SqlError),
    /// A result could not be converted.
    #[error("converting a DuckDB result: {0}")]
    Arrow(String),
}

/// An in-memory DuckDB database over a lake.
pub struct DuckEngine {
    con: Connection,
    /// The lake's root directory.
    pub root: PathBuf,
    /// The mapping model the functions use.
    pub mapper: Arc<LazyMapper>,
}

impl DuckEngine {
    /// Open over `lake` (local only): views, compatibility macros, shipped views, functions.
    pub async fn open(lake: &Lake, options: &EngineOptions) -> Result<Self, DuckError> {
        let url = lake.location.base_url.as_str().to_string();
        let Some(root) = lake.location.local_path() else {
            return Err(DuckError::NotLocal(url));
        };
        let setup = crate::sql::duckdb_sql::setup(lake).await?;
        let con = Connection::open_in_memory()?;
        let mapper = Arc::new(LazyMapper::new(
            &options.models_root,
            &options.mapping_domain,
            options.threshold,
        ));
        duckdb_adapter::register(&con, &mapper)?;
        for sql in setup {
            if sql
                .lines()
                .all(|l| l.trim().is_empty() || l.starts_with("--"))
            {
                continue;
            }
            con.execute_batch(&sql).map_err(|source| DuckError::Setup {
                sql: sql
                    .lines()
                    .find(|l| !l.starts_with("--"))
                    .unwrap_or_default()
                    .to_string(),
                source,
            })?;
        }
        // Lock the session down: files are reachable only under the lake root (reads of its views;
        // COPY … TO elsewhere fails), and the settings cannot be changed back from SQL.
        let lockdown = format!(
            "SET allowed_directories = [{}]; SET enable_external_access = false; SET lock_configuration = true;",
            crate::sql::duckdb_sql::quote_literal(&format!("{}/", root.display()))
        );
        con.execute_batch(&lockdown)
            .map_err(|source| DuckError::Setup {
                sql: lockdown.clone(),
                source,
            })?;
        Ok(Self { con, root, mapper })
    }

    /// The statements of `text`, split at top-level semicolons (quotes and comments respected).
    pub fn statements(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let (mut start, mut i) = (0, 0);
        let b = text.as_bytes();
        while i < b.len() {
            match b[i] {
                q @ (b'\'' | b'"') => {
                    i += 1;
                    while i < b.len() {
                        if b[i] == q {
                            if b.get(i + 1) == Some(&q) {
                                i += 1;
                            } else {
                                break;
                            }
                        }
                        i += 1;
                    }
                }
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    i += 2;
                    while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                        i += 1;
                    }
                    i += 1;
                }
                b';' => {
                    out.push(text[start..i].to_string());
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        out.push(text[start.min(text.len())..].to_string());
        out.into_iter()
            .filter(|s| {
                // Keep statements with something besides comments and whitespace.
                s.lines()
                    .map(|l| l.split("--").next().unwrap_or_default().trim())
                    .any(|l| !l.is_empty())
            })
            .collect()
    }

    /// Run every statement of `sql`, collecting each result.
    pub fn run(&self, sql: &str) -> Result<Vec<QueryResult>, DuckError> {
        Self::statements(sql)
            .iter()
            .map(|s| self.run_statement(s))
            .collect()
    }

    /// Run one statement. Statements that write files or tables of the lake are refused, as on
    /// DataFusion (see [`crate::sql::SqlError::ReadOnly`]).
    pub fn run_statement(&self, sql: &str) -> Result<QueryResult, DuckError> {
        if let Some(what) = writing_statement(sql) {
            return Err(DuckError::ReadOnly(crate::sql::SqlError::ReadOnly { what }));
        }
        let mut stmt = self.con.prepare(sql)?;
        let batches60: Vec<duckdb::arrow::record_batch::RecordBatch> =
            stmt.query_arrow([])?.collect();
        let schema60 = stmt.schema();
        let schema = schema_from_duckdb(&schema60)?;
        let mut batches = Vec::with_capacity(batches60.len());
        for b in batches60 {
            let s = duckdb::arrow::array::StructArray::from(b);
            let a = duckdb_adapter::from_duckdb(&s).map_err(|e| DuckError::Arrow(e.to_string()))?;
            let s = a
                .as_any()
                .downcast_ref::<StructArray>()
                .ok_or_else(|| DuckError::Arrow("a batch is not a struct".into()))?;
            let b = RecordBatch::from(s);
            let b = b
                .with_schema(schema.clone())
                .map_err(|e| DuckError::Arrow(e.to_string()))?;
            batches.push(b);
        }
        Ok(QueryResult { schema, batches })
    }

    /// Tables and views, sorted.
    pub fn table_names(&self) -> Vec<(String, &'static str)> {
        let q = "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1";
        let mut out = Vec::new();
        if let Ok(r) = self.run_statement(q) {
            for b in &r.batches {
                let names = crate::feeds::column_strings(b, 0);
                let kinds = crate::feeds::column_strings(b, 1);
                for (n, k) in names.into_iter().zip(kinds) {
                    let kind = if k.as_deref() == Some("VIEW") {
                        "view"
                    } else {
                        "table"
                    };
                    out.push((n.unwrap_or_default(), kind));
                }
            }
        }
        out
    }

    /// Columns of a table or view.
    pub fn table_schema(&self, name: &str) -> Option<SchemaRef> {
        self.run_statement(&format!(
            "SELECT * FROM {} LIMIT 0",
            crate::sql::duckdb_sql::quote_ident(name)
        ))
        .ok()
        .map(|r| r.schema)
    }
}

/// The kind of a statement that writes (its first keyword, after comments and parentheses), if
/// it is one. DuckDB's own statement type is not exposed by duckdb-rs; the session's file lockdown
/// is the second line of defence.
fn writing_statement(sql: &str) -> Option<String> {
    const WRITERS: &[&str] = &[
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "COPY",
        "EXPORT",
        "IMPORT",
        "ATTACH",
        "DETACH",
        "INSTALL",
        "LOAD",
        "TRUNCATE",
        "VACUUM",
        "CHECKPOINT",
    ];
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix('(') {
            rest = r.trim_start();
        } else {
            break;
        }
    }
    let first_word = |t: &str| -> String {
        t.chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect::<String>()
            .to_ascii_uppercase()
    };
    let mut word = first_word(rest);
    // EXPLAIN ANALYZE runs the statement it explains.
    while matches!(word.as_str(), "EXPLAIN" | "ANALYZE") {
        rest = rest[word.len()..].trim_start();
        word = first_word(rest);
    }
    if WRITERS.contains(&word.as_str()) {
        return Some(word);
    }
    // A CTE may precede a write: WITH … INSERT/UPDATE/DELETE.
    if word == "WITH" {
        let upper = sql.to_ascii_uppercase();
        for w in ["INSERT", "UPDATE", "DELETE"] {
            if upper
                .split(|c: char| !c.is_ascii_alphabetic())
                .any(|t| t == w)
            {
                return Some(w.to_string());
            }
        }
    }
    None
}

/// An arrow-60 schema as arrow 59 (types through the C schema; field names kept).
fn schema_from_duckdb(s: &duckdb::arrow::datatypes::Schema) -> Result<SchemaRef, DuckError> {
    let empty = duckdb::arrow::record_batch::RecordBatch::new_empty(Arc::new(s.clone()));
    let st = duckdb::arrow::array::StructArray::from(empty);
    let a = duckdb_adapter::from_duckdb(&st).map_err(|e| DuckError::Arrow(e.to_string()))?;
    match a.data_type() {
        DataType::Struct(fields) => Ok(Arc::new(Schema::new(fields.clone()))),
        other => Err(DuckError::Arrow(format!("unexpected result type {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_statements_are_recognised() {
        for w in [
            "INSERT INTO t VALUES (1)",
            "  -- c\n/* x */ copy (SELECT 1) TO '/tmp/x.csv'",
            "(COPY t TO 'x')",
            "EXPORT DATABASE '/tmp/x'",
            "WITH a AS (SELECT 1) DELETE FROM t",
            "attach '/tmp/x.db'",
            "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        ] {
            assert!(writing_statement(w).is_some(), "{w}");
        }
        for r in [
            "SELECT 'INSERT'",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "DESCRIBE t",
        ] {
            assert_eq!(writing_statement(r), None, "{r}");
        }
    }

    #[test]
    fn splits_statements_outside_quotes_and_comments() {
        let s = DuckEngine::statements(
            "SELECT 'a;b'; -- c;d\nSELECT \"x;y\" FROM t /* ; */; ;\n-- only a comment",
        );
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].contains("'a;b'"));
        assert!(s[1].contains("\"x;y\"") && s[1].contains("/* ; */"));
    }
}
