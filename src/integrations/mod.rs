//! Integrations: mapped intel pushed to SIEM and SOAR targets (Splunk HEC, Elastic/OpenSearch,
//! Microsoft Sentinel, syslog CEF/LEEF, TheHive, webhooks) through an outbox in the lake.
//!
//! A push queues every current mapping a target's filters select and has not seen (one commit),
//! then delivers the due rows batch by batch and records each outcome (one commit per chunk).
//! Delivery is at least once: a row is marked delivered only after the receiver said so, and every
//! receiver gets an idempotency key it understands (`_id`, `sourceRef`, deterministic STIX ids,
//! event ids), so a resend after a crash or a lost answer does not create a second record. A target
//! that is down keeps its rows queued for the next push and never holds up the others.

pub mod elastic;
pub mod escape;
pub mod http;
pub mod outbox;
pub mod record;
pub mod sentinel;
pub mod settings;
pub mod splunk;
pub mod syslog;
pub mod thehive;
pub mod webhook;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use datafusion::error::DataFusionError;
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::config::Settings;
use crate::feeds::FeedError;
use crate::lake::{Lake, LakeError};
use crate::sql::{Engine, EngineOptions, SqlError};
use outbox::{OutboxRow, Status};
use record::{Due, Names, Record};
pub use settings::{Kind, TargetSettings};

/// Errors of a push as a whole. A target's own failures (down, refusing) are not errors: they are
/// in its [`TargetReport`] and leave its rows queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrationError {
    /// `--target` names no configured target.
    #[error("no integration named {name:?} (configured: {known}); check --target or integrations: in the settings")]
    UnknownTarget {
        /// The name given.
        name: String,
        /// Configured names.
        known: String,
    },
    /// Nothing is configured.
    #[error("no integrations are configured (or all are enabled: false): add targets under integrations: in the settings (see the README, \"Push to SIEM and SOAR\")")]
    NoTargets,
    /// A query over the lake failed.
    #[error(transparent)]
    Sql(Box<SqlError>),
    /// Writing outbox rows failed (the rows already committed stay; the next push carries on).
    #[error("writing the integration outbox: {0}")]
    Outbox(Box<FeedError>),
    /// The lake (locks, listing).
    #[error(transparent)]
    Lake(Box<LakeError>),
}

impl From<SqlError> for IntegrationError {
    fn from(e: SqlError) -> Self {
        IntegrationError::Sql(Box::new(e))
    }
}

impl From<DataFusionError> for IntegrationError {
    fn from(e: DataFusionError) -> Self {
        IntegrationError::Sql(Box::new(SqlError::from(e)))
    }
}

impl From<LakeError> for IntegrationError {
    fn from(e: LakeError) -> Self {
        IntegrationError::Lake(Box::new(e))
    }
}

/// What a receiver said of one record.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Accepted (or it already had it).
    Delivered,
    /// Refused for now (throttled, busy): retried at a later push, after a back-off.
    Retry(String),
    /// Refused for good (malformed for the receiver): dead-letter.
    Reject(String),
}

/// How a whole request failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Network, timeout, 5xx, 429: try again (after `Retry-After` when given).
    Transient(Option<Duration>),
    /// The target cannot take anything now (credentials, endpoint): stop this target for this push.
    Stop,
    /// The records are unacceptable to the receiver: dead-letter.
    Reject,
}

/// A failed request.
#[derive(Debug, Clone)]
pub struct SendError {
    /// For people and `last_error` (never a secret).
    pub message: String,
    /// What to do about it.
    pub failure: Failure,
}

/// A receiver.
#[async_trait]
pub trait Sink: Send {
    /// Records of one item must go in one request (one alert per item).
    fn by_item(&self) -> bool {
        false
    }
    /// Once per push before the first batch (index template, token).
    async fn prepare(&mut self) -> Result<(), SendError> {
        Ok(())
    }
    /// Send one batch; one outcome per record, in order.
    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError>;
}

/// The receiver of a target.
pub fn sink(t: &TargetSettings) -> Result<Box<dyn Sink>, String> {
    Ok(match t.kind {
        Kind::Elastic => Box::new(elastic::Elastic::new(t)?),
        Kind::SplunkHec => Box::new(splunk::Splunk::new(t)?),
        Kind::Sentinel => Box::new(sentinel::Sentinel::new(t)?),
        Kind::Syslog => Box::new(syslog::Syslog::new(t)?),
        Kind::Thehive => Box::new(thehive::TheHive::new(t)?),
        Kind::Webhook => Box::new(webhook::Webhook::new(t)?),
    })
}

/// Options of a push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Only this target (it may be disabled); None: every enabled target.
    pub target: Option<String>,
    /// Count what would be queued and sent; write and send nothing.
    pub dry_run: bool,
    /// Only mappings made at or after this instant are queued (e.g. a new target without backfill).
    pub since: Option<DateTime<Utc>>,
    /// Queue dead-letter rows again before delivering.
    pub retry_dead: bool,
}

/// What a push did for one target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetReport {
    /// Target name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Mappings newly queued.
    pub queued: usize,
    /// Dead-letter rows queued again (`--retry-dead`).
    pub revived: usize,
    /// Delivered this push.
    pub delivered: usize,
    /// Failed this push (retried at a later push).
    pub failed: usize,
    /// Sent to dead-letter this push.
    pub dead: usize,
    /// Dropped because their item changed since queued (the new version is queued).
    pub superseded: usize,
    /// Still queued and not attempted (the target stopped, or a dry run).
    pub waiting: usize,
    /// Why the target stopped early, if it did.
    pub error: Option<String>,
    /// Seconds.
    pub seconds: f64,
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Its id (in the outbox rows it wrote).
    pub push_id: String,
    /// Nothing was written or sent.
    pub dry_run: bool,
    /// Per target, in settings order.
    pub targets: Vec<TargetReport>,
}

impl PushReport {
    /// Did any target stop on an error?
    pub fn any_failed(&self) -> bool {
        self.targets.iter().any(|t| t.error.is_some())
    }
}

/// Records read from the lake per delivery chunk (observables looked up and outcomes committed
/// once per chunk).
const CHUNK: usize = 5000;

/// The targets a push works on.
pub fn targets<'a>(
    settings: &'a Settings,
    only: Option<&str>,
) -> Result<Vec<&'a TargetSettings>, IntegrationError> {
    let all = &settings.integrations;
    match only {
        Some(name) => all
            .iter()
            .find(|t| t.name == name)
            .map(|t| vec![t])
            .ok_or_else(|| IntegrationError::UnknownTarget {
                name: name.to_string(),
                known: if all.is_empty() {
                    "none".into()
                } else {
                    all.iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        None => {
            let on: Vec<_> = all.iter().filter(|t| t.enabled).collect();
            if on.is_empty() {
                Err(IntegrationError::NoTargets)
            } else {
                Ok(on)
            }
        }
    }
}

/// Queue what is new for each target, then deliver what is due. `progress` receives one-line
/// status messages.
pub async fn push(
    settings: &Settings,
    lake: &Lake,
    options: &PushOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PushReport, IntegrationError> {
    let targets = targets(settings, options.target.as_deref())?;
    let push_id = crate::feeds::new_batch_id(Utc::now());
    let work = run(settings, lake, &targets, &push_id, options, progress);
    let reports = if options.dry_run {
        work.await?
    } else {
        // One push at a time per lake: two would send the same rows twice.
        let ttl = crate::lake::lock_ttl(&settings.lake);
        lake.location
            .with_locks(&["push"], &format!("push {push_id}"), ttl, work)
            .await?
    };
    Ok(PushReport {
        push_id,
        dry_run: options.dry_run,
        targets: reports,
    })
}

async fn run(
    settings: &Settings,
    lake: &Lake,
    targets: &[&TargetSettings],
    push_id: &str,
    options: &PushOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<TargetReport>, IntegrationError> {
    let engine_options = EngineOptions::from_settings(settings);
    let engine = Engine::open_with(lake, &engine_options).await?;
    let names = Names::load(&engine, settings.mapping.domain.as_str()).await?;
    let mut reports: Vec<TargetReport> = targets
        .iter()
        .map(|t| TargetReport {
            name: t.name.clone(),
            kind: t.kind.as_str().to_string(),
            ..Default::default()
        })
        .collect();
    let now = Utc::now();
    for (t, rep) in targets.iter().zip(reports.iter_mut()) {
        progress(&format!("{}: finding new mappings", t.name));
        let new = record::candidates(&engine, t, &names, options.since).await?;
        rep.queued = new.len();
        let mut dead = if options.retry_dead {
            dead_rows(&engine, t).await?
        } else {
            vec![]
        };
        rep.revived = dead.len();
        if options.dry_run {
            continue;
        }
        let stamp = outbox::stamp(now);
        for chunk in new.chunks(50_000) {
            let rows: Vec<OutboxRow> = chunk
                .iter()
                .map(|c| OutboxRow {
                    delivery_id: c.delivery_id.clone(),
                    item_id: c.item_id.clone(),
                    item_version: c.item_version.clone(),
                    technique_id: c.technique_id.clone(),
                    method: c.method.clone(),
                    payload_hash: String::new(),
                    status: Status::Pending,
                    attempts: 0,
                    last_error: None,
                    next_attempt_at: None,
                    delivered_at: None,
                    updated_at: stamp.clone(),
                    push_id: push_id.to_string(),
                })
                .collect();
            outbox::append(lake, &t.name, push_id, &rows).await?;
        }
        for r in &mut dead {
            r.status = Status::Pending;
            r.attempts = 0;
            r.next_attempt_at = None;
            r.updated_at = stamp.clone();
            r.push_id = push_id.to_string();
        }
        outbox::append(lake, &t.name, push_id, &dead).await?;
    }
    // Read the outbox again: the rows just queued are due now.
    let engine = if options.dry_run {
        engine
    } else {
        Engine::open_with(lake, &engine_options).await?
    };
    for (t, rep) in targets.iter().zip(reports.iter_mut()) {
        let started = Instant::now();
        let due = record::due(&engine, t, &names, Utc::now()).await?;
        if options.dry_run {
            rep.waiting = due.len() + rep.queued + rep.revived;
        } else {
            deliver(&engine, lake, t, push_id, due, rep, progress).await?;
        }
        rep.seconds = started.elapsed().as_secs_f64();
    }
    Ok(reports)
}

async fn dead_rows(
    engine: &Engine,
    t: &TargetSettings,
) -> Result<Vec<OutboxRow>, IntegrationError> {
    let sql = "SELECT delivery_id, item_id, item_version, technique_id, method, payload_hash, attempts, last_error \
               FROM integration_outbox WHERE target = $1 AND status = 'dead'";
    let mut out = Vec::new();
    for b in record::collect(engine, sql, vec![ScalarValue::from(t.name.as_str())]).await? {
        for row in crate::feeds::rows_of(&b) {
            let get = |c: usize| row[c].clone().unwrap_or_default();
            out.push(OutboxRow {
                delivery_id: get(0),
                item_id: get(1),
                item_version: get(2),
                technique_id: get(3),
                method: get(4),
                payload_hash: get(5),
                status: Status::Dead,
                attempts: get(6).parse().unwrap_or(0),
                last_error: row[7].clone(),
                next_attempt_at: None,
                delivered_at: None,
                updated_at: String::new(),
                push_id: String::new(),
            });
        }
    }
    Ok(out)
}

/// Ranges of `records` of at most `size`, never splitting an item when `by_item` (an item larger
/// than `size` gets a range of its own).
pub fn batches(records: &[Record], size: usize, by_item: bool) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let mut end = (start + size.max(1)).min(records.len());
        if by_item && end < records.len() {
            let same =
                |a: &Record, b: &Record| a.item_id == b.item_id && a.item_version == b.item_version;
            let mut cut = end;
            while cut > start && same(&records[cut - 1], &records[cut]) {
                cut -= 1;
            }
            if cut == start {
                // One item longer than a batch: take all of it.
                while end < records.len() && same(&records[end - 1], &records[end]) {
                    end += 1;
                }
            } else {
                end = cut;
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

fn row(r: &Record, status: Status, attempts: i64, push_id: &str) -> OutboxRow {
    let now = Utc::now();
    OutboxRow {
        delivery_id: r.delivery_id.clone(),
        item_id: r.item_id.clone(),
        item_version: r.item_version.clone(),
        technique_id: r.technique_id.clone(),
        method: r.method.clone(),
        payload_hash: r.payload_hash(),
        status,
        attempts,
        last_error: None,
        next_attempt_at: None,
        delivered_at: (status == Status::Delivered).then(|| outbox::stamp(now)),
        updated_at: outbox::stamp(now),
        push_id: push_id.to_string(),
    }
}

/// Back-off of a record the receiver refused for now: 1 min doubling per attempt, at most 6 h.
fn record_backoff(attempts: i64) -> Duration {
    let secs = 60u64.saturating_mul(1 << attempts.clamp(0, 9)) / 2;
    crate::feeds::http::jittered(Duration::from_secs(secs.min(6 * 3600)))
}

/// A request a push makes of a target.
#[derive(Clone, Copy)]
enum Request<'a> {
    /// [`Sink::prepare`].
    Prepare,
    /// [`Sink::send`] of a batch.
    Send(&'a [Record]),
}

/// Make `request`, retrying transient failures `retries` times with jittered back-off from
/// `backoff_secs`, doubling (`Retry-After` honoured, both capped at `max_wait_secs`). A batch the
/// receiver rejects as a whole gives every record a `Reject`; a rejected `prepare` is an error.
async fn with_retries(
    sink: &mut dyn Sink,
    t: &TargetSettings,
    request: Request<'_>,
) -> Result<Vec<Outcome>, SendError> {
    let mut delay = Duration::from_secs_f64(t.backoff_secs);
    let max_wait = Duration::from_secs_f64(t.max_wait_secs);
    let records = match request {
        Request::Prepare => 0,
        Request::Send(batch) => batch.len(),
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let answer = match request {
            Request::Prepare => sink.prepare().await.map(|()| vec![]),
            Request::Send(batch) => sink.send(batch).await,
        };
        match answer {
            Ok(o) if o.len() == records => return Ok(o),
            Ok(o) => {
                return Err(SendError {
                    message: format!(
                        "receiver gave {} outcome(s) for {records} record(s)",
                        o.len()
                    ),
                    failure: Failure::Stop,
                })
            }
            Err(e) => match e.failure {
                Failure::Reject if records > 0 => {
                    return Ok(vec![Outcome::Reject(e.message); records]);
                }
                Failure::Transient(after) if tries < t.retries => {
                    let wait = after.unwrap_or_else(|| crate::feeds::http::jittered(delay));
                    tracing::warn!(target = %t.name, error = %e.message, wait_secs = wait.min(max_wait).as_secs_f64(), "push: retrying");
                    tokio::time::sleep(wait.min(max_wait)).await;
                    delay *= 2;
                }
                _ => return Err(e),
            },
        }
    }
}

async fn deliver(
    engine: &Engine,
    lake: &Lake,
    t: &TargetSettings,
    push_id: &str,
    due: Vec<Due>,
    rep: &mut TargetReport,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), IntegrationError> {
    let mut records = Vec::new();
    let mut superseded = Vec::new();
    for d in due {
        match d {
            Due::Record(r) => records.push(*r),
            Due::Superseded(c, attempts) => superseded.push(OutboxRow {
                delivery_id: c.delivery_id,
                item_id: c.item_id,
                item_version: c.item_version,
                technique_id: c.technique_id,
                method: c.method,
                payload_hash: String::new(),
                status: Status::Superseded,
                attempts,
                last_error: Some(
                    "the item changed since it was queued; its current version is queued instead"
                        .into(),
                ),
                next_attempt_at: None,
                delivered_at: None,
                updated_at: outbox::stamp(Utc::now()),
                push_id: push_id.to_string(),
            }),
        }
    }
    rep.superseded = superseded.len();
    outbox::append(lake, &t.name, push_id, &superseded).await?;
    if records.is_empty() {
        return Ok(());
    }
    let total = records.len();
    let mut sink = match sink(t) {
        Ok(s) => s,
        Err(e) => {
            rep.error = Some(e);
            rep.waiting = total;
            return Ok(());
        }
    };
    let prepared = with_retries(sink.as_mut(), t, Request::Prepare).await;
    if let Err(e) = prepared {
        rep.error = Some(e.message);
        rep.waiting = total;
        return Ok(());
    }
    let by_item = sink.by_item();
    let max_attempts = i64::from(t.max_attempts);
    let mut done = 0;
    for range in batches(&records, CHUNK, by_item) {
        let chunk = &mut records[range];
        record::attach_observables(engine, chunk, t.max_observables).await?;
        let mut rows = Vec::with_capacity(chunk.len());
        let mut stopped = None;
        for b in batches(chunk, t.batch(), by_item) {
            let batch = &chunk[b];
            match with_retries(sink.as_mut(), t, Request::Send(batch)).await {
                Ok(outcomes) => {
                    for (r, o) in batch.iter().zip(outcomes) {
                        let attempts = r.attempts + 1;
                        rows.push(match o {
                            Outcome::Delivered => {
                                rep.delivered += 1;
                                row(r, Status::Delivered, r.attempts, push_id)
                            }
                            Outcome::Retry(e) if attempts < max_attempts => {
                                rep.failed += 1;
                                let mut x = row(r, Status::Failed, attempts, push_id);
                                x.last_error = Some(e);
                                x.next_attempt_at =
                                    Some(outbox::stamp(Utc::now() + record_backoff(attempts)));
                                x
                            }
                            Outcome::Retry(e) | Outcome::Reject(e) => {
                                rep.dead += 1;
                                let mut x = row(r, Status::Dead, attempts, push_id);
                                x.last_error = Some(e);
                                x
                            }
                        });
                    }
                }
                Err(e) => {
                    // The target is down or refusing: this batch counts an attempt, the rest
                    // stays queued untouched and is due at the next push.
                    for r in batch {
                        let attempts = r.attempts + 1;
                        let status = if attempts >= max_attempts {
                            rep.dead += 1;
                            Status::Dead
                        } else {
                            rep.failed += 1;
                            Status::Failed
                        };
                        let mut x = row(r, status, attempts, push_id);
                        x.last_error = Some(e.message.clone());
                        rows.push(x);
                    }
                    stopped = Some(e.message);
                    break;
                }
            }
        }
        done += rows.len();
        outbox::append(lake, &t.name, push_id, &rows).await?;
        progress(&format!(
            "{}: {} of {total} sent ({} delivered)",
            t.name, done, rep.delivered
        ));
        if let Some(e) = stopped {
            rep.waiting = total - done;
            rep.error = Some(format!(
                "{e}; {} row(s) stay queued for the next push",
                total - rep.delivered - rep.dead
            ));
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(item: &str) -> Record {
        Record {
            delivery_id: String::new(),
            item_id: item.into(),
            item_version: "1".into(),
            source: "otx".into(),
            kind: None,
            title: None,
            text: None,
            observed_at: None,
            country: None,
            family: None,
            tags: vec![],
            technique_id: "T1".into(),
            technique_name: None,
            parent: None,
            tactics: vec![],
            score: 0.5,
            method: "model".into(),
            model_version: None,
            mapped_at: String::new(),
            observables: vec![],
            attempts: 0,
        }
    }

    #[test]
    fn batches_never_split_an_item_when_asked() {
        let r: Vec<Record> = ["a", "a", "b", "b", "b", "c"]
            .iter()
            .map(|i| rec(i))
            .collect();
        assert_eq!(batches(&r, 3, false), vec![0..3, 3..6]);
        assert_eq!(batches(&r, 3, true), vec![0..2, 2..5, 5..6]);
        // An item longer than the batch size travels whole.
        assert_eq!(batches(&r, 2, true), vec![0..2, 2..5, 5..6]);
        assert_eq!(
            batches(&r[..0], 2, true),
            Vec::<std::ops::Range<usize>>::new()
        );
    }

    #[test]
    fn record_backoff_grows_and_is_capped() {
        assert!(record_backoff(1) <= Duration::from_secs(60));
        assert!(record_backoff(3) >= Duration::from_secs(60));
        assert!(record_backoff(40) <= Duration::from_secs(6 * 3600));
    }
}
