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
        failed
    });
    if failed > 0 {
        eprintln!("{failed} sqllogictest file(s) failed");
        std::process::exit(1);
    }
}
