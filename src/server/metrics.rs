//! `/metrics`: HTTP requests and latency by route and status, job durations, last success per job,
//! rows ingested — in the OpenMetrics text format Prometheus scrapes.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::pipeline::{JobReport, StageStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Http {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStatus {
    job: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobName {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rows {
    stage: String,
    kind: String,
}

type Buckets = fn() -> Histogram;

/// The service's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Http, Counter>,
    latency: Family<Route, Histogram, Buckets>,
    jobs: Family<JobStatus, Histogram, Buckets>,
    last_success: Family<JobName, Gauge<f64, AtomicU64>>,
    rows: Family<Rows, Counter>,
}

fn http_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("threatlake");
        let requests = Family::<Http, Counter>::default();
        let latency = Family::<Route, Histogram, Buckets>::new_with_constructor(http_buckets);
        let jobs = Family::<JobStatus, Histogram, Buckets>::new_with_constructor(job_buckets);
        let last_success = Family::<JobName, Gauge<f64, AtomicU64>>::default();
        let rows = Family::<Rows, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method and route",
            latency.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Job run durations by job and status",
            jobs.clone(),
        );
        registry.register(
            "job_last_success_timestamp_seconds",
            "Unix time of the last successful run of each job",
            last_success.clone(),
        );
        registry.register(
            "rows_ingested",
            "Rows and items written by job stages, by stage and kind",
            rows.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            jobs,
            last_success,
            rows,
        }
    }
}

impl Metrics {
    /// Count one request.
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&Http {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&Route {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// Count one finished job run.
    pub fn job(&self, r: &JobReport, status: &str) {
        self.jobs
            .get_or_create(&JobStatus {
                job: r.job.as_str().to_string(),
                status: status.to_string(),
            })
            .observe(r.seconds);
        if r.error.is_none() {
            self.last_success
                .get_or_create(&JobName {
                    job: r.job.as_str().to_string(),
                })
                .set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
        }
        for s in &r.stages {
            if s.status != StageStatus::Ok {
                continue;
            }
            for (kind, n) in &s.counts {
                self.rows
                    .get_or_create(&Rows {
                        stage: s.stage.as_str().to_string(),
                        kind: kind.clone(),
                    })
                    .inc_by(*n);
            }
        }
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
