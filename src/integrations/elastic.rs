//! Elasticsearch / OpenSearch: ECS documents through `_bulk` (`create` with the delivery id as
//! `_id`, so a resend is a version conflict, not a second document), after installing the index
//! template that types the fields.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::http::{answer, client, secret, transport};
use super::record::Record;
use super::settings::{ElasticAuth, TargetSettings};
use super::{Failure, Outcome, SendError, Sink};

/// The data stream used when no `index` is configured.
pub const DEFAULT_STREAM: &str = "logs-ti_threatlake.mappings-default";

/// An Elastic target.
pub struct Elastic {
    client: reqwest::Client,
    base: String,
    index: String,
    data_stream: bool,
    auth: Option<String>,
    secret_env: Option<String>,
}

impl Elastic {
    /// From settings (reads the secret).
    pub fn new(t: &TargetSettings) -> Result<Self, String> {
        let auth = secret(t)?.map(|s| match t.auth.unwrap_or_default() {
            ElasticAuth::ApiKey => format!("ApiKey {s}"),
            ElasticAuth::Bearer => format!("Bearer {s}"),
            ElasticAuth::Basic => {
                use base64::Engine as _;
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(s)
                )
            }
        });
        let index = t.index.clone().unwrap_or_else(|| DEFAULT_STREAM.into());
        Ok(Self {
            client: client(t)?,
            base: t.url.trim_end_matches('/').to_string(),
            data_stream: index.starts_with("logs-"),
            index,
            auth,
            secret_env: t.secret_env.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}/{path}", self.base));
        match &self.auth {
            Some(a) => r.header(reqwest::header::AUTHORIZATION, a),
            None => r,
        }
    }

    /// The index template: keyword ids, typed scores, IPs and dates; a data stream when the index
    /// is a `logs-*` name.
    pub fn template(&self) -> Value {
        let kw = json!({"type": "keyword"});
        let mut t = json!({
            "index_patterns": [if self.data_stream { "logs-ti_threatlake.*".to_string() } else { self.index.clone() }],
            "priority": 200,
            "template": {"mappings": {"dynamic": true, "properties": {
                "@timestamp": {"type": "date"},
                "event": {"properties": {
                    "kind": kw, "category": kw, "type": kw, "dataset": kw, "id": kw, "provider": kw,
                    "created": {"type": "date"}, "risk_score": {"type": "float"}
                }},
                "threat": {"properties": {
                    "framework": kw,
                    "technique": {"properties": {
                        "id": kw, "name": kw, "reference": kw,
                        "subtechnique": {"properties": {"id": kw, "name": kw, "reference": kw}}
                    }},
                    "tactic": {"properties": {"id": kw, "name": kw, "reference": kw}},
                    "feed": {"properties": {"name": kw}},
                    "indicator": {"properties": {
                        "type": kw, "provider": kw, "confidence": kw, "description": {"type": "text"},
                        "first_seen": {"type": "date"}, "ip": {"type": "ip"}, "domain": kw,
                        "url": {"properties": {"full": kw}},
                        "email": {"properties": {"address": kw}},
                        "file": {"properties": {"hash": {"properties": {"md5": kw, "sha1": kw, "sha256": kw}}}},
                        "vulnerability": {"properties": {"id": kw}},
                        "other": kw
                    }}
                }},
                "threatlake": {"properties": {
                    "item_id": kw, "item_version": kw, "source": kw, "kind": kw, "title": {"type": "text"},
                    "text": {"type": "text"}, "score": {"type": "float"}, "method": kw,
                    "model_version": kw, "country": kw, "family": kw, "tags": kw
                }}
            }}}
        });
        if self.data_stream {
            t["data_stream"] = json!({});
        }
        t
    }

    /// The ECS document of a record.
    pub fn document(r: &Record) -> Value {
        let mut technique = json!({"id": [r.technique_id], "reference": [r.technique_url()]});
        if let Some(n) = &r.technique_name {
            technique["name"] = json!([n]);
        }
        if let Some((pid, pname)) = &r.parent {
            let mut sub = technique.clone();
            sub["reference"] = json!([r.technique_url()]);
            technique = json!({
                "id": [pid],
                "reference": [format!("https://attack.mitre.org/techniques/{pid}/")],
                "subtechnique": sub
            });
            if let Some(n) = pname {
                technique["name"] = json!([n]);
            }
        }
        let tactic = json!({
            "id": r.tactics.iter().filter_map(|t| t.id.clone()).collect::<Vec<_>>(),
            "name": r.tactics.iter().map(|t| t.name.clone().unwrap_or_else(|| t.shortname.clone())).collect::<Vec<_>>(),
            "reference": r.tactics.iter().filter_map(|t| t.id.as_ref().map(|i| format!("https://attack.mitre.org/tactics/{i}/"))).collect::<Vec<_>>(),
        });
        let mut indicator = json!({
            "provider": r.source,
            "confidence": match r.score { s if s >= 0.75 => "High", s if s >= 0.4 => "Medium", _ => "Low" },
        });
        if let Some(t) = &r.title {
            indicator["description"] = json!(t);
        }
        if let Some(t) = &r.observed_at {
            indicator["first_seen"] = json!(t);
        }
        let mut types: Vec<&str> = vec![];
        let mut values: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for o in &r.observables {
            let (ecs_type, field) = match o.kind {
                "ip" if o.value.contains(':') => ("ipv6-addr", "ip"),
                "ip" => ("ipv4-addr", "ip"),
                "domain" => ("domain-name", "domain"),
                "url" => ("url", "url"),
                "email" => ("email-addr", "email"),
                "md5" | "sha1" | "sha256" => ("file", o.kind),
                "cve" => ("vulnerability", "cve"),
                _ => ("other", "other"),
            };
            // A value the ip type would refuse goes to `other` instead of failing the document.
            let field = if field == "ip" && o.value.parse::<std::net::IpAddr>().is_err() {
                "other"
            } else {
                field
            };
            if !types.contains(&ecs_type) {
                types.push(ecs_type);
            }
            values.entry(field).or_default().push(&o.value);
        }
        for (field, v) in values {
            let v = json!(v);
            match field {
                "url" => indicator["url"] = json!({"full": v}),
                "email" => indicator["email"] = json!({"address": v}),
                "cve" => indicator["vulnerability"] = json!({"id": v}),
                "md5" | "sha1" | "sha256" => {
                    if !indicator["file"].is_object() {
                        indicator["file"] = json!({"hash": {}});
                    }
                    indicator["file"]["hash"][field] = v;
                }
                f => indicator[f] = v,
            }
        }
        if !types.is_empty() {
            indicator["type"] = json!(types);
        }
        json!({
            "@timestamp": r.mapped_at,
            "event": {
                "kind": "enrichment", "category": ["threat"], "type": ["indicator"],
                "dataset": "ti_threatlake.mappings", "id": r.delivery_id, "provider": "threatlake",
                "created": r.mapped_at, "risk_score": r.score * 100.0
            },
            "threat": {
                "framework": "MITRE ATT&CK",
                "technique": technique,
                "tactic": tactic,
                "feed": {"name": format!("threatlake {}", r.source)},
                "indicator": indicator
            },
            "threatlake": {
                "item_id": r.item_id, "item_version": r.item_version, "source": r.source, "kind": r.kind,
                "title": r.title, "text": r.text.as_deref().map(|t| super::escape::cap(t, 32_000)),
                "score": r.score, "method": r.method, "model_version": r.model_version,
                "country": r.country, "family": r.family, "tags": r.tags
            }
        })
    }
}

#[async_trait]
impl Sink for Elastic {
    async fn prepare(&mut self) -> Result<(), SendError> {
        let name = format!("threatlake-{}", self.index.replace('.', "-"));
        let what = format!("installing index template {name}");
        let resp = self
            .request(reqwest::Method::PUT, &format!("_index_template/{name}"))
            .json(&self.template())
            .send()
            .await
            .map_err(|e| transport(&what, &e))?;
        answer(resp, &what, self.secret_env.as_deref()).await?;
        Ok(())
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError> {
        let mut body = Vec::with_capacity(batch.len() * 2048);
        for r in batch {
            let action = json!({"create": {"_index": self.index, "_id": r.delivery_id}});
            serde_json::to_writer(&mut body, &action).expect("JSON to memory");
            body.push(b'\n');
            serde_json::to_writer(&mut body, &Self::document(r)).expect("JSON to memory");
            body.push(b'\n');
        }
        let what = format!("_bulk of {} document(s)", batch.len());
        let resp = self
            .request(reqwest::Method::POST, "_bulk")
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await
            .map_err(|e| transport(&what, &e))?;
        let (_, bytes) = answer(resp, &what, self.secret_env.as_deref()).await?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| SendError {
            message: format!("{what}: the answer is not JSON: {e}"),
            failure: Failure::Transient(None),
        })?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.len() != batch.len() {
            return Err(SendError {
                message: format!(
                    "{what}: the answer lists {} item(s) for {} sent",
                    items.len(),
                    batch.len()
                ),
                failure: Failure::Transient(None),
            });
        }
        Ok(items
            .iter()
            .map(|item| {
                let op = item
                    .as_object()
                    .and_then(|o| o.values().next())
                    .cloned()
                    .unwrap_or_default();
                let status = op["status"].as_u64().unwrap_or(0);
                let reason = || {
                    format!(
                        "HTTP {status} {}: {}",
                        op["error"]["type"].as_str().unwrap_or(""),
                        super::escape::cap(op["error"]["reason"].as_str().unwrap_or(""), 300)
                    )
                };
                match status {
                    200..=299 => Outcome::Delivered,
                    // Already there: a resend after a crash or a lost answer.
                    409 => Outcome::Delivered,
                    429 | 500..=599 => Outcome::Retry(reason()),
                    _ => Outcome::Reject(reason()),
                }
            })
            .collect())
    }
}
