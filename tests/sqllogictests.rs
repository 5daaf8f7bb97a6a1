//! Runs `tests/slt/*.slt` (sqllogictest) against a lake holding the real ATT&CK v18.1 bundles, on
//! DataFusion and — built with `--features duckdb` — on the embedded DuckDB engine too, as DuckDB's
//! extension template does, so the engines cannot drift. Records that only one engine can run say
//! so with `onlyif datafusion` / `skipif duckdb` (the runner labels each engine).
//! `cargo test --test sqllogictests -- --complete` rewrites the expected output (DataFusion's).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use sqllogictest::{DBOutput, DefaultColumnType};
use threatlake::{Engine, Lake};

/// The engines the files run on.
enum Db {
    DataFusion(Engine),
    #[cfg(feature = "duckdb")]
    DuckDb(threatlake::duck::DuckEngine),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DbError(String);

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let results = match self {
            Db::DataFusion(engine) => engine.run(sql).await.map_err(|e| DbError(e.to_string()))?,
            #[cfg(feature = "duckdb")]
            Db::DuckDb(engine) => engine.run(sql).map_err(|e| DbError(e.to_string()))?,
        };
        let Some(r) = results.into_iter().last() else {
            return Ok(DBOutput::StatementComplete(0));
        };
        let is_query = sql.trim_start().to_lowercase().starts_with("select")
            || sql.trim_start().to_lowercase().starts_with("with");
        if !is_query {
            return Ok(DBOutput::StatementComplete(r.num_rows() as u64));
        }
        let types = r
            .schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                t if t.is_integer() => DefaultColumnType::Integer,
                DataType::Float16
                | DataType::Float32
                | DataType::Float64
                | DataType::Decimal128(..) => DefaultColumnType::FloatingPoint,
                _ => DefaultColumnType::Text,
            })
            .collect();
        let opts = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        for b in &r.batches {
            let fmts: Vec<_> = b
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
                .collect();
            for i in 0..b.num_rows() {
                rows.push(
                    fmts.iter()
                        .map(|f| {
                            let s = f.value(i).to_string();
                            if s.is_empty() {
                                "(empty)".to_string()
                            } else {
                                s
                            }
                        })
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}
}

/// A fresh session of `engine` over the fixture lake and model.
async fn open(
    engine: &str,
    lake: &Lake,
    mapper: std::sync::Arc<threatlake_udfs::LazyMapper>,
    models: &std::path::Path,
) -> Result<Db, DbError> {
    let err = |e: &dyn std::fmt::Display| DbError(e.to_string());
    match engine {
        #[cfg(feature = "duckdb")]
        "duckdb" => {
            let _ = &mapper;
            let options = threatlake::sql::EngineOptions {
                models_root: models.to_path_buf(),
                ..Default::default()
            };
            threatlake::duck::DuckEngine::open(lake, &options)
                .await
                .map(Db::DuckDb)
                .map_err(|e| err(&e))
        }
        _ => {
            let _ = models;
            Engine::open_with_mapper(lake, mapper)
                .await
                .map(Db::DataFusion)
                .map_err(|e| err(&e))
        }
    }
}

fn main() {
    let complete = std::env::args().any(|a| a == "--complete");
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(async move {
        let t = Instant::now();
        let dir = common::scratch("slt");
        let lake = common::ingest(&dir, &["enterprise", "mobile", "ics"]).await;
        eprintln!(
            "slt fixture: ingested 3 ATT&CK domains in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let engine = Engine::open(&lake).await.unwrap();
        let report = threatlake::mapping::build_model(
            &engine,
            threatlake::Domain::Enterprise,
            &dir.join("models"),
            None,
            threatlake_udfs::mapper::MapperParams::default(),
            Some(threatlake::mapping::calibration_setting("builtin").unwrap()),
            threatlake::mapping::Learn {
                feedback: false,
                examples: threatlake::mapping::examples_setting("builtin").unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mapper = std::sync::Arc::new(threatlake_udfs::LazyMapper::loaded(
            std::sync::Arc::new(threatlake_udfs::mapper::Mapper::load(&report.dir).unwrap()),
            None,
        ));
        eprintln!(
            "slt fixture: built the enterprise model in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/slt"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "slt"))
                .filter(|p| {
                    filter
                        .as_ref()
                        .is_none_or(|f| p.to_string_lossy().contains(f.as_str()))
                })
                .collect();
        files.sort();
        assert!(!files.is_empty(), "no .slt files found");
        let mut failed = 0;
        let mut engines = vec!["datafusion"];
        if cfg!(feature = "duckdb") {
            engines.push("duckdb");
        }
        for f in files {
            for engine in &engines {
                if complete && *engine != "datafusion" {
                    continue;
                }
                let (lake, mapper, models) = (lake.clone(), mapper.clone(), dir.join("models"));
                let engine_name = engine.to_string();
                let mut runner = sqllogictest::Runner::new(move || {
                    let (lake, mapper, models) = (lake.clone(), mapper.clone(), models.clone());
                    let engine_name = engine_name.clone();
                    async move { open(&engine_name, &lake, mapper, &models).await }
                });
                runner.add_label(engine);
                let name = format!("{} ({engine})", f.file_name().unwrap().to_string_lossy());
                let result = if complete {
                    runner
                        .update_test_file(
                            &f,
                            " ",
                            sqllogictest::default_validator,
                            sqllogictest::default_normalizer,
                            sqllogictest::default_column_validator,
                        )
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    runner
                        .run_file_async(&f)
                        .await
                        .map_err(|e| e.display(true).to_string())
                };
                match result {
                    Ok(()) => eprintln!("ok   {name}"),
                    Err(e) => {
                        failed += 1;
                        eprintln!("FAIL {name}\n{e}");
                    }
                }
            }
        }
        if filter.is_none() && !complete {
            failed += development_floors(&mapper.get().unwrap());
        }
        failed
    });
    if failed > 0 {
        eprintln!("{failed} sqllogictest file(s) failed");
        std::process::exit(1);
    }
}

/// One development set's floors: ranking no lower, calibration error no higher, abstention on the
/// negatives and document-level F1 (AnnoCTR) no worse than recorded when the calibration was fitted.
struct Floor {
    file: &'static str,
    top1: f64,
    recall_at_5: f64,
    mrr_at_10: f64,
    /// ECE of the top-1 score (negatives counted as wrong).
    ece: f64,
    /// Share of negatives mapped at the model's own threshold.
    negatives_mapped: f64,
    /// map_report F1 over the set's reports (rows grouped by `doc`), and the ceiling of its report
    /// scores' ECE.
    doc: Option<(f64, f64)>,
}

const FLOORS: [Floor; 3] = [
    Floor {
        file: "annoctr_dev.jsonl",
        top1: TOP1_ANNOCTR,
        recall_at_5: R5_ANNOCTR,
        mrr_at_10: MRR_ANNOCTR,
        ece: ECE_ANNOCTR,
        negatives_mapped: 0.05,
        doc: Some((DOC_F1_ANNOCTR, DOC_ECE_ANNOCTR)),
    },
    Floor {
        file: "splunk_detections.jsonl",
        top1: TOP1_SPLUNK,
        recall_at_5: R5_SPLUNK,
        mrr_at_10: MRR_SPLUNK,
        ece: ECE_SPLUNK,
        negatives_mapped: 0.0,
        doc: None,
    },
    Floor {
        file: "car_analytics.jsonl",
        top1: TOP1_CAR,
        recall_at_5: R5_CAR,
        mrr_at_10: MRR_CAR,
        ece: ECE_CAR,
        negatives_mapped: 0.0,
        doc: None,
    },
];

/// The development sets of `../shared/data/eval/` against their floors (a drop fails, a rise does
/// not); returns the number of sets that fell below.
fn development_floors(m: &threatlake_udfs::mapper::Mapper) -> usize {
    use threatlake_udfs::mapper::eval;
    use threatlake_udfs::mapping_kernels::par_top_k;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/eval");
    let mut failed = 0;
    for f in &FLOORS {
        let path = format!("{dir}/{}", f.file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let rows: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // The reports the model learnt sentences of (mapping.examples: AnnoCTR's train documents)
        // are left out, as `model eval` leaves them out.
        let keys: Vec<(&str, Option<&str>)> = rows
            .iter()
            .map(|r| {
                let text = r["text"].as_str().unwrap();
                (text, r["doc"].as_str().or(r["id"].as_str()))
            })
            .collect();
        let keep = eval::not_learnt(m, &keys);
        assert!(
            keys.iter()
                .all(|(text, g)| g.is_some() || !m.model.learnt(text)),
            "a learnt row without a report"
        );
        let rows: Vec<serde_json::Value> = rows
            .into_iter()
            .zip(keep)
            .filter_map(|(r, k)| k.then_some(r))
            .collect();
        let texts: Vec<String> = rows
            .iter()
            .map(|r| r["text"].as_str().unwrap().to_string())
            .collect();
        let labels: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                r["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_str().unwrap().to_string())
                    .collect()
            })
            .collect();
        let ranked = par_top_k(m, &texts, 10);
        let (mut ids, mut pos_labels, mut pairs) = (vec![], vec![], vec![]);
        let (mut negatives, mut negatives_mapped) = (0usize, 0usize);
        for ((r, l), t) in ranked.iter().zip(&labels).zip(&texts) {
            let top = r.first().map_or(0.0, |x| x.score);
            let r_ids: Vec<String> = r
                .iter()
                .map(|x| m.model.techniques[x.technique].id.clone())
                .collect();
            let right = r_ids.first().is_some_and(|t| l.contains(t));
            pairs.push((top, right));
            if l.is_empty() {
                negatives += 1;
                negatives_mapped += usize::from(top >= m.threshold_for_text(None, t));
                continue;
            }
            ids.push(r_ids);
            pos_labels.push(l.clone());
        }
        let metrics = eval::evaluate(&ids, &pos_labels);
        let ece = eval::reliability(&pairs, 10).ece;
        let neg_share = negatives_mapped as f64 / negatives.max(1) as f64;
        let doc = f.doc.map(|_| {
            let mut docs: std::collections::BTreeMap<&str, (Vec<&str>, Vec<&str>)> =
                Default::default();
            for (r, t) in rows.iter().zip(&texts) {
                let d = docs.entry(r["doc"].as_str().unwrap_or("")).or_default();
                d.0.push(t);
                d.1.extend(
                    r["labels"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|l| l.as_str()),
                );
            }
            let docs: Vec<(String, std::collections::BTreeSet<String>)> = docs
                .into_values()
                .filter(|(_, l)| !l.is_empty())
                .map(|(t, l)| (t.join("\n\n"), l.into_iter().map(str::to_string).collect()))
                .collect();
            eval::document_scores(m, &docs, None)
        });
        eprintln!(
            "dev  {}: top1 {:.4} recall@5 {:.4} mrr@10 {:.4} ECE {:.4} negatives mapped {:.4}{}",
            f.file,
            metrics.top1,
            metrics.recall_at_5,
            metrics.mrr_at_10,
            ece,
            neg_share,
            doc.map_or(String::new(), |d| format!(
                " document F1 {:.4} report-score ECE {:.4}",
                d.f1, d.ece
            ))
        );
        let ok = metrics.top1 >= f.top1
            && metrics.recall_at_5 >= f.recall_at_5
            && metrics.mrr_at_10 >= f.mrr_at_10
            && ece <= f.ece
            && neg_share <= f.negatives_mapped
            && doc
                .zip(f.doc)
                .is_none_or(|(got, (f1, ece))| got.f1 >= f1 && got.ece <= ece);
        if !ok {
            failed += 1;
            eprintln!("FAIL {} fell below its floor", f.file);
        }
    }
    failed
}

// Floors: the figures measured with the shipped calibration (enterprise 18.1, default parameters,
// mapping.examples builtin learnt LABELLED_WEIGHT times; AnnoCTR: its 16 dev reports, the model
// learnt the train reports): top-1 0.5881 / 0.5112 / 0.7475, recall@5 0.8388 / 0.7396 / 0.9192,
// MRR@10 0.7033 / 0.6130 / 0.8281, ECE 0.0280 / 0.0482 / 0.1184, AnnoCTR document F1 0.481 and
// report-score ECE 0.047, a little below; ECE ceilings a little above. CAR's 99 rows cannot show an
// ECE below about 0.09 even for perfect scores, and one analytic moves it by 0.01 (0.107 before
// detection titles naming a tool read as prose, which brought Splunk's 1,651 rules from 0.060 to
// 0.047 and CAR's mean over five cross-validation draws from 0.115 to 0.109), so its ceiling has
// that margin; AnnoCTR's 486 report scores cannot show less than about 0.03 (see README).
const TOP1_ANNOCTR: f64 = 0.58;
const R5_ANNOCTR: f64 = 0.83;
const MRR_ANNOCTR: f64 = 0.70;
const ECE_ANNOCTR: f64 = 0.04;
const DOC_F1_ANNOCTR: f64 = 0.47;
const DOC_ECE_ANNOCTR: f64 = 0.05;
const TOP1_SPLUNK: f64 = 0.508;
const R5_SPLUNK: f64 = 0.735;
const MRR_SPLUNK: f64 = 0.61;
const ECE_SPLUNK: f64 = 0.055;
const TOP1_CAR: f64 = 0.74;
const R5_CAR: f64 = 0.91;
const MRR_CAR: f64 = 0.82;
const ECE_CAR: f64 = 0.13;
