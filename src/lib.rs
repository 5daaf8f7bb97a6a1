//! threatlake: an embedded analytics engine for threat intelligence mapped to MITRE ATT&CK.
//!
//! The library holds the engine (config, lake storage, ATT&CK ingestion, SQL sessions, output
//! rendering); the `threatlake` binary is a thin command-line layer over it.

pub mod attack;
pub mod charts;
pub mod config;
#[cfg(feature = "duckdb")]
pub mod duck;
pub mod extract;
pub mod feedback;
pub mod feeds;
pub mod integrations;
pub mod lake;
pub mod mapping;
pub mod models;
pub mod pipeline;
pub mod reports;
pub mod server;
pub mod sql;

pub use config::{Domain, Settings};
pub use lake::{Lake, Location};
pub use sql::Engine;
