//! The `job_runs` lake table: one row per job run — from the schedule, the API or the CLI — with
//! its trigger, times, status and per-stage counts and seconds.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{JobReport, PipelineError, StageStatus};
use crate::feeds::{fixed, ts};
use crate::lake::Lake;

/// The table.
pub const JOB_RUNS: &str = "job_runs";
/// Its partition column (`YYYY-MM` of the start).
pub const JOB_RUNS_PARTITION: [&str; 1] = ["month"];

/// Who started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `threatlake run` (or another job command) on the command line.
    Cli,
    /// The scheduler, at a scheduled time.
    Schedule,
    /// The scheduler at start, for a scheduled time missed while the server was down.
    CatchUp,
    /// `POST /api/v1/runs`.
    Api,
}

impl Trigger {
    /// Its name in `job_runs`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cli => "cli",
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch_up",
            Trigger::Api => "api",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every stage ran or had nothing to do.
    Ok,
    /// A stage failed.
    Failed,
    /// Not run: the previous run of the same job was still going (single flight).
    Skipped,
    /// Stopped at a safe point (shutdown).
    Stopped,
}

impl RunStatus {
    /// Its name in `job_runs`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Skipped => "skipped",
            RunStatus::Stopped => "stopped",
        }
    }
}

/// One stage in a `job_runs` row.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    /// Stage name.
    pub stage: String,
    /// ok, skipped, failed.
    pub status: String,
    /// Seconds.
    pub seconds: f64,
    /// Counts as a JSON object (`{"pulses": 12, …}`).
    pub counts: String,
    /// One line for people.
    pub summary: String,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// A `job_runs` row.
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    /// Run id (sortable by start).
    pub run_id: String,
    /// Job name.
    pub job: String,
    /// cli, schedule, catch_up, api.
    pub trigger: String,
    /// ok, failed, skipped, stopped.
    pub status: String,
    /// Start (RFC 3339, µs).
    pub started: String,
    /// End.
    pub finished: String,
    /// Seconds.
    pub seconds: f64,
    /// Stages in order.
    pub stages: Vec<StageRow>,
    /// The job's error.
    pub error: Option<String>,
    /// Host that ran it.
    pub host: String,
}

impl JobRun {
    /// The row of a finished run.
    pub fn from_report(
        r: &JobReport,
        trigger: Trigger,
        started: DateTime<Utc>,
        finished: DateTime<Utc>,
    ) -> Self {
        let status = match (&r.error, r.stopped) {
            (None, _) => RunStatus::Ok,
            (Some(_), true) => RunStatus::Stopped,
            (Some(_), false) => RunStatus::Failed,
        };
        Self {
            run_id: r.run_id.clone(),
            job: r.job.as_str().to_string(),
            trigger: trigger.as_str().to_string(),
            status: status.as_str().to_string(),
            started: fixed(started),
            finished: fixed(finished),
            seconds: r.seconds,
            stages: r
                .stages
                .iter()
                .map(|s| StageRow {
                    stage: s.stage.as_str().to_string(),
                    status: match s.status {
                        StageStatus::Ok => "ok",
                        StageStatus::Skipped => "skipped",
                        StageStatus::Failed => "failed",
                    }
                    .to_string(),
                    seconds: s.seconds,
                    counts: serde_json::to_string(&s.counts).unwrap_or_else(|_| "{}".into()),
                    summary: s.summary.clone(),
                    error: s.error.clone(),
                })
                .collect(),
            error: r.error.clone(),
            host: crate::lake::lock::host(),
        }
    }

    /// The row of a run not started because the previous one was still going.
    pub fn skipped(job: super::Job, trigger: Trigger, at: DateTime<Utc>, why: &str) -> Self {
        Self {
            run_id: crate::feeds::new_batch_id(at),
            job: job.as_str().to_string(),
            trigger: trigger.as_str().to_string(),
            status: RunStatus::Skipped.as_str().to_string(),
            started: fixed(at),
            finished: fixed(at),
            seconds: 0.0,
            stages: vec![],
            error: Some(why.to_string()),
            host: crate::lake::lock::host(),
        }
    }
}

/// Schema of [`JOB_RUNS`].
pub fn schema() -> SchemaRef {
    let stage = Fields::from(vec![
        Field::new("stage", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("counts", DataType::Utf8, false),
        Field::new("summary", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("job", DataType::Utf8, false),
        Field::new("trigger", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("started", ts(), false),
        Field::new("finished", ts(), false),
        Field::new("seconds", DataType::Float64, false),
        Field::new(
            "stages",
            DataType::List(Arc::new(Field::new("item", DataType::Struct(stage), true))),
            false,
        ),
        Field::new("error", DataType::Utf8, true),
        Field::new("host", DataType::Utf8, false),
    ]))
}

/// Append `run` to `job_runs` (one commit).
pub async fn record(lake: &Lake, run: &JobRun) -> Result<(), PipelineError> {
    let month = run.started.get(..7).unwrap_or("unknown").to_string();
    crate::feeds::append(
        lake,
        JOB_RUNS,
        &schema(),
        &[("month", month.as_str())],
        &format!("{} {}", run.job, run.run_id),
        std::slice::from_ref(run),
    )
    .await?;
    Ok(())
}
