//! Distributed mode: the same session (lake tables, views, `map_technique` and friends) on an
//! Apache DataFusion Ballista cluster. Plans go to the scheduler as protobuf and the executors run
//! them with this session's functions and object stores, so the SQL and its answers are the same.

use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::prelude::SessionContext;

use super::{Engine, SqlError};

/// This session's tables and views, by name. Taken before Ballista sets up its session: it
/// re-creates the default catalog in the (shared) catalog list, which empties this one too.
async fn tables(engine: &Engine) -> Result<Vec<(String, Arc<dyn TableProvider>)>, SqlError> {
    let mut out = Vec::new();
    if let Some(schema) = engine
        .ctx
        .catalog("threatlake")
        .and_then(|c| c.schema("lake"))
    {
        for name in schema.table_names() {
            if let Some(provider) = schema.table(&name).await? {
                out.push((name, provider));
            }
        }
    }
    Ok(out)
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
