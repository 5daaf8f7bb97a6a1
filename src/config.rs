//! Settings: `config/settings.yaml`, overridden by `THREATLAKE_<SECTION>_<KEY>` environment variables,
//! with secrets (API keys) taken only from the environment or a git-ignored secrets file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};
use serde_yaml_ng::{Mapping, Value};

/// The defaults shipped in the repository; used when no settings file exists at the default path.
pub const DEFAULT_SETTINGS: &str = include_str!("../config/settings.yaml");
/// Where settings are read from when neither `--config` nor `THREATLAKE_CONFIG` is given.
pub const DEFAULT_PATH: &str = "config/settings.yaml";
/// Environment variables with the `THREATLAKE_` prefix that are not setting overrides.
/// `THREATLAKE_MODEL` and `THREATLAKE_DUCKDB_EXTENSION` are read by the DuckDB extension and the
/// notebooks, which share a shell with the CLI; the crash tests set the fault store's variable.
const RESERVED_ENV: &[&str] = &[
    "THREATLAKE_CONFIG",
    "THREATLAKE_LOG",
    "THREATLAKE_MODEL",
    "THREATLAKE_DUCKDB_EXTENSION",
    crate::lake::fault::ABORT_AT_ENV,
    crate::server::auth::SECRET_ENV,
];
/// Settings that hold secrets: only the environment or the secrets file may set them.
const SECRET_KEYS: &[(&str, &str)] = &[
    ("otx", "api_key"),
    ("virustotal", "api_key"),
    ("taxii", "password"),
    ("taxii", "token"),
];

/// Errors loading settings. Each names the file or variable and says how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The settings file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The YAML did not parse or did not match the expected keys and types.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// File (or `<built-in defaults>`).
        path: String,
        /// serde's message, which names the offending key, line and column.
        message: String,
    },
    /// An environment override does not name a known setting.
    #[error("environment variable {var} does not name a setting (expected THREATLAKE_<SECTION>_<KEY>, sections: {sections})")]
    UnknownEnv {
        /// The variable.
        var: String,
        /// Known sections.
        sections: String,
    },
    /// A secret was written into the settings file that lives in git.
    #[error("{path} sets {key}, which is a secret: remove it and set {env} in the environment or put it in {secrets}")]
    SecretInFile {
        /// Settings file.
        path: String,
        /// `section.key`.
        key: String,
        /// The environment variable to use instead.
        env: String,
        /// The git-ignored secrets file.
        secrets: String,
    },
}

/// A secret value: never printed, never serialised in clear.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(Option<String>);

impl Secret {
    /// The secret, for building a request header. Do not log it.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref().filter(|s| !s.is_empty())
    }
    /// Wrap a value (tests, programmatic use).
    pub fn new(value: impl Into<String>) -> Self {
        Self(Some(value.into()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.expose().is_some() {
            "<redacted>"
        } else {
            "<unset>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.expose().is_some() {
            "<redacted>"
        } else {
            "<unset>"
        })
    }
}

/// Effective settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where data lives.
    pub lake: LakeSettings,
    /// ATT&CK sources.
    pub attack: AttackSettings,
    /// SQL front-end defaults.
    pub sql: SqlSettings,
    /// AlienVault OTX feed.
    pub otx: OtxSettings,
    /// VirusTotal v3 feed.
    pub virustotal: VirusTotalSettings,
    /// TAXII 2.1 collections pulled as a feed (defaults when the section is absent).
    #[serde(default)]
    pub taxii: TaxiiSettings,
    /// map_technique model.
    pub mapping: MappingSettings,
    /// Report output.
    pub reports: ReportSettings,
    /// Job schedule of `threatlake serve`.
    pub schedule: ScheduleSettings,
    /// `threatlake serve` (defaults when the section is absent).
    #[serde(default)]
    pub server: ServerSettings,
    /// SIEM/SOAR push targets (`threatlake push`, the `push` stage of `run`).
    #[serde(
        default,
        deserialize_with = "crate::integrations::settings::deserialize_targets"
    )]
    pub integrations: Vec<crate::integrations::TargetSettings>,
}

/// `lake:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LakeSettings {
    /// Processed Parquet lake (path or URL).
    pub root: String,
    /// Raw store (path or URL).
    pub raw: String,
    /// Model artifacts (path or URL).
    pub models: String,
    /// Local copy of the models when `models` is an object-store URL (they are memory-mapped).
    #[serde(default = "default_models_cache")]
    pub models_cache: String,
    /// Object-store client behaviour (retries, timeouts) and lake locks.
    #[serde(default)]
    pub store: StoreSettings,
    /// Set at start-up when `models` was an object-store URL: it is kept here and `models` then
    /// names the local cache.
    #[serde(skip)]
    pub models_remote: Option<String>,
}

fn default_models_cache() -> String {
    "data/.cache/models".into()
}

/// `lake.store:` how lake I/O talks to object storage. Credentials, region and endpoint are not here:
/// they come from the standard AWS environment variables and `~/.aws/{credentials,config}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Retries of a failed request (5xx, connection errors) before giving up.
    pub max_retries: usize,
    /// Give up retrying a request after this long.
    pub retry_timeout_secs: f64,
    /// TCP connect timeout.
    pub connect_timeout_secs: f64,
    /// Whole-request timeout.
    pub request_timeout_secs: f64,
    /// A writer lock older than this is considered abandoned (its process died) and may be taken over.
    pub lock_ttl_minutes: f64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_timeout_secs: 60.0,
            connect_timeout_secs: 5.0,
            request_timeout_secs: 300.0,
            lock_ttl_minutes: 120.0,
        }
    }
}

/// The three ATT&CK domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    /// Enterprise ATT&CK.
    Enterprise,
    /// Mobile ATT&CK.
    Mobile,
    /// ATT&CK for ICS.
    Ics,
}

impl Domain {
    /// All domains in a fixed order.
    pub const ALL: [Domain; 3] = [Domain::Enterprise, Domain::Mobile, Domain::Ics];

    /// Short name used in partitions and paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Enterprise => "enterprise",
            Domain::Mobile => "mobile",
            Domain::Ics => "ics",
        }
    }

    /// The STIX `x_mitre_domains` value.
    pub fn stix_name(self) -> &'static str {
        match self {
            Domain::Enterprise => "enterprise-attack",
            Domain::Mobile => "mobile-attack",
            Domain::Ics => "ics-attack",
        }
    }

    /// Parse either form (`enterprise` or `enterprise-attack`).
    pub fn parse(s: &str) -> Option<Domain> {
        Domain::ALL
            .into_iter()
            .find(|d| s.eq_ignore_ascii_case(d.as_str()) || s.eq_ignore_ascii_case(d.stix_name()))
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `attack:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSettings {
    /// Domains ingested by default.
    pub domains: Vec<Domain>,
    /// Bundle URL (or path) per domain.
    pub sources: BTreeMap<Domain, String>,
    /// MITRE's collection index (every release of every domain with its bundle URL), read by `run`
    /// and the `ingest_attack` job to ingest newer releases; null or empty: no check.
    #[serde(default = "default_attack_index")]
    pub index: Option<String>,
    /// Download timeout.
    pub http_timeout_secs: u64,
    /// Largest bundle accepted, in MB once decompressed (ATT&CK Enterprise v18.1 is 45 MB).
    #[serde(default = "default_max_bundle_mb")]
    pub max_bundle_mb: f64,
    /// Most STIX objects in one bundle (Enterprise v18.1 has 24,771).
    #[serde(default = "default_max_objects")]
    pub max_objects: usize,
}

fn default_attack_index() -> Option<String> {
    Some("https://raw.githubusercontent.com/mitre-attack/attack-stix-data/master/index.json".into())
}
fn default_max_bundle_mb() -> f64 {
    256.0
}
fn default_max_objects() -> usize {
    250_000
}

impl AttackSettings {
    /// The bundle caps.
    pub fn limits(&self) -> crate::attack::BundleLimits {
        crate::attack::BundleLimits {
            max_bytes: (self.max_bundle_mb.clamp(0.001, 1e6) * 1_048_576.0) as u64,
            max_objects: self.max_objects.max(1),
        }
    }
}

/// `sql:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSettings {
    /// Default output format name.
    pub format: String,
    /// REPL history file; empty disables.
    pub history_file: String,
    /// Rows shown by the table format (0 = all).
    pub max_rows: usize,
    /// Memory a `threatlake sql` query may hold (MB; sorts and joins spill to disk beyond it;
    /// 0 = unbounded).
    #[serde(default = "default_sql_memory_mb")]
    pub memory_mb: usize,
}

fn default_sql_memory_mb() -> usize {
    2048
}

/// `otx:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OtxSettings {
    /// API base URL.
    pub base_url: String,
    /// Pulses per page.
    pub page_size: u32,
    /// HTTP timeouts and retries.
    #[serde(default)]
    pub http: HttpSettings,
    /// From THREATLAKE_OTX_API_KEY or the secrets file only.
    #[serde(default)]
    pub api_key: Secret,
}

/// `taxii:` section: TAXII 2.1 collections `run` pulls (`ingest taxii --collection URL` pulls any).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaxiiSettings {
    /// Collection URLs (`https://host/api-root/collections/{id}/`).
    pub collections: Vec<String>,
    /// HTTP Basic user; the password comes from THREATLAKE_TAXII_PASSWORD.
    pub username: Option<String>,
    /// Objects per page asked for (`limit`; servers may send fewer).
    pub page_size: u32,
    /// HTTP timeouts and retries.
    pub http: HttpSettings,
    /// From THREATLAKE_TAXII_PASSWORD or the secrets file only.
    pub password: Secret,
    /// A bearer token instead of Basic auth: THREATLAKE_TAXII_TOKEN or the secrets file only.
    pub token: Secret,
}

impl Default for TaxiiSettings {
    fn default() -> Self {
        Self {
            collections: Vec::new(),
            username: None,
            page_size: 500,
            http: HttpSettings::default(),
            password: Secret::default(),
            token: Secret::default(),
        }
    }
}

/// Timeouts and retries of a feed client.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Attempts per request (429/5xx/timeouts are retried).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First backoff between attempts (doubles each time).
    #[serde(default = "default_backoff")]
    pub backoff_secs: f64,
    /// Longest single wait, including a server's Retry-After.
    #[serde(default = "default_max_wait")]
    pub max_wait_secs: f64,
    /// Largest response body accepted (MB, decompressed); larger answers are refused unread.
    #[serde(default = "default_max_body_mb")]
    pub max_body_mb: f64,
}

fn default_timeout() -> f64 {
    30.0
}
fn default_attempts() -> u32 {
    4
}
fn default_backoff() -> f64 {
    2.0
}
fn default_max_wait() -> f64 {
    120.0
}
fn default_max_body_mb() -> f64 {
    64.0
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            timeout_secs: default_timeout(),
            attempts: default_attempts(),
            backoff_secs: default_backoff(),
            max_wait_secs: default_max_wait(),
            max_body_mb: default_max_body_mb(),
        }
    }
}

impl HttpSettings {
    /// As a client retry policy.
    pub fn policy(&self) -> crate::feeds::http::RetryPolicy {
        use std::time::Duration;
        let secs = |x: f64| Duration::from_secs_f64(x.clamp(0.0, 86_400.0));
        crate::feeds::http::RetryPolicy {
            attempts: self.attempts.max(1),
            backoff: secs(self.backoff_secs),
            max_wait: secs(self.max_wait_secs),
            timeout: secs(self.timeout_secs.max(0.001)),
            max_body: (self.max_body_mb.clamp(0.001, 1e6) * 1_048_576.0) as u64,
        }
    }
}

/// `virustotal:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirusTotalSettings {
    /// API base URL.
    pub base_url: String,
    /// Token-bucket rate.
    pub requests_per_minute: u32,
    /// Requests per day before stopping cleanly.
    pub daily_budget: u32,
    /// How long a stored lookup stays fresh.
    pub cache_ttl_hours: u32,
    /// Observables to look up on every run (hashes, URLs, domains, IPs).
    #[serde(default)]
    pub observables: Vec<String>,
    /// Indicators of the newest OTX pulses to enrich per run (0 = none).
    #[serde(default)]
    pub enrich_from_otx: usize,
    /// HTTP timeouts and retries.
    #[serde(default)]
    pub http: HttpSettings,
    /// From THREATLAKE_VIRUSTOTAL_API_KEY or the secrets file only.
    #[serde(default)]
    pub api_key: Secret,
}

/// `mapping:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// Domain whose newest model the SQL functions use.
    pub domain: Domain,
    /// Abstain threshold of map_technique; `None` (null) takes the model's own (the threshold its
    /// text calibration chose, else 0.03).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Default k.
    pub top_k: usize,
    /// Optional pretrained vectors.
    pub pretrained_vectors: Option<String>,
    /// Text calibration `model build` puts beside a model of its domain (`model calibrate --write`
    /// makes one); null builds models whose scores are calibrated on ATT&CK procedures only.
    #[serde(default)]
    pub calibration: Option<String>,
    /// Labelled report sentences `model build` learns as procedure examples besides ATT&CK's:
    /// `builtin` (AnnoCTR's train documents, `data/mapping/`), a JSON-lines file of
    /// `{"text", "labels"}`, or null (none).
    #[serde(default)]
    pub examples: Option<String>,
    /// Items `map-intel` maps and commits at a time (evidence, then the items): memory holds one
    /// commit's items and results, not the whole backlog; more are fewer, larger commits.
    #[serde(default = "default_items_per_commit")]
    pub items_per_commit: usize,
    /// The share of the workbench's labelled reports `model build` keeps out of the model (0 to
    /// 0.9, whole reports, a stable draw per report), so `model eval` / `model calibrate` on `model
    /// feedback export` measure the model on the organisation's own text. 0 learns them all.
    #[serde(default)]
    pub feedback_holdout: f64,
}

fn default_items_per_commit() -> usize {
    10_000
}

/// `reports:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSettings {
    /// Output directory.
    pub out_dir: String,
    /// Template directory (user-overridable).
    pub templates: String,
    /// Memory the report queries may hold (MB; sorts spill to disk beyond it; 0 = unbounded).
    #[serde(default = "default_reports_memory_mb")]
    pub memory_mb: usize,
    /// Mapping rows per pass of the STIX export and the TAXII collection: items are read in
    /// passes over disjoint shares of their ids, so a pass's join holds about this many rows'
    /// items (≈ 200 MB at the default); fewer passes are faster, more need less memory.
    #[serde(default = "default_rows_per_pass")]
    pub rows_per_pass: usize,
}

fn default_reports_memory_mb() -> usize {
    1024
}

fn default_rows_per_pass() -> usize {
    crate::reports::stix::ROWS_PER_PASS
}

/// `schedule:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Cron expression per job name (`run`, `ingest_attack`, `ingest_otx`, `ingest_vt`, `map`,
    /// `snapshot`, `report`), UTC; six fields when the first is seconds.
    #[serde(default)]
    pub jobs: BTreeMap<String, String>,
    /// Each scheduled start is delayed by a random 0..jitter_secs (spreads load on the feeds).
    #[serde(default = "default_jitter")]
    pub jitter_secs: u64,
    /// At start, run a job once when its last scheduled time passed while the server was down.
    #[serde(default = "default_true")]
    pub catch_up: bool,
}

fn default_jitter() -> u64 {
    30
}
fn default_true() -> bool {
    true
}

/// `server:` section (`threatlake serve`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Listen address.
    pub bind: String,
    /// Users, API tokens and the token key (outside the lake: the lake is readable through SQL).
    pub auth_file: String,
    /// `POST /api/v1/sql` limits.
    pub sql: ServerSqlSettings,
    /// Seconds a running job gets to reach a safe point at shutdown.
    pub shutdown_grace_secs: u64,
    /// Seconds between re-reads of the lake (so writes by CLI commands become visible).
    pub refresh_secs: u64,
    /// Browser sessions.
    pub session: SessionSettings,
    /// Failed logins.
    pub login: LoginSettings,
    /// Seconds between flushes of the audit log to the lake.
    pub audit_flush_secs: u64,
    /// Largest request body in KB.
    pub max_body_kb: usize,
    /// MB of memory for the results of the dashboard's own queries, kept until the lake changes
    /// (0: every page queries the lake).
    #[serde(default = "default_page_cache_mb")]
    pub page_cache_mb: usize,
}

fn default_page_cache_mb() -> usize {
    64
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            auth_file: "config/auth.yaml".into(),
            sql: ServerSqlSettings {
                max_rows: 10_000,
                timeout_secs: 30,
                memory_mb: 1024,
            },
            shutdown_grace_secs: 60,
            refresh_secs: 60,
            session: SessionSettings {
                idle_minutes: 30,
                max_hours: 12,
            },
            login: LoginSettings {
                max_failures: 5,
                window_minutes: 15,
            },
            audit_flush_secs: 5,
            max_body_kb: 1024,
            page_cache_mb: default_page_cache_mb(),
        }
    }
}

/// `server.sql`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSqlSettings {
    /// Rows returned at most (the answer says when it was cut).
    pub max_rows: usize,
    /// Seconds a query may run.
    pub timeout_secs: u64,
    /// Memory all queries together may hold, in MB (DataFusion's memory pool).
    pub memory_mb: usize,
}

/// `server.session`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Minutes without a request before a session ends.
    pub idle_minutes: u64,
    /// Hours after login when a session ends regardless.
    pub max_hours: u64,
}

/// `server.login`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSettings {
    /// Failed logins per user name, and per client address, within the window before further
    /// attempts are refused.
    pub max_failures: u32,
    /// The window, in minutes.
    pub window_minutes: u64,
}

/// Where the settings came from, for messages.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings.
    pub settings: Settings,
    /// The settings file, or None for built-in defaults.
    pub path: Option<PathBuf>,
}

impl Settings {
    /// Load settings: explicit path (flag or THREATLAKE_CONFIG) or `config/settings.yaml` if present,
    /// else built-in defaults; then the secrets file beside it; then environment overrides.
    pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
        Self::load_with_env(explicit, std::env::vars())
    }

    /// Settings from YAML text alone (no secrets file, no environment); `label` names the text in
    /// errors.
    pub fn from_yaml(text: &str, label: &str) -> Result<Settings, ConfigError> {
        serde_yaml_ng::from_value(parse_yaml(text, label)?).map_err(|e| ConfigError::Invalid {
            path: label.to_string(),
            message: e.to_string(),
        })
    }

    /// [`Settings::load`] with the environment given explicitly (tests).
    pub fn load_with_env(
        explicit: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigError> {
        let (path, text) = match explicit {
            Some(p) => (Some(p.to_path_buf()), read(p)?),
            None if Path::new(DEFAULT_PATH).is_file() => (
                Some(PathBuf::from(DEFAULT_PATH)),
                read(Path::new(DEFAULT_PATH))?,
            ),
            None => (None, DEFAULT_SETTINGS.to_string()),
        };
        let label = path.as_ref().map_or_else(
            || "<built-in defaults>".to_string(),
            |p| p.display().to_string(),
        );
        let mut value = parse_yaml(&text, &label)?;
        let secrets_path = path
            .as_ref()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new("config"))
            .join("secrets.yaml");
        for (section, key) in SECRET_KEYS {
            if get(&value, section, key).is_some_and(|v| !v.is_null()) {
                return Err(ConfigError::SecretInFile {
                    path: label,
                    key: format!("{section}.{key}"),
                    env: env_name(section, key),
                    secrets: secrets_path.display().to_string(),
                });
            }
        }
        if secrets_path.is_file() {
            let secrets = parse_yaml(&read(&secrets_path)?, &secrets_path.display().to_string())?;
            merge(&mut value, secrets);
        }
        // The variables integrations name for their secrets are theirs, not setting overrides.
        let secret_envs: Vec<String> = value
            .get("integrations")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|t| t.get("secret_env")?.as_str().map(str::to_string))
            .collect();
        let env = env
            .into_iter()
            .filter(|(k, _)| !secret_envs.iter().any(|s| s == k));
        let applied = apply_env(&mut value, env)?;
        let settings: Settings =
            serde_yaml_ng::from_value(value).map_err(|e| ConfigError::Invalid {
                path: if applied.is_empty() {
                    label.clone()
                } else {
                    format!("{label} with the overrides {}", applied.join(", "))
                },
                message: e.to_string(),
            })?;
        crate::integrations::settings::check_all(&settings.integrations).map_err(|message| {
            ConfigError::Invalid {
                path: label.clone(),
                message,
            }
        })?;
        Ok(Loaded { settings, path })
    }

    /// The effective settings as YAML, secrets redacted.
    pub fn to_redacted_yaml(&self) -> String {
        serde_yaml_ng::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }
}

fn read(p: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
        path: p.to_path_buf(),
        source,
    })
}

fn parse_yaml(text: &str, label: &str) -> Result<Value, ConfigError> {
    let v: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
        path: label.to_string(),
        message: e.to_string(),
    })?;
    match v {
        Value::Mapping(_) => Ok(v),
        Value::Null => Ok(Value::Mapping(Mapping::new())),
        _ => Err(ConfigError::Invalid {
            path: label.to_string(),
            message: "the top level must be a mapping of sections (lake:, attack:, …)".into(),
        }),
    }
}

fn get<'a>(v: &'a Value, section: &str, key: &str) -> Option<&'a Value> {
    v.get(section)?.get(key)
}

fn env_name(section: &str, key: &str) -> String {
    format!(
        "THREATLAKE_{}_{}",
        section.to_uppercase(),
        key.to_uppercase()
    )
}

/// Deep-merge `overlay` into `base` (mappings merge, everything else replaces).
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Apply `THREATLAKE_<SECTION>_<KEY>` overrides; returns the variables applied (for messages).
fn apply_env(
    value: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    let Value::Mapping(root) = value else {
        return Ok(applied);
    };
    // A section that may be left out of a settings file still takes its variables.
    let optional = Value::String("taxii".to_string());
    if !root.contains_key(&optional) {
        root.insert(optional, Value::Mapping(serde_yaml_ng::Mapping::new()));
    }
    let mut sections: Vec<String> = root
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    // Longest first so a section whose name prefixes another can never steal its variables.
    sections.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("THREATLAKE_") && !RESERVED_ENV.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let rest = var["THREATLAKE_".len()..].to_lowercase();
        let section = sections.iter().find(|s| rest.starts_with(&format!("{s}_")));
        let Some(section) = section else {
            return Err(ConfigError::UnknownEnv {
                var,
                sections: sections.join(", "),
            });
        };
        let key = &rest[section.len() + 1..];
        let is_secret = SECRET_KEYS.iter().any(|(s, k)| s == section && *k == key);
        // Secrets stay strings whatever they look like; other values parse as YAML scalars so numbers,
        // booleans and lists work (`THREATLAKE_ATTACK_DOMAINS='[enterprise]'`).
        let parsed = if is_secret {
            Value::String(raw)
        } else {
            serde_yaml_ng::from_str(&raw).unwrap_or(Value::String(raw))
        };
        let Some(Value::Mapping(sec)) = root.get_mut(section.as_str()) else {
            return Err(ConfigError::UnknownEnv {
                var,
                sections: sections.join(", "),
            });
        };
        set_nested(sec, key, parsed);
        applied.push(var);
    }
    Ok(applied)
}

/// Set `key` in `map`, descending into a nested mapping whose name prefixes it, so
/// `THREATLAKE_LAKE_STORE_MAX_RETRIES` sets `lake.store.max_retries` (a key of the map itself wins).
fn set_nested(map: &mut serde_yaml_ng::Mapping, key: &str, v: Value) {
    if !map.contains_key(key) {
        let mut nested: Vec<String> = map
            .iter()
            .filter(|(_, val)| val.is_mapping())
            .filter_map(|(k, _)| k.as_str())
            .filter(|k| key.starts_with(&format!("{k}_")))
            .map(str::to_string)
            .collect();
        nested.sort_by_key(|k| std::cmp::Reverse(k.len()));
        if let Some(k) = nested.first() {
            if let Some(Value::Mapping(m)) = map.get_mut(k.as_str()) {
                return set_nested(m, &key[k.len() + 1..], v);
            }
        }
    }
    map.insert(Value::String(key.to_string()), v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_settings_are_overridden_from_the_environment() {
        let l = Settings::load_with_env(
            None,
            env(&[
                ("THREATLAKE_LAKE_STORE_MAX_RETRIES", "9"),
                ("THREATLAKE_OTX_HTTP_MAX_BODY_MB", "2"),
                ("THREATLAKE_LAKE_ROOT", "/tmp/l"),
            ]),
        )
        .unwrap();
        assert_eq!(l.settings.lake.store.max_retries, 9);
        assert_eq!(l.settings.otx.http.max_body_mb, 2.0);
        assert_eq!(l.settings.lake.root, "/tmp/l");
        let e = Settings::load_with_env(None, env(&[("THREATLAKE_LAKE_STORE_NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("THREATLAKE_LAKE_STORE_NOPE") && e.contains("nope"),
            "{e}"
        );
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_parse() {
        let l = Settings::load_with_env(None, env(&[])).unwrap();
        assert_eq!(l.settings.lake.root, "data/lake");
        assert_eq!(l.settings.attack.domains.len(), 3);
        assert!(l.settings.attack.sources[&Domain::Enterprise].starts_with("https://"));
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = DEFAULT_SETTINGS.replace("  raw: data/raw", "  rawr: data/raw");
        let p = write(dir.path(), "s.yaml", &text);
        let e = Settings::load_with_env(Some(&p), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rawr") && e.contains("s.yaml"), "{e}");
    }

    #[test]
    fn taxii_secrets_come_from_the_environment_even_without_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let start = DEFAULT_SETTINGS.find("taxii:").unwrap();
        let end = DEFAULT_SETTINGS.find("mapping:").unwrap();
        let text = format!("{}{}", &DEFAULT_SETTINGS[..start], &DEFAULT_SETTINGS[end..]);
        let p = write(dir.path(), "s.yaml", &text);
        let l = Settings::load_with_env(
            Some(&p),
            env(&[
                ("THREATLAKE_TAXII_PASSWORD", "007"),
                ("THREATLAKE_TAXII_USERNAME", "analyst"),
            ]),
        )
        .unwrap();
        assert_eq!(l.settings.taxii.password.expose(), Some("007"));
        assert_eq!(l.settings.taxii.username.as_deref(), Some("analyst"));
        assert_eq!(l.settings.taxii.page_size, 500);
        let text = DEFAULT_SETTINGS.replace(
            "  username: null\n  page_size: 500",
            "  username: a\n  password: pw\n  page_size: 500",
        );
        assert_ne!(text, DEFAULT_SETTINGS);
        let p = write(dir.path(), "t.yaml", &text);
        let e = Settings::load_with_env(Some(&p), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("taxii.password")
                && e.contains("THREATLAKE_TAXII_PASSWORD")
                && !e.contains("pw\n"),
            "{e}"
        );
    }

    #[test]
    fn env_overrides_and_secrets() {
        let l = Settings::load_with_env(
            None,
            env(&[
                ("THREATLAKE_LAKE_ROOT", "/tmp/x"),
                ("THREATLAKE_VIRUSTOTAL_DAILY_BUDGET", "7"),
                ("THREATLAKE_OTX_API_KEY", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(l.settings.lake.root, "/tmp/x");
        assert_eq!(l.settings.virustotal.daily_budget, 7);
        assert_eq!(l.settings.otx.api_key.expose(), Some("12345"));
        let shown = l.settings.to_redacted_yaml();
        assert!(
            !shown.contains("12345") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!format!("{:?}", l.settings).contains("12345"));
    }

    #[test]
    fn unknown_env_is_rejected() {
        // Variables of the DuckDB extension and notebooks are not settings, and not errors.
        assert!(Settings::load_with_env(
            None,
            env(&[
                ("THREATLAKE_MODEL", "/m"),
                ("THREATLAKE_DUCKDB_EXTENSION", "/e")
            ])
        )
        .is_ok());
        let e = Settings::load_with_env(None, env(&[("THREATLAKE_NOPE_X", "1")])).unwrap_err();
        assert!(e.to_string().contains("THREATLAKE_NOPE_X"));
    }

    #[test]
    fn secret_in_settings_file_is_refused_but_allowed_in_secrets_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = DEFAULT_SETTINGS.replace("  page_size: 50", "  page_size: 50\n  api_key: abc");
        let p = write(dir.path(), "settings.yaml", &bad);
        let e = Settings::load_with_env(Some(&p), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("THREATLAKE_OTX_API_KEY") && !e.contains("abc"),
            "{e}"
        );

        let p = write(dir.path(), "settings.yaml", DEFAULT_SETTINGS);
        write(
            dir.path(),
            "secrets.yaml",
            "virustotal:\n  api_key: s3cr3t\n",
        );
        let l = Settings::load_with_env(Some(&p), env(&[])).unwrap();
        assert_eq!(l.settings.virustotal.api_key.expose(), Some("s3cr3t"));
    }
}
