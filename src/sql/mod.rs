//! SQL over the lake: a DataFusion session with every lake table, the shipped views and threatlake's functions.

#[cfg(feature = "ballista")]
pub mod distributed;
pub mod duckdb_sql;
pub mod output;

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};

use threatlake_udfs::LazyMapper;

use crate::attack;
use crate::lake::{Lake, LakeError};

/// Views shipped in `sql/views/`, created on every session in this order (later ones may use earlier ones).
pub const VIEWS: &[(&str, &str)] = &[
    (
        "attack_versions_current",
        include_str!("../../sql/views/attack_versions_current.sql"),
    ),
    (
        "attack_techniques_current",
        include_str!("../../sql/views/attack_techniques_current.sql"),
    ),
    (
        "attack_tactics_current",
        include_str!("../../sql/views/attack_tactics_current.sql"),
    ),
    (
        "attack_technique_tactics",
        include_str!("../../sql/views/attack_technique_tactics.sql"),
    ),
    (
        "attack_procedures_current",
        include_str!("../../sql/views/attack_procedures_current.sql"),
    ),
    ("otx_data", include_str!("../../sql/views/otx_data.sql")),
    (
        "otx_indicators",
        include_str!("../../sql/views/otx_indicators.sql"),
    ),
    (
        "virustotal_data",
        include_str!("../../sql/views/virustotal_data.sql"),
    ),
    (
        "virustotal_techniques",
        include_str!("../../sql/views/virustotal_techniques.sql"),
    ),
    (
        "threat_intelligence_data",
        include_str!("../../sql/views/threat_intelligence_data.sql"),
    ),
];

/// Errors opening a session or running SQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlError {
    /// Listing the lake failed (boxed: lake errors carry the store's error and hints).
    #[error(transparent)]
    Lake(Box<LakeError>),
    /// DataFusion rejected a statement or failed to run it (its message is shown as is, once:
    /// not chained as a source, since DataFusion's message already includes its causes).
    #[error("{0}")]
    DataFusion(Box<DataFusionError>),
    /// A shipped view failed to create; a bug, or a lake written by an incompatible version.
    #[error("creating view {name} from sql/views/{name}.sql: {source}")]
    View {
        /// View name.
        name: String,
        /// DataFusion's error.
        source: DataFusionError,
    },
}

impl From<LakeError> for SqlError {
    fn from(e: LakeError) -> Self {
        SqlError::Lake(Box::new(e))
    }
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        SqlError::DataFusion(Box::new(e))
    }
}

/// Where the mapping functions find their model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Directory holding `<domain>-<version>/` model artifacts.
    pub models_root: PathBuf,
    /// Domain whose newest model `map_technique` uses.
    pub mapping_domain: String,
    /// Abstain threshold of `map_technique`.
    pub threshold: f64,
    /// Only intel observed at or after this instant (`report --since`): `otx_data` and
    /// `virustotal_data` (and the views built on them) are filtered; `*_all` keeps everything.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            models_root: PathBuf::from("data/models"),
            mapping_domain: "enterprise".into(),
            threshold: 0.03,
            since: None,
        }
    }
}

impl EngineOptions {
    /// Options from settings.
    pub fn from_settings(s: &crate::Settings) -> Self {
        Self {
            models_root: PathBuf::from(&s.lake.models),
            mapping_domain: s.mapping.domain.to_string(),
            threshold: s.mapping.threshold,
            since: None,
        }
    }
}

/// A DataFusion session over one lake.
pub struct Engine {
    /// The session; use it for anything not wrapped here.
    pub ctx: SessionContext,
    /// The lake it reads.
    pub lake: Lake,
    /// The mapping model its functions use (loaded on first use).
    pub mapper: Arc<LazyMapper>,
}

impl Engine {
    /// Open a session: register every table in the lake (ATT&CK tables that are absent are
    /// registered empty, so queries and views work on a fresh lake), functions, then views.
    pub async fn open(lake: &Lake) -> Result<Self, SqlError> {
        Self::open_with(lake, &EngineOptions::default()).await
    }

    /// [`Engine::open`] with explicit mapping options.
    pub async fn open_with(lake: &Lake, options: &EngineOptions) -> Result<Self, SqlError> {
        let mapper = Arc::new(LazyMapper::new(
            &options.models_root,
            &options.mapping_domain,
            options.threshold,
        ));
        Self::open_filtered(lake, mapper, options.since).await
    }

    /// [`Engine::open`] with a given (possibly already loaded) mapping model.
    pub async fn open_with_mapper(lake: &Lake, mapper: Arc<LazyMapper>) -> Result<Self, SqlError> {
        Self::open_filtered(lake, mapper, None).await
    }

    async fn open_filtered(
        lake: &Lake,
        mapper: Arc<LazyMapper>,
        since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Self, SqlError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("threatlake", "lake");
        let ctx = SessionContext::new_with_config(config);
        ctx.register_object_store(&lake.location.base_url, lake.location.store.clone());
        {
            let state = ctx.state_ref();
            let mut state = state.write();
            threatlake_udfs::register_all(&mut *state, mapper.clone())?;
        }
        let found = lake.tables().await?;
        let known = known_tables();
        for (name, schema, cols) in &known {
            let provider: Arc<dyn TableProvider> = match found.get(*name) {
                Some(_) => listing_table(&ctx, lake, name, Some(schema.clone()), cols).await?,
                None => empty_table(schema.clone(), cols)?,
            };
            ctx.register_table(*name, provider)?;
        }
        for (name, info) in &found {
            if known.iter().any(|(k, _, _)| k == name) {
                continue;
            }
            let cols: Vec<&str> = info.partition_cols.iter().map(String::as_str).collect();
            let provider = listing_table(&ctx, lake, name, None, &cols).await?;
            ctx.register_table(name.as_str(), provider)?;
        }
        for (name, sql) in VIEWS {
            let view_err = |source| SqlError::View {
                name: name.to_string(),
                source,
            };
            ctx.sql(sql).await.map_err(view_err)?;
            let time = match *name {
                "otx_data" => "coalesce(modified, created)",
                "virustotal_data" => "coalesce(last_analysis, fetched_at)",
                _ => continue,
            };
            if let Some(since) = since {
                // Keep the unfiltered view as `<name>_all`; later views bind to the filtered one.
                // The instant is formatted here from a parsed timestamp, never taken from input text.
                let all = ctx.deregister_table(*name)?.expect("view just created");
                ctx.register_table(format!("{name}_all"), all)?;
                let filtered = format!(
                    "CREATE VIEW {name} AS SELECT * FROM {name}_all WHERE {time} >= TIMESTAMP '{}'",
                    since.format("%Y-%m-%dT%H:%M:%SZ")
                );
                ctx.sql(&filtered).await.map_err(view_err)?;
            }
        }
        Ok(Self {
            ctx,
            lake: lake.clone(),
            mapper,
        })
    }

    /// Run every statement in `sql` and collect the results of each.
    pub async fn run(&self, sql: &str) -> Result<Vec<QueryResult>, SqlError> {
        let mut out = Vec::new();
        for stmt in parse(sql)? {
            out.push(self.run_statement(stmt).await?);
        }
        Ok(out)
    }

    /// Run one parsed statement.
    pub async fn run_statement(&self, stmt: Statement) -> Result<QueryResult, SqlError> {
        let state = self.ctx.state();
        let plan = state.statement_to_plan(stmt).await?;
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok(QueryResult { schema, batches })
    }

    /// Names of tables and views in the lake schema, sorted, with their kind.
    pub async fn table_names(&self) -> Vec<(String, &'static str)> {
        let Some(schema) = self
            .ctx
            .catalog("threatlake")
            .and_then(|c| c.schema("lake"))
        else {
            return vec![];
        };
        let mut names = schema.table_names();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            let kind = match schema
                .table(&n)
                .await
                .ok()
                .flatten()
                .map(|t| t.table_type())
            {
                Some(datafusion::datasource::TableType::View) => "view",
                _ => "table",
            };
            out.push((n, kind));
        }
        out
    }

    /// The schema of a table or view, if it exists.
    pub async fn table_schema(&self, name: &str) -> Option<SchemaRef> {
        self.ctx.table_provider(name).await.ok().map(|t| t.schema())
    }
}

/// The result of one statement.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Output schema (also for zero rows).
    pub schema: SchemaRef,
    /// Result batches.
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    /// Total rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Split SQL text into statements (DataFusion's parser, so `;` inside strings is handled).
pub fn parse(sql: &str) -> Result<Vec<Statement>, SqlError> {
    Ok(DFParser::parse_sql(sql)?.into_iter().collect())
}

/// Tables with a fixed schema: ATT&CK and feed tables. They are registered even when the lake has no
/// files for them yet, so views and queries over them always resolve.
pub fn known_tables() -> Vec<(&'static str, SchemaRef, &'static [&'static str])> {
    let mut v: Vec<(&'static str, SchemaRef, &'static [&'static str])> = attack::table_schemas()
        .into_iter()
        .map(|(n, s)| (n, s, &attack::PARTITION_COLS[..]))
        .collect();
    v.extend(crate::feeds::table_schemas());
    v
}

async fn listing_table(
    ctx: &SessionContext,
    lake: &Lake,
    name: &str,
    schema: Option<SchemaRef>,
    partition_cols: &[&str],
) -> Result<Arc<dyn TableProvider>, SqlError> {
    let url = ListingTableUrl::parse(lake.location.dir_url(name))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(
            partition_cols
                .iter()
                .map(|c| (c.to_string(), DataType::Utf8))
                .collect(),
        );
    let schema = match schema {
        Some(s) => s,
        None => options.infer_schema(&ctx.state(), &url).await?,
    };
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}

fn empty_table(
    schema: SchemaRef,
    partition_cols: &[&str],
) -> Result<Arc<dyn TableProvider>, SqlError> {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(
        partition_cols
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, false)),
    );
    let schema = Arc::new(Schema::new(fields));
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?))
}
