//! Splunk HTTP Event Collector: batched JSON events (`sourcetype` `threatlake:mapping`, CIM-style
//! `annotations.mitre_attack` fields) to `/services/collector/event`, and optionally indexer
//! acknowledgement: a request channel per push, then `/services/collector/ack` until every batch is
//! indexed.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::http::{answer, client, excerpt, secret, transport};
use super::record::Record;
use super::settings::TargetSettings;
use super::{Failure, Outcome, SendError, Sink};

/// Sourcetype of every event.
pub const SOURCETYPE: &str = "threatlake:mapping";

/// A Splunk HEC target.
pub struct Splunk {
    client: reqwest::Client,
    base: String,
    token: String,
    channel: String,
    ack: bool,
    ack_timeout: Duration,
    index: Option<String>,
    host: String,
    secret_env: Option<String>,
}

impl Splunk {
    /// From settings (reads the token).
    pub fn new(t: &TargetSettings) -> Result<Self, String> {
        Ok(Self {
            client: client(t)?,
            base: t.url.trim_end_matches('/').to_string(),
            token: secret(t)?.unwrap_or_default(),
            channel: uuid::Uuid::new_v4().to_string(),
            ack: t.ack,
            ack_timeout: Duration::from_secs_f64(t.ack_timeout_secs),
            index: t.index.clone(),
            host: crate::lake::lock::host(),
            secret_env: t.secret_env.clone(),
        })
    }

    /// The HEC envelope of a record.
    pub fn event(&self, r: &Record) -> Value {
        let time = chrono::DateTime::parse_from_rfc3339(&r.mapped_at)
            .map(|d| d.timestamp_millis() as f64 / 1000.0)
            .unwrap_or(0.0);
        let mut event = r.event();
        event["annotations"] = json!({
            "mitre_attack": [r.technique_id],
            "mitre_attack.mitre_tactic": r.tactics.iter().map(|t| t.shortname.clone()).collect::<Vec<_>>(),
            "mitre_attack.mitre_tactic_id": r.tactics.iter().filter_map(|t| t.id.clone()).collect::<Vec<_>>(),
        });
        let mut envelope = json!({
            "time": time, "host": self.host, "source": "threatlake", "sourcetype": SOURCETYPE,
            "event": event, "fields": {"threatlake_delivery_id": r.delivery_id}
        });
        if let Some(i) = &self.index {
            envelope["index"] = json!(i);
        }
        envelope
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.post(format!("{}/{path}", self.base)).header(
            reqwest::header::AUTHORIZATION,
            format!("Splunk {}", self.token),
        );
        if self.ack {
            r.header("X-Splunk-Request-Channel", &self.channel)
        } else {
            r
        }
    }

    async fn wait_for_ack(&self, id: u64) -> Result<(), SendError> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            let what = format!("indexer acknowledgement {id}");
            let resp = self
                .post("services/collector/ack")
                .json(&json!({"acks": [id]}))
                .send()
                .await
                .map_err(|e| transport(&what, &e))?;
            let (_, body) = answer(resp, &what, self.secret_env.as_deref()).await?;
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["acks"][id.to_string()].as_bool() == Some(true) {
                return Ok(());
            }
            if start.elapsed() >= self.ack_timeout {
                return Err(SendError {
                    message: format!(
                        "{what}: not indexed within {} s (ack_timeout_secs); the batch is sent again next time",
                        self.ack_timeout.as_secs_f64()
                    ),
                    failure: Failure::Transient(None),
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

#[async_trait]
impl Sink for Splunk {
    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError> {
        let mut body = Vec::with_capacity(batch.len() * 2048);
        for r in batch {
            serde_json::to_writer(&mut body, &self.event(r)).expect("JSON to memory");
            body.push(b'\n');
        }
        let what = format!("HEC batch of {} event(s)", batch.len());
        let resp = self
            .post("services/collector/event")
            .body(body)
            .send()
            .await
            .map_err(|e| transport(&what, &e))?;
        // HEC answers a bad token with 403 (code 4), a disabled one with 403 (code 1) and "server
        // busy" with 503 (code 9): the generic reading of the status is right for each.
        let (_, bytes) = answer(resp, &what, self.secret_env.as_deref()).await?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| SendError {
            message: format!("{what}: the answer is not HEC JSON: {}", excerpt(&bytes)),
            failure: Failure::Transient(None),
        })?;
        if v["code"].as_i64().unwrap_or(0) != 0 {
            return Err(SendError {
                message: format!("{what}: {}", excerpt(&bytes)),
                failure: Failure::Reject,
            });
        }
        if self.ack {
            let Some(id) = v["ackId"].as_u64() else {
                return Err(SendError {
                    message: format!("{what}: ack is on but the answer has no ackId (enable indexer acknowledgement on the token, or set ack: false)"),
                    failure: Failure::Stop,
                });
            };
            self.wait_for_ack(id).await?;
        }
        Ok(vec![Outcome::Delivered; batch.len()])
    }
}
