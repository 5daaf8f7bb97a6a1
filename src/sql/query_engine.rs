//! The query engines over one lake — DataFusion (default), embedded DuckDB, Ballista — behind one
//! type that the REPL, batch `sql`, reports and the server all use.

use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::StreamExt;

use super::{Engine, EngineOptions, QueryResult, SqlError};
use crate::Lake;

/// Which engine runs SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Apache DataFusion in process.
    DataFusion,
    /// Embedded DuckDB (the `duckdb` feature).
    DuckDb,
    /// Apache DataFusion Ballista (the `ballista` feature): in-process standalone or a remote
    /// scheduler.
    Ballista,
}

/// Errors opening an engine or running SQL on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryEngineError {
    /// DataFusion or Ballista.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// DuckDB.
    #[cfg(feature = "duckdb")]
    #[error(transparent)]
    Duck(#[from] crate::duck::DuckError),
    /// The engine is not in this build.
    #[error("this build has no {engine} engine; build with `cargo build --features {feature}`")]
    NotBuilt {
        /// Engine name.
        engine: &'static str,
        /// Cargo feature.
        feature: &'static str,
    },
}

/// What receives each statement's result as it streams (the REPL's printer).
pub trait ResultSink {
    /// Errors of the sink (output); engine errors convert into it.
    type Error: From<QueryEngineError>;
    /// A statement's result begins.
    fn begin(&mut self, schema: &SchemaRef) -> Result<(), Self::Error>;
    /// The next batch; `Ok(false)` stops reading this result, which cancels the query.
    fn batch(&mut self, batch: &RecordBatch) -> Result<bool, Self::Error>;
    /// The statement ended after `secs` (or reading it stopped, when `batch` said so).
    fn end(&mut self, secs: f64) -> Result<(), Self::Error>;
}

/// A session on one engine.
pub enum QueryEngine {
    /// DataFusion (also Ballista, which runs DataFusion plans).
    DataFusion(Engine),
    /// Embedded DuckDB over the same lake.
    #[cfg(feature = "duckdb")]
    DuckDb(crate::duck::DuckEngine),
}

impl QueryEngine {
    /// Open `kind` over `lake`; `scheduler` is a Ballista scheduler URL (standalone when None).
    pub async fn open(
        kind: EngineKind,
        lake: &Lake,
        options: &EngineOptions,
        scheduler: Option<&str>,
    ) -> Result<Self, QueryEngineError> {
        match kind {
            EngineKind::DataFusion => Ok(Self::DataFusion(Engine::open_with(lake, options).await?)),
            #[cfg(feature = "duckdb")]
            EngineKind::DuckDb => Ok(Self::DuckDb(
                crate::duck::DuckEngine::open(lake, options).await?,
            )),
            #[cfg(not(feature = "duckdb"))]
            EngineKind::DuckDb => Err(QueryEngineError::NotBuilt {
                engine: "DuckDB",
                feature: "duckdb",
            }),
            #[cfg(feature = "ballista")]
            EngineKind::Ballista => {
                let engine = Engine::open_with(lake, options).await?;
                Ok(Self::DataFusion(match scheduler {
                    Some(url) => engine.into_ballista_remote(url).await?,
                    None => engine.into_ballista_standalone().await?,
                }))
            }
            #[cfg(not(feature = "ballista"))]
            EngineKind::Ballista => {
                let _ = scheduler;
                Err(QueryEngineError::NotBuilt {
                    engine: "Ballista",
                    feature: "ballista",
                })
            }
        }
    }

    /// Parse `text` and run each statement, handing its result to `sink` batch by batch as the
    /// engine produces it (DataFusion and Ballista stream; DuckDB hands over its finished result).
    pub async fn stream_each<S: ResultSink>(
        &self,
        text: &str,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        match self {
            QueryEngine::DataFusion(e) => {
                for stmt in super::parse(text).map_err(QueryEngineError::from)? {
                    let start = Instant::now();
                    let (schema, mut stream) = e
                        .stream_statement(stmt)
                        .await
                        .map_err(QueryEngineError::from)?;
                    sink.begin(&schema)?;
                    while let Some(b) = stream.next().await {
                        let b = b.map_err(|e| QueryEngineError::from(super::SqlError::from(e)))?;
                        if !sink.batch(&b)? {
                            break;
                        }
                    }
                    drop(stream);
                    sink.end(start.elapsed().as_secs_f64())?;
                }
            }
            #[cfg(feature = "duckdb")]
            QueryEngine::DuckDb(e) => {
                for stmt in crate::duck::DuckEngine::statements(text) {
                    let start = Instant::now();
                    let r = e.run_statement(&stmt).map_err(QueryEngineError::from)?;
                    sink.begin(&r.schema)?;
                    for b in &r.batches {
                        if !sink.batch(b)? {
                            break;
                        }
                    }
                    sink.end(start.elapsed().as_secs_f64())?;
                }
            }
        }
        Ok(())
    }

    /// Every statement's result, collected.
    pub async fn run(&self, text: &str) -> Result<Vec<QueryResult>, QueryEngineError> {
        /// Collects every statement's batches.
        #[derive(Default)]
        struct Collect(Vec<QueryResult>);
        impl ResultSink for Collect {
            type Error = QueryEngineError;
            fn begin(&mut self, schema: &SchemaRef) -> Result<(), QueryEngineError> {
                self.0.push(QueryResult {
                    schema: schema.clone(),
                    batches: Vec::new(),
                });
                Ok(())
            }
            fn batch(&mut self, batch: &RecordBatch) -> Result<bool, QueryEngineError> {
                if let Some(r) = self.0.last_mut() {
                    r.batches.push(batch.clone());
                }
                Ok(true)
            }
            fn end(&mut self, _secs: f64) -> Result<(), QueryEngineError> {
                Ok(())
            }
        }
        let mut c = Collect::default();
        self.stream_each(text, &mut c).await?;
        Ok(c.0)
    }

    /// Tables and views, sorted, with their kind.
    pub async fn table_names(&self) -> Vec<(String, &'static str)> {
        match self {
            QueryEngine::DataFusion(e) => e.table_names().await,
            #[cfg(feature = "duckdb")]
            QueryEngine::DuckDb(e) => e.table_names(),
        }
    }

    /// A table's or view's schema.
    pub async fn table_schema(&self, name: &str) -> Option<SchemaRef> {
        match self {
            QueryEngine::DataFusion(e) => e.table_schema(name).await,
            #[cfg(feature = "duckdb")]
            QueryEngine::DuckDb(e) => e.table_schema(name),
        }
    }

    /// The lake it reads, for banners.
    pub fn describe(&self) -> String {
        match self {
            QueryEngine::DataFusion(e) => e.lake.location.to_string(),
            #[cfg(feature = "duckdb")]
            QueryEngine::DuckDb(e) => format!("{} (DuckDB)", e.root.display()),
        }
    }
}
