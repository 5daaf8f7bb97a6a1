//! Distributed mode: the same session (lake tables, views, `map_technique` and friends) on an
//! Apache DataFusion Ballista cluster. Plans go to the scheduler as protobuf and the executors run
//! them with this session's functions and object stores, so the SQL and its answers are the same.

use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::prelude::SessionContext;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::ScalarValue;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::TableType;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use super::{Engine, SqlError};
use crate::lake::delta::{AsOf, Snapshot};
use crate::lake::Lake;

/// This session's tables and views, by name. Taken before Ballista sets up its session: it
/// re-creates the default catalog in the (shared) catalog list, which empties this one too. Lake
/// tables become plain Parquet scans of their snapshot's files, which Ballista can ship to
/// executors (delta-rs's own scan has no protobuf form Ballista knows).
async fn tables(engine: &Engine) -> Result<Vec<(String, Arc<dyn TableProvider>)>, SqlError> {
    let mut out = Vec::new();
    if let Some(schema) = engine
        .ctx
        .catalog("threatlake")
        .and_then(|c| c.schema("lake"))
    {
        for name in schema.table_names() {
            if let Some(provider) = schema.table(&name).await? {
                let provider = match engine.lake.snapshot(&name, &AsOf::Latest).await? {
                    Some(snap) if provider.table_type() == TableType::Base => {
                        Arc::new(SnapshotFiles::new(&engine.lake, &name, &snap, provider.schema())?)
                    }
                    _ => provider,
                };
                out.push((name, provider));
            }
        }
    }
    Ok(out)
}

/// A lake table as the Parquet files of one Delta snapshot, hive partition values from their paths.
#[derive(Debug)]
struct SnapshotFiles {
    schema: SchemaRef,
    file_schema: SchemaRef,
    partition_cols: Vec<FieldRef>,
    files: Vec<PartitionedFile>,
    store: ObjectStoreUrl,
}

impl SnapshotFiles {
    fn new(lake: &Lake, name: &str, snap: &Snapshot, schema: SchemaRef) -> Result<Self, SqlError> {
        let is_part = |f: &FieldRef| snap.partition_cols.contains(f.name());
        let file_schema = Arc::new(Schema::new(
            schema.fields().iter().filter(|f| !is_part(f)).cloned().collect::<Vec<_>>(),
        ));
        let partition_cols: Vec<FieldRef> = snap
            .partition_cols
            .iter()
            .map(|c| Arc::new(Field::new(c, DataType::Utf8, true)))
            .collect();
        let mut fields: Vec<FieldRef> = file_schema.fields().iter().cloned().collect();
        fields.extend(partition_cols.iter().cloned());
        let files = snap
            .files
            .iter()
            .map(|(rel, size)| {
                let rel = crate::sql::duckdb_sql::decode_path(rel);
                let mut f = PartitionedFile::new(lake.location.path(&format!("{name}/{rel}")).to_string(), *size);
                f.partition_values = snap
                    .partition_cols
                    .iter()
                    .map(|c| {
                        let v = rel
                            .split('/')
                            .find_map(|seg| seg.strip_prefix(&format!("{c}=")))
                            .map(str::to_string);
                        ScalarValue::Utf8(v)
                    })
                    .collect();
                f
            })
            .collect();
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            file_schema,
            partition_cols,
            files,
            store: ObjectStoreUrl::parse(lake.location.base_url.as_str())?,
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for SnapshotFiles {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let table_schema = TableSchema::builder(self.file_schema.clone())
            .with_table_partition_cols(self.partition_cols.clone())
            .build();
        let source = Arc::new(ParquetSource::new(table_schema));
        let config = FileScanConfigBuilder::new(self.store.clone(), source)
            .with_file_group(FileGroup::new(self.files.clone()))
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// Give Ballista's client session this session's functions, tables and views.
fn carry_over(
    from: Engine,
    tables: Vec<(String, Arc<dyn TableProvider>)>,
    to: SessionContext,
) -> Result<Engine, SqlError> {
    {
        let state = to.state_ref();
        let mut state = state.write();
        threatlake_udfs::register_all(&mut *state, from.mapper.clone())?;
    }
    let catalog = to.catalog("threatlake").ok_or_else(|| {
        datafusion::error::DataFusionError::Plan(
            "Ballista session has no threatlake catalog".into(),
        )
    })?;
    if catalog.schema("lake").is_none() {
        catalog.register_schema("lake", Arc::new(MemorySchemaProvider::new()))?;
    }
    for (name, provider) in tables {
        to.register_table(name.as_str(), provider)?;
    }
    Ok(Engine { ctx: to, ..from })
}

impl Engine {
    /// Move this session onto a Ballista scheduler and executor started in this process on
    /// loopback ports (gRPC and Arrow Flight between them, as between machines); the executor is
    /// built from this session's state, so it has the threatlake functions and the lake's store.
    pub async fn into_ballista_standalone(self) -> Result<Engine, SqlError> {
        let tables = tables(&self).await?;
        let ctx = SessionContext::standalone_with_state(self.ctx.state()).await?;
        carry_over(self, tables, ctx)
    }

    /// Send this session's queries to a running Ballista scheduler (`df://host:port`); its executors
    /// must register the threatlake functions to run `map_technique`.
    pub async fn into_ballista_remote(self, url: &str) -> Result<Engine, SqlError> {
        let tables = tables(&self).await?;
        let ctx = SessionContext::remote_with_state(url, self.ctx.state()).await?;
        carry_over(self, tables, ctx)
    }
}
