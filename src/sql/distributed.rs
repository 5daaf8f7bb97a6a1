//! Distributed mode: the same session (lake tables, views, `map_technique` and friends) on an
//! Apache DataFusion Ballista cluster. Plans go to the scheduler as protobuf and the executors run
//! them with this session's functions and object stores, so the SQL and its answers are the same.

use ballista::prelude::SessionContextExt;

use super::{Engine, SqlError};

impl Engine {
    /// Move this session onto a Ballista scheduler and executor started in this process on
    /// loopback ports (gRPC and Arrow Flight between them, as between machines); the executor is
    /// built from this session's state, so it has the threatlake functions and the lake's store.
    pub async fn into_ballista_standalone(self) -> Result<Engine, SqlError> {
        let ctx = datafusion::prelude::SessionContext::standalone_with_state(self.ctx.state()).await?;
        Ok(Engine { ctx, ..self })
    }

    /// Send this session's queries to a running Ballista scheduler (`df://host:port`); its executors
    /// must register the threatlake functions to run `map_technique`.
    pub async fn into_ballista_remote(self, url: &str) -> Result<Engine, SqlError> {
        let ctx = datafusion::prelude::SessionContext::remote_with_state(url, self.ctx.state()).await?;
        Ok(Engine { ctx, ..self })
    }
}
