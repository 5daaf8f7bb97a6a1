//! TheHive 5: one alert per threat item version (`POST /api/v1/alert`) with its observables and
//! its techniques as `procedures` (TTPs), under a `sourceRef` derived from the item, so a resend is
//! refused as a duplicate instead of opening a second alert.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::escape::{cap, markdown};
use super::http::{answer, client, secret, transport};
use super::record::Record;
use super::settings::TargetSettings;
use super::{Failure, Outcome, SendError, Sink};

/// A TheHive target.
pub struct TheHive {
    client: reqwest::Client,
    base: String,
    key: String,
    secret_env: Option<String>,
}

impl TheHive {
    /// From settings (reads the API key).
    pub fn new(t: &TargetSettings) -> Result<Self, String> {
        Ok(Self {
            client: client(t)?,
            base: t.url.trim_end_matches('/').to_string(),
            key: secret(t)?.unwrap_or_default(),
            secret_env: t.secret_env.clone(),
        })
    }

    /// The alert's `sourceRef`: stable per item version.
    pub fn source_ref(r: &Record) -> String {
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{}\u{1f}{}", r.item_id, r.item_version).as_bytes(),
        );
        format!("threatlake-{}", id.simple())
    }

    /// The alert for the records of one item.
    pub fn alert(records: &[Record]) -> Value {
        let r = &records[0];
        let best = records.iter().map(|r| r.score).fold(0.0, f64::max);
        let millis = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_millis())
                .unwrap_or(0)
        };
        let date = r.observed_at.as_deref().map_or(0, millis);
        let date = if date > 0 { date } else { millis(&r.mapped_at) };
        let mut tags = vec![
            "threatlake".to_string(),
            format!("source:{}", cap(&r.source, 64)),
        ];
        for rec in records {
            let t = format!("mitre-attack:{}", cap(&rec.technique_id, 32));
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let observables: Vec<Value> = r
            .observables
            .iter()
            .map(|o| {
                let data_type = match o.kind {
                    "ip" => "ip",
                    "domain" => "domain",
                    "url" => "url",
                    "email" => "mail",
                    "md5" | "sha1" | "sha256" => "hash",
                    _ => "other",
                };
                json!({"dataType": data_type, "data": cap(&o.value, 4096), "tags": [format!("threatlake:{}", o.kind)]})
            })
            .collect();
        let procedures: Vec<Value> = records
            .iter()
            .map(|rec| {
                let mut p = json!({
                    "patternId": rec.technique_id,
                    "occurDate": date,
                    "description": format!("{} mapping, score {:.3}", rec.method, rec.score),
                });
                if let Some(t) = rec.tactics.first() {
                    p["tactic"] = json!(t.shortname);
                }
                p
            })
            .collect();
        let techniques: Vec<String> = records
            .iter()
            .map(|rec| {
                format!(
                    "- {} {} (score {:.3}, {})",
                    markdown(&rec.technique_id),
                    markdown(rec.technique_name.as_deref().unwrap_or("")),
                    rec.score,
                    markdown(&rec.method)
                )
            })
            .collect();
        let description = format!(
            "Threat item `{}` from {} mapped to ATT&CK by threatlake.\n\n{}\n\n**Text**\n\n{}",
            r.item_id.replace('`', "'"),
            markdown(&r.source),
            techniques.join("\n"),
            markdown(&cap(r.text.as_deref().unwrap_or(""), 20_000))
        );
        json!({
            "type": "threatlake",
            "source": "threatlake",
            "sourceRef": Self::source_ref(r),
            "title": cap(r.title.as_deref().unwrap_or(&r.item_id), 512),
            "description": description,
            "severity": match best { s if s >= 0.9 => 3, s if s >= 0.5 => 2, _ => 1 },
            "date": date,
            "tags": tags,
            "tlp": 2,
            "pap": 2,
            "observables": observables,
            "procedures": procedures,
        })
    }
}

#[async_trait]
impl Sink for TheHive {
    fn by_item(&self) -> bool {
        true
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError> {
        let mut out = Vec::with_capacity(batch.len());
        for group in
            batch.chunk_by(|a, b| a.item_id == b.item_id && a.item_version == b.item_version)
        {
            let what = format!("alert for {}", cap(&group[0].item_id, 80));
            let resp = self
                .client
                .post(format!("{}/api/v1/alert", self.base))
                .bearer_auth(&self.key)
                .json(&Self::alert(group))
                .send()
                .await
                .map_err(|e| transport(&what, &e));
            let resp = match resp {
                Ok(r) => r,
                // Alerts already created in this batch are kept as delivered; the rest retry.
                Err(e) if !out.is_empty() => {
                    out.resize(batch.len(), Outcome::Retry(e.message));
                    return Ok(out);
                }
                Err(e) => return Err(e),
            };
            let outcome = match answer(resp, &what, self.secret_env.as_deref()).await {
                Ok(_) => Outcome::Delivered,
                // TheHive refuses a second alert with the same type, source and sourceRef.
                Err(e)
                    if matches!(e.failure, Failure::Reject)
                        && (e.message.contains("already exists")
                            || e.message.contains("ConflictError")) =>
                {
                    Outcome::Delivered
                }
                Err(e) if matches!(e.failure, Failure::Reject) => Outcome::Reject(e.message),
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    out.resize(batch.len(), Outcome::Retry(e.message));
                    return Ok(out);
                }
            };
            out.extend(std::iter::repeat_n(outcome, group.len()));
        }
        Ok(out)
    }
}
