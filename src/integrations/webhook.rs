//! Generic webhook (Shuffle, Tines, Cortex XSOAR): a JSON batch of events, signed
//! `X-Threatlake-Signature: sha256=HEX(HMAC-SHA256(secret, "<timestamp>.<body>"))` with the Unix
//! time in `X-Threatlake-Timestamp`, so a receiver can refuse forged or replayed requests.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::http::{answer, client, secret, transport};
use super::record::Record;
use super::settings::TargetSettings;
use super::{Outcome, SendError, Sink};

/// Signature header.
pub const SIGNATURE: &str = "X-Threatlake-Signature";
/// Timestamp header (Unix seconds, signed with the body).
pub const TIMESTAMP: &str = "X-Threatlake-Timestamp";
/// Delivery header: stable for the same events, so a receiver can drop a resent batch.
pub const DELIVERY: &str = "X-Threatlake-Delivery";

/// A webhook target.
pub struct Webhook {
    client: reqwest::Client,
    url: String,
    key: String,
    secret_env: Option<String>,
}

/// The signature of `body` sent at `timestamp`.
pub fn sign(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

impl Webhook {
    /// From settings (reads the signing key).
    pub fn new(t: &TargetSettings) -> Result<Self, String> {
        Ok(Self {
            client: client(t)?,
            url: t.url.clone(),
            key: secret(t)?.unwrap_or_default(),
            secret_env: t.secret_env.clone(),
        })
    }
}

#[async_trait]
impl Sink for Webhook {
    async fn send(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, SendError> {
        let now = chrono::Utc::now();
        let events: Vec<_> = batch.iter().map(Record::event).collect();
        let body = serde_json::to_vec(&json!({
            "type": "threatlake.mappings",
            "version": 1,
            "sent_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "events": events,
        }))
        .expect("JSON to memory");
        let ids: Vec<&str> = batch.iter().map(|r| r.delivery_id.as_str()).collect();
        let delivery = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, ids.join(",").as_bytes());
        let what = format!("webhook batch of {} event(s)", batch.len());
        let resp = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP, now.timestamp().to_string())
            .header(SIGNATURE, sign(self.key.as_bytes(), now.timestamp(), &body))
            .header(DELIVERY, delivery.to_string())
            .body(body)
            .send()
            .await
            .map_err(|e| transport(&what, &e))?;
        answer(resp, &what, self.secret_env.as_deref()).await?;
        Ok(vec![Outcome::Delivered; batch.len()])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_hmac() {
        // HMAC-SHA256("key", "1700000000.{}"), computed independently with Python's hmac module.
        assert_eq!(
            super::sign(b"key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }
}
