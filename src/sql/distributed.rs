//! Distributed mode: the same session (lake tables, views, `map_technique` and friends) on an
//! Apache DataFusion Ballista cluster. Plans go to the scheduler as protobuf and the executors run
//! them with this session's functions and object stores, so the SQL and its answers are the same.

use std::sync::Arc;

use ballista::prelude::{SessionConfigExt, SessionContextExt};
use ballista_core::serde::BallistaLogicalExtensionCodec;
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::common::TableReference;
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::error::DataFusionError;
use datafusion::execution::{SessionState, SessionStateBuilder, TaskContext};
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion_proto::logical_plan::LogicalExtensionCodec;

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
            let Some(provider) = schema.table(&name).await? else {
                continue;
            };
            if provider.table_type() == TableType::View {
                continue; // re-created over the shipped tables (see `carry_over`)
            }
            let provider = match engine.lake.snapshot(&name, &AsOf::Latest).await? {
                Some(snap) => Arc::new(SnapshotFiles::new(
                    &engine.lake,
                    &name,
                    &snap,
                    provider.schema(),
                )?),
                None => provider,
            };
            out.push((name, provider));
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
            schema
                .fields()
                .iter()
                .filter(|f| !is_part(f))
                .cloned()
                .collect::<Vec<_>>(),
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
                let mut f = PartitionedFile::new(
                    lake.location.path(&format!("{name}/{rel}")).to_string(),
                    *size,
                );
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

/// [`carry_over`], then the shipped views over the carried tables.
async fn carry_over_with_views(
    from: Engine,
    tables: Vec<(String, Arc<dyn TableProvider>)>,
    to: SessionContext,
) -> Result<Engine, SqlError> {
    let since = from.since;
    let engine = carry_over(from, tables, to)?;
    super::create_views(&engine.ctx, since).await?;
    Ok(engine)
}

/// What a [`SnapshotFiles`] table sends to the scheduler (the schema travels beside it).
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotFilesProto {
    store: String,
    partition_cols: Vec<String>,
    /// (object path, size, partition values)
    files: Vec<(String, u64, Vec<Option<String>>)>,
}

/// Ballista's logical codec, plus lake tables as snapshot file lists.
#[derive(Debug, Default)]
struct LakeCodec(BallistaLogicalExtensionCodec);

impl LogicalExtensionCodec for LakeCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> datafusion::error::Result<Extension> {
        self.0.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> datafusion::error::Result<()> {
        self.0.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let Ok(p) = serde_json::from_slice::<SnapshotFilesProto>(buf) else {
            return self
                .0
                .try_decode_table_provider(buf, table_ref, schema, ctx);
        };
        let partition_cols: Vec<FieldRef> = p
            .partition_cols
            .iter()
            .map(|c| Arc::new(Field::new(c, DataType::Utf8, true)))
            .collect();
        let file_schema = Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| !p.partition_cols.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let files = p
            .files
            .into_iter()
            .map(|(path, size, values)| {
                let mut f = PartitionedFile::new(path, size);
                f.partition_values = values.into_iter().map(ScalarValue::Utf8).collect();
                f
            })
            .collect();
        Ok(Arc::new(SnapshotFiles {
            schema,
            file_schema,
            partition_cols,
            files,
            store: ObjectStoreUrl::parse(&p.store)?,
        }))
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> datafusion::error::Result<()> {
        let any: &dyn std::any::Any = node.as_ref();
        let Some(t) = any.downcast_ref::<SnapshotFiles>() else {
            return self.0.try_encode_table_provider(table_ref, node, buf);
        };
        let p = SnapshotFilesProto {
            store: t.store.as_str().to_string(),
            partition_cols: t.partition_cols.iter().map(|f| f.name().clone()).collect(),
            files: t
                .files
                .iter()
                .map(|f| {
                    let values = f
                        .partition_values
                        .iter()
                        .map(|v| match v {
                            ScalarValue::Utf8(s) => s.clone(),
                            other => Some(other.to_string()),
                        })
                        .collect();
                    (
                        f.object_meta.location.to_string(),
                        f.object_meta.size,
                        values,
                    )
                })
                .collect(),
        };
        serde_json::to_writer(buf, &p).map_err(|e| DataFusionError::External(Box::new(e)))
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> datafusion::error::Result<Arc<dyn FileFormatFactory>> {
        self.0.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> datafusion::error::Result<()> {
        self.0.try_encode_file_format(buf, node)
    }
}

/// This session's state with the codec that ships lake tables to the scheduler.
fn with_codec(engine: &Engine) -> SessionState {
    let state = engine.ctx.state();
    let config = state
        .config()
        .clone()
        .with_ballista_logical_extension_codec(Arc::new(LakeCodec::default()));
    SessionStateBuilder::new_from_existing(state)
        .with_config(config)
        .build()
}

impl Engine {
    /// Move this session onto a Ballista scheduler and executor started in this process on
    /// loopback ports (gRPC and Arrow Flight between them, as between machines); the executor is
    /// built from this session's state, so it has the threatlake functions and the lake's store.
    pub async fn into_ballista_standalone(self) -> Result<Engine, SqlError> {
        let tables = tables(&self).await?;
        let ctx = SessionContext::standalone_with_state(with_codec(&self)).await?;
        carry_over_with_views(self, tables, ctx).await
    }

    /// Send this session's queries to a running Ballista scheduler (`df://host:port`); its executors
    /// must register the threatlake functions to run `map_technique`.
    pub async fn into_ballista_remote(self, url: &str) -> Result<Engine, SqlError> {
        let tables = tables(&self).await?;
        let ctx = SessionContext::remote_with_state(url, with_codec(&self)).await?;
        carry_over_with_views(self, tables, ctx).await
    }
}
