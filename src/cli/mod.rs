//! Command-line front ends that are not the engine: the SQL REPL, model, feed and bench commands.

pub mod auth;
pub mod bench;
pub mod feeds;
pub mod model;
pub mod progress;
pub mod push;
pub mod repl;
pub mod report;
