//! The delivery outbox: `integration_outbox_log`, an append-only log of every state a (target,
//! mapping) pair went through, and the `integration_outbox` view of each pair's newest state.
//!
//! Appending instead of updating makes every step one atomic commit: a push killed at any point
//! leaves each row as it was before or after, and the next push carries on from there.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::IntegrationError;
use crate::feeds::{fixed, ts};
use crate::lake::Lake;

/// The log table.
pub const OUTBOX_LOG: &str = "integration_outbox_log";
/// Its partition column: the target's name.
pub const OUTBOX_PARTITION: [&str; 1] = ["target"];

/// A row's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for its first delivery.
    Pending,
    /// The receiver accepted it (or already had it).
    Delivered,
    /// A delivery failed; the next push tries again.
    Failed,
    /// Given up: rejected by the receiver, or failed `max_attempts` times (`push --retry-dead`).
    Dead,
    /// The item changed since it was queued; its new version is queued instead.
    Superseded,
}

impl Status {
    /// Its name in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Dead => "dead",
            Status::Superseded => "superseded",
        }
    }
}

/// One state change.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    /// The idempotency key every receiver sees (`_id`, event id, `externalId`…).
    pub delivery_id: String,
    /// Threat item.
    pub item_id: String,
    /// Its version.
    pub item_version: String,
    /// ATT&CK technique.
    pub technique_id: String,
    /// model or source.
    pub method: String,
    /// SHA-256 of what was (or will be) sent, so a changed payload can be told from a resend.
    pub payload_hash: String,
    /// New state.
    pub status: Status,
    /// Failed deliveries so far.
    pub attempts: i64,
    /// The receiver's or transport's error (no secrets).
    pub last_error: Option<String>,
    /// Not retried before this time (per-record back-off).
    pub next_attempt_at: Option<String>,
    /// When the receiver accepted it.
    pub delivered_at: Option<String>,
    /// When this state was written.
    pub updated_at: String,
    /// The push that wrote it.
    pub push_id: String,
}

/// Schema of [`OUTBOX_LOG`] (without the partition column).
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("delivery_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("item_version", DataType::Utf8, false),
        Field::new("technique_id", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("payload_hash", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("attempts", DataType::Int64, false),
        Field::new("last_error", DataType::Utf8, true),
        Field::new("next_attempt_at", ts(), true),
        Field::new("delivered_at", ts(), true),
        Field::new("updated_at", ts(), false),
        Field::new("push_id", DataType::Utf8, false),
    ]))
}

/// Append state changes of `target` in one commit.
pub async fn append(
    lake: &Lake,
    target: &str,
    push_id: &str,
    rows: &[OutboxRow],
) -> Result<(), IntegrationError> {
    crate::feeds::append(
        lake,
        OUTBOX_LOG,
        &schema(),
        &[(OUTBOX_PARTITION[0], target)],
        push_id,
        rows,
    )
    .await
    .map_err(|e| IntegrationError::Outbox(Box::new(e)))
}

/// An instant as the table stores it.
pub fn stamp(at: DateTime<Utc>) -> String {
    fixed(at)
}
