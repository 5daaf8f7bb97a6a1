//! Command-line front ends that are not the engine: the SQL REPL and the bench printer.

pub mod bench;
pub mod model;
pub mod repl;
