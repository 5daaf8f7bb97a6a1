//! Analysts' decisions on the mapper's suggestions (the dashboard's mapping workbench): the lake
//! table `mapping_feedback`, and its export as labelled JSONL in the `model eval --input` format.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::feeds::{ts, FeedError};
use crate::{Engine, Lake};

/// The table.
pub const MAPPING_FEEDBACK: &str = "mapping_feedback";
/// Its partition column.
pub const PARTITION: [&str; 1] = ["month"];

/// What an analyst decided about one suggestion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The suggested technique is right.
    Accept,
    /// The suggested technique is wrong.
    Reject,
    /// Wrong; this other technique is right.
    Correct,
}

impl Verdict {
    /// Parse `accept`, `reject` or `correct`.
    pub fn parse(s: &str) -> Option<Verdict> {
        match s {
            "accept" => Some(Verdict::Accept),
            "reject" => Some(Verdict::Reject),
            "correct" => Some(Verdict::Correct),
            _ => None,
        }
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject => "reject",
            Verdict::Correct => "correct",
        }
    }
}

/// One row of `mapping_feedback`.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// When (RFC 3339, UTC).
    pub at: String,
    /// Who decided.
    pub who: String,
    /// The submitted document (SHA-256 of its text, first 16 hex digits).
    pub doc: String,
    /// The sentence.
    pub sentence: String,
    /// The technique the model suggested.
    pub suggested: String,
    /// The model's score for it.
    pub score: Option<f64>,
    /// accept, reject or correct.
    pub decision: String,
    /// The right technique (accept: the suggestion; correct: the analyst's; reject: none).
    pub technique_id: Option<String>,
    /// The model that suggested it (`<domain>-<release>`).
    pub model: Option<String>,
}

/// Schema of [`MAPPING_FEEDBACK`].
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("at", ts(), false),
        Field::new("who", DataType::Utf8, false),
        Field::new("doc", DataType::Utf8, false),
        Field::new("sentence", DataType::Utf8, false),
        Field::new("suggested", DataType::Utf8, false),
        Field::new("score", DataType::Float64, true),
        Field::new("decision", DataType::Utf8, false),
        Field::new("technique_id", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
    ]))
}

/// The document id of a submitted text.
pub fn doc_id(text: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(text.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Append one decision (one commit).
pub async fn record(lake: &Lake, d: &Decision) -> Result<(), FeedError> {
    record_all(lake, std::slice::from_ref(d)).await
}

/// One line of a labelled file to import (the export's format, `model eval --input` files,
/// CTID TRAM-style annotations): `labels` become accepted decisions, `rejected` rejections.
#[derive(Debug, Clone, Deserialize)]
pub struct Labelled {
    /// The sentence.
    pub text: String,
    /// Techniques that are right for it.
    pub labels: Vec<String>,
    /// Techniques that are wrong for it.
    #[serde(default)]
    pub rejected: Vec<String>,
    /// The document it comes from (default: the sentence's own id).
    #[serde(default)]
    pub doc: Option<String>,
}

/// A labelled file that cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A label that is not a technique id.
    #[error("line {line}: {id:?} is not an ATT&CK technique id (T1234 or T1234.567)")]
    NotATechnique {
        /// Its line in the file.
        line: usize,
        /// What it said.
        id: String,
    },
}

/// The decisions the lines of a labelled file stand for (each with its line number), made by
/// `who` at `at`: an accept per label, a reject per rejected technique. Fails on the first
/// technique id that is not one, naming its line.
pub fn decisions_of(
    lines: &[(usize, Labelled)],
    who: &str,
    at: &str,
) -> Result<Vec<Decision>, ImportError> {
    let mut out = Vec::new();
    for (line, l) in lines {
        let doc = l
            .doc
            .clone()
            .filter(|d| !d.is_empty() && d.len() <= 64)
            .unwrap_or_else(|| doc_id(&l.text));
        let accepted = l.labels.iter().map(|t| (t, Verdict::Accept));
        let rejected = l.rejected.iter().map(|t| (t, Verdict::Reject));
        for (t, verdict) in accepted.chain(rejected) {
            if !crate::reports::navigator::is_technique_id(t) {
                return Err(ImportError::NotATechnique {
                    line: *line,
                    id: t.clone(),
                });
            }
            out.push(Decision {
                at: at.to_string(),
                who: who.to_string(),
                doc: doc.clone(),
                sentence: l.text.clone(),
                suggested: t.clone(),
                score: None,
                decision: verdict.as_str().into(),
                technique_id: (verdict == Verdict::Accept).then(|| t.clone()),
                model: None,
            });
        }
    }
    Ok(out)
}

/// Append decisions in one commit (partitioned by the first one's month).
pub async fn record_all(lake: &Lake, decisions: &[Decision]) -> Result<(), FeedError> {
    let Some(first) = decisions.first() else {
        return Ok(());
    };
    let month = first.at.get(..7).unwrap_or("unknown").to_string();
    crate::feeds::append(
        lake,
        MAPPING_FEEDBACK,
        &schema(),
        &[("month", month.as_str())],
        &format!("feedback {} {}", first.doc, decisions.len()),
        decisions,
    )
    .await
}

/// One labelled example of the export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    /// The sentence.
    pub text: String,
    /// Techniques analysts accepted or gave (empty: every suggestion was rejected).
    pub labels: Vec<String>,
    /// Suggestions rejected and not accepted later.
    pub rejected: Vec<String>,
    /// `workbench`.
    pub source: &'static str,
    /// The document (`model eval` scores documents by this).
    pub doc: String,
}

/// Every sentence analysts decided on, its labels from the newest decision per suggestion.
pub async fn export(engine: &Engine) -> Result<Vec<Example>, crate::sql::SqlError> {
    let r = engine
        .run(
            "SELECT doc, sentence, suggested, decision, technique_id FROM mapping_feedback \
             ORDER BY doc, sentence, at, suggested",
        )
        .await?;
    // (doc, sentence) → suggestion → (decision, technique), the newest winning.
    type Decided = BTreeMap<String, (String, Option<String>)>;
    let mut by: BTreeMap<(String, String), Decided> = BTreeMap::new();
    for q in &r {
        for b in &q.batches {
            let col = |i: usize| crate::feeds::column_strings(b, i);
            let (doc, sentence, suggested, decision, tid) =
                (col(0), col(1), col(2), col(3), col(4));
            for i in 0..b.num_rows() {
                let (Some(d), Some(s), Some(g), Some(v)) = (
                    doc[i].clone(),
                    sentence[i].clone(),
                    suggested[i].clone(),
                    decision[i].clone(),
                ) else {
                    continue;
                };
                by.entry((d, s)).or_default().insert(g, (v, tid[i].clone()));
            }
        }
    }
    Ok(by
        .into_iter()
        .map(|((doc, text), decisions)| {
            let mut labels: Vec<String> = decisions
                .values()
                .filter(|(v, _)| v != "reject")
                .filter_map(|(_, t)| t.clone())
                .collect();
            labels.sort();
            labels.dedup();
            let rejected = decisions
                .iter()
                .filter(|(_, (v, _))| v == "reject")
                .map(|(g, _)| g.clone())
                .filter(|g| !labels.contains(g))
                .collect();
            Example {
                text,
                labels,
                rejected,
                source: "workbench",
                doc,
            }
        })
        .collect())
}
