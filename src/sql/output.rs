//! Render query results as table, CSV, TSV, JSON, NDJSON or Markdown (arrow writers where they exist).

use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Output formats of `threatlake sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Boxed ASCII table.
    Table,
    /// Comma-separated, with header.
    Csv,
    /// Tab-separated, with header.
    Tsv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
    /// GitHub-flavoured Markdown table.
    Markdown,
}

impl OutputFormat {
    /// Every format, for help text and completion.
    pub const ALL: [OutputFormat; 6] = [
        OutputFormat::Table,
        OutputFormat::Csv,
        OutputFormat::Tsv,
        OutputFormat::Json,
        OutputFormat::Ndjson,
        OutputFormat::Markdown,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Table => "table",
            OutputFormat::Csv => "csv",
            OutputFormat::Tsv => "tsv",
            OutputFormat::Json => "json",
            OutputFormat::Ndjson => "ndjson",
            OutputFormat::Markdown => "markdown",
        }
    }
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OutputFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = OutputFormat::ALL.iter().map(|f| f.name()).collect();
                format!("unknown format '{s}'; choose one of {}", names.join(", "))
            })
    }
}

/// Errors writing output: I/O (a closed pipe among them) or Arrow encoding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// Writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Encoding failed.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

impl OutputError {
    /// True when the reader went away (`threatlake sql -c … | head`): not a failure.
    pub fn is_broken_pipe(&self) -> bool {
        let io = match self {
            OutputError::Io(e) => Some(e),
            OutputError::Arrow(ArrowError::IoError(_, e)) => Some(e),
            OutputError::Arrow(ArrowError::ExternalError(e)) => e.downcast_ref::<std::io::Error>(),
            _ => None,
        };
        io.is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Write `batches` in `format`. `max_rows` (0 = all) limits only the table format, which is for eyes.
pub fn write(
    out: &mut dyn Write,
    format: OutputFormat,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    max_rows: usize,
) -> Result<(), OutputError> {
    // A statement without a result set (CREATE VIEW, CREATE EXTERNAL TABLE, SET) prints nothing in
    // the data formats, so a script can create a table and query it in one run.
    if schema.fields().is_empty() && format != OutputFormat::Table {
        return Ok(());
    }
    match format {
        OutputFormat::Table => write_table(out, schema, batches, max_rows),
        OutputFormat::Csv => write_delimited(out, schema, batches, b','),
        OutputFormat::Tsv => write_delimited(out, schema, batches, b'\t'),
        OutputFormat::Json => {
            let mut w = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut *out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            drop(w);
            out.write_all(b"\n")?;
            Ok(())
        }
        OutputFormat::Ndjson => {
            let mut w = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(&mut *out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            Ok(())
        }
        OutputFormat::Markdown => write_markdown(out, schema, batches),
    }
}

fn write_table(
    out: &mut dyn Write,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    max_rows: usize,
) -> Result<(), OutputError> {
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let shown: Vec<RecordBatch> = if max_rows > 0 && total > max_rows {
        let mut left = max_rows;
        let mut v = Vec::new();
        for b in batches {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            v.push(b.slice(0, n));
            left -= n;
        }
        v
    } else {
        batches.to_vec()
    };
    let text = arrow::util::pretty::pretty_format_batches_with_schema(schema.clone(), &shown)?;
    writeln!(out, "{text}")?;
    if shown.iter().map(RecordBatch::num_rows).sum::<usize>() < total {
        writeln!(
            out,
            "({max_rows} of {total} rows shown; use \\format csv or LIMIT to see more)"
        )?;
    }
    Ok(())
}

/// CSV/TSV through arrow-csv. Nested columns (lists, structs) are rendered as text first since CSV has
/// no nesting, and text cells that a spreadsheet would run as a formula are neutralised: intel text
/// is attacker-controlled.
fn write_delimited(
    out: &mut dyn Write,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    delimiter: u8,
) -> Result<(), OutputError> {
    let flat_schema = flatten_schema(schema);
    let empty = [RecordBatch::new_empty(schema.clone())];
    let batches = if batches.is_empty() {
        &empty[..]
    } else {
        batches
    };
    // arrow-csv folds I/O errors into strings; encode each batch in memory and write it ourselves so
    // a closed pipe stays recognisable as one.
    let mut buf = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        buf.clear();
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(i == 0)
            .with_delimiter(delimiter)
            .build(&mut buf);
        w.write(&flatten_batch(&flat_schema, b, true)?)?;
        drop(w);
        out.write_all(&buf)?;
    }
    Ok(())
}

fn write_markdown(
    out: &mut dyn Write,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<(), OutputError> {
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('|', "\\|")
            .replace('\n', "<br>")
    };
    let names: Vec<String> = schema.fields().iter().map(|f| esc(f.name())).collect();
    writeln!(out, "| {} |", names.join(" | "))?;
    writeln!(out, "|{}", " --- |".repeat(names.len()))?;
    let opts = FormatOptions::default().with_null("NULL");
    for b in batches {
        let fmts = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..b.num_rows() {
            let cells: Vec<String> = fmts
                .iter()
                .map(|f| esc(&f.value(row).to_string()))
                .collect();
            writeln!(out, "| {} |", cells.join(" | "))?;
        }
    }
    Ok(())
}

fn is_nested(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(_, _)
            | DataType::Struct(_)
            | DataType::Map(_, _)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
    )
}

fn flatten_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if is_nested(f.data_type()) {
                Field::new(f.name(), DataType::Utf8, true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Render nested columns as text and (optionally) neutralise spreadsheet formulas in text columns.
fn flatten_batch(
    flat: &SchemaRef,
    b: &RecordBatch,
    neutralise: bool,
) -> Result<RecordBatch, ArrowError> {
    let opts = FormatOptions::default();
    let cols: Vec<ArrayRef> = b
        .columns()
        .iter()
        .map(|c| -> Result<ArrayRef, ArrowError> {
            if is_nested(c.data_type()) {
                let f = ArrayFormatter::try_new(c.as_ref(), &opts)?;
                let v: StringArray = (0..c.len())
                    .map(|i| {
                        c.is_valid(i)
                            .then(|| neutralise_formula(&f.value(i).to_string()))
                    })
                    .collect();
                Ok(Arc::new(v))
            } else if neutralise
                && matches!(
                    c.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                )
            {
                let s = arrow::compute::cast(c, &DataType::Utf8)?;
                let s = s
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8");
                let v: StringArray = s.iter().map(|x| x.map(neutralise_formula)).collect();
                let v: ArrayRef = Arc::new(v);
                arrow::compute::cast(&v, c.data_type())
            } else {
                Ok(c.clone())
            }
        })
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(flat.clone(), cols)
}

/// Prefix a cell that a spreadsheet would evaluate (`= + - @`, tab, CR) with `'` (OWASP CSV injection).
pub fn neutralise_formula(s: &str) -> String {
    // Spreadsheets skip leading blanks before deciding that a cell is a formula (` =1+2` runs too).
    let lead = s.trim_start_matches([' ', '\u{a0}', '\n']);
    if lead.starts_with([
        '=', '+', '-', '@', '\t', '\r', '\u{ff1d}', '\u{ff0b}', '\u{ff0d}', '\u{ff20}',
    ]) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("t", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec![
                Some("=HYPERLINK(\"http://x\")"),
                Some("a|b"),
                None,
            ]))],
        )
        .unwrap();
        (schema, b)
    }

    #[test]
    fn csv_neutralises_formulas() {
        let (s, b) = batch();
        let mut out = Vec::new();
        write(&mut out, OutputFormat::Csv, &s, &[b], 0).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("'=HYPERLINK"), "{text}");
    }

    #[test]
    fn markdown_escapes_pipes() {
        let (s, b) = batch();
        let mut out = Vec::new();
        write(&mut out, OutputFormat::Markdown, &s, &[b], 0).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("a\\|b"));
    }

    #[test]
    fn empty_json_is_an_array() {
        let (s, _) = batch();
        let mut out = Vec::new();
        write(&mut out, OutputFormat::Json, &s, &[], 0).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[]\n");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(
            "NDJSON".parse::<OutputFormat>().unwrap(),
            OutputFormat::Ndjson
        );
        assert!("xml"
            .parse::<OutputFormat>()
            .unwrap_err()
            .contains("markdown"));
    }

    #[test]
    fn formulas_behind_blanks_are_neutralised() {
        for cell in [" =1+2", "  @SUM(A1)", "\u{a0}-2+3", "\n+1", "\u{ff1d}1+1"] {
            assert!(neutralise_formula(cell).starts_with('\''), "{cell:?}");
        }
        for cell in ["a=1", "1+2", "", "   "] {
            assert_eq!(neutralise_formula(cell), cell);
        }
    }

    #[test]
    fn statements_without_a_result_set_print_nothing_in_data_formats() {
        let empty: SchemaRef = Arc::new(Schema::empty());
        for f in [
            OutputFormat::Csv,
            OutputFormat::Tsv,
            OutputFormat::Json,
            OutputFormat::Ndjson,
            OutputFormat::Markdown,
        ] {
            let mut out = Vec::new();
            write(&mut out, f, &empty, &[], 0).unwrap();
            assert!(out.is_empty(), "{f:?}: {}", String::from_utf8_lossy(&out));
        }
    }
}
