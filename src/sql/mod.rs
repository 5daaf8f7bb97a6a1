//! SQL over the lake: a DataFusion session with every lake table, the shipped views and threatlake's functions.

#[cfg(feature = "ballista")]
pub mod distributed;
pub mod duckdb_sql;
pub mod output;
pub mod query_engine;
pub mod time_travel;

pub use query_engine::{EngineKind, QueryEngine, QueryEngineError, ResultSink};

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};

use threatlake_udfs::LazyMapper;

use crate::attack;
use crate::lake::delta::AsOf;
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
    ("taxii_data", include_str!("../../sql/views/taxii_data.sql")),
    (
        "taxii_techniques",
        include_str!("../../sql/views/taxii_techniques.sql"),
    ),
    (
        "threat_intelligence_data",
        include_str!("../../sql/views/threat_intelligence_data.sql"),
    ),
    (
        "integration_outbox",
        include_str!("../../sql/views/integration_outbox.sql"),
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
    /// A statement that would write: lake tables change only through threatlake's commit path.
    #[error("{what} is not allowed: SQL here is read-only, because lake tables change only through threatlake's own commit path (`threatlake ingest …`, `run`, `map-intel`, `lake compact`). To save a result, use `threatlake sql --format csv|json -c \"SELECT …\" > file` or `threatlake report`")]
    ReadOnly {
        /// The statement kind (INSERT, COPY, …).
        what: String,
    },
    /// A statement other than a query where only queries are accepted (`POST /api/v1/sql`).
    #[error("{what} is not allowed here: only a single SELECT (or WITH … SELECT, EXPLAIN SELECT) query is accepted; no DDL, SET, COPY or external tables")]
    NotAQuery {
        /// What was given.
        what: String,
    },
    /// The query ran longer than allowed.
    #[error("the query was stopped after {secs} s (server.sql.timeout_secs); add filters or a LIMIT, or query aggregates")]
    Timeout {
        /// The limit.
        secs: u64,
    },
    /// A statement nested beyond what is planned safely and quickly.
    #[error("the statement nests {what} deeper than {limit} levels and was not run: split it, use IN (…) instead of long OR chains, or UNION a table of values instead of many SELECTs")]
    TooDeep {
        /// What is nested (expressions, set operations).
        what: &'static str,
        /// The limit.
        limit: usize,
    },
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

impl SqlError {
    /// The query ran out of its memory pool where DataFusion could not spill ("Resources
    /// exhausted", wherever in DataFusion's chain of causes): front ends name their setting.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, SqlError::DataFusion(d) if d.to_string().contains("Resources exhausted"))
    }
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        SqlError::DataFusion(Box::new(e))
    }
}

/// Where the mapping functions find their model, and how much memory queries may take.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The runtime (memory pool, spill files) sessions share; None: a fresh unbounded one.
    pub runtime: Option<Arc<datafusion::execution::runtime_env::RuntimeEnv>>,
    /// Directory holding `<domain>-<version>/` model artifacts.
    pub models_root: PathBuf,
    /// Domain whose newest model `map_technique` uses.
    pub mapping_domain: String,
    /// Abstain threshold of `map_technique` (`None`: the model's own).
    pub threshold: Option<f64>,
    /// Only intel observed at or after this instant (`report --since`): `otx_data` and
    /// `virustotal_data` (and the views built on them) are filtered; `*_all` keeps everything.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl EngineOptions {
    /// Hold the session's queries to `memory_mb` ([`bounded_runtime`]); 0 leaves them unbounded.
    pub fn with_memory_mb(mut self, memory_mb: usize) -> Result<Self, SqlError> {
        if memory_mb > 0 {
            self.runtime = Some(bounded_runtime(memory_mb)?);
        }
        Ok(self)
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            models_root: PathBuf::from("data/models"),
            mapping_domain: "enterprise".into(),
            threshold: None,
            since: None,
            runtime: None,
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
            runtime: None,
        }
    }
}

/// A runtime whose memory pool holds queries to `memory_mb` (sorts, aggregations and joins spill
/// to temporary files beyond it where DataFusion can); sessions sharing it share the pool.
pub fn bounded_runtime(
    memory_mb: usize,
) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>, SqlError> {
    Ok(datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(memory_mb.max(16) << 20, 1.0)
        .build_arc()?)
}

/// A DataFusion session over one lake.
pub struct Engine {
    /// The session; use it for anything not wrapped here.
    pub ctx: SessionContext,
    /// The lake it reads.
    pub lake: Lake,
    /// The mapping model its functions use (loaded on first use).
    pub mapper: Arc<LazyMapper>,
    /// Snapshots `as_of(…)` reads (time travel).
    as_of: Arc<time_travel::AsOfTables>,
    /// The `--since` filter of the views (Ballista sessions re-create the views with it).
    #[cfg_attr(not(feature = "ballista"), allow(dead_code))]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// The version of each lake table it reads: two sessions with equal versions (and `since`)
    /// answer every query over the lake's tables alike.
    versions: std::collections::BTreeMap<String, u64>,
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
        Self::open_filtered(lake, mapper, options.since, options.runtime.clone()).await
    }

    /// [`Engine::open`] with a given (possibly already loaded) mapping model.
    pub async fn open_with_mapper(lake: &Lake, mapper: Arc<LazyMapper>) -> Result<Self, SqlError> {
        Self::open_filtered(lake, mapper, None, None).await
    }

    async fn open_filtered(
        lake: &Lake,
        mapper: Arc<LazyMapper>,
        since: Option<chrono::DateTime<chrono::Utc>>,
        runtime: Option<Arc<datafusion::execution::runtime_env::RuntimeEnv>>,
    ) -> Result<Self, SqlError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("threatlake", "lake");
        let ctx = match runtime {
            None => SessionContext::new_with_config(config),
            Some(rt) => SessionContext::new_with_config_rt(config, rt),
        };
        ctx.register_object_store(&lake.location.base_url, lake.location.store.clone());
        {
            let state = ctx.state_ref();
            let mut state = state.write();
            threatlake_udfs::register_all(&mut *state, mapper.clone())?;
        }
        // Each table is registered at its current snapshot: a query reads the files of one
        // committed version, whatever writers commit meanwhile.
        let found = lake.require_delta().await?;
        let known = known_tables();
        let mut versions = std::collections::BTreeMap::new();
        for (name, schema, cols) in &known {
            let provider = match lake
                .versioned_provider(name, &AsOf::Latest, &ctx.state())
                .await?
            {
                Some((p, v)) => {
                    versions.insert(name.to_string(), v);
                    p
                }
                None => empty_table(schema.clone(), cols)?,
            };
            ctx.register_table(*name, provider)?;
        }
        for name in &found {
            if known.iter().any(|(k, _, _)| k == name) {
                continue;
            }
            if let Some((provider, v)) = lake
                .versioned_provider(name, &AsOf::Latest, &ctx.state())
                .await?
            {
                versions.insert(name.clone(), v);
                ctx.register_table(name.as_str(), provider)?;
            }
        }
        create_views(&ctx, since).await?;
        let as_of = Arc::new(time_travel::AsOfTables::default());
        ctx.register_udtf(
            time_travel::NAME,
            Arc::new(time_travel::AsOfFunction(as_of.clone())),
        );
        Ok(Self {
            ctx,
            lake: lake.clone(),
            mapper,
            as_of,
            since,
            versions,
        })
    }

    /// The snapshot this session reads: each lake table with the version registered.
    pub fn versions(&self) -> &std::collections::BTreeMap<String, u64> {
        &self.versions
    }

    /// Run every statement in `sql` and collect the results of each.
    pub async fn run(&self, sql: &str) -> Result<Vec<QueryResult>, SqlError> {
        let mut out = Vec::new();
        for stmt in parse(sql)? {
            out.push(self.run_statement(stmt).await?);
        }
        Ok(out)
    }

    /// Run one parsed statement. Statements that write (INSERT, UPDATE, DELETE, COPY) are refused.
    pub async fn run_statement(&self, stmt: Statement) -> Result<QueryResult, SqlError> {
        let (schema, stream) = self.stream_statement(stmt).await?;
        let batches = datafusion::physical_plan::common::collect(stream).await?;
        Ok(QueryResult { schema, batches })
    }

    /// Run `sql`, exactly one statement, as a stream of record batches (see
    /// [`Engine::stream_statement`]): for the queries threatlake writes itself.
    pub async fn stream(
        &self,
        sql: &str,
    ) -> Result<
        (
            SchemaRef,
            datafusion::physical_plan::SendableRecordBatchStream,
        ),
        SqlError,
    > {
        let mut stmts = parse(sql)?;
        if stmts.len() != 1 {
            return Err(SqlError::NotAQuery {
                what: format!("{} statements", stmts.len()),
            });
        }
        self.stream_statement(stmts.remove(0)).await
    }

    /// Run one parsed statement as a stream of record batches, read as they are produced (a
    /// statement without rows gives an empty stream). Dropping the stream cancels the query.
    /// Statements that write are refused.
    pub async fn stream_statement(
        &self,
        stmt: Statement,
    ) -> Result<
        (
            SchemaRef,
            datafusion::physical_plan::SendableRecordBatchStream,
        ),
        SqlError,
    > {
        self.as_of
            .prepare(&self.lake, &stmt, &self.ctx.state())
            .await?;
        let state = self.ctx.state();
        let plan = state.statement_to_plan(stmt).await?;
        refuse_writes(&plan)?;
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        Ok((schema, df.execute_stream().await?))
    }

    /// Run one query of untrusted text read-only: exactly one SELECT/WITH/EXPLAIN statement (no
    /// DDL, SET, COPY, DML, external tables), at most `max_rows` rows (the flag says whether more
    /// existed), stopped after `timeout`.
    pub async fn query(
        &self,
        sql: &str,
        max_rows: usize,
        timeout: std::time::Duration,
    ) -> Result<(QueryResult, bool), SqlError> {
        use datafusion::sql::sqlparser::ast::Statement as Ast;
        let mut stmts = parse(sql)?;
        if stmts.len() != 1 {
            return Err(SqlError::NotAQuery {
                what: format!("{} statements", stmts.len()),
            });
        }
        let stmt = stmts.remove(0);
        let is_query = |s: &Statement| match s {
            Statement::Statement(s) => matches!(s.as_ref(), Ast::Query(_)),
            _ => false,
        };
        let ok = match &stmt {
            Statement::Explain(e) => is_query(&e.statement),
            s => is_query(s),
        };
        if !ok {
            let what = match &stmt {
                Statement::Statement(s) => s
                    .to_string()
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
                Statement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE".into(),
                Statement::CopyTo(_) => "COPY".into(),
                _ => "this statement".into(),
            };
            return Err(SqlError::NotAQuery { what });
        }
        let secs = timeout.as_secs();
        let work = async {
            self.as_of
                .prepare(&self.lake, &stmt, &self.ctx.state())
                .await?;
            let plan = self.ctx.state().statement_to_plan(stmt).await?;
            refuse_writes(&plan)?;
            refuse_non_queries(&plan)?;
            let df = self.ctx.execute_logical_plan(plan).await?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let df = df.limit(0, Some(max_rows.saturating_add(1)))?;
            let mut batches = df.collect().await?;
            let total: usize = batches.iter().map(|b| b.num_rows()).sum();
            let truncated = total > max_rows;
            if truncated {
                let mut keep = max_rows;
                for b in batches.iter_mut() {
                    let n = b.num_rows().min(keep);
                    *b = b.slice(0, n);
                    keep -= n;
                }
            }
            Ok::<_, SqlError>((QueryResult { schema, batches }, truncated))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| SqlError::Timeout { secs })?
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

/// Deepest expression or set-operation nesting a statement may have. DataFusion plans deep trees in
/// time quadratic in their depth (3,000 terms: 9 s) and recursively; 1,000 plans in about a second.
pub const MAX_SQL_DEPTH: usize = 1_000;

/// sqlparser's nesting limit for parentheses and subqueries (DataFusion's default).
const PARSER_RECURSION_LIMIT: usize = 50;

/// Stack for parsing, checking and dropping one SQL text: a 20,000-term chain nests that deep, and
/// both the checks and dropping the tree recurse. Grown on the heap only when needed (`stacker`).
const PARSE_STACK: usize = 512 << 20;

/// Split SQL text into statements (DataFusion's parser, so `;` inside strings is handled). A
/// statement nested deeper than [`MAX_SQL_DEPTH`] is refused here, before planning.
pub fn parse(sql: &str) -> Result<Vec<Statement>, SqlError> {
    stacker::grow(PARSE_STACK, || {
        let stmts: Vec<Statement> = DFParser::parse_sql(sql)
            .map_err(|e| {
                // sqlparser stops nested parentheses and subqueries at its recursion limit; say
                // so in words rather than as `RecursionLimitExceeded (current limit: 50)`.
                if e.to_string().contains("RecursionLimitExceeded") {
                    SqlError::TooDeep {
                        what: "parentheses or subqueries",
                        limit: PARSER_RECURSION_LIMIT,
                    }
                } else {
                    SqlError::from(e)
                }
            })?
            .into_iter()
            .collect();
        for stmt in &stmts {
            check_depth(stmt)?;
        }
        Ok(stmts)
    })
}

/// Refuse [`MAX_SQL_DEPTH`]-deep statements (see there).
fn check_depth(stmt: &Statement) -> Result<(), SqlError> {
    use datafusion::sql::sqlparser::ast::{Expr, Query, SetExpr, Visit, Visitor};
    use std::ops::ControlFlow;

    struct Depth {
        now: usize,
    }
    impl Depth {
        fn enter(&mut self, what: &'static str, levels: usize) -> ControlFlow<SqlError> {
            self.now += levels;
            if self.now > MAX_SQL_DEPTH {
                return ControlFlow::Break(SqlError::TooDeep {
                    what,
                    limit: MAX_SQL_DEPTH,
                });
            }
            ControlFlow::Continue(())
        }
    }
    impl Visitor for Depth {
        type Break = SqlError;
        fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<SqlError> {
            self.enter("expressions", 1)
        }
        fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<SqlError> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<SqlError> {
            // UNION/INTERSECT/EXCEPT chains nest SetExprs, which have no visitor hook: measure the
            // chain here, without recursion, before the visitor descends into it.
            let mut deepest = 1;
            let mut stack: Vec<(&SetExpr, usize)> = vec![(&q.body, 1)];
            while let Some((e, d)) = stack.pop() {
                deepest = deepest.max(d);
                if d > MAX_SQL_DEPTH {
                    break;
                }
                if let SetExpr::SetOperation { left, right, .. } = e {
                    stack.push((left, d + 1));
                    stack.push((right, d + 1));
                }
            }
            if deepest > MAX_SQL_DEPTH {
                return ControlFlow::Break(SqlError::TooDeep {
                    what: "set operations (UNION, INTERSECT, EXCEPT)",
                    limit: MAX_SQL_DEPTH,
                });
            }
            self.enter("subqueries and expressions", 1)
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<SqlError> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
    }

    let mut v = Depth { now: 0 };
    let flow = match stmt {
        Statement::Statement(s) => s.visit(&mut v),
        Statement::Explain(e) => return check_depth(&e.statement),
        Statement::CopyTo(c) => match &c.source {
            datafusion::sql::parser::CopyToSource::Query(q) => q.visit(&mut v),
            datafusion::sql::parser::CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    };
    match flow {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Plans that change the session (CREATE/DROP, SET) are refused where only queries may run.
fn refuse_non_queries(plan: &datafusion::logical_expr::LogicalPlan) -> Result<(), SqlError> {
    use datafusion::logical_expr::LogicalPlan;
    match first_node(plan, |p| match p {
        LogicalPlan::Ddl(d) => Some(d.name().to_string()),
        LogicalPlan::Statement(s) => Some(s.name().to_string()),
        _ => None,
    })? {
        Some(what) => Err(SqlError::NotAQuery { what }),
        None => Ok(()),
    }
}

/// What `pick` says of the first plan node (inputs of EXPLAIN included) it says anything of.
fn first_node(
    plan: &datafusion::logical_expr::LogicalPlan,
    pick: impl Fn(&datafusion::logical_expr::LogicalPlan) -> Option<String>,
) -> Result<Option<String>, SqlError> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut found = None;
    plan.apply(|p| {
        found = pick(p);
        Ok(if found.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    Ok(found)
}

/// Lake tables are written only by threatlake's commit path (staging, locks, versions rows), so
/// plans that write are refused whatever their target: INSERT/UPDATE/DELETE would add files to the
/// lake unlocked, COPY … TO writes anywhere on disk or in the bucket.
fn refuse_writes(plan: &datafusion::logical_expr::LogicalPlan) -> Result<(), SqlError> {
    use datafusion::logical_expr::LogicalPlan;
    // Walks EXPLAIN [ANALYZE] inputs too: EXPLAIN ANALYZE INSERT would run the insert.
    match first_node(plan, |p| match p {
        LogicalPlan::Dml(d) => Some(d.op.to_string()),
        LogicalPlan::Copy(_) => Some("COPY … TO".to_string()),
        _ => None,
    })? {
        Some(what) => Err(SqlError::ReadOnly { what }),
        None => Ok(()),
    }
}

/// Create the shipped views on `ctx` (over tables already registered), with `otx_data` and
/// `virustotal_data` filtered to `since` when given (the unfiltered ones stay as `<name>_all`).
pub(crate) async fn create_views(
    ctx: &SessionContext,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(), SqlError> {
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
    Ok(())
}

/// Tables with a fixed schema: ATT&CK and feed tables. They are registered even when the lake has no
/// files for them yet, so views and queries over them always resolve.
pub fn known_tables() -> Vec<(&'static str, SchemaRef, &'static [&'static str])> {
    let mut v: Vec<(&'static str, SchemaRef, &'static [&'static str])> = attack::table_schemas()
        .into_iter()
        .map(|(n, s)| (n, s, &attack::PARTITION_COLS[..]))
        .collect();
    v.extend(crate::feeds::table_schemas());
    v.push((
        crate::pipeline::runs::JOB_RUNS,
        crate::pipeline::runs::schema(),
        &crate::pipeline::runs::JOB_RUNS_PARTITION,
    ));
    v.push((
        crate::server::audit::AUDIT_LOG,
        crate::server::audit::schema(),
        &crate::server::audit::AUDIT_PARTITION,
    ));
    v.push((
        crate::feedback::MAPPING_FEEDBACK,
        crate::feedback::schema(),
        &crate::feedback::PARTITION,
    ));
    v.push((
        crate::integrations::outbox::OUTBOX_LOG,
        crate::integrations::outbox::schema(),
        &crate::integrations::outbox::OUTBOX_PARTITION,
    ));
    v
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
