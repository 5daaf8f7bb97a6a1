//! The DuckDB side of the lake as SQL: a view per lake table over its Parquet files, empty tables
//! for known tables the lake lacks, the compatibility macros of `sql/duckdb/compat.sql`, then the
//! shipped views of `sql/views/`. The embedded engine runs these statements; `threatlake lake
//! duckdb-sql` prints them so stock DuckDB (with the threatlake extension) gets the same tables.

use arrow::datatypes::DataType;

use super::{known_tables, VIEWS};
use crate::lake::delta::AsOf;
use crate::lake::{Lake, LakeError};

/// A Delta log path (percent-encoded, e.g. `%3A` in partition values) as a file name.
pub fn decode_path(p: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", p.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| p.to_string())
}

/// DuckDB-dialect helpers the shipped views need (DataFusion function names DuckDB lacks).
pub const COMPAT: &str = include_str!("../../sql/duckdb/compat.sql");
/// The view over one lake table; `{table}` and `{glob}` are filled in (quoted) per table.
pub const LAKE_VIEW: &str = include_str!("../../sql/duckdb/lake_view.sql");

/// `'…'` with quotes doubled.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `"…"` with quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// DuckDB's name for an Arrow type of the lake's schemas.
pub fn duck_type(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int32 => "INTEGER".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Date32 => "DATE".into(),
        // UTC instants as plain TIMESTAMP: see sql/duckdb/lake_view.sql.
        DataType::Timestamp(_, _) => "TIMESTAMP".into(),
        DataType::List(f) | DataType::LargeList(f) => format!("{}[]", duck_type(f.data_type())),
        _ => "VARCHAR".into(),
    }
}

/// The statements that give a DuckDB database the lake: a local directory, or `s3://bucket/prefix`
/// (stock DuckDB reads that through its httpfs extension or a registered fsspec filesystem). The
/// threatlake functions must be registered first (the views use `attack_version_key`).
pub async fn setup(lake: &Lake) -> Result<Vec<String>, LakeError> {
    let root = lake.location.reader_root();
    // Each table's current snapshot: exactly the files of its latest commit.
    let mut found = std::collections::BTreeMap::new();
    for name in lake.require_delta().await? {
        if let Some(snap) = lake.snapshot(&name, &AsOf::Latest).await? {
            if !snap.files.is_empty() {
                found.insert(name, snap.files);
            }
        }
    }
    let known = known_tables();
    let mut out = vec![COMPAT.to_string()];
    // The template's comment explains the placeholders: print it once as written, and substitute
    // them in the statement only (not in the comment, where they would read as nonsense).
    let (comment, view): (Vec<&str>, Vec<&str>) =
        LAKE_VIEW.lines().partition(|l| l.starts_with("--"));
    let view = view.join("\n") + "\n";
    if !found.is_empty() {
        out.push(comment.join("\n"));
    }
    for (name, files) in &found {
        let list = files
            .iter()
            .map(|(f, _)| quote_literal(&format!("{root}/{name}/{}", decode_path(f))))
            .collect::<Vec<_>>()
            .join(", ");
        let glob = format!("[{list}]");
        let tz: Vec<String> = known
            .iter()
            .find(|(k, _, _)| k == name)
            .map(|(_, schema, _)| {
                schema
                    .fields()
                    .iter()
                    .filter(|f| matches!(f.data_type(), DataType::Timestamp(_, Some(_))))
                    .map(|f| {
                        let c = quote_ident(f.name());
                        format!("CAST({c} AS TIMESTAMP) AS {c}")
                    })
                    .collect()
            })
            .unwrap_or_default();
        let replace = if tz.is_empty() {
            String::new()
        } else {
            format!("REPLACE ({})", tz.join(", "))
        };
        out.push(
            view.replace("{table}", &quote_ident(name))
                .replace("{glob}", &glob)
                .replace("{replace}", &replace),
        );
    }
    for (name, schema, partition_cols) in known {
        if found.contains_key(name) {
            continue;
        }
        let mut cols: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("{} {}", quote_ident(f.name()), duck_type(f.data_type())))
            .collect();
        cols.extend(
            partition_cols
                .iter()
                .map(|c| format!("{} VARCHAR", quote_ident(c))),
        );
        out.push(format!(
            "CREATE TABLE {} ({});",
            quote_ident(name),
            cols.join(", ")
        ));
    }
    // Timestamps read as TIMESTAMP print differently from DataFusion's UTC text, which item versions
    // are stored in; compare in DataFusion's form.
    out.extend(VIEWS.iter().map(|(_, sql)| {
        sql.replace("CAST(modified AS VARCHAR)", "threatlake_ts_text(modified)")
            .replace(
                "CAST(fetched_at AS VARCHAR)",
                "threatlake_ts_text(fetched_at)",
            )
    }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn the_template_comment_keeps_its_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("x", DataType::Int64, false),
        ]));
        let batch = arrow::array::RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow::array::Int64Array::from(vec![1]))],
        )
        .unwrap();
        for t in ["t1", "t2"] {
            lake.append(t, &[], schema.clone(), std::slice::from_ref(&batch), "test")
                .await
                .unwrap();
        }
        let text = setup(&lake).await.unwrap().join("\n");
        let comments: Vec<&str> = text.lines().filter(|l| l.starts_with("--")).collect();
        assert_eq!(
            comments.iter().filter(|l| l.contains("{table}")).count(),
            1,
            "{text}"
        );
        assert!(!comments.iter().any(|l| l.contains("\"t1\"")), "{text}");
        assert!(text.contains("CREATE VIEW \"t1\"") && text.contains("CREATE VIEW \"t2\""));
    }

    #[test]
    fn quotes_and_types() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        let list = DataType::List(Arc::new(arrow::datatypes::Field::new(
            "item",
            DataType::Utf8,
            true,
        )));
        assert_eq!(duck_type(&list), "VARCHAR[]");
    }
}
