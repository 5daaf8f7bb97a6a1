//! STIX 2.1 objects of mapped intel — a `report` per current threat item, the `attack-pattern`s it
//! maps to (MITRE's own objects when the lake has the technique), `relationship`s carrying score and
//! method — each dated when it was added, for the report bundle and the TAXII collections.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::ReportError;
use crate::sql::Engine;

/// Namespace of threatlake's deterministic STIX ids (same item → same id across runs).
const NS: Uuid = Uuid::from_u128(0x6f1c_1b5e_8a0d_4c1e_9f3a_72b4_5d6e_0a11);

fn sid(kind: &str, key: &str) -> String {
    format!(
        "{kind}--{}",
        Uuid::new_v5(&NS, format!("{kind}|{key}").as_bytes())
    )
}

/// The bundle for every mapped current item: the objects of [`mapped_objects`], oldest first.
pub async fn bundle(engine: &Engine) -> Result<Value, ReportError> {
    let mut objects = mapped_objects(engine).await?;
    objects.sort_by(by_date_added);
    Ok(json!({
        "type": "bundle",
        "id": format!("bundle--{}", Uuid::new_v4()),
        "objects": objects.into_iter().map(|d| d.object).collect::<Vec<_>>()
    }))
}

/// A STIX object with the time it was added to a TAXII collection (stable across requests, so
/// `added_after` paging works).
#[derive(Debug, Clone)]
pub struct Dated {
    /// When it was added (its ATT&CK `modified`, or when the mapping was made).
    pub added: DateTime<Utc>,
    /// The object.
    pub object: Value,
}

/// Order of a TAXII collection and of the bundle: date added, then id.
pub fn by_date_added(a: &Dated, b: &Dated) -> std::cmp::Ordering {
    (a.added, a.object["id"].as_str()).cmp(&(b.added, b.object["id"].as_str()))
}

/// A timestamp as Arrow or a feed wrote it (any RFC 3339 variant `feeds::rfc3339` reads).
fn parse_ts(s: Option<&str>) -> Option<DateTime<Utc>> {
    let s = crate::feeds::rfc3339(Some(&Value::String(s?.to_string())))?;
    DateTime::parse_from_rfc3339(&s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

fn fmt_ts(d: DateTime<Utc>) -> String {
    d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The `attack-pattern` objects of the lake's current ATT&CK releases (MITRE's ids and dates), by
/// ATT&CK id.
pub async fn attack_patterns(engine: &Engine) -> Result<BTreeMap<String, Dated>, ReportError> {
    let r = engine
        .run(
            "SELECT stix_id, technique_id, name, description, array_to_string(tactics, ','), \
                    CAST(created AS VARCHAR), CAST(modified AS VARCHAR), domain, url, \
                    CAST(is_subtechnique AS VARCHAR), version, array_to_string(platforms, ',') \
             FROM attack_techniques_current ORDER BY domain DESC, technique_id",
        )
        .await
        .map_err(|source| ReportError::Sql {
            name: "attack-patterns".into(),
            source,
        })?;
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let mut out = BTreeMap::new();
    for b in &r[0].batches {
        for row in crate::feeds::rows_of(b) {
            let get = |c: usize| row[c].clone();
            let (Some(id), Some(tid)) = (get(0), get(1)) else {
                continue;
            };
            let created = parse_ts(get(5).as_deref()).unwrap_or(epoch);
            let modified = parse_ts(get(6).as_deref()).unwrap_or(created);
            let domain = get(7).unwrap_or_default();
            let chain = match domain.as_str() {
                "mobile" => "mitre-mobile-attack",
                "ics" => "mitre-ics-attack",
                _ => "mitre-attack",
            };
            let url = get(8).unwrap_or_else(|| {
                format!(
                    "https://attack.mitre.org/techniques/{}/",
                    tid.replace('.', "/")
                )
            });
            let mut o = json!({
                "type": "attack-pattern", "spec_version": "2.1", "id": id,
                "created": fmt_ts(created), "modified": fmt_ts(modified),
                "name": get(2).unwrap_or_else(|| tid.clone()),
                "external_references": [{"source_name": "mitre-attack", "external_id": tid, "url": url}],
                "x_mitre_domains": [format!("{domain}-attack")],
                "x_mitre_is_subtechnique": get(9).as_deref() == Some("true"),
            });
            if let Some(d) = get(3).filter(|d| !d.is_empty()) {
                o["description"] = json!(d);
            }
            let phases: Vec<Value> = get(4)
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|p| json!({"kill_chain_name": chain, "phase_name": p}))
                .collect();
            if !phases.is_empty() {
                o["kill_chain_phases"] = json!(phases);
            }
            let platforms: Vec<&str> = row[11]
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .collect();
            if !platforms.is_empty() {
                o["x_mitre_platforms"] = json!(platforms);
            }
            if let Some(v) = get(10) {
                o["x_mitre_version"] = json!(v);
            }
            // The mapping domain's technique is listed last (ORDER BY domain DESC puts enterprise
            // last), so it wins where two domains share an id.
            out.insert(
                tid,
                Dated {
                    added: modified,
                    object: o,
                },
            );
        }
    }
    Ok(out)
}

/// Mapped intel as dated STIX objects: a `report` per current item, a `relationship` per mapping
/// (dated when it was mapped) and the `attack-pattern`s they point to, plus threatlake's identity.
pub async fn mapped_objects(engine: &Engine) -> Result<Vec<Dated>, ReportError> {
    let err = |source| ReportError::Sql {
        name: "mapped-intel".into(),
        source,
    };
    let r = engine
        .run(
            "SELECT t.item_id, t.item_version, t.source, t.title, t.text, CAST(t.observed_at AS VARCHAR), \
                    m.technique_id, max(m.technique_name), max(m.score), m.method, CAST(min(m.mapped_at) AS VARCHAR) \
             FROM threat_intelligence_data t \
             JOIN mapped_threat_data m ON m.item_id = t.item_id AND m.item_version = t.item_version \
             GROUP BY t.item_id, t.item_version, t.source, t.title, t.text, t.observed_at, m.technique_id, m.method \
             ORDER BY 1, 7, 10",
        )
        .await
        .map_err(err)?;
    let patterns = attack_patterns(engine).await?;
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let identity = sid("identity", "threatlake");
    let mut out = vec![Dated {
        added: epoch,
        object: json!({
            "type": "identity", "spec_version": "2.1", "id": identity,
            "created": fmt_ts(epoch), "modified": fmt_ts(epoch),
            "name": "threatlake", "identity_class": "system"
        }),
    }];
    let mut used: BTreeMap<String, Dated> = BTreeMap::new();
    let mut reports: BTreeMap<String, Dated> = BTreeMap::new();
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for b in &r[0].batches {
        for row in crate::feeds::rows_of(b) {
            let get = |c: usize| row[c].clone();
            let (Some(item), Some(ver), Some(tid)) = (get(0), get(1), get(6)) else {
                continue;
            };
            let mapped = parse_ts(get(10).as_deref()).unwrap_or(epoch);
            let pattern = match patterns.get(&tid) {
                Some(p) => p.object.clone(),
                None => json!({
                    "type": "attack-pattern", "spec_version": "2.1", "id": sid("attack-pattern", &tid),
                    "created": fmt_ts(mapped), "modified": fmt_ts(mapped),
                    "name": get(7).unwrap_or_else(|| tid.clone()),
                    "external_references": [{"source_name": "mitre-attack", "external_id": tid,
                        "url": format!("https://attack.mitre.org/techniques/{}/", tid.replace('.', "/"))}]
                }),
            };
            let pattern_id = pattern["id"].as_str().unwrap_or_default().to_string();
            let e = used.entry(pattern_id.clone()).or_insert(Dated {
                added: mapped,
                object: pattern,
            });
            e.added = e.added.min(mapped);
            let report_id = sid("report", &format!("{item}|{ver}"));
            let when = parse_ts(get(5).as_deref()).unwrap_or(mapped);
            let rep = reports.entry(report_id.clone()).or_insert_with(|| Dated {
                added: mapped,
                object: json!({
                    "type": "report", "spec_version": "2.1", "id": report_id,
                    "created": fmt_ts(when), "modified": fmt_ts(when), "published": fmt_ts(when),
                    "created_by_ref": identity,
                    "name": get(3).unwrap_or_else(|| item.clone()),
                    "description": get(4).unwrap_or_default(),
                    "report_types": ["threat-report"],
                    "external_references": [{"source_name": get(2).unwrap_or_default(), "external_id": item}]
                }),
            });
            rep.added = rep.added.min(mapped);
            let method = get(9).unwrap_or_default();
            let score: f64 = get(8).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let rel_id = sid("relationship", &format!("{item}|{ver}|{tid}|{method}"));
            out.push(Dated {
                added: mapped,
                object: json!({
                    "type": "relationship", "spec_version": "2.1", "id": rel_id,
                    "created": fmt_ts(mapped), "modified": fmt_ts(mapped), "created_by_ref": identity,
                    "relationship_type": "related-to", "source_ref": report_id, "target_ref": pattern_id,
                    "confidence": (score * 100.0).round().clamp(0.0, 100.0) as i64,
                    "description": format!("{method} mapping, score {score:.3}"),
                    "x_threatlake_score": score, "x_threatlake_method": method
                }),
            });
            let r = refs.entry(report_id).or_default();
            for id in [pattern_id, rel_id] {
                if !r.contains(&id) {
                    r.push(id);
                }
            }
        }
    }
    for (id, mut rep) in reports {
        rep.object["object_refs"] = json!(refs.remove(&id).unwrap_or_default());
        out.push(rep);
    }
    out.extend(used.into_values());
    Ok(out)
}
