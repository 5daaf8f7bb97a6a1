//! A query result as columns a chart can read: text labels, numbers, and time as days.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use super::ChartError;

/// Columns of one result, batches concatenated.
pub struct Frame {
    /// Column names.
    pub names: Vec<String>,
    /// Columns.
    pub columns: Vec<ArrayRef>,
    /// Row count.
    pub rows: usize,
}

fn is_numeric(t: &DataType) -> bool {
    t.is_numeric()
}

fn is_temporal(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
    )
}

impl Frame {
    /// Concatenate `batches` (of `schema`).
    pub fn new(schema: &SchemaRef, batches: &[RecordBatch]) -> Self {
        let batch = concat_batches(schema, batches)
            .unwrap_or_else(|_| RecordBatch::new_empty(schema.clone()));
        Self {
            names: schema.fields().iter().map(|f| f.name().clone()).collect(),
            rows: batch.num_rows(),
            columns: batch.columns().to_vec(),
        }
    }

    fn known(&self) -> String {
        self.names.join(", ")
    }

    /// Index of column `name`.
    pub fn column(&self, name: &str, kind: &'static str) -> Result<usize, ChartError> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| ChartError::Data {
                kind,
                message: format!(
                    "no column {name:?} in the result (columns: {})",
                    self.known()
                ),
            })
    }

    /// The named value column, or the first numeric one.
    pub fn value_column(
        &self,
        name: Option<&str>,
        kind: &'static str,
    ) -> Result<usize, ChartError> {
        self.value_column_except(name, kind, &[])
    }

    /// As [`Frame::value_column`], skipping `except` when picking automatically.
    pub fn value_column_except(
        &self,
        name: Option<&str>,
        kind: &'static str,
        except: &[usize],
    ) -> Result<usize, ChartError> {
        let i = match name {
            Some(n) => self.column(n, kind)?,
            None => (0..self.columns.len())
                .find(|i| !except.contains(i) && is_numeric(self.columns[*i].data_type()))
                .ok_or_else(|| ChartError::Data {
                    kind,
                    message: format!(
                        "no numeric column to plot (columns: {}); name one with y=COLUMN",
                        self.known()
                    ),
                })?,
        };
        if !is_numeric(self.columns[i].data_type()) {
            return Err(ChartError::Data {
                kind,
                message: format!(
                    "column {:?} is {}, not a number",
                    self.names[i],
                    self.columns[i].data_type()
                ),
            });
        }
        Ok(i)
    }

    /// First text column not in `except`.
    pub fn first_text_column(&self, except: &[usize]) -> Option<usize> {
        (0..self.columns.len()).find(|i| {
            !except.contains(i)
                && matches!(
                    self.columns[*i].data_type(),
                    DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Utf8View
                        | DataType::Dictionary(_, _)
                )
        })
    }

    /// First date/time column, else the first numeric one.
    pub fn x_column(&self) -> Option<usize> {
        let types: Vec<&DataType> = self.columns.iter().map(|c| c.data_type()).collect();
        types
            .iter()
            .position(|t| is_temporal(t))
            .or_else(|| types.iter().position(|t| is_numeric(t)))
    }

    /// Labels for a bar chart: the non-numeric columns before `value`, joined with " · " (the
    /// first column when there are none).
    pub fn label_strings(&self, value: usize) -> Vec<String> {
        let cols: Vec<usize> = (0..value)
            .filter(|i| !is_numeric(self.columns[*i].data_type()))
            .collect();
        let cols = if cols.is_empty() { vec![0] } else { cols };
        let parts: Vec<Vec<String>> = cols.iter().map(|c| self.strings(*c)).collect();
        (0..self.rows)
            .map(|r| {
                parts
                    .iter()
                    .map(|p| p[r].as_str())
                    .collect::<Vec<_>>()
                    .join(" · ")
            })
            .collect()
    }

    /// Column `i` as display strings ("(none)" for NULL).
    pub fn strings(&self, i: usize) -> Vec<String> {
        let col = &self.columns[i];
        let opts = FormatOptions::default();
        match ArrayFormatter::try_new(col.as_ref(), &opts) {
            Ok(f) => (0..col.len())
                .map(|r| {
                    if col.is_null(r) {
                        "(none)".to_string()
                    } else {
                        f.value(r).to_string()
                    }
                })
                .collect(),
            Err(_) => vec![String::new(); col.len()],
        }
    }

    /// Column `i` as numbers (None for NULL or non-numeric).
    pub fn numbers(&self, i: usize) -> Vec<Option<f64>> {
        match cast(&self.columns[i], &DataType::Float64) {
            Ok(a) => a
                .as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.filter(|x| x.is_finite()))
                .collect(),
            Err(_) => vec![None; self.rows],
        }
    }

    /// Column `i` as axis values: dates/times as days since 1970-01-01 (then `true`), numbers as is.
    pub fn axis_values(&self, i: usize) -> (Vec<Option<f64>>, bool) {
        let col = &self.columns[i];
        if !is_temporal(col.data_type()) {
            return (self.numbers(i), false);
        }
        let ms = cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))
            .and_then(|a| cast(&a, &DataType::Int64));
        match ms {
            Ok(a) => (
                a.as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.map(|ms| ms as f64 / 86_400_000.0))
                    .collect(),
                true,
            ),
            Err(_) => (vec![None; self.rows], true),
        }
    }
}

/// "2026-11-28" for a day count since 1970-01-01.
pub fn date_label(days: f64) -> String {
    chrono::DateTime::from_timestamp((days * 86_400.0) as i64, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn picks_columns_by_type() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("kind", DataType::Utf8, true),
            Field::new("family", DataType::Utf8, true),
            Field::new("items", DataType::Int64, false),
            Field::new(
                "day",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
            Field::new("score", DataType::Float64, true),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("url"), None])),
                Arc::new(StringArray::from(vec!["x", "y"])),
                Arc::new(Int64Array::from(vec![3, 4])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(86_400_000),
                    None,
                ])),
                Arc::new(Float64Array::from(vec![Some(0.5), Some(f64::NAN)])),
            ],
        )
        .unwrap();
        let f = Frame::new(&schema, &[b.clone(), b]);
        assert_eq!(f.rows, 4);
        assert_eq!(f.value_column(None, "bar").unwrap(), 2);
        assert_eq!(f.label_strings(2)[0], "url · x");
        assert_eq!(f.label_strings(2)[1], "(none) · y");
        assert_eq!(f.x_column(), Some(3));
        let (days, dates) = f.axis_values(3);
        assert!(dates);
        assert_eq!(days[0], Some(1.0));
        assert_eq!(days[1], None);
        assert_eq!(date_label(1.0), "1970-01-02");
        assert_eq!(f.numbers(4)[1], None, "NaN is no value");
        let e = f.value_column(Some("kind"), "bar").unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
        let e = f.column("nope", "bar").unwrap_err().to_string();
        assert!(e.contains("kind, family, items"), "{e}");
    }
}
