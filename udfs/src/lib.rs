//! SQL functions for threatlake: one Arrow kernel per function plus thin engine adapters.
//!
//! Kernels (`kernels`) take and return Arrow arrays and know nothing about any SQL engine, so the
//! same code serves DataFusion (`datafusion` adapters here) and, later, DuckDB.

pub mod datafusion_adapter;
pub mod kernels;

use datafusion::logical_expr::ScalarUDF;

pub use datafusion_adapter::register_all;

/// Every scalar function this crate provides, ready to register on a DataFusion session.
pub fn all_functions() -> Vec<ScalarUDF> {
    datafusion_adapter::all_functions()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn function_names_are_unique() {
        let mut seen = HashSet::new();
        for f in all_functions() {
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
