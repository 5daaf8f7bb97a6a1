//! The `audit_log` lake table: every API call and login (who, role, route, status; the SQL text for
//! `/sql`), buffered in memory and appended in one commit every `server.audit_flush_secs` and at
//! shutdown.

use std::sync::{Arc, Mutex};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Serialize;

use crate::feeds::ts;
use crate::lake::Lake;

/// The table.
pub const AUDIT_LOG: &str = "audit_log";
/// Its partition column (UTC date).
pub const AUDIT_PARTITION: [&str; 1] = ["day"];

/// Rows kept in memory while the lake cannot be written.
pub const MAX_QUEUED: usize = 100_000;

/// One audited event.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    /// When (RFC 3339).
    pub at: String,
    /// User, `token:NAME`, or the name tried at a failed login; empty when anonymous.
    pub who: String,
    /// Role, when known.
    pub role: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Route pattern (`/api/v1/items/{id}`).
    pub route: String,
    /// Path asked for (query string left out).
    pub path: String,
    /// HTTP status answered.
    pub status: i32,
    /// Client address.
    pub client: String,
    /// The SQL text of `/sql`.
    pub sql: Option<String>,
    /// login, login_failed, login_limited, logout, token_refused, …
    pub event: String,
}

/// Schema of [`AUDIT_LOG`].
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("at", ts(), false),
        Field::new("who", DataType::Utf8, false),
        Field::new("role", DataType::Utf8, true),
        Field::new("method", DataType::Utf8, false),
        Field::new("route", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("status", DataType::Int32, false),
        Field::new("client", DataType::Utf8, false),
        Field::new("sql", DataType::Utf8, true),
        Field::new("event", DataType::Utf8, false),
    ]))
}

/// The buffer.
pub struct Audit {
    lake: Lake,
    buf: Mutex<Vec<AuditRow>>,
}

impl Audit {
    /// Writing to `lake`.
    pub fn new(lake: Lake) -> Self {
        Self {
            lake,
            buf: Mutex::new(Vec::new()),
        }
    }

    /// Queue a row. While the lake cannot be written, at most [`MAX_QUEUED`] rows wait; beyond
    /// that the oldest are dropped (and the drop is logged), so an outage cannot exhaust memory.
    pub fn push(&self, row: AuditRow) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() >= MAX_QUEUED {
            let n = buf.len() + 1 - MAX_QUEUED;
            buf.drain(..n);
            tracing::error!(
                "audit log: {n} row(s) dropped: the lake has not accepted audit rows for a while"
            );
        }
        buf.push(row);
    }

    /// Append what is queued, one commit per day; rows that fail to land stay queued.
    pub async fn flush(&self) -> Result<usize, crate::feeds::FeedError> {
        let rows = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()));
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_day: std::collections::BTreeMap<String, Vec<AuditRow>> = Default::default();
        for r in rows {
            by_day
                .entry(r.at.get(..10).unwrap_or("unknown").to_string())
                .or_default()
                .push(r);
        }
        let mut written = 0;
        let mut days = by_day.into_iter();
        while let Some((day, rows)) = days.next() {
            let r = crate::feeds::append(
                &self.lake,
                AUDIT_LOG,
                &schema(),
                &[("day", day.as_str())],
                "audit log",
                &rows,
            )
            .await;
            if let Err(e) = r {
                let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
                let mut keep: Vec<AuditRow> = rows;
                keep.extend(days.flat_map(|(_, r)| r));
                keep.append(&mut buf);
                *buf = keep;
                return Err(e);
            }
            written += rows.len();
        }
        Ok(written)
    }
}
