//! VirusTotal v3: look up observables (hashes, URLs, domains, IPs) within the quota, keep every response
//! raw, and append reports and sandbox ATT&CK techniques to the lake.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use base64::Engine as _;
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use super::http::{FeedClient, Fetched};
use super::FeedError;
use super::{
    append, fixed, keep_raw, read_state, rfc3339, string_list, strings, text, ts, write_state,
};
use crate::lake::{Lake, Location};

/// Every lookup made.
pub const LOOKUP_LOG: &str = "virustotal_lookup_log";
/// Techniques from sandbox MITRE trees and behaviour summaries.
pub const TECHNIQUE_LOG: &str = "virustotal_technique_log";
/// Environment variable of the key.
pub const KEY_ENV: &str = "THREATLAKE_VIRUSTOTAL_API_KEY";

/// What an observable is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// MD5/SHA-1/SHA-256.
    File,
    /// http(s) URL.
    Url,
    /// Domain or host name.
    Domain,
    /// IPv4/IPv6 address.
    Ip,
}

impl Kind {
    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Url => "url",
            Kind::Domain => "domain",
            Kind::Ip => "ip",
        }
    }
}

/// Undo the defanging analysts apply when they share IOCs: `hxxp://`, `example[.]com`,
/// `1.2.3[.]4`, `evil(.)com`, `[dot]`, `[:]`, `[://]`, `[@]`.
pub fn refang(s: &str) -> String {
    let mut out = s.trim().to_string();
    // Until nothing changes: `[[.]]` is `[.]` after one pass (found by fuzzing), and a refanged
    // value must refang to itself. Each pass that changes the text shortens it, so this ends.
    loop {
        let before = out.len();
        for (from, to) in [
            ("[://]", "://"),
            ("[:]", ":"),
            ("[.]", "."),
            ("(.)", "."),
            ("{.}", "."),
            ("[dot]", "."),
            ("(dot)", "."),
            ("[@]", "@"),
            ("[at]", "@"),
        ] {
            if out.contains(from) {
                out = out.replace(from, to);
            }
        }
        if out.len() == before {
            break;
        }
    }
    if let Some((scheme, rest)) = out.split_once("://") {
        let fixed = match scheme.to_ascii_lowercase().as_str() {
            "hxxp" | "hxp" => Some("http"),
            "hxxps" | "hxps" => Some("https"),
            "fxp" => Some("ftp"),
            _ => None,
        };
        if let Some(f) = fixed {
            out = format!("{f}://{rest}");
        }
    }
    out
}

/// Classify and normalise an observable (refanged first); None for anything VirusTotal cannot look
/// up.
pub fn classify(s: &str) -> Option<(Kind, String)> {
    if s.len() > 8192 {
        return None;
    }
    let refanged = refang(s);
    let s = refanged.as_str();
    if s.is_empty() || s.len() > 2048 {
        return None;
    }
    if matches!(s.len(), 32 | 40 | 64) && s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Some((Kind::File, s.to_ascii_lowercase()));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((Kind::Ip, ip.to_string()));
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        if matches!(
            scheme.to_ascii_lowercase().as_str(),
            "http" | "https" | "ftp"
        ) && !rest.is_empty()
        {
            return Some((Kind::Url, s.to_string()));
        }
        return None;
    }
    let d = s.trim_end_matches('.').to_ascii_lowercase();
    let ok = d.contains('.')
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    ok.then_some((Kind::Domain, d))
}

/// The API path of an observable's report.
pub fn report_path(kind: Kind, obs: &str) -> String {
    match kind {
        Kind::File => format!("files/{obs}"),
        Kind::Url => format!(
            "urls/{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(obs.as_bytes())
        ),
        Kind::Domain => format!("domains/{obs}"),
        Kind::Ip => format!("ip_addresses/{obs}"),
    }
}

/// Requests one lookup costs.
pub fn cost(kind: Kind) -> u32 {
    if kind == Kind::File {
        3
    } else {
        1
    }
}

/// Schema of [`LOOKUP_LOG`] (the `virustotal_data` view has the same columns).
pub fn lookup_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("observable", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("found", DataType::Boolean, false),
        Field::new("sha256", DataType::Utf8, true),
        Field::new("md5", DataType::Utf8, true),
        Field::new("url", DataType::Utf8, true),
        Field::new("domain", DataType::Utf8, true),
        Field::new("ip", DataType::Utf8, true),
        Field::new("names", strings(), true),
        Field::new("type_tags", strings(), true),
        Field::new("type_description", DataType::Utf8, true),
        Field::new("first_submission", ts(), true),
        Field::new("last_submission", ts(), true),
        Field::new("last_analysis", ts(), true),
        Field::new("malicious", DataType::Int64, true),
        Field::new("suspicious", DataType::Int64, true),
        Field::new("harmless", DataType::Int64, true),
        Field::new("undetected", DataType::Int64, true),
        Field::new("reputation", DataType::Int64, true),
        Field::new("threat_label", DataType::Utf8, true),
        Field::new("threat_categories", strings(), true),
        Field::new("threat_families", strings(), true),
        Field::new("sandbox_verdicts", strings(), true),
        Field::new("sigma_hits", strings(), true),
        Field::new("country", DataType::Utf8, true),
        Field::new("asn", DataType::Int64, true),
        Field::new("as_owner", DataType::Utf8, true),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("raw_ref", DataType::Utf8, true),
        Field::new("fetched_at", ts(), false),
    ]))
}

/// Schema of [`TECHNIQUE_LOG`].
pub fn technique_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("observable", DataType::Utf8, false),
        Field::new("technique_id", DataType::Utf8, false),
        Field::new("technique_name", DataType::Utf8, true),
        Field::new("tactic_ids", strings(), true),
        Field::new("sandbox", DataType::Utf8, false),
        Field::new("signature_descriptions", strings(), true),
        Field::new("severity", DataType::Utf8, true),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("fetched_at", ts(), false),
    ]))
}

/// One lookup.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LookupRow {
    pub observable: String,
    pub kind: String,
    pub found: bool,
    pub sha256: Option<String>,
    pub md5: Option<String>,
    pub url: Option<String>,
    pub domain: Option<String>,
    pub ip: Option<String>,
    pub names: Vec<String>,
    pub type_tags: Vec<String>,
    pub type_description: Option<String>,
    pub first_submission: Option<String>,
    pub last_submission: Option<String>,
    pub last_analysis: Option<String>,
    pub malicious: Option<i64>,
    pub suspicious: Option<i64>,
    pub harmless: Option<i64>,
    pub undetected: Option<i64>,
    pub reputation: Option<i64>,
    pub threat_label: Option<String>,
    pub threat_categories: Vec<String>,
    pub threat_families: Vec<String>,
    pub sandbox_verdicts: Vec<String>,
    pub sigma_hits: Vec<String>,
    pub country: Option<String>,
    pub asn: Option<i64>,
    pub as_owner: Option<String>,
    pub batch_id: String,
    pub raw_ref: Option<String>,
    pub fetched_at: String,
}

impl LookupRow {
    /// A row for `obs` before any response: the observable's own column (domain, ip or url) filled.
    pub fn new(kind: Kind, obs: &str, batch: &str, at: &str) -> Self {
        let mut row = LookupRow {
            observable: obs.to_string(),
            kind: kind.as_str().to_string(),
            batch_id: batch.to_string(),
            fetched_at: at.to_string(),
            ..Default::default()
        };
        match kind {
            Kind::Domain => row.domain = Some(obs.to_string()),
            Kind::Ip => row.ip = Some(obs.to_string()),
            Kind::Url => row.url = Some(obs.to_string()),
            Kind::File => {}
        }
        row
    }
}

/// Parser of a file's sandbox endpoint: (body, observable, batch, fetched_at) → technique rows.
pub type SandboxParser = fn(&[u8], &str, &str, &str) -> Result<Vec<TechniqueRow>, String>;

/// The file endpoints that carry ATT&CK techniques, with their parsers.
pub const SANDBOX_ENDPOINTS: [(&str, SandboxParser); 2] = [
    ("behaviour_mitre_trees", parse_mitre_trees),
    ("behaviour_summary", parse_behaviour_summary),
];

/// One sandbox technique.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TechniqueRow {
    pub observable: String,
    pub technique_id: String,
    pub technique_name: Option<String>,
    pub tactic_ids: Vec<String>,
    pub sandbox: String,
    pub signature_descriptions: Vec<String>,
    pub severity: Option<String>,
    pub batch_id: String,
    pub fetched_at: String,
}

fn values_of(v: Option<&Value>) -> Vec<String> {
    // popular_threat_category / popular_threat_name: [{"count": n, "value": "trojan"}]
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.get("value").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Fill a lookup row from a `/files|urls|domains|ip_addresses/{id}` body.
pub fn parse_report(body: &[u8], row: &mut LookupRow) -> Result<(), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let a = v
        .get("data")
        .and_then(|d| d.get("attributes"))
        .and_then(Value::as_object)
        .ok_or("no data.attributes object (is the base URL the VirusTotal v3 API?)")?;
    row.found = true;
    row.sha256 = text(a.get("sha256"));
    row.md5 = text(a.get("md5"));
    row.url = text(a.get("url")).or_else(|| text(a.get("last_final_url")));
    let mut names = string_list(a.get("names"));
    if let Some(m) = text(a.get("meaningful_name")) {
        if !names.contains(&m) {
            names.insert(0, m);
        }
    }
    if let Some(t) = text(a.get("title")) {
        names.push(t);
    }
    names.truncate(50);
    row.names = names;
    let mut tags = string_list(a.get("type_tags"));
    tags.extend(string_list(a.get("tags")));
    tags.dedup();
    row.type_tags = tags;
    row.type_description = text(a.get("type_description"));
    row.first_submission = rfc3339(
        a.get("first_submission_date")
            .or_else(|| a.get("creation_date")),
    );
    row.last_submission = rfc3339(
        a.get("last_submission_date")
            .or_else(|| a.get("last_modification_date")),
    );
    row.last_analysis = rfc3339(a.get("last_analysis_date"));
    let stats = a.get("last_analysis_stats");
    let stat = |k: &str| stats.and_then(|s| s.get(k)).and_then(Value::as_i64);
    row.malicious = stat("malicious");
    row.suspicious = stat("suspicious");
    row.harmless = stat("harmless");
    row.undetected = stat("undetected");
    row.reputation = a.get("reputation").and_then(Value::as_i64);
    let ptc = a.get("popular_threat_classification");
    row.threat_label = ptc.and_then(|p| text(p.get("suggested_threat_label")));
    row.threat_categories = values_of(ptc.and_then(|p| p.get("popular_threat_category")));
    row.threat_families = values_of(ptc.and_then(|p| p.get("popular_threat_name")));
    if let Some(sv) = a.get("sandbox_verdicts").and_then(Value::as_object) {
        for (sandbox, verdict) in sv {
            let cat = verdict
                .get("category")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let names = string_list(verdict.get("malware_names")).join(", ");
            row.sandbox_verdicts.push(if names.is_empty() {
                format!("{sandbox}: {cat}")
            } else {
                format!("{sandbox}: {cat} ({names})")
            });
        }
    }
    if let Some(sig) = a.get("sigma_analysis_results").and_then(Value::as_array) {
        for r in sig {
            if let Some(t) = r.get("rule_title").and_then(Value::as_str) {
                row.sigma_hits.push(t.to_string());
            }
        }
    }
    row.country = text(a.get("country"));
    row.asn = a.get("asn").and_then(Value::as_i64);
    row.as_owner = text(a.get("as_owner"));
    Ok(())
}

/// Techniques from `/files/{id}/behaviour_mitre_trees` (`data.{sandbox}.tactics[].techniques[]`).
pub fn parse_mitre_trees(
    body: &[u8],
    obs: &str,
    batch: &str,
    at: &str,
) -> Result<Vec<TechniqueRow>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let data = v
        .get("data")
        .and_then(Value::as_object)
        .ok_or("no 'data' object")?;
    let mut by: BTreeMap<(String, String), TechniqueRow> = BTreeMap::new();
    for (sandbox, tree) in data {
        for tactic in tree
            .get("tactics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tactic_id = text(tactic.get("id"));
            for t in tactic
                .get("techniques")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = text(t.get("id")) else {
                    continue;
                };
                let row = by
                    .entry((sandbox.clone(), id.clone()))
                    .or_insert_with(|| TechniqueRow {
                        observable: obs.to_string(),
                        technique_id: id,
                        technique_name: text(t.get("name")),
                        tactic_ids: vec![],
                        sandbox: sandbox.clone(),
                        signature_descriptions: vec![],
                        severity: None,
                        batch_id: batch.to_string(),
                        fetched_at: at.to_string(),
                    });
                if let Some(tid) = &tactic_id {
                    if !row.tactic_ids.contains(tid) {
                        row.tactic_ids.push(tid.clone());
                    }
                }
                for s in t
                    .get("signatures")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(d) = text(s.get("description")) {
                        if !row.signature_descriptions.contains(&d) {
                            row.signature_descriptions.push(d);
                        }
                    }
                    row.severity = max_severity(row.severity.take(), text(s.get("severity")));
                }
            }
        }
    }
    Ok(by.into_values().collect())
}

/// Techniques from `/files/{id}/behaviour_summary` (`data.mitre_attack_techniques[]`).
pub fn parse_behaviour_summary(
    body: &[u8],
    obs: &str,
    batch: &str,
    at: &str,
) -> Result<Vec<TechniqueRow>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let data = v
        .get("data")
        .and_then(Value::as_object)
        .ok_or("no 'data' object")?;
    let mut by: BTreeMap<String, TechniqueRow> = BTreeMap::new();
    for t in data
        .get("mitre_attack_techniques")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = text(t.get("id")) else {
            continue;
        };
        let row = by.entry(id.clone()).or_insert_with(|| TechniqueRow {
            observable: obs.to_string(),
            technique_id: id,
            technique_name: None,
            tactic_ids: vec![],
            sandbox: "behaviour_summary".into(),
            signature_descriptions: vec![],
            severity: None,
            batch_id: batch.to_string(),
            fetched_at: at.to_string(),
        });
        if let Some(d) = text(t.get("signature_description")) {
            row.signature_descriptions.push(d);
        }
        row.severity = max_severity(row.severity.take(), text(t.get("severity")));
    }
    Ok(by.into_values().collect())
}

fn max_severity(a: Option<String>, b: Option<String>) -> Option<String> {
    let rank = |s: &Option<String>| {
        let s = s.as_deref().unwrap_or("").to_ascii_uppercase();
        ["INFO", "LOW", "MEDIUM", "HIGH", "CRITICAL"]
            .iter()
            .position(|k| s.ends_with(k))
            .map_or(-1, |p| p as i32)
    };
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}

/// Observables from a file: one per line, or a CSV/JSON-lines whose first field / `observable` /
/// `indicator` holds it; defanged ones (`hxxp://`, `example[.]com`) are refanged. Blank lines and `#` comments are skipped; unusable lines are reported.
pub fn read_iocs(path: &str) -> Result<(Vec<String>, Vec<String>), FeedError> {
    let bytes = std::fs::read(path).map_err(|e| FeedError::Input {
        path: path.to_string(),
        message: format!("cannot read the IOC file: {e}"),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| FeedError::Input {
        path: path.to_string(),
        message: format!(
            "not UTF-8 (first invalid byte at offset {}); save the IOC list as UTF-8 text",
            e.utf8_error().valid_up_to()
        ),
    })?;
    Ok(parse_iocs(&text))
}

/// The observables of an IOC list's text (see [`read_iocs`]): usable ones normalised, and the
/// unusable lines (shortened) for the report.
pub fn parse_iocs(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let cand = if l.starts_with('{') {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| text_field(&v))
                .unwrap_or_default()
        } else {
            // The csv crate, so quoted fields with commas ("a, b",…) stay one field.
            let delimiter = if l.contains('\t') { b'\t' } else { b',' };
            csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .delimiter(delimiter)
                .from_reader(l.as_bytes())
                .records()
                .next()
                .and_then(Result::ok)
                .and_then(|r| r.get(0).map(|f| f.trim().to_string()))
                .unwrap_or_default()
        };
        if let Some((_, normalised)) = classify(&cand) {
            ok.push(normalised);
        } else {
            bad.push(l.chars().take(80).collect());
        }
    }
    (ok, bad)
}

fn text_field(v: &Value) -> Option<String> {
    ["observable", "indicator", "ioc", "value"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
}

/// What a VirusTotal run did.
#[derive(Debug, Default, Clone)]
pub struct VtReport {
    /// Run id.
    pub batch_id: String,
    /// Observables looked up.
    pub looked_up: usize,
    /// Of which VirusTotal did not know.
    pub not_found: usize,
    /// Skipped: fresh in the lake (cache TTL).
    pub cached: usize,
    /// Left for the next run (daily budget).
    pub deferred: usize,
    /// Rejected inputs.
    pub invalid: Vec<String>,
    /// Technique rows stored.
    pub techniques: usize,
    /// Requests sent.
    pub requests: u32,
}

/// Quota settings of a run.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Requests allowed per UTC day.
    pub daily_budget: u32,
    /// Hours a stored lookup stays fresh.
    pub cache_ttl_hours: u32,
}

/// Observables looked up within the TTL (so they are not fetched again).
pub async fn fresh_observables(
    engine: &crate::sql::Engine,
    ttl_hours: u32,
) -> Result<BTreeSet<String>, FeedError> {
    let cutoff = fixed(Utc::now() - chrono::Duration::hours(ttl_hours.min(1_000_000) as i64));
    // The cutoff is our own timestamp, not intel text.
    let r = engine
        .run(&format!(
            "SELECT DISTINCT observable FROM virustotal_lookup_log WHERE fetched_at >= TIMESTAMP '{cutoff}'"
        ))
        .await?;
    let mut out = BTreeSet::new();
    for b in &r[0].batches {
        out.extend(super::column_strings(b, 0).into_iter().flatten());
    }
    Ok(out)
}

/// Indicators of the most recently modified pulses that VirusTotal can look up (enrichment).
pub async fn otx_observables(
    engine: &crate::sql::Engine,
    limit: usize,
) -> Result<Vec<String>, FeedError> {
    let r = engine
        .run(&format!(
            "SELECT i.indicator FROM otx_indicators i JOIN otx_data p ON i.pulse_id = p.pulse_id \
             WHERE i.type IN ('FileHash-MD5', 'FileHash-SHA1', 'FileHash-SHA256', 'domain', 'hostname', 'IPv4', 'IPv6', 'URL') \
             ORDER BY p.modified DESC, i.indicator LIMIT {limit}"
        ))
        .await?;
    let mut out = Vec::new();
    for b in &r[0].batches {
        out.extend(super::column_strings(b, 0).into_iter().flatten());
    }
    Ok(out)
}

/// Look up `observables` (de-duplicated, cache-filtered), within the daily budget. What was fetched
/// before an error is written before the error is returned.
pub async fn ingest(
    lake: &Lake,
    raw: &Location,
    client: &FeedClient,
    observables: &[String],
    quota: Quota,
    progress: super::Progress<'_>,
) -> Result<VtReport, FeedError> {
    let engine = crate::sql::Engine::open(lake).await?;
    let fresh = fresh_observables(&engine, quota.cache_ttl_hours).await?;
    let now = Utc::now();
    let batch = super::new_batch_id(now);
    let date = now.format("%Y-%m-%d").to_string();
    let at = fixed(now);
    let mut state = read_state(lake, "virustotal").await?;
    let mut used: u32 = if state.get("budget_date") == Some(&date) {
        state
            .get("budget_used")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let mut report = VtReport {
        batch_id: batch.clone(),
        ..Default::default()
    };
    let mut todo: BTreeSet<(Kind, String)> = BTreeSet::new();
    for o in observables {
        match classify(o) {
            Some((_, v)) if fresh.contains(&v) => report.cached += 1,
            Some(kv) => {
                todo.insert(kv);
            }
            None => report.invalid.push(o.chars().take(80).collect()),
        }
    }
    let (mut lookups, mut techniques) = (Vec::new(), Vec::new());
    let mut failure = None;
    for (n, (kind, obs)) in todo.iter().enumerate() {
        if used + cost(*kind) > quota.daily_budget {
            report.deferred = todo.len() - n;
            tracing::warn!(
                deferred = report.deferred,
                "VirusTotal daily budget reached; the rest waits for the next run"
            );
            break;
        }
        let before = client.requests();
        let r = lookup(client, raw, &date, &batch, &at, n, *kind, obs).await;
        used += client.requests() - before;
        match r {
            Ok((row, techs)) => {
                report.looked_up += 1;
                progress(&format!(
                    "{}/{} looked up, {used} request(s) today",
                    n + 1,
                    todo.len()
                ));
                report.not_found += usize::from(!row.found);
                report.techniques += techs.len();
                lookups.push(row);
                techniques.extend(techs);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    report.requests = client.requests();
    store(lake, &date, &batch, &lookups, &techniques).await?;
    state.insert("budget_date".into(), date.clone());
    state.insert("budget_used".into(), used.to_string());
    state.insert("last_batch".into(), batch);
    write_state(lake, "virustotal", &state).await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Append a run's lookups and sandbox techniques to the log tables (techniques first, so a lookup row
/// never lacks its techniques).
pub async fn store(
    lake: &Lake,
    date: &str,
    batch: &str,
    lookups: &[LookupRow],
    techniques: &[TechniqueRow],
) -> Result<(), FeedError> {
    let part = [("ingest_date", date)];
    append(
        lake,
        TECHNIQUE_LOG,
        &technique_schema(),
        &part,
        batch,
        techniques,
    )
    .await?;
    append(lake, LOOKUP_LOG, &lookup_schema(), &part, batch, lookups).await
}

#[allow(clippy::too_many_arguments)]
async fn lookup(
    client: &FeedClient,
    raw: &Location,
    date: &str,
    batch: &str,
    at: &str,
    n: usize,
    kind: Kind,
    obs: &str,
) -> Result<(LookupRow, Vec<TechniqueRow>), FeedError> {
    let mut row = LookupRow::new(kind, obs, batch, at);
    let path = report_path(kind, obs);
    let url = client.url(&path)?;
    let malformed = |url: &url::Url, raw_ref: &str, message: String| FeedError::Malformed {
        service: "VirusTotal",
        url: url.to_string(),
        message: format!("{message} (kept as {raw_ref})"),
    };
    let body = match client.get(&url).await? {
        Fetched::NotFound => return Ok((row, vec![])),
        Fetched::Body(b) => b,
    };
    let raw_ref = keep_raw(
        raw,
        "virustotal",
        date,
        &format!("{batch}-{n:05}-report"),
        &body,
    )
    .await?;
    parse_report(&body, &mut row).map_err(|m| malformed(&url, &raw_ref, m))?;
    row.raw_ref = Some(raw_ref);
    let mut techniques = Vec::new();
    if kind == Kind::File {
        for (endpoint, parse) in SANDBOX_ENDPOINTS {
            let url = client.url(&format!("{path}/{endpoint}"))?;
            let Fetched::Body(body) = client.get(&url).await? else {
                continue;
            };
            let raw_ref = keep_raw(
                raw,
                "virustotal",
                date,
                &format!("{batch}-{n:05}-{endpoint}"),
                &body,
            )
            .await?;
            let rows = parse(&body, obs, batch, at).map_err(|m| malformed(&url, &raw_ref, m))?;
            techniques.extend(rows);
        }
    }
    Ok((row, techniques))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defanged_observables_are_refanged() {
        assert_eq!(
            classify("hxxp://evil[.]example/path").unwrap(),
            (Kind::Url, "http://evil.example/path".into())
        );
        assert_eq!(
            classify("hxxps[://]evil(.)example").unwrap(),
            (Kind::Url, "https://evil.example".into())
        );
        assert_eq!(
            classify("Example[.]COM").unwrap(),
            (Kind::Domain, "example.com".into())
        );
        assert_eq!(
            classify("10.0.0[.]1").unwrap(),
            (Kind::Ip, "10.0.0.1".into())
        );
        assert_eq!(
            classify("bad[dot]example[dot]org").unwrap(),
            (Kind::Domain, "bad.example.org".into())
        );
    }

    #[test]
    fn refanging_is_idempotent() {
        assert_eq!(
            classify("hxxp://evil[[.]]example[.]com/x").unwrap(),
            (Kind::Url, "http://evil.example.com/x".into())
        );
        // The fuzzer's find (tests/fuzz/regressions): every accepted observable classifies to itself.
        let text = String::from_utf8_lossy(include_bytes!(
            "../../tests/fuzz/regressions/ioc_lines-refang-not-idempotent"
        ));
        let (ok, _) = parse_iocs(&text);
        assert!(!ok.is_empty());
        for o in ok {
            assert_eq!(classify(&o).unwrap().1, o);
        }
    }

    #[test]
    fn ioc_files_keep_quoted_commas_and_refang() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("iocs.csv");
        std::fs::write(
            &p,
            "# exported\n\"hxxp://evil[.]example/a,b\",url,\"seen, twice\"\nexample[.]org,domain\n\"1.2.3.4\"\t ip\n",
        )
        .unwrap();
        let (ok, bad) = read_iocs(p.to_str().unwrap()).unwrap();
        assert_eq!(
            ok,
            vec!["http://evil.example/a,b", "example.org", "1.2.3.4"],
            "{bad:?}"
        );
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn observables_are_classified() {
        assert_eq!(
            classify("177ADD288B289D43236D2DBA33E65956").unwrap().0,
            Kind::File
        );
        assert_eq!(classify("1.1.1.1").unwrap(), (Kind::Ip, "1.1.1.1".into()));
        assert_eq!(classify("http://example.com/").unwrap().0, Kind::Url);
        assert_eq!(
            classify("GitHub.com.").unwrap(),
            (Kind::Domain, "github.com".into())
        );
        for bad in [
            "",
            "not a domain",
            "javascript://x",
            "a..b",
            "'; DROP TABLE x; --",
        ] {
            assert!(classify(bad).is_none(), "{bad}");
        }
        assert_eq!(
            report_path(Kind::Url, "http://example.com/"),
            "urls/aHR0cDovL2V4YW1wbGUuY29tLw"
        );
    }

    #[test]
    fn severity_keeps_the_highest() {
        let s = |x: &str| Some(x.to_string());
        assert_eq!(max_severity(s("INFO"), s("HIGH")), s("HIGH"));
        assert_eq!(
            max_severity(s("IMPACT_SEVERITY_HIGH"), s("LOW")),
            s("IMPACT_SEVERITY_HIGH")
        );
    }
}
