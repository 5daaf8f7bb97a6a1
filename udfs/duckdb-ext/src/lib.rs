//! threatlake as a loadable extension for stock DuckDB: `LOAD 'threatlake.duckdb_extension'` adds
//! `map_technique`, `map_techniques`, `technique_score`, `explain_mapping`, `map_report` (the same Arrow kernels as
//! threatlake's DataFusion engine), `threatlake_use_model(dir)`, `attack_version_key` and
//! `technique_parent`. The model comes from `THREATLAKE_MODEL` (a model directory), else the newest
//! model under `THREATLAKE_LAKE_MODELS` (default `data/models`) for `THREATLAKE_MAPPING_DOMAIN`
//! (default enterprise), or from `SELECT threatlake_use_model('/path/to/model')`.

use std::error::Error;
use std::sync::Arc;

use duckdb::{duckdb_entrypoint_c_api, Connection};
use threatlake_udfs::duckdb_adapter;
use threatlake_udfs::LazyMapper;

/// Called by DuckDB on `LOAD`.
///
/// # Safety
/// DuckDB passes a valid connection for the lifetime of the call (see the macro).
#[duckdb_entrypoint_c_api(ext_name = "threatlake", min_duckdb_version = "v1.2.0")]
pub unsafe fn extension_entrypoint(con: Connection) -> Result<(), Box<dyn Error>> {
    // Loaded lazily: LOAD succeeds without a model; the first mapping call says how to get one.
    let mapper = Arc::new(LazyMapper::from_env());
    duckdb_adapter::register(&con, &mapper)?;
    Ok(())
}
