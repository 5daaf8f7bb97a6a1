//! The job schedule: `schedule.jobs` cron expressions (UTC, optional seconds field), a random
//! jitter per start, single flight per job (a run still going makes the next one skip, recorded),
//! and one catch-up run at start for a scheduled time missed while the server was down.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use rand::Rng;

use super::{start_job, AppState, ServerError};
use crate::config::ScheduleSettings;
use crate::pipeline::{Job, Trigger};

/// One scheduled job.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The job.
    pub job: Job,
    /// When.
    pub cron: Cron,
    /// The expression as written.
    pub expr: String,
}

/// Parse `schedule.jobs`; every name and expression is checked before the server starts.
pub fn parse(settings: &ScheduleSettings) -> Result<Vec<Entry>, ServerError> {
    settings
        .jobs
        .iter()
        .map(|(name, expr)| {
            let job = Job::parse(name).ok_or_else(|| ServerError::Schedule {
                job: name.clone(),
                message: format!("no such job; jobs: {}", Job::names()),
            })?;
            let cron = Cron::from_str(expr).map_err(|e| ServerError::Schedule {
                job: name.clone(),
                message: format!(
                    "{expr:?} is not a cron expression ({e}); use five fields (minute hour day month weekday) or six with seconds first, e.g. \"0 */6 * * *\""
                ),
            })?;
            Ok(Entry {
                job,
                cron,
                expr: expr.clone(),
            })
        })
        .collect()
}

/// The last start of `job` recorded in `job_runs`, if any.
async fn last_start(state: &AppState, job: Job) -> Option<DateTime<Utc>> {
    use datafusion::prelude::{col, lit};
    let engine = state.engine();
    let df = engine
        .ctx
        .table(crate::pipeline::runs::JOB_RUNS)
        .await
        .ok()?
        .filter(col("job").eq(lit(job.as_str())))
        .ok()?
        .aggregate(
            vec![],
            vec![datafusion::functions_aggregate::expr_fn::max(col(
                "started",
            ))],
        )
        .ok()?;
    let batches = df.collect().await.ok()?;
    let b = batches.first()?;
    let a = b
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::TimestampMicrosecondArray>()?;
    if a.is_empty() || arrow::array::Array::is_null(a, 0) {
        return None;
    }
    DateTime::from_timestamp_micros(a.value(0))
}

/// Run the schedule until `quit` turns true.
pub async fn run(
    state: Arc<AppState>,
    entries: Vec<Entry>,
    quit: tokio::sync::watch::Receiver<bool>,
) {
    let jitter = state.settings.schedule.jitter_secs;
    let catch_up = state.settings.schedule.catch_up;
    let mut tasks = tokio::task::JoinSet::new();
    for e in entries {
        let st = state.clone();
        let mut quit = quit.clone();
        tasks.spawn(async move {
            let now = Utc::now();
            if catch_up {
                if let (Ok(prev), Some(last)) = (
                    e.cron.find_previous_occurrence(&now, false),
                    last_start(&st, e.job).await,
                ) {
                    if last < prev {
                        tracing::info!(job = %e.job, missed = %prev, last_run = %last, "catch-up run for a scheduled time missed while the server was down");
                        let _ = start_job(&st, e.job, Trigger::CatchUp).await;
                    }
                }
            }
            tracing::info!(job = %e.job, cron = %e.expr, "scheduled");
            // The last time fired: a timer that wakes a hair early must not fire the same time twice.
            let mut fired = Utc::now();
            loop {
                let now = Utc::now();
                let Ok(next) = e.cron.find_next_occurrence(&now.max(fired), false) else {
                    tracing::warn!(job = %e.job, cron = %e.expr, "no next time for this schedule; it stops");
                    return;
                };
                let extra = if jitter > 0 {
                    rand::thread_rng().gen_range(0..=jitter * 1000)
                } else {
                    0
                };
                let wait = (next - now).to_std().unwrap_or_default() + Duration::from_millis(extra);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = quit.changed() => return,
                }
                if *quit.borrow() {
                    return;
                }
                fired = next;
                let _ = start_job(&st, e.job, Trigger::Schedule).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
