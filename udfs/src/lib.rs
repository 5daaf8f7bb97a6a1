//! SQL functions for threatlake: one Arrow kernel per function plus thin engine adapters.
//!
//! Kernels (`kernels`) take and return Arrow arrays and know nothing about any SQL engine, so the
//! same code serves DataFusion (`datafusion_adapter`) and DuckDB (`duckdb_adapter`: the embedded engine
//! and the loadable extension).

#[cfg(feature = "datafusion")]
pub mod datafusion_adapter;
#[cfg(feature = "duckdb")]
pub mod duckdb_adapter;
pub mod kernels;
pub mod mapper;
pub mod mapping_kernels;
pub mod model_slot;

#[cfg(feature = "datafusion")]
pub use datafusion_adapter::{all_functions, register_all};
pub use model_slot::{LazyMapper, DEFAULT_THRESHOLD};

#[cfg(all(test, feature = "datafusion"))]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn function_names_are_unique() {
        let mut seen = HashSet::new();
        for f in all_functions(std::sync::Arc::new(LazyMapper::new(
            "/nonexistent",
            "enterprise",
            Some(0.5),
        ))) {
            assert!(
                seen.insert(f.name().to_string()),
                "duplicate function name {}",
                f.name()
            );
            for alias in f.aliases() {
                assert!(seen.insert(alias.clone()), "duplicate alias {alias}");
            }
        }
        assert!(!seen.is_empty());
    }
}
