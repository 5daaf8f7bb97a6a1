//! Arrow kernels of the mapping functions (`map_technique`, `map_techniques`, `technique_score`,
//! `explain_mapping`, `map_report`): a batch in, an array out, rows scored in parallel with one scratch per thread.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, ListArray, StringArray, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields};
use rayon::prelude::*;

use crate::mapper::{Mapper, Scratch};

/// Errors a mapping kernel reports for bad arguments.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// `k` out of range.
    #[error("map_techniques: k must be between 0 and {max}, got {k}")]
    InvalidK {
        /// The k given.
        k: i64,
        /// Largest allowed.
        max: usize,
    },
    /// `k` is not a whole number (text that is no number, a fraction).
    #[error("map_techniques: k must be a whole number, got {given}")]
    NotAnInteger {
        /// The value given, as text.
        given: String,
    },
    /// A technique id the model does not know.
    #[error("technique_score: unknown technique id '{id}' (the model for ATT&CK {domain} {version} has no such active or revoked technique)")]
    UnknownTechnique {
        /// The id given.
        id: String,
        /// Model domain.
        domain: String,
        /// Model release.
        version: String,
    },
}

/// Rows per parallel task: large enough to amortise scheduling, small enough to balance 2+ cores.
const CHUNK: usize = 256;

thread_local! {
    /// One scratch per worker thread, kept across batches so its token cache stays warm.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Run `f` with this thread's scratch.
fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        // A re-entrant call on this thread (not expected) falls back to a fresh scratch.
        Err(_) => f(&mut Scratch::default()),
    })
}

fn par_rows<T: Send>(n: usize, f: impl Fn(usize, &mut Scratch) -> T + Sync) -> Vec<T> {
    let chunks: Vec<Vec<T>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            with_scratch(|scratch| {
                (c * CHUNK..((c + 1) * CHUNK).min(n))
                    .map(|i| f(i, scratch))
                    .collect()
            })
        })
        .collect();
    chunks.into_iter().flatten().collect()
}

/// Best technique id per text, or NULL when the text is NULL/empty or the best score is below the
/// threshold (`threshold`, else the model's own for the text: [`Mapper::threshold_for_text`]).
pub fn map_technique(m: &Mapper, texts: &StringArray, threshold: Option<f64>) -> ArrayRef {
    let out: Vec<Option<String>> = par_rows(texts.len(), |i, s| {
        if texts.is_null(i) {
            return None;
        }
        let text = texts.value(i);
        let top = m.top_k(text, 1, s).into_iter().next()?;
        (top.score >= m.threshold_for_text(threshold, text) && top.score > 0.0)
            .then(|| m.model.techniques[top.technique].id.clone())
    });
    Arc::new(StringArray::from(out))
}

/// The struct type of one `map_techniques` entry.
pub fn ranked_struct_fields() -> Fields {
    Fields::from(vec![
        Field::new("technique_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new(
            "tactics",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        Field::new("score", DataType::Float64, false),
    ])
}

/// The return type of `map_techniques`.
pub fn ranked_list_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(ranked_struct_fields()),
        true,
    )))
}

/// The `k` argument as integers: integer types as they are; floats only when whole (2.0, not
/// 2.7); text only when it spells an integer. Casting would turn 'abc' into NULL and 2.7 into 2.
pub fn k_argument(k: &ArrayRef) -> Result<Int64Array, KernelError> {
    use arrow::datatypes::DataType;
    let bad = |given: String| KernelError::NotAnInteger { given };
    match k.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = arrow::compute::cast(k, &DataType::Utf8).map_err(|e| bad(e.to_string()))?;
            let text = text
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8");
            text.iter()
                .map(|v| {
                    v.map(|t| t.trim().parse::<i64>().map_err(|_| bad(format!("'{t}'"))))
                        .transpose()
                })
                .collect()
        }
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let f = arrow::compute::cast(k, &DataType::Float64).map_err(|e| bad(e.to_string()))?;
            let f = f
                .as_any()
                .downcast_ref::<Float64Array>()
                .expect("cast to Float64");
            f.iter()
                .map(|v| {
                    v.map(|x| {
                        if x.fract() == 0.0 && x.abs() < 1e15 {
                            Ok(x as i64)
                        } else {
                            Err(bad(x.to_string()))
                        }
                    })
                    .transpose()
                })
                .collect()
        }
        _ => {
            let i = arrow::compute::cast(k, &DataType::Int64).map_err(|e| bad(e.to_string()))?;
            Ok(i.as_any()
                .downcast_ref::<Int64Array>()
                .expect("cast to Int64")
                .clone())
        }
    }
}

/// Top-k per text as `List<Struct<technique_id, name, tactics, score>>`; `ks` holds k per row
/// (broadcast a scalar by passing one value). NULL text or NULL k gives NULL.
pub fn map_techniques(
    m: &Mapper,
    texts: &StringArray,
    ks: &Int64Array,
) -> Result<ArrayRef, KernelError> {
    let max = m.model.techniques.len();
    for k in ks.iter().flatten() {
        if k < 0 || k as usize > max {
            return Err(KernelError::InvalidK { k, max });
        }
    }
    let k_at = |i: usize| {
        if ks.len() == 1 {
            (!ks.is_null(0)).then(|| ks.value(0))
        } else {
            (!ks.is_null(i)).then(|| ks.value(i))
        }
    };
    let rows = par_rows(texts.len(), |i, s| {
        let k = k_at(i)?;
        if texts.is_null(i) {
            return None;
        }
        Some(m.top_k(texts.value(i), k as usize, s))
    });
    let (mut ids, mut names, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    let mut tactic_values: Vec<&str> = Vec::new();
    let mut tactic_offsets: Vec<i32> = vec![0];
    let mut offsets: Vec<i32> = vec![0];
    let mut valid = Vec::with_capacity(rows.len());
    for r in &rows {
        valid.push(r.is_some());
        for x in r.iter().flatten() {
            let t = &m.model.techniques[x.technique];
            ids.push(t.id.as_str());
            names.push(t.name.as_str());
            scores.push(x.score);
            tactic_values.extend(t.tactics.iter().map(String::as_str));
            tactic_offsets.push(tactic_values.len() as i32);
        }
        offsets.push(ids.len() as i32);
    }
    let tactics = ListArray::new(
        Arc::new(Field::new("item", DataType::Utf8, true)),
        OffsetBuffer::new(tactic_offsets.into()),
        Arc::new(StringArray::from(tactic_values)),
        None,
    );
    let entries = StructArray::new(
        ranked_struct_fields(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(names)),
            Arc::new(tactics),
            Arc::new(Float64Array::from(scores)),
        ],
        None,
    );
    let list = ListArray::new(
        Arc::new(Field::new(
            "item",
            DataType::Struct(ranked_struct_fields()),
            true,
        )),
        OffsetBuffer::new(offsets.into()),
        Arc::new(entries),
        Some(valid.into()),
    );
    Ok(Arc::new(list))
}

/// Calibrated score of one technique per text (ids broadcast like `ks` above); NULL in, NULL out.
pub fn technique_score(
    m: &Mapper,
    texts: &StringArray,
    ids: &StringArray,
) -> Result<ArrayRef, KernelError> {
    let mut resolved: Vec<Option<usize>> = Vec::with_capacity(ids.len());
    for id in ids.iter() {
        resolved.push(match id {
            None => None,
            Some(id) => {
                Some(
                    m.model
                        .technique_index(id)
                        .ok_or_else(|| KernelError::UnknownTechnique {
                            id: id.to_string(),
                            domain: m.model.domain.clone(),
                            version: m.model.attack_version.clone(),
                        })?,
                )
            }
        });
    }
    let at = |i: usize| {
        if resolved.len() == 1 {
            resolved[0]
        } else {
            resolved[i]
        }
    };
    let out: Vec<Option<f64>> = par_rows(texts.len(), |i, s| {
        let t = at(i)?;
        if texts.is_null(i) {
            return None;
        }
        Some(m.model.technique_score(&m.vectors, texts.value(i), t, s))
    });
    Ok(Arc::new(Float64Array::from(out)))
}

/// Evidence for the best match per text; NULL for NULL text or when nothing matched.
pub fn explain_mapping(m: &Mapper, texts: &StringArray, threshold: Option<f64>) -> ArrayRef {
    let out: Vec<Option<String>> = par_rows(texts.len(), |i, s| {
        if texts.is_null(i) {
            return None;
        }
        m.explain(texts.value(i), threshold, s)
    });
    Arc::new(StringArray::from(out))
}

/// The struct type of one `map_report` entry.
pub fn report_struct_fields() -> Fields {
    Fields::from(vec![
        Field::new("technique_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("sentences", DataType::Int64, false),
        Field::new("sentence", DataType::Utf8, false),
    ])
}

/// The return type of `map_report`.
pub fn report_list_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(report_struct_fields()),
        true,
    )))
}

/// Whole reports mapped sentence by sentence (see [`crate::mapper::document`]): per text the
/// techniques found at or above `threshold`, strongest first, as
/// `List<Struct<technique_id, name, score, sentences, sentence>>`; NULL text gives NULL.
pub fn map_report(m: &Mapper, texts: &StringArray, threshold: Option<f64>) -> ArrayRef {
    let rows = par_documents(m, texts.len(), threshold, |i| {
        (!texts.is_null(i)).then(|| texts.value(i))
    });
    let (mut ids, mut names, mut scores, mut counts, mut sentences) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut offsets: Vec<i32> = vec![0];
    let mut valid = Vec::with_capacity(rows.len());
    for r in &rows {
        valid.push(r.is_some());
        for f in r.iter().flatten() {
            let t = &m.model.techniques[f.technique];
            ids.push(t.id.as_str());
            names.push(t.name.as_str());
            scores.push(f.score);
            counts.push(f.sentences as i64);
            sentences.push(f.sentence.as_str());
        }
        offsets.push(ids.len() as i32);
    }
    let entries = StructArray::new(
        report_struct_fields(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(names)),
            Arc::new(Float64Array::from(scores)),
            Arc::new(Int64Array::from(counts)),
            Arc::new(StringArray::from(sentences)),
        ],
        None,
    );
    Arc::new(ListArray::new(
        Arc::new(Field::new(
            "item",
            DataType::Struct(report_struct_fields()),
            true,
        )),
        OffsetBuffer::new(offsets.into()),
        Arc::new(entries),
        Some(valid.into()),
    ))
}

/// Documents mapped in parallel, one per task (a report has hundreds of sentences), input order
/// kept; `text(i)` gives document `i` or `None` for NULL.
pub fn par_documents<'a>(
    m: &Mapper,
    n: usize,
    threshold: Option<f64>,
    text: impl Fn(usize) -> Option<&'a str> + Sync,
) -> Vec<Option<Vec<crate::mapper::document::Found>>> {
    // Each worker's scratch outlives the call: a fresh one per task (as before) started every
    // batch of reports with a cold token cache, and `map --document` over a file read in 8 MB
    // batches took half as long again.
    (0..n)
        .into_par_iter()
        .map(|i| {
            let t = text(i)?;
            Some(with_scratch(|s| {
                crate::mapper::document::map_document(m, t, threshold, s)
            }))
        })
        .collect()
}

/// Top-k for plain strings (CLI batch mapping and evaluation), in parallel, input order kept.
pub fn par_top_k(m: &Mapper, texts: &[String], k: usize) -> Vec<Vec<crate::mapper::Ranked>> {
    par_rows(texts.len(), |i, s| m.top_k(&texts[i], k, s))
}
