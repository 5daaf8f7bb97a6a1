//! STIX 2.1 bundle of mapped intel: a `report` per current threat item, the `attack-pattern` objects it
//! maps to (MITRE's own STIX ids when the lake has the technique, ATT&CK ids as external references),
//! and `relationship` objects carrying score and method.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::ReportError;
use crate::feeds::column_strings;
use crate::sql::Engine;

/// Namespace of threatlake's deterministic STIX ids (same item → same id across runs).
const NS: Uuid = Uuid::from_u128(0x6f1c_1b5e_8a0d_4c1e_9f3a_72b4_5d6e_0a11);

fn sid(kind: &str, key: &str) -> String {
    format!(
        "{kind}--{}",
        Uuid::new_v5(&NS, format!("{kind}|{key}").as_bytes())
    )
}

fn stamp(s: Option<&str>, fallback: DateTime<Utc>) -> String {
    s.and_then(|s| crate::feeds::rfc3339(Some(&Value::String(s.to_string()))))
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|d| d.with_timezone(&Utc))
        .unwrap_or(fallback)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The bundle for every mapped current item.
pub async fn bundle(engine: &Engine) -> Result<Value, ReportError> {
    let err = |source| ReportError::Sql {
        name: "stix".into(),
        source,
    };
    let r = engine
        .run(
            "SELECT t.item_id, t.item_version, t.source, t.title, t.text, CAST(t.observed_at AS VARCHAR), \
                    m.technique_id, m.technique_name, CAST(m.score AS VARCHAR), m.method, a.stix_id \
             FROM threat_intelligence_data t \
             JOIN mapped_threat_data m ON m.item_id = t.item_id AND m.item_version = t.item_version \
             LEFT JOIN (SELECT technique_id, max(stix_id) AS stix_id FROM attack_techniques_current GROUP BY 1) a \
               ON a.technique_id = m.technique_id \
             ORDER BY t.item_id, m.technique_id, m.method",
        )
        .await
        .map_err(err)?;
    let now = Utc::now();
    let created = now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let identity = sid("identity", "threatlake");
    let mut objects: Vec<Value> = vec![json!({
        "type": "identity", "spec_version": "2.1", "id": identity, "created": created, "modified": created,
        "name": "threatlake", "identity_class": "system"
    })];
    let mut patterns: BTreeMap<String, Value> = BTreeMap::new();
    let mut reports: BTreeMap<String, (Value, Vec<String>)> = BTreeMap::new();
    for b in &r[0].batches {
        let mut cols: Vec<_> = (0..b.num_columns())
            .map(|i| column_strings(b, i).into_iter())
            .collect();
        for _ in 0..b.num_rows() {
            let row: Vec<Option<String>> = cols.iter_mut().map(|c| c.next().flatten()).collect();
            let get = |k: usize| row[k].clone();
            let (Some(item), Some(ver), Some(tid)) = (get(0), get(1), get(6)) else {
                continue;
            };
            let when = stamp(get(5).as_deref(), now);
            let pattern_id = get(10).unwrap_or_else(|| sid("attack-pattern", &tid));
            patterns.entry(pattern_id.clone()).or_insert_with(|| {
                let url = format!("https://attack.mitre.org/techniques/{}/", tid.replace('.', "/"));
                json!({
                    "type": "attack-pattern", "spec_version": "2.1", "id": pattern_id,
                    "created": created, "modified": created,
                    "name": get(7).unwrap_or_else(|| tid.clone()),
                    "external_references": [{"source_name": "mitre-attack", "external_id": tid, "url": url}]
                })
            });
            let report_id = sid("report", &format!("{item}|{ver}"));
            let entry = reports.entry(report_id.clone()).or_insert_with(|| {
                (
                    json!({
                        "type": "report", "spec_version": "2.1", "id": report_id,
                        "created": when, "modified": when, "published": when,
                        "created_by_ref": identity,
                        "name": get(3).unwrap_or_else(|| item.clone()),
                        "description": get(4).unwrap_or_default(),
                        "report_types": ["threat-report"],
                        "external_references": [{"source_name": get(2).unwrap_or_default(), "external_id": item}]
                    }),
                    vec![],
                )
            });
            let method = get(9).unwrap_or_default();
            let score: f64 = get(8).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let rel_id = sid("relationship", &format!("{item}|{ver}|{tid}|{method}"));
            objects.push(json!({
                "type": "relationship", "spec_version": "2.1", "id": rel_id,
                "created": created, "modified": created, "created_by_ref": identity,
                "relationship_type": "related-to", "source_ref": report_id, "target_ref": pattern_id,
                "confidence": (score * 100.0).round().clamp(0.0, 100.0) as i64,
                "description": format!("{method} mapping, score {score:.3}"),
                "x_threatlake_score": score, "x_threatlake_method": method
            }));
            for id in [pattern_id, rel_id] {
                if !entry.1.contains(&id) {
                    entry.1.push(id);
                }
            }
        }
    }
    for (_, (mut rep, refs)) in reports {
        rep["object_refs"] = json!(refs);
        objects.push(rep);
    }
    objects.extend(patterns.into_values());
    Ok(json!({
        "type": "bundle",
        "id": format!("bundle--{}", Uuid::new_v4()),
        "objects": objects
    }))
}
