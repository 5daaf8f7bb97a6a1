//! What a push sends: one mapping (threat item × technique) with the item's facts, its observables
//! and the ATT&CK names, read from the lake with every filter value bound as a query parameter.

use std::collections::{BTreeMap, HashMap};

use arrow::array::RecordBatch;
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::settings::TargetSettings;
use super::IntegrationError;
use crate::feeds::column_strings;
use crate::sql::Engine;

/// Namespace of delivery ids: the same mapping has the same id for every target and every push.
const NS: Uuid = Uuid::from_u128(0x2b7e_9c41_5d3a_4f08_8e6b_1c9d_0a7f_3e52);

/// The idempotency key of one mapping.
pub fn delivery_id(item_id: &str, item_version: &str, technique_id: &str, method: &str) -> String {
    Uuid::new_v5(
        &NS,
        format!("{item_id}\u{1f}{item_version}\u{1f}{technique_id}\u{1f}{method}").as_bytes(),
    )
    .to_string()
}

/// An observable of a threat item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Observable {
    /// ip, domain, url, email, md5, sha1, sha256, cve, other.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The value as the source gave it.
    pub value: String,
}

/// An ATT&CK tactic.
#[derive(Debug, Clone, Serialize)]
pub struct Tactic {
    /// TA0002.
    pub id: Option<String>,
    /// execution.
    pub shortname: String,
    /// Execution.
    pub name: Option<String>,
}

/// One mapping to deliver.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Idempotency key.
    pub delivery_id: String,
    /// Threat item (`otx:<pulse>`, `vt:<kind>:<observable>`).
    pub item_id: String,
    /// Its version.
    pub item_version: String,
    /// otx, virustotal.
    pub source: String,
    /// pulse, file, ip, domain, url.
    pub kind: Option<String>,
    /// Title.
    pub title: Option<String>,
    /// The text that was mapped (attacker-controlled).
    pub text: Option<String>,
    /// When the source observed it.
    pub observed_at: Option<String>,
    /// Targeted country.
    pub country: Option<String>,
    /// Malware family or adversary.
    pub family: Option<String>,
    /// Source tags.
    pub tags: Vec<String>,
    /// ATT&CK technique (T1059.001).
    pub technique_id: String,
    /// Its name.
    pub technique_name: Option<String>,
    /// Parent technique of a sub-technique: (id, name).
    pub parent: Option<(String, Option<String>)>,
    /// Tactics of the technique.
    pub tactics: Vec<Tactic>,
    /// Calibrated score, 0-1.
    pub score: f64,
    /// model or source.
    pub method: String,
    /// Model that mapped it.
    pub model_version: Option<String>,
    /// When it was mapped (RFC 3339).
    pub mapped_at: String,
    /// Observables (at most `max_observables`).
    pub observables: Vec<Observable>,
    /// Failed deliveries so far.
    #[serde(skip)]
    pub attempts: i64,
}

impl Record {
    /// The ATT&CK page of the technique.
    pub fn technique_url(&self) -> String {
        format!(
            "https://attack.mitre.org/techniques/{}/",
            self.technique_id.replace('.', "/")
        )
    }

    /// The event every JSON receiver gets (webhook, Splunk): stable field names.
    pub fn event(&self) -> Value {
        json!({
            "id": self.delivery_id,
            "item_id": self.item_id,
            "item_version": self.item_version,
            "source": self.source,
            "kind": self.kind,
            "title": self.title,
            "description": self.text,
            "observed_at": self.observed_at,
            "country": self.country,
            "family": self.family,
            "tags": self.tags,
            "technique_id": self.technique_id,
            "technique_name": self.technique_name,
            "technique_url": self.technique_url(),
            "tactic_ids": self.tactics.iter().filter_map(|t| t.id.clone()).collect::<Vec<_>>(),
            "tactics": self.tactics.iter().map(|t| t.shortname.clone()).collect::<Vec<_>>(),
            "score": self.score,
            "method": self.method,
            "model_version": self.model_version,
            "mapped_at": self.mapped_at,
            "observables": self.observables,
        })
    }

    /// SHA-256 of the event, recorded in the outbox beside each state.
    pub fn payload_hash(&self) -> String {
        let body = serde_json::to_vec(&self.event()).unwrap_or_default();
        format!("{:x}", Sha256::digest(body))
    }

    /// Score as a 0-100 integer (confidence fields).
    pub fn confidence(&self) -> i64 {
        (self.score * 100.0).round().clamp(0.0, 100.0) as i64
    }
}

/// ATT&CK names of the lake's current release (the mapping domain first).
#[derive(Debug, Default)]
pub struct Names {
    techniques: HashMap<String, String>,
    tactics: HashMap<String, (String, String)>,
}

impl Names {
    /// Read them.
    pub async fn load(engine: &Engine, domain: &str) -> Result<Self, IntegrationError> {
        let mut names = Names::default();
        // The mapping domain sorts last, so its names win where domains share an id or shortname.
        let sql = "SELECT technique_id, name, domain = $1 AS mine FROM attack_techniques_current ORDER BY mine";
        for b in collect(engine, sql, vec![ScalarValue::from(domain)]).await? {
            let (ids, ns) = (column_strings(&b, 0), column_strings(&b, 1));
            for (id, n) in ids.into_iter().zip(ns) {
                if let (Some(id), Some(n)) = (id, n) {
                    names.techniques.insert(id, n);
                }
            }
        }
        let sql = "SELECT shortname, tactic_id, name, domain = $1 AS mine FROM attack_tactics_current ORDER BY mine";
        for b in collect(engine, sql, vec![ScalarValue::from(domain)]).await? {
            let (s, i, n) = (
                column_strings(&b, 0),
                column_strings(&b, 1),
                column_strings(&b, 2),
            );
            for ((s, i), n) in s.into_iter().zip(i).zip(n) {
                if let (Some(s), Some(i), Some(n)) = (s, i, n) {
                    names.tactics.insert(s, (i, n));
                }
            }
        }
        Ok(names)
    }

    fn tactic(&self, shortname: &str) -> Tactic {
        let known = self.tactics.get(shortname);
        Tactic {
            id: known.map(|k| k.0.clone()),
            shortname: shortname.to_string(),
            name: known.map(|k| k.1.clone()),
        }
    }

    /// Does a tactic filter entry (shortname or TA id) name this shortname?
    fn tactic_matches(&self, filter: &str, shortname: &str) -> bool {
        filter.eq_ignore_ascii_case(shortname)
            || self
                .tactics
                .get(shortname)
                .is_some_and(|(id, _)| id.eq_ignore_ascii_case(filter))
    }
}

/// Run a parameterised query and collect it.
pub async fn collect(
    engine: &Engine,
    sql: &str,
    params: Vec<ScalarValue>,
) -> Result<Vec<RecordBatch>, IntegrationError> {
    let df = engine.ctx.sql(sql).await?;
    let df = if params.is_empty() {
        df
    } else {
        df.with_param_values(params)?
    };
    Ok(df.collect().await?)
}

/// The mapping key columns of a candidate: the target's filters decide, in Rust, on these.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Key.
    pub delivery_id: String,
    /// Item.
    pub item_id: String,
    /// Version.
    pub item_version: String,
    /// Technique.
    pub technique_id: String,
    /// Method.
    pub method: String,
}

/// Does the target want this mapping?
pub fn selected(
    t: &TargetSettings,
    names: &Names,
    source: &str,
    technique: &str,
    tactics: &[String],
    score: f64,
    method: &str,
) -> bool {
    score >= t.min_score
        && (t.sources.is_empty() || t.sources.iter().any(|s| s.eq_ignore_ascii_case(source)))
        && t.method.is_none_or(|m| m.as_str() == method)
        && (t.techniques.is_empty()
            || t.techniques.iter().any(|f| {
                technique.eq_ignore_ascii_case(f)
                    || technique
                        .to_ascii_uppercase()
                        .starts_with(&format!("{}.", f.to_ascii_uppercase()))
            }))
        && (t.tactics.is_empty()
            || t.tactics
                .iter()
                .any(|f| tactics.iter().any(|s| names.tactic_matches(f, s))))
}

/// Current mappings of the lake not yet in the target's outbox that its filters select (mapped at
/// or after `since` when given).
pub async fn candidates(
    engine: &Engine,
    t: &TargetSettings,
    names: &Names,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Vec<Candidate>, IntegrationError> {
    let sql = "SELECT m.item_id, m.item_version, m.technique_id, m.method, m.source, m.score, \
                      array_to_string(m.tactics, ',') \
               FROM mapped_threat_data m \
               JOIN threat_intelligence_data t ON t.item_id = m.item_id AND t.item_version = m.item_version \
               WHERE m.mapped_at >= $2 \
                 AND NOT EXISTS (SELECT 1 FROM integration_outbox_log o \
                                 WHERE o.target = $1 AND o.item_id = m.item_id AND o.item_version = m.item_version \
                                   AND o.technique_id = m.technique_id AND o.method = m.method) \
               ORDER BY m.item_id, m.item_version, m.technique_id, m.method";
    let since = since.map_or(i64::MIN, |s| s.timestamp_micros());
    let params = vec![
        ScalarValue::from(t.name.as_str()),
        ScalarValue::TimestampMicrosecond(Some(since), Some("UTC".into())),
    ];
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    for b in collect(engine, sql, params).await? {
        for row in crate::feeds::rows_of(&b) {
            let get = |c: usize| row[c].clone().unwrap_or_default();
            let score: f64 = get(5).parse().unwrap_or(0.0);
            let tactics: Vec<String> = get(6)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if !selected(t, names, &get(4), &get(2), &tactics, score, &get(3)) {
                continue;
            }
            let id = delivery_id(&get(0), &get(1), &get(2), &get(3));
            // A mapping written twice (a re-run after a crash) is queued once.
            if last.as_deref() == Some(id.as_str()) {
                continue;
            }
            last = Some(id.clone());
            out.push(Candidate {
                delivery_id: id,
                item_id: get(0),
                item_version: get(1),
                technique_id: get(2),
                method: get(3),
            });
        }
    }
    Ok(out)
}

/// A row due for delivery: the record, or only its key when the item changed since it was queued.
#[derive(Debug)]
pub enum Due {
    /// Deliver it.
    Record(Box<Record>),
    /// The item's queued version is no longer current.
    Superseded(Candidate, i64),
}

/// The target's due rows (pending, or failed and past their back-off) with everything a receiver
/// needs, in item order.
pub async fn due(
    engine: &Engine,
    t: &TargetSettings,
    names: &Names,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Due>, IntegrationError> {
    let sql = "SELECT d.delivery_id, d.item_id, d.item_version, d.technique_id, d.method, d.attempts, \
                      t.item_id IS NOT NULL, m.source, t.kind, t.title, t.text, CAST(t.observed_at AS VARCHAR), \
                      t.country, t.family, array_to_string(t.tags, '\u{1f}'), m.technique_name, \
                      array_to_string(m.tactics, ','), m.score, m.model_version, CAST(m.mapped_at AS VARCHAR) \
               FROM (SELECT * FROM integration_outbox WHERE target = $1 AND status IN ('pending', 'failed') \
                       AND (next_attempt_at IS NULL OR next_attempt_at <= $2)) d \
               LEFT JOIN threat_intelligence_data t ON t.item_id = d.item_id AND t.item_version = d.item_version \
               LEFT JOIN (SELECT item_id, item_version, technique_id, method, first_value(source) AS source, \
                                 first_value(technique_name) AS technique_name, first_value(tactics) AS tactics, \
                                 max(score) AS score, first_value(model_version) AS model_version, \
                                 min(mapped_at) AS mapped_at \
                          FROM mapped_threat_data GROUP BY 1, 2, 3, 4) m \
                 ON m.item_id = d.item_id AND m.item_version = d.item_version \
                AND m.technique_id = d.technique_id AND m.method = d.method \
               ORDER BY d.item_id, d.item_version, d.technique_id, d.method";
    let params = vec![
        ScalarValue::from(t.name.as_str()),
        ScalarValue::TimestampMicrosecond(Some(now.timestamp_micros()), Some("UTC".into())),
    ];
    let mut out = Vec::new();
    for b in collect(engine, sql, params).await? {
        for row in crate::feeds::rows_of(&b) {
            let opt = |c: usize| row[c].clone().filter(|s| !s.is_empty());
            let get = |c: usize| row[c].clone().unwrap_or_default();
            let attempts: i64 = get(5).parse().unwrap_or(0);
            let current = get(6) == "true" && row[7].is_some();
            if !current {
                out.push(Due::Superseded(
                    Candidate {
                        delivery_id: get(0),
                        item_id: get(1),
                        item_version: get(2),
                        technique_id: get(3),
                        method: get(4),
                    },
                    attempts,
                ));
                continue;
            }
            let technique_id = get(3);
            let parent = technique_id
                .split_once('.')
                .map(|(p, _)| (p.to_string(), names.techniques.get(p).cloned()));
            out.push(Due::Record(Box::new(Record {
                delivery_id: get(0),
                item_id: get(1),
                item_version: get(2),
                source: get(7),
                kind: opt(8),
                title: opt(9),
                text: opt(10),
                observed_at: opt(11).map(|s| rfc3339(&s)),
                country: opt(12),
                family: opt(13),
                tags: get(14)
                    .split('\u{1f}')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                technique_name: opt(15).or_else(|| names.techniques.get(&technique_id).cloned()),
                technique_id,
                parent,
                tactics: get(16)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| names.tactic(s))
                    .collect(),
                score: get(17).parse().unwrap_or(0.0),
                method: get(4),
                model_version: opt(18),
                mapped_at: rfc3339(&get(19)),
                observables: vec![],
                attempts,
            })));
        }
    }
    Ok(out)
}

/// `2026-01-02T03:04:05.123456Z` from Arrow's `2026-01-02T03:04:05.123456Z` or `… 03:04:05+00:00`.
fn rfc3339(s: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .map(|d| {
            d.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })
        .unwrap_or_else(|_| s.to_string())
}

/// The observables of threat items (OTX indicators of a pulse; a VirusTotal item is its own
/// observable), at most `max` per item, by item id.
pub async fn observables(
    engine: &Engine,
    item_ids: &[&str],
    max: usize,
) -> Result<BTreeMap<String, Vec<Observable>>, IntegrationError> {
    let mut out: BTreeMap<String, Vec<Observable>> = BTreeMap::new();
    if max == 0 {
        return Ok(out);
    }
    let pulses: std::collections::BTreeSet<&str> = item_ids
        .iter()
        .filter_map(|i| i.strip_prefix("otx:"))
        .collect();
    // Bounded IN lists: one query per few thousand pulses.
    let pulses: Vec<&str> = pulses.into_iter().collect();
    for part in pulses.chunks(5000) {
        let df = engine
            .ctx
            .table("otx_indicators")
            .await?
            .filter(col("pulse_id").in_list(part.iter().map(|p| lit(*p)).collect(), false))?
            .select_columns(&["pulse_id", "type", "indicator"])?
            .sort(vec![
                col("pulse_id").sort(true, false),
                col("indicator").sort(true, false),
            ])?;
        for b in df.collect().await? {
            let (p, k, v) = (
                column_strings(&b, 0),
                column_strings(&b, 1),
                column_strings(&b, 2),
            );
            for ((p, k), v) in p.into_iter().zip(k).zip(v) {
                let (Some(p), Some(v)) = (p, v) else { continue };
                let list = out.entry(format!("otx:{p}")).or_default();
                if list.len() < max {
                    list.push(Observable {
                        kind: otx_kind(k.as_deref().unwrap_or("")),
                        value: v,
                    });
                }
            }
        }
    }
    for id in item_ids {
        if let Some((kind, value)) = id.strip_prefix("vt:").and_then(|r| r.split_once(':')) {
            out.insert(
                id.to_string(),
                vec![Observable {
                    kind: vt_kind(kind, value),
                    value: value.to_string(),
                }],
            );
        }
    }
    Ok(out)
}

/// Fill in the observables of `records`.
pub async fn attach_observables(
    engine: &Engine,
    records: &mut [Record],
    max: usize,
) -> Result<(), IntegrationError> {
    let ids: std::collections::BTreeSet<String> =
        records.iter().map(|r| r.item_id.clone()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let found = observables(engine, &ids, max).await?;
    for r in records.iter_mut() {
        r.observables = found.get(&r.item_id).cloned().unwrap_or_default();
    }
    Ok(())
}

fn otx_kind(t: &str) -> &'static str {
    match t {
        "IPv4" | "IPv6" => "ip",
        "domain" | "hostname" => "domain",
        "URL" | "URI" => "url",
        "email" => "email",
        "FileHash-MD5" => "md5",
        "FileHash-SHA1" => "sha1",
        "FileHash-SHA256" => "sha256",
        "CVE" => "cve",
        _ => "other",
    }
}

fn vt_kind(kind: &str, value: &str) -> &'static str {
    match kind {
        "ip" | "ip_address" => "ip",
        "domain" => "domain",
        "url" => "url",
        "file" => match value.len() {
            32 => "md5",
            40 => "sha1",
            _ => "sha256",
        },
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(yaml: &str) -> TargetSettings {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn filters_select_by_score_source_method_technique_family_and_tactic() {
        let mut names = Names::default();
        names
            .tactics
            .insert("execution".into(), ("TA0002".into(), "Execution".into()));
        let t = target(
            "{name: t, kind: elastic, url: 'http://h', min_score: 0.5, sources: [otx], method: model, techniques: [T1059], tactics: [TA0002]}",
        );
        let ex = ["execution".to_string()];
        assert!(selected(&t, &names, "otx", "T1059.001", &ex, 0.6, "model"));
        assert!(selected(&t, &names, "otx", "T1059", &ex, 0.5, "model"));
        assert!(!selected(
            &t,
            &names,
            "otx",
            "T1059.001",
            &ex,
            0.49,
            "model"
        ));
        assert!(!selected(
            &t,
            &names,
            "virustotal",
            "T1059",
            &ex,
            0.9,
            "model"
        ));
        assert!(!selected(&t, &names, "otx", "T1059", &ex, 0.9, "source"));
        assert!(!selected(&t, &names, "otx", "T10590", &ex, 0.9, "model"));
        assert!(!selected(
            &t,
            &names,
            "otx",
            "T1059",
            &["persistence".into()],
            0.9,
            "model"
        ));
        let all = target("{name: t, kind: elastic, url: 'http://h'}");
        assert!(selected(
            &all,
            &names,
            "virustotal",
            "T1003",
            &[],
            0.0,
            "source"
        ));
        let by_name = target("{name: t, kind: elastic, url: 'http://h', tactics: [Execution]}");
        assert!(selected(
            &by_name, &names, "otx", "T1059", &ex, 0.1, "model"
        ));
    }

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let a = delivery_id("otx:1", "v1", "T1059", "model");
        assert_eq!(a, delivery_id("otx:1", "v1", "T1059", "model"));
        assert_ne!(a, delivery_id("otx:1", "v2", "T1059", "model"));
        assert_ne!(a, delivery_id("otx:1", "v1", "T1059", "source"));
        // The separator keeps "a|b" + "c" apart from "a" + "b|c".
        assert_ne!(
            delivery_id("otx:1", "v1T", "1059", "model"),
            delivery_id("otx:1", "v1", "T1059", "model")
        );
    }
}
