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
    let mut p = Printer::new(out, format, max_rows, 0);
    p.begin(schema)?;
    for b in batches {
        if !p.batch(b)? {
            break;
        }
    }
    p.finish()?;
    Ok(())
}

/// What a [`Printer`] wrote of one result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Printed {
    /// Rows written.
    pub rows: usize,
    /// True when the result had more rows than were written (reading stopped there).
    pub more: bool,
}

/// Writes one result batch by batch as it streams: rows are written as they arrive (the table
/// format, which needs every width first, holds at most the rows it shows), and it says when it
/// has enough so the caller can stop reading (and so stop the query).
pub struct Printer<W: Write> {
    out: W,
    format: OutputFormat,
    /// Rows the table format shows (0 = all).
    show: usize,
    /// Rows any format writes before it stops (0 = all).
    limit: usize,
    schema: SchemaRef,
    flat: Option<SchemaRef>,
    rows: usize,
    more: bool,
    held: Vec<RecordBatch>,
    buf: Vec<u8>,
}

impl<W: Write> Printer<W> {
    /// A printer of `format` onto `out`: the table format shows `show` rows (0 = all); every
    /// format stops after `limit` rows (0 = none).
    pub fn new(out: W, format: OutputFormat, show: usize, limit: usize) -> Self {
        Self {
            out,
            format,
            show,
            limit,
            schema: Arc::new(Schema::empty()),
            flat: None,
            rows: 0,
            more: false,
            held: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// A result with `schema` begins.
    pub fn begin(&mut self, schema: &SchemaRef) -> Result<(), OutputError> {
        self.schema = schema.clone();
        self.flat = None;
        self.rows = 0;
        self.more = false;
        self.held.clear();
        // A statement without a result set (CREATE VIEW, CREATE EXTERNAL TABLE, SET) prints nothing
        // in the data formats, so a script can create a table and query it in one run.
        if self.silent() {
            return Ok(());
        }
        match self.format {
            OutputFormat::Json => self.out.write_all(b"[")?,
            OutputFormat::Markdown => {
                let names: Vec<String> = schema
                    .fields()
                    .iter()
                    .map(|f| md_escape(f.name()))
                    .collect();
                writeln!(self.out, "| {} |", names.join(" | "))?;
                writeln!(self.out, "|{}", " --- |".repeat(names.len()))?;
            }
            _ => {}
        }
        Ok(())
    }

    fn silent(&self) -> bool {
        self.schema.fields().is_empty() && self.format != OutputFormat::Table
    }

    /// The rows of `b` this result still takes.
    fn cap(&self) -> usize {
        let mut cap = usize::MAX;
        if self.limit > 0 {
            cap = self.limit;
        }
        if self.format == OutputFormat::Table && self.show > 0 {
            cap = cap.min(self.show);
        }
        cap.saturating_sub(self.rows)
    }

    /// Write the next batch. Returns false once the printer has all it will write (a row beyond
    /// the limit was seen): stop reading.
    pub fn batch(&mut self, b: &RecordBatch) -> Result<bool, OutputError> {
        if self.silent() || b.num_rows() == 0 {
            return Ok(true);
        }
        let take = b.num_rows().min(self.cap());
        if take < b.num_rows() {
            self.more = true;
        }
        if take > 0 {
            self.write_rows(&b.slice(0, take))?;
            self.rows += take;
        }
        Ok(!self.more)
    }

    fn write_rows(&mut self, b: &RecordBatch) -> Result<(), OutputError> {
        match self.format {
            OutputFormat::Table => self.held.push(b.clone()),
            OutputFormat::Csv | OutputFormat::Tsv => self.write_delimited(b)?,
            OutputFormat::Json | OutputFormat::Ndjson => {
                // Rows as JSON lines; the array form joins them with commas.
                self.buf.clear();
                let mut w = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(&mut self.buf);
                w.write(b)?;
                w.finish()?;
                drop(w);
                if self.format == OutputFormat::Ndjson {
                    self.out.write_all(&self.buf)?;
                } else {
                    for (i, line) in self
                        .buf
                        .split(|c| *c == b'\n')
                        .filter(|l| !l.is_empty())
                        .enumerate()
                    {
                        if self.rows > 0 || i > 0 {
                            self.out.write_all(b",")?;
                        }
                        self.out.write_all(line)?;
                    }
                }
            }
            OutputFormat::Markdown => {
                let opts = FormatOptions::default().with_null("NULL");
                let fmts = b
                    .columns()
                    .iter()
                    .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
                    .collect::<Result<Vec<_>, _>>()?;
                for row in 0..b.num_rows() {
                    let cells: Vec<String> = fmts
                        .iter()
                        .map(|f| md_escape(&f.value(row).to_string()))
                        .collect();
                    writeln!(self.out, "| {} |", cells.join(" | "))?;
                }
            }
        }
        Ok(())
    }

    /// CSV/TSV through arrow-csv, the header with the first rows (or alone at the end). Nested
    /// columns (lists, structs) are rendered as text since CSV has no nesting, and text cells that
    /// a spreadsheet would run as a formula are neutralised: intel text is attacker-controlled.
    fn write_delimited(&mut self, b: &RecordBatch) -> Result<(), OutputError> {
        let flat = self
            .flat
            .get_or_insert_with(|| flatten_schema(&self.schema))
            .clone();
        let delimiter = if self.format == OutputFormat::Tsv {
            b'\t'
        } else {
            b','
        };
        // arrow-csv folds I/O errors into strings; encode in memory and write it ourselves so a
        // closed pipe stays recognisable as one.
        self.buf.clear();
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(self.rows == 0)
            .with_delimiter(delimiter)
            .build(&mut self.buf);
        w.write(&flatten_batch(&flat, b, true)?)?;
        drop(w);
        self.out.write_all(&self.buf)?;
        Ok(())
    }

    /// Flush what was written (after each batch, so rows show as they come).
    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.out.flush()?;
        Ok(())
    }

    /// End the result (the table is drawn now, the JSON array closed, a CSV header written for
    /// zero rows).
    pub fn finish(&mut self) -> Result<Printed, OutputError> {
        let printed = Printed {
            rows: self.rows,
            more: self.more,
        };
        if self.silent() {
            return Ok(printed);
        }
        match self.format {
            OutputFormat::Table => {
                let held = std::mem::take(&mut self.held);
                let text = arrow::util::pretty::pretty_format_batches_with_schema(
                    self.schema.clone(),
                    &held,
                )?;
                writeln!(self.out, "{text}")?;
                if self.more {
                    writeln!(
                        self.out,
                        "(first {} rows shown; the result has more: use \\format csv, LIMIT or --maxrows 0 to see them)",
                        self.rows
                    )?;
                }
            }
            OutputFormat::Csv | OutputFormat::Tsv if self.rows == 0 => {
                self.write_delimited(&RecordBatch::new_empty(self.schema.clone()))?;
            }
            OutputFormat::Json => self.out.write_all(b"]\n")?,
            _ => {}
        }
        self.out.flush()?;
        Ok(printed)
    }
}

fn md_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('\n', "<br>")
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
