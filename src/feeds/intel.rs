//! From threat items to techniques: `map-intel` writes `mapped_threat_data` (model and source-stated
//! techniques), and each run snapshots the threat model (`threat_model`) that `model diff` compares.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use chrono::Utc;
use serde::Serialize;

use super::{append, column_strings, fixed, strings, ts, FeedError};
use crate::lake::Lake;
use crate::sql::Engine;

/// Item → technique evidence.
pub const MAPPED: &str = "mapped_threat_data";
/// Partition of [`MAPPED`].
pub const MAPPED_PARTITION: [&str; 1] = ["mapped_date"];
/// Every item version mapped (also those that gave no technique), so each is mapped once.
pub const MAPPED_ITEMS: &str = "mapped_items";

/// Schema of [`MAPPED_ITEMS`].
pub fn mapped_items_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("item_id", DataType::Utf8, false),
        Field::new("item_version", DataType::Utf8, false),
        Field::new("techniques", DataType::Int64, false),
        Field::new("model_version", DataType::Utf8, true),
        Field::new("mapped_at", ts(), false),
        Field::new("batch_id", DataType::Utf8, false),
    ]))
}

#[derive(Debug, Clone, Serialize)]
struct MappedItem {
    item_id: String,
    item_version: String,
    techniques: i64,
    model_version: Option<String>,
    mapped_at: String,
    batch_id: String,
}

/// Threat-model snapshots, one partition per run.
pub const THREAT_MODEL: &str = "threat_model";
/// Partition of [`THREAT_MODEL`].
pub const THREAT_MODEL_PARTITION: [&str; 1] = ["run_id"];

/// Schema of [`MAPPED`].
pub fn mapped_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("item_id", DataType::Utf8, false),
        Field::new("item_version", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("technique_id", DataType::Utf8, false),
        Field::new("technique_name", DataType::Utf8, true),
        Field::new("tactic", DataType::Utf8, true),
        Field::new("tactics", strings(), true),
        Field::new("score", DataType::Float64, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, true),
        Field::new("mapped_at", ts(), false),
        Field::new("batch_id", DataType::Utf8, false),
    ]))
}

/// Schema of [`THREAT_MODEL`].
pub fn threat_model_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("technique_id", DataType::Utf8, false),
        Field::new("technique_name", DataType::Utf8, true),
        Field::new("tactic", DataType::Utf8, true),
        Field::new("evidence_count", DataType::Int64, false),
        Field::new("distinct_sources", DataType::Int64, false),
        Field::new("first_seen", ts(), true),
        Field::new("last_seen", ts(), true),
        Field::new("weight", DataType::Float64, false),
        Field::new("score", DataType::Float64, false),
        Field::new("created_at", ts(), false),
    ]))
}

#[derive(Debug, Clone, Serialize)]
struct MappedRow {
    item_id: String,
    item_version: String,
    source: String,
    technique_id: String,
    technique_name: Option<String>,
    tactic: Option<String>,
    tactics: Vec<String>,
    score: f64,
    method: &'static str,
    model_version: Option<String>,
    mapped_at: String,
    batch_id: String,
}

/// Texts longer than this (in characters, about six sentences) are mapped as reports, sentence
/// by sentence (`map_report`); shorter ones whole (`map_techniques`, top-k).
pub const REPORT_CHARS: usize = 1_000;

/// What `map-intel` did.
#[derive(Debug, Default, Clone)]
pub struct MapReport {
    /// Run id.
    pub batch_id: String,
    /// Items mapped this run.
    pub items: usize,
    /// Model evidence rows.
    pub model_rows: usize,
    /// Source-stated rows.
    pub source_rows: usize,
}

/// Map every threat item (version) not mapped yet: model top-k above `threshold` (a text longer than
/// [`REPORT_CHARS`]: every technique its sentences map to), plus the techniques
/// the source states (OTX `attack_ids`, VirusTotal sandbox trees, TAXII attack-pattern references).
pub async fn map_intel(
    lake: &Lake,
    engine: &Engine,
    top_k: usize,
    threshold: Option<f64>,
    model_version: Option<String>,
    items_per_commit: usize,
) -> Result<MapReport, FeedError> {
    // The model (loaded by map_techniques below) decides the threshold per text unless one is
    // configured.
    let now = Utc::now();
    let batch = super::new_batch_id(now);
    let at = fixed(now);
    let mut report = MapReport {
        batch_id: batch.clone(),
        ..Default::default()
    };
    // Items not mapped yet (by id and version). An item whose evidence is committed counts as
    // mapped even if the `mapped_items` commit after it never happened (a crash between the two):
    // its evidence is never written twice. Intel text only ever travels as column data.
    let pending = "SELECT t.item_id, t.item_version, t.source, t.text FROM threat_intelligence_data t \
        WHERE NOT EXISTS (SELECT 1 FROM mapped_items m WHERE m.item_id = t.item_id AND m.item_version = t.item_version) \
          AND NOT EXISTS (SELECT 1 FROM mapped_threat_data d WHERE d.item_id = t.item_id AND d.item_version = t.item_version)";
    // Short texts (a pulse's paragraph) are mapped whole, top-k; longer ones (a report pasted into a
    // pulse, a TAXII report's description) sentence by sentence with `map_report`, so a report
    // keeps every technique it describes. Each UDF runs only on the rows of its branch.
    let sql = format!(
        "SELECT p.item_id, p.item_version, p.source, \
           CASE WHEN character_length(p.text) <= {REPORT_CHARS} THEN map_techniques(p.text, {top_k}) END AS ranked, p.text, \
           CASE WHEN character_length(p.text) > {REPORT_CHARS} THEN map_report(p.text) END AS report \
         FROM ({pending}) p"
    );
    let mapper = engine.mapper.get().ok();
    let model = match threshold {
        Some(_) => None,
        None => mapper.as_ref(),
    };
    // Tactics of a technique `map_report` found (its entries carry id, name and score only).
    let tactics_of: std::collections::HashMap<&str, &[String]> = mapper
        .iter()
        .flat_map(|m| m.model.techniques.iter())
        .map(|t| (t.id.as_str(), t.tactics.as_slice()))
        .collect();
    // A model row of an item (id, version, source).
    let model_row = |(id, ver, src): (&String, &String, &String),
                     technique: &str,
                     name: &str,
                     tactics: Vec<String>,
                     score: f64| MappedRow {
        item_id: id.clone(),
        item_version: ver.clone(),
        source: src.clone(),
        technique_id: technique.to_string(),
        technique_name: Some(name.to_string()),
        tactic: tactics.first().cloned(),
        tactics,
        score,
        method: "model",
        model_version: model_version.clone(),
        mapped_at: at.clone(),
        batch_id: batch.clone(),
    };
    // Techniques stated by the sources (ids, no text), by item, resolved to names and tactics
    // where ATT&CK knows them; each item's go into the commit of its model rows.
    let mut stated = stated_rows(engine, pending).await?;
    let mut commit = Commit {
        lake,
        part: now.format("%Y-%m-%d").to_string(),
        batch: &batch,
        at: &at,
        model_version: &model_version,
        rows: Vec::new(),
        items: std::collections::BTreeSet::new(),
    };
    // The pending items stream through the mapper and are committed `items_per_commit` at a time:
    // memory holds one commit's items, not the backlog.
    let (_, mut stream) = engine.stream(&sql).await?;
    while let Some(b) = futures::StreamExt::next(&mut stream).await {
        let b = b.map_err(crate::sql::SqlError::from)?;
        let (ids, vers, srcs) = (
            column_strings(&b, 0),
            column_strings(&b, 1),
            column_strings(&b, 2),
        );
        // The text as Utf8 whatever string type the views produce (a no-op when it already is).
        let texts =
            arrow::compute::cast(b.column(4), &DataType::Utf8).map_err(|e| FeedError::Arrow {
                table: "threat_intelligence_data",
                message: e.to_string(),
            })?;
        let texts = texts.as_string::<i32>();
        let lists = b.column(3).as_list::<i32>();
        let reports = b.column(5).as_list::<i32>();
        for r in 0..b.num_rows() {
            let (Some(id), Some(ver), Some(src)) = (&ids[r], &vers[r], &srcs[r]) else {
                continue;
            };
            if commit.items.len() >= items_per_commit.max(1) {
                commit.write(&mut stated, &mut report).await?;
            }
            commit.items.insert((id.clone(), ver.clone()));
            if !reports.is_null(r) {
                // map_report kept the techniques whose report score reached its threshold.
                let entries = reports.value(r);
                let s = entries.as_struct();
                let tid = s.column(0).as_string::<i32>();
                let name = s.column(1).as_string::<i32>();
                let score = s.column(2).as_primitive::<Float64Type>();
                for e in 0..s.len() {
                    let tl = tactics_of
                        .get(tid.value(e))
                        .map(|t| t.to_vec())
                        .unwrap_or_default();
                    commit.rows.push(model_row(
                        (id, ver, src),
                        tid.value(e),
                        name.value(e),
                        tl,
                        score.value(e),
                    ));
                }
                continue;
            }
            if lists.is_null(r) {
                continue;
            }
            let threshold = match &model {
                Some(m) => m.threshold_for_text(None, texts.value(r)),
                None => threshold.unwrap_or(threatlake_udfs::DEFAULT_THRESHOLD),
            };
            let entries = lists.value(r);
            let s = entries.as_struct();
            let tid = s.column(0).as_string::<i32>();
            let name = s.column(1).as_string::<i32>();
            let tactics = s.column(2).as_list::<i32>();
            let score = s.column(3).as_primitive::<Float64Type>();
            for e in 0..s.len() {
                if score.value(e) < threshold {
                    continue;
                }
                let tl = tactics.value(e);
                let tl: Vec<String> = tl
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(str::to_string)
                    .collect();
                commit.rows.push(model_row(
                    (id, ver, src),
                    tid.value(e),
                    name.value(e),
                    tl,
                    score.value(e),
                ));
            }
        }
    }
    // Items with stated techniques the stream did not bring (none expected: both read the same
    // pending items) are committed too.
    commit.items.extend(stated.keys().cloned());
    commit.write(&mut stated, &mut report).await?;
    Ok(report)
}

/// One commit of `map-intel`: its items and their model rows.
struct Commit<'a> {
    lake: &'a Lake,
    /// The `mapped_date` partition.
    part: String,
    batch: &'a str,
    at: &'a str,
    model_version: &'a Option<String>,
    rows: Vec<MappedRow>,
    items: std::collections::BTreeSet<(String, String)>,
}

impl Commit<'_> {
    /// Write the items gathered so far with their model rows and (taken from `stated`) their
    /// source rows, count them into `report`, and start over.
    async fn write(
        &mut self,
        stated: &mut StatedByItem,
        report: &mut MapReport,
    ) -> Result<(), FeedError> {
        if self.items.is_empty() {
            return Ok(());
        }
        let mut rows = std::mem::take(&mut self.rows);
        report.model_rows += rows.len();
        for item in &self.items {
            let Some(s) = stated.remove(item) else {
                continue;
            };
            report.source_rows += s.len();
            rows.extend(s.into_iter().map(|s| MappedRow {
                item_id: item.0.clone(),
                item_version: item.1.clone(),
                source: s.source,
                technique_id: s.technique_id,
                technique_name: s.name,
                tactic: s.tactics.first().cloned(),
                tactics: s.tactics,
                score: 1.0,
                method: "source",
                model_version: None,
                mapped_at: self.at.to_string(),
                batch_id: self.batch.to_string(),
            }));
        }
        report.items += self.items.len();
        let mut per_item: std::collections::BTreeMap<(String, String), i64> =
            std::mem::take(&mut self.items)
                .into_iter()
                .map(|k| (k, 0))
                .collect();
        for r in &rows {
            *per_item
                .entry((r.item_id.clone(), r.item_version.clone()))
                .or_default() += 1;
        }
        let done: Vec<MappedItem> = per_item
            .into_iter()
            .map(|((item_id, item_version), techniques)| MappedItem {
                item_id,
                item_version,
                techniques,
                model_version: self.model_version.clone(),
                mapped_at: self.at.to_string(),
                batch_id: self.batch.to_string(),
            })
            .collect();
        let part = [("mapped_date", self.part.as_str())];
        // Evidence first (one commit), then the items (one commit): after a crash in between, the
        // items with evidence are not pending (see above) and those without are mapped again —
        // nothing twice.
        append(
            self.lake,
            MAPPED,
            &mapped_schema(),
            &part,
            self.batch,
            &rows,
        )
        .await?;
        append(
            self.lake,
            MAPPED_ITEMS,
            &mapped_items_schema(),
            &part,
            self.batch,
            &done,
        )
        .await
    }
}

/// A technique a source states for an item (its row is made at the item's commit).
struct Stated {
    source: String,
    technique_id: String,
    name: Option<String>,
    tactics: Vec<String>,
}

/// Stated techniques by item (id, version).
type StatedByItem = std::collections::BTreeMap<(String, String), Vec<Stated>>;

/// The techniques the sources state for the pending items (`pending`, a query of them): OTX
/// `attack_ids`, VirusTotal sandbox trees, TAXII attack-pattern references; by item.
async fn stated_rows(engine: &Engine, pending: &str) -> Result<StatedByItem, FeedError> {
    let stated = format!(
        "WITH pending AS ({pending}), \
         s AS ( \
           SELECT p.item_id, p.item_version, p.source, upper(trim(a.id)) AS technique_id FROM pending p \
             JOIN (SELECT 'otx:' || pulse_id AS item_id, unnest(attack_ids) AS id FROM otx_data) a ON a.item_id = p.item_id \
           UNION \
           SELECT p.item_id, p.item_version, p.source, upper(trim(v.technique_id)) FROM pending p \
             JOIN virustotal_techniques v ON p.item_id = 'vt:file:' || v.observable \
           UNION \
           SELECT p.item_id, p.item_version, p.source, x.technique_id FROM pending p \
             JOIN taxii_techniques x ON p.item_id = 'taxii:' || x.object_id) \
         SELECT s.item_id, s.item_version, s.source, s.technique_id, \
                first_value(t.name) AS name, array_agg(tt.tactic ORDER BY tt.matrix_order) FILTER (WHERE tt.tactic IS NOT NULL) AS tactics \
         FROM s LEFT JOIN attack_techniques_current t ON t.technique_id = s.technique_id \
           LEFT JOIN attack_technique_tactics tt ON tt.technique_id = s.technique_id AND tt.domain = t.domain \
         GROUP BY s.item_id, s.item_version, s.source, s.technique_id ORDER BY 1, 4"
    );
    let mut out = StatedByItem::default();
    // Streamed: the map holds the techniques, not the query's batches as well.
    let (_, mut stream) = engine.stream(&stated).await?;
    while let Some(b) = futures::StreamExt::next(&mut stream).await {
        let b = &b.map_err(crate::sql::SqlError::from)?;
        let (ids, vers, srcs, tids, names) = (
            column_strings(b, 0),
            column_strings(b, 1),
            column_strings(b, 2),
            column_strings(b, 3),
            column_strings(b, 4),
        );
        let tactics = b.column(5).as_list::<i32>();
        for r in 0..b.num_rows() {
            let (Some(id), Some(ver), Some(src), Some(tid)) =
                (&ids[r], &vers[r], &srcs[r], &tids[r])
            else {
                continue;
            };
            let tl: Vec<String> = if tactics.is_null(r) {
                vec![]
            } else {
                super::array_strings(&tactics.value(r))
                    .into_iter()
                    .flatten()
                    .collect()
            };
            out.entry((id.clone(), ver.clone()))
                .or_default()
                .push(Stated {
                    source: src.clone(),
                    technique_id: tid.clone(),
                    name: names[r].clone(),
                    tactics: tl,
                });
        }
    }
    Ok(out)
}

/// Snapshot the threat model from all mapped evidence of the current item versions; returns the run id
/// and the number of techniques.
pub async fn snapshot(lake: &Lake, engine: &Engine) -> Result<(String, usize), FeedError> {
    let now = Utc::now();
    let run = super::new_batch_id(now);
    let sql = format!(
        "WITH e AS ( \
           SELECT m.technique_id, m.technique_name, m.tactic, m.source, m.score, t.observed_at \
           FROM mapped_threat_data m JOIN threat_intelligence_data t \
             ON m.item_id = t.item_id AND m.item_version = t.item_version), \
         g AS ( \
           SELECT technique_id, max(technique_name) AS technique_name, max(tactic) AS tactic, count(*) AS evidence_count, \
                  count(DISTINCT source) AS distinct_sources, min(observed_at) AS first_seen, max(observed_at) AS last_seen, \
                  sum(score) AS weight FROM e GROUP BY technique_id) \
         SELECT technique_id, technique_name, tactic, evidence_count, distinct_sources, first_seen, last_seen, weight, \
                weight / max(weight) OVER () AS score, TIMESTAMP '{}' AS created_at \
         FROM g ORDER BY weight DESC, technique_id",
        fixed(now)
    );
    let r = engine.run(&sql).await?;
    let schema = threat_model_schema();
    let mut batches = Vec::new();
    let mut n = 0;
    for b in &r[0].batches {
        let cols = (0..b.num_columns())
            .map(|i| arrow::compute::cast(b.column(i), schema.field(i).data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FeedError::Arrow {
                table: THREAT_MODEL,
                message: e.to_string(),
            })?;
        let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| FeedError::Arrow {
            table: THREAT_MODEL,
            message: e.to_string(),
        })?;
        n += batch.num_rows();
        batches.push(batch);
    }
    lake.append(
        THREAT_MODEL,
        &[("run_id", &run)],
        schema,
        &batches,
        &format!("threat model snapshot {run}"),
    )
    .await?;
    Ok((run, n))
}

/// One line of a threat-model diff.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffLine {
    /// new | rising | fading | gone | steady
    pub change: &'static str,
    /// Technique.
    pub technique_id: String,
    /// Name.
    pub technique_name: Option<String>,
    /// Score in run A (None when absent).
    pub score_a: Option<f64>,
    /// Score in run B.
    pub score_b: Option<f64>,
    /// Evidence in run A.
    pub evidence_a: i64,
    /// Evidence in run B.
    pub evidence_b: i64,
}

/// Runs with a snapshot, oldest first.
pub async fn runs(engine: &Engine) -> Result<Vec<String>, FeedError> {
    let r = engine
        .run("SELECT DISTINCT CAST(run_id AS VARCHAR) FROM threat_model ORDER BY 1")
        .await?;
    let mut out = Vec::new();
    for b in &r[0].batches {
        out.extend(column_strings(b, 0).into_iter().flatten());
    }
    Ok(out)
}

/// Compare two snapshots: techniques new in B, gone from A, rising (score ×1.25 or more evidence with
/// a higher score), fading (score ×0.8 or less), else steady (omitted unless `all`).
pub async fn diff(
    engine: &Engine,
    a: &str,
    b: &str,
    all: bool,
) -> Result<Vec<DiffLine>, FeedError> {
    let load = |run: String| async move {
        let df = engine
            .ctx
            .table("threat_model")
            .await
            .map_err(crate::sql::SqlError::from)?
            .filter(datafusion::prelude::col("run_id").eq(datafusion::prelude::lit(run)))
            .map_err(crate::sql::SqlError::from)?
            .select_columns(&["technique_id", "technique_name", "score", "evidence_count"])
            .map_err(crate::sql::SqlError::from)?;
        let batches = df.collect().await.map_err(crate::sql::SqlError::from)?;
        let mut m = std::collections::BTreeMap::new();
        for b in &batches {
            let (ids, names) = (column_strings(b, 0), column_strings(b, 1));
            let score = b.column(2).as_primitive::<Float64Type>();
            let ev = b.column(3).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                if let Some(id) = &ids[i] {
                    m.insert(id.clone(), (names[i].clone(), score.value(i), ev.value(i)));
                }
            }
        }
        Ok::<_, FeedError>(m)
    };
    let (ma, mb) = (load(a.to_string()).await?, load(b.to_string()).await?);
    let mut keys: std::collections::BTreeSet<&String> = ma.keys().collect();
    keys.extend(mb.keys());
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (ma.get(k), mb.get(k));
        let change = match (x, y) {
            (None, Some(_)) => "new",
            (Some(_), None) => "gone",
            (Some(x), Some(y)) if y.1 >= x.1 * 1.25 || (y.2 > x.2 && y.1 > x.1) => "rising",
            (Some(x), Some(y)) if y.1 <= x.1 * 0.8 => "fading",
            _ => "steady",
        };
        if change == "steady" && !all {
            continue;
        }
        out.push(DiffLine {
            change,
            technique_id: k.clone(),
            technique_name: y.or(x).and_then(|v| v.0.clone()),
            score_a: x.map(|v| v.1),
            score_b: y.map(|v| v.1),
            evidence_a: x.map_or(0, |v| v.2),
            evidence_b: y.map_or(0, |v| v.2),
        });
    }
    let order = |c: &str| {
        ["new", "rising", "fading", "gone", "steady"]
            .iter()
            .position(|x| *x == c)
    };
    out.sort_by(|p, q| {
        order(p.change)
            .cmp(&order(q.change))
            .then(
                q.score_b
                    .unwrap_or(0.0)
                    .total_cmp(&p.score_b.unwrap_or(0.0)),
            )
            .then(p.technique_id.cmp(&q.technique_id))
    });
    Ok(out)
}
