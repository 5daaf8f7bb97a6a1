//! Microsoft Sentinel: the threat-intelligence upload API (STIX 2.1 objects, at most 100 per
//! request) with an Entra client-credentials token. Each mapping becomes the technique's
//! `attack-pattern`, an `indicator` per observable and an `indicates` relationship, all with
//! deterministic ids so a resend updates instead of duplicating; per-record errors of a 200 answer
//! fail only their records.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use uuid::Uuid;

use super::escape::{cap, stix_string};
use super::http::{answer, client, excerpt, secret, transport};
use super::record::Record;
use super::settings::TargetSettings;
use super::{Failure, Outcome, SendError, Sink};

/// Objects per upload request (the API's limit).
pub const MAX_OBJECTS: usize = 100;
/// The upload API's version.
pub const API_VERSION: &str = "2024-02-01-preview";
const DEFAULT_URL: &str = "https://api.ti.security.microsoft.com";
const SCOPE: &str = "https://management.azure.com/.default";
const NS: Uuid = Uuid::from_u128(0x6f1c_1b5e_8a0d_4c1e_9f3a_72b4_5d6e_0a11);

/// A Sentinel target.
pub struct Sentinel {
    client: reqwest::Client,
    upload: String,
    token_url: String,
    client_id: String,
    client_secret: String,
    token: Option<(String, Instant)>,
    secret_env: Option<String>,
}

fn sid(kind: &str, key: &str) -> String {
    format!(
        "{kind}--{}",
        Uuid::new_v5(&NS, format!("{kind}|{key}").as_bytes())
    )
}

impl Sentinel {
    /// From settings (reads the client secret).
    pub fn new(t: &TargetSettings) -> Result<Self, String> {
        let tenant = t.tenant_id.clone().unwrap_or_default();
        let base = if t.url.is_empty() {
            DEFAULT_URL
        } else {
            t.url.trim_end_matches('/')
        };
        let workspace = t.workspace_id.clone().unwrap_or_default();
        Ok(Self {
            client: client(t)?,
            upload: format!(
                "{base}/workspaces/{}/threat-intelligence-stix-objects:upload?api-version={API_VERSION}",
                url::form_urlencoded::byte_serialize(workspace.as_bytes()).collect::<String>()
            ),
            token_url: t.token_url.clone().unwrap_or_else(|| {
                format!(
                    "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                    url::form_urlencoded::byte_serialize(tenant.as_bytes()).collect::<String>()
                )
            }),
            client_id: t.client_id.clone().unwrap_or_default(),
            client_secret: secret(t)?.unwrap_or_default(),
            token: None,
            secret_env: t.secret_env.clone(),
        })
    }

    async fn token(&mut self) -> Result<String, SendError> {
        if let Some((t, until)) = &self.token {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let what = "Entra token request";
        let resp = self
            .client
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.as_str()),
                ("scope", SCOPE),
            ])
            .send()
            .await
            .map_err(|e| transport(what, &e))?;
        let (_, body) = answer(resp, what, self.secret_env.as_deref())
            .await
            .map_err(|mut e| {
                // A bad client id or secret is 400/401 here: no use retrying this push.
                if !matches!(e.failure, Failure::Transient(_)) {
                    e.failure = Failure::Stop;
                }
                e
            })?;
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let Some(token) = v["access_token"].as_str() else {
            return Err(SendError {
                message: format!("{what}: no access_token in the answer"),
                failure: Failure::Stop,
            });
        };
        let life = v["expires_in"].as_u64().unwrap_or(3600).saturating_sub(60);
        self.token = Some((
            token.to_string(),
            Instant::now() + Duration::from_secs(life),
        ));
        Ok(token.to_string())
    }

    /// The STIX objects of a record (observables capped so a record fits one request).
    pub fn objects(r: &Record) -> Vec<Value> {
        let created = r.mapped_at.clone();
        let pattern_id = sid("attack-pattern", &r.technique_id);
        let kill_chain: Vec<Value> = r
            .tactics
            .iter()
            .map(|t| json!({"kill_chain_name": "mitre-attack", "phase_name": t.shortname}))
            .collect();
        let mut pattern = json!({
            "type": "attack-pattern", "spec_version": "2.1", "id": pattern_id,
            "created": created, "modified": created,
            "name": r.technique_name.clone().unwrap_or_else(|| r.technique_id.clone()),
            "external_references": [{"source_name": "mitre-attack", "external_id": r.technique_id, "url": r.technique_url()}]
        });
        // STIX forbids empty lists: a technique of another domain has no known tactic here.
        if !kill_chain.is_empty() {
            pattern["kill_chain_phases"] = json!(kill_chain);
        }
        let mut out = vec![pattern];
        for o in r.observables.iter().take((MAX_OBJECTS - 1) / 2) {
            let v = stix_string(&o.value);
            let pattern = match o.kind {
                "ip" if o.value.contains(':') => format!("[ipv6-addr:value = '{v}']"),
                "ip" => format!("[ipv4-addr:value = '{v}']"),
                "domain" => format!("[domain-name:value = '{v}']"),
                "url" => format!("[url:value = '{v}']"),
                "email" => format!("[email-addr:value = '{v}']"),
                "md5" => format!("[file:hashes.MD5 = '{v}']"),
                "sha1" => format!("[file:hashes.'SHA-1' = '{v}']"),
                "sha256" => format!("[file:hashes.'SHA-256' = '{v}']"),
                _ => continue,
            };
            let indicator_id = sid("indicator", &format!("{}|{}", o.kind, o.value));
            out.push(json!({
                "type": "indicator", "spec_version": "2.1", "id": indicator_id,
                "created": created, "modified": created, "valid_from": created,
                "name": cap(&o.value, 256),
                "description": cap(r.title.as_deref().unwrap_or(&r.item_id), 1000),
                "pattern": pattern, "pattern_type": "stix",
                "indicator_types": ["malicious-activity"],
                "confidence": r.confidence(),
                "labels": [format!("threatlake:{}", r.source)],
                "external_references": [{"source_name": r.source, "external_id": cap(&r.item_id, 256)}]
            }));
            out.push(json!({
                "type": "relationship", "spec_version": "2.1",
                "id": sid("relationship", &format!("{}|{}|{}", r.delivery_id, o.kind, o.value)),
                "created": created, "modified": created, "relationship_type": "indicates",
                "source_ref": indicator_id, "target_ref": pattern_id, "confidence": r.confidence(),
                "description": format!("{} mapping, score {:.3}", r.method, r.score)
            }));
        }
        out
    }
}

#[async_trait]
impl Sink for Sentinel {
    async fn prepare(&mut self) -> Result<(), SendError> {
        self.token().await.map(drop)
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError> {
        let mut out = vec![Outcome::Delivered; batch.len()];
        // Pack records into requests of at most MAX_OBJECTS objects; remember whose each object is.
        let mut requests: Vec<(Vec<Value>, Vec<usize>)> = vec![(vec![], vec![])];
        for (i, r) in batch.iter().enumerate() {
            let objects = Self::objects(r);
            if requests
                .last()
                .is_some_and(|q| q.0.len() + objects.len() > MAX_OBJECTS)
            {
                requests.push((vec![], vec![]));
            }
            let q = requests.last_mut().expect("one request at least");
            q.1.extend(std::iter::repeat_n(i, objects.len()));
            q.0.extend(objects);
        }
        for (n, (objects, owners)) in requests.into_iter().enumerate() {
            if objects.is_empty() {
                continue;
            }
            let what = format!("upload of {} STIX object(s)", objects.len());
            let token = self.token().await?;
            let sent = self
                .client
                .post(&self.upload)
                .bearer_auth(token)
                .json(&json!({"sourcesystem": "threatlake", "stixobjects": objects}))
                .send()
                .await
                .map_err(|e| transport(&what, &e));
            let result = match sent {
                Ok(resp) => answer(resp, &what, self.secret_env.as_deref()).await,
                Err(e) => Err(e),
            };
            let body = match result {
                Ok((_, body)) => body,
                Err(e) if n == 0 => return Err(e),
                // Earlier requests went through: only the rest is retried.
                Err(e) => {
                    for &i in &owners {
                        out[i] = Outcome::Retry(e.message.clone());
                    }
                    continue;
                }
            };
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            for err in v["errors"].as_array().into_iter().flatten() {
                let Some(i) = err["recordIndex"]
                    .as_u64()
                    .and_then(|k| owners.get(k as usize))
                else {
                    continue;
                };
                let msgs = err["errorMessages"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_else(|| excerpt(err.to_string().as_bytes()));
                out[*i] = Outcome::Reject(format!(
                    "Sentinel refused a STIX object: {}",
                    cap(&msgs, 300)
                ));
            }
        }
        Ok(out)
    }
}
