//! `integrations:` in settings.yaml: the push targets, their filters and delivery knobs, checked
//! when settings load so a typo is reported before anything is sent.

use serde::{Deserialize, Deserializer, Serialize};

/// Which receiver a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Splunk HTTP Event Collector.
    SplunkHec,
    /// Elasticsearch / OpenSearch `_bulk`, ECS documents.
    Elastic,
    /// Microsoft Sentinel threat-intelligence upload API (STIX objects).
    Sentinel,
    /// Syslog (RFC 5424) carrying CEF or LEEF over UDP, TCP or TLS.
    Syslog,
    /// TheHive 5 alerts with the techniques as TTPs.
    Thehive,
    /// Any JSON webhook (Shuffle, Tines, Cortex XSOAR), HMAC-signed.
    Webhook,
}

impl Kind {
    /// Its name in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SplunkHec => "splunk_hec",
            Kind::Elastic => "elastic",
            Kind::Sentinel => "sentinel",
            Kind::Syslog => "syslog",
            Kind::Thehive => "thehive",
            Kind::Webhook => "webhook",
        }
    }

    /// Records per request when `batch_size` is not set.
    pub fn default_batch(self) -> usize {
        match self {
            Kind::Elastic => 1000,
            Kind::SplunkHec => 500,
            Kind::Sentinel => 100,
            Kind::Syslog => 1000,
            Kind::Thehive => 50,
            Kind::Webhook => 100,
        }
    }

    fn needs_secret(self) -> bool {
        matches!(
            self,
            Kind::SplunkHec | Kind::Sentinel | Kind::Thehive | Kind::Webhook
        )
    }
}

/// Which mappings a target receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodFilter {
    /// Found by the mapping model.
    Model,
    /// Stated by the source (OTX `attack_ids`, VirusTotal sandboxes).
    Source,
}

impl MethodFilter {
    /// Its name in `mapped_threat_data.method`.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodFilter::Model => "model",
            MethodFilter::Source => "source",
        }
    }
}

/// Syslog payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyslogFormat {
    /// ArcSight Common Event Format.
    #[default]
    Cef,
    /// IBM QRadar Log Event Extended Format 2.0.
    Leef,
}

/// How an Elastic target authenticates with its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ElasticAuth {
    /// `Authorization: ApiKey <secret>` (the encoded API key Elastic prints).
    #[default]
    ApiKey,
    /// `user:password` as HTTP Basic.
    Basic,
    /// `Authorization: Bearer <secret>`.
    Bearer,
}

/// One push target.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSettings {
    /// Unique name (letters, digits, `-`, `_`): `push --target NAME`, the outbox partition.
    pub name: String,
    /// Receiver kind.
    pub kind: Kind,
    /// Endpoint: the service's base URL, or `udp://`, `tcp://`, `tls://host:port` for syslog.
    pub url: String,
    /// Environment variable holding the target's secret (token, API key, client secret, HMAC key).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Off: nothing is queued or sent.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Only mappings scoring at least this (0-1).
    #[serde(default)]
    pub min_score: f64,
    /// Only these sources (otx, virustotal); empty: all.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Only these techniques (a parent also selects its sub-techniques); empty: all.
    #[serde(default)]
    pub techniques: Vec<String>,
    /// Only techniques of these tactics (shortname like `execution`, or id like `TA0002`); empty: all.
    #[serde(default)]
    pub tactics: Vec<String>,
    /// Only model or only source-stated mappings; absent: both.
    #[serde(default)]
    pub method: Option<MethodFilter>,
    /// Records per request (default per kind; Sentinel at most 100 objects per request).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Seconds per request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Tries of a failing request within one push (back-off with jitter; `Retry-After` honoured).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First back-off between those tries, doubling.
    #[serde(default = "default_backoff")]
    pub backoff_secs: f64,
    /// Longest wait honoured from `Retry-After` or back-off.
    #[serde(default = "default_max_wait")]
    pub max_wait_secs: f64,
    /// Pushes that may fail a row before it goes to dead-letter.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Observables sent per item at most.
    #[serde(default = "default_observables")]
    pub max_observables: usize,
    /// PEM file of extra CA certificates (a private CA of an on-premises receiver).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// syslog: cef or leef.
    #[serde(default)]
    pub format: Option<SyslogFormat>,
    /// elastic: index or data stream (default `logs-ti_threatlake.mappings-default`, a data
    /// stream); splunk_hec: the Splunk index (default: the token's).
    #[serde(default)]
    pub index: Option<String>,
    /// elastic: how the secret is sent.
    #[serde(default)]
    pub auth: Option<ElasticAuth>,
    /// splunk_hec: wait for indexer acknowledgement before counting a batch delivered.
    #[serde(default)]
    pub ack: bool,
    /// splunk_hec: seconds to wait for the acknowledgement.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: f64,
    /// sentinel: Entra tenant id.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// sentinel: application (client) id; its secret is in `secret_env`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// sentinel: Log Analytics workspace id.
    #[serde(default)]
    pub workspace_id: Option<String>,
    /// sentinel: token endpoint (default Entra's for `tenant_id`).
    #[serde(default)]
    pub token_url: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_timeout() -> f64 {
    30.0
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> f64 {
    1.0
}
fn default_max_wait() -> f64 {
    120.0
}
fn default_attempts() -> u32 {
    8
}
fn default_observables() -> usize {
    100
}
fn default_ack_timeout() -> f64 {
    60.0
}

impl TargetSettings {
    /// Records per request.
    pub fn batch(&self) -> usize {
        self.batch_size.unwrap_or_else(|| self.kind.default_batch())
    }

    /// What is wrong with it, if anything (names the target and the key).
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        let bad = |key: &str, why: String| Err(format!("integration {n:?}: {key}: {why}"));
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "integration name {n:?}: use 1-64 letters, digits, '-' or '_'"
            ));
        }
        if !(0.0..=1.0).contains(&self.min_score) {
            return bad("min_score", "must be between 0 and 1".into());
        }
        let batch = self.batch();
        let max_batch = if self.kind == Kind::Sentinel {
            100
        } else {
            10_000
        };
        if batch == 0 || batch > max_batch {
            return bad("batch_size", format!("must be 1-{max_batch}"));
        }
        if self.max_attempts == 0 || self.retries == 0 {
            return bad("max_attempts/retries", "must be at least 1".into());
        }
        for (key, v) in [
            ("timeout_secs", self.timeout_secs),
            ("backoff_secs", self.backoff_secs),
            ("max_wait_secs", self.max_wait_secs),
            ("ack_timeout_secs", self.ack_timeout_secs),
        ] {
            if !(0.0..=86_400.0).contains(&v) {
                return bad(key, "must be a number of seconds, 0-86400".into());
            }
        }
        match &self.secret_env {
            Some(v) if !valid_env_name(v) => {
                return bad(
                    "secret_env",
                    "must be an environment variable name (A-Z, 0-9, _), not the secret itself"
                        .into(),
                )
            }
            None if self.kind.needs_secret() => {
                return bad(
                    "secret_env",
                    format!(
                        "a {} target needs the name of the environment variable holding its secret",
                        self.kind.as_str()
                    ),
                )
            }
            _ => {}
        }
        let url = url::Url::parse(&self.url)
            .map_err(|e| format!("integration {n:?}: url {:?}: {e}", self.url))?;
        let schemes: &[&str] = if self.kind == Kind::Syslog {
            &["udp", "tcp", "tls"]
        } else {
            &["http", "https"]
        };
        if !schemes.contains(&url.scheme()) || url.host_str().is_none() {
            return bad(
                "url",
                format!(
                    "{:?} must start with {}",
                    self.url,
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if self.kind == Kind::Syslog && url.port().is_none() {
            return bad("url", format!("{:?} needs a port", self.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad(
                "url",
                "credentials do not belong in the URL: put the secret in the environment variable named by secret_env".into(),
            );
        }
        let only = |key: &str, set: bool, kinds: &[Kind]| {
            if set && !kinds.contains(&self.kind) {
                bad(
                    key,
                    format!("does not apply to a {} target", self.kind.as_str()),
                )
            } else {
                Ok(())
            }
        };
        only("format", self.format.is_some(), &[Kind::Syslog])?;
        only(
            "index",
            self.index.is_some(),
            &[Kind::Elastic, Kind::SplunkHec],
        )?;
        only("auth", self.auth.is_some(), &[Kind::Elastic])?;
        only("ack", self.ack, &[Kind::SplunkHec])?;
        for (key, v) in [
            ("tenant_id", &self.tenant_id),
            ("client_id", &self.client_id),
            ("workspace_id", &self.workspace_id),
        ] {
            only(key, v.is_some(), &[Kind::Sentinel])?;
            if self.kind == Kind::Sentinel && v.as_deref().is_none_or(str::is_empty) {
                return bad(key, "a sentinel target needs it".into());
            }
        }
        only("token_url", self.token_url.is_some(), &[Kind::Sentinel])?;
        if let Some(i) = &self.index {
            if i.is_empty()
                || !i
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || i.starts_with(['-', '_', '.'])
            {
                return bad("index", format!("{i:?} is not a valid index name"));
            }
        }
        Ok(())
    }
}

fn valid_env_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit())
}

/// Check every target and that names are unique.
pub fn check_all(targets: &[TargetSettings]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for t in targets {
        t.check()?;
        if !seen.insert(t.name.as_str()) {
            return Err(format!("integration name {:?} is used twice", t.name));
        }
    }
    Ok(())
}

/// `integrations:` as a list; an empty mapping (`{}`, what older settings files hold) is an empty list.
pub fn deserialize_targets<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<TargetSettings>, D::Error> {
    use serde_yaml_ng::Value;
    match Value::deserialize(d)? {
        Value::Null => Ok(vec![]),
        Value::Mapping(m) if m.is_empty() => Ok(vec![]),
        // Through a Value so serde's own message (unknown field, wrong type) reaches the user.
        v @ Value::Sequence(_) => serde_yaml_ng::from_value(v).map_err(serde::de::Error::custom),
        _ => Err(serde::de::Error::custom(
            "integrations must be a list of targets (- name: …, kind: …, url: …)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(yaml: &str) -> Result<(), String> {
        let t: TargetSettings = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        t.check()
    }

    #[test]
    fn targets_are_checked_with_messages_naming_the_key() {
        assert!(target("{name: soc, kind: elastic, url: 'http://127.0.0.1:9200'}").is_ok());
        let e = target("{name: soc, kind: splunk_hec, url: 'https://s:8088'}").unwrap_err();
        assert!(e.contains("secret_env"), "{e}");
        let e = target("{name: s, kind: syslog, url: 'http://h:514'}").unwrap_err();
        assert!(e.contains("udp://"), "{e}");
        let e = target("{name: s, kind: syslog, url: 'tcp://h'}").unwrap_err();
        assert!(e.contains("port"), "{e}");
        let e = target("{name: 'a b', kind: elastic, url: 'http://h'}").unwrap_err();
        assert!(e.contains("letters"), "{e}");
        let e = target("{name: w, kind: webhook, url: 'http://h', secret_env: 's3cr3t-value'}")
            .unwrap_err();
        assert!(e.contains("not the secret itself"), "{e}");
        let e = target("{name: w, kind: elastic, url: 'http://u:p@h'}").unwrap_err();
        assert!(e.contains("credentials"), "{e}");
        let e = target(
            "{name: s, kind: sentinel, url: 'https://h', secret_env: S, batch_size: 500, tenant_id: t, client_id: c, workspace_id: w}",
        )
        .unwrap_err();
        assert!(e.contains("1-100"), "{e}");
        let e = target("{name: s, kind: sentinel, url: 'https://h', secret_env: S}").unwrap_err();
        assert!(e.contains("tenant_id"), "{e}");
        let e = target("{name: s, kind: elastic, url: 'http://h', format: cef}").unwrap_err();
        assert!(e.contains("format"), "{e}");
        let e = target("{name: s, kind: elastic, url: 'http://h', api_key: x}").unwrap_err();
        assert!(e.contains("api_key"), "{e}");
    }
}
