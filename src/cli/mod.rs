//! Command-line front ends that are not the engine: the SQL REPL, model, feed and bench commands.

pub mod bench;
pub mod feeds;
pub mod model;
pub mod repl;
pub mod report;

use anyhow::Result;
use threatlake::{Lake, Settings};

/// Run `work` holding the lake's writer locks `names` (see `threatlake::lake::lock`): a second writer
/// of the same tables fails at once with who holds them. The locks are released whether `work`
/// succeeds or not.
pub async fn locked<T>(
    lake: &Lake,
    settings: &Settings,
    names: &[&str],
    purpose: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let ttl = threatlake::lake::lock_ttl(&settings.lake);
    lake.location.with_locks(names, purpose, ttl, work).await
}
