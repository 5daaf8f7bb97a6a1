//! STIX 2.1 objects of mapped intel — a `report` per current threat item, the `attack-pattern`s it
//! maps to (MITRE's own objects when the lake has the technique), `relationship`s carrying score and
//! method — each dated when it was added, for the report bundle and the TAXII collections.

use std::collections::BTreeMap;
use std::io::Write;

use arrow::array::AsArray;
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

/// Write the bundle of every mapped current item to `out` (pretty JSON, as `serde_json` prints a
/// whole bundle) object by object, as [`for_each_mapped_object`] streams them: memory holds one
/// item's objects at a time, whatever the number of items. Returns the objects written.
pub async fn write_bundle(
    engine: &Engine,
    rows_per_pass: usize,
    out: &mut (dyn Write + Send),
) -> Result<usize, ReportError> {
    let io = |e: std::io::Error| ReportError::Write {
        path: "mapped_intel.stix.json".into(),
        message: e.to_string(),
    };
    write!(
        out,
        "{{\n  \"id\": \"bundle--{}\",\n  \"objects\": [",
        Uuid::new_v4()
    )
    .map_err(io)?;
    let mut n = 0usize;
    for_each_mapped_object(engine, rows_per_pass, |d| {
        let text = serde_json::to_string_pretty(&d.object).map_err(|e| ReportError::Write {
            path: "mapped_intel.stix.json".into(),
            message: e.to_string(),
        })?;
        out.write_all(if n == 0 { b"\n" } else { b",\n" })
            .map_err(io)?;
        // Nested two levels deep: every line of the object indented by four spaces (JSON text
        // has no raw newlines inside strings, so lines are the printer's own).
        for (i, line) in text.lines().enumerate() {
            if i > 0 {
                out.write_all(b"\n").map_err(io)?;
            }
            out.write_all(b"    ").map_err(io)?;
            out.write_all(line.as_bytes()).map_err(io)?;
        }
        n += 1;
        Ok(())
    })
    .await?;
    out.write_all(if n == 0 { b"]" } else { b"\n  ]" })
        .map_err(io)?;
    out.write_all(b",\n  \"type\": \"bundle\"\n}\n")
        .map_err(io)?;
    Ok(n)
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

/// Mapped intel as dated STIX objects, collected (the TAXII collection pages them by date).
pub async fn mapped_objects(
    engine: &Engine,
    rows_per_pass: usize,
) -> Result<Vec<Dated>, ReportError> {
    let mut out = Vec::new();
    for_each_mapped_object(engine, rows_per_pass, |d| {
        out.push(d);
        Ok(())
    })
    .await?;
    Ok(out)
}

fn sql_err(source: crate::sql::SqlError) -> ReportError {
    ReportError::Sql {
        name: "mapped-intel".into(),
        source,
    }
}

/// Mapped intel as dated STIX objects, handed to `emit` as the lake streams them: threatlake's
/// identity, the `attack-pattern`s mapped to (MITRE's own objects when the lake has the technique),
/// then per current item a `relationship` per mapping (dated when it was mapped, carrying score and
/// method) and the item's `report`. Items stream from DataFusion one row each, with their mappings,
/// so one item's objects are held at a time.
pub async fn for_each_mapped_object(
    engine: &Engine,
    rows_per_pass: usize,
    mut emit: impl FnMut(Dated) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    use futures::StreamExt;
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let identity = sid("identity", "threatlake");
    emit(Dated {
        added: epoch,
        object: json!({
            "type": "identity", "spec_version": "2.1", "id": identity,
            "created": fmt_ts(epoch), "modified": fmt_ts(epoch),
            "name": "threatlake", "identity_class": "system"
        }),
    })?;
    // The attack-patterns mapped to (ATT&CK has hundreds of techniques: held in memory).
    let patterns = attack_patterns(engine).await?;
    // Items are read in passes over disjoint shares of the item ids ([`ItemPasses`]), so a join
    // holds one share of the items, whatever their number.
    let passes = ItemPasses::for_lake(engine, rows_per_pass).await?;
    // Technique → (name, first mapped), over every pass.
    let mut used: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for pass in passes.iter() {
        let r = engine
            .run(&format!(
                "SELECT m.technique_id, max(m.technique_name), CAST(min(m.mapped_at) AS VARCHAR) \
                 FROM threat_intelligence_data t \
                 JOIN mapped_threat_data m ON m.item_id = t.item_id AND m.item_version = t.item_version \
                 WHERE {} GROUP BY m.technique_id",
                pass.filter("t.item_id")
            ))
            .await
            .map_err(sql_err)?;
        for b in &r[0].batches {
            for mut row in crate::feeds::rows_of(b) {
                let Some(tid) = row[0].take() else {
                    continue;
                };
                let e = used.entry(tid).or_default();
                e.0 = e.0.take().max(row[1].take());
                e.1 = match (e.1.take(), row[2].take()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    let mut pattern_ids: BTreeMap<String, String> = BTreeMap::new();
    for (tid, (name, mapped)) in used {
        let mapped = parse_ts(mapped.as_deref()).unwrap_or(epoch);
        let object = match patterns.get(&tid) {
            Some(p) => p.object.clone(),
            None => json!({
                "type": "attack-pattern", "spec_version": "2.1", "id": sid("attack-pattern", &tid),
                "created": fmt_ts(mapped), "modified": fmt_ts(mapped),
                "name": name.unwrap_or_else(|| tid.clone()),
                "external_references": [{"source_name": "mitre-attack", "external_id": tid,
                    "url": format!("https://attack.mitre.org/techniques/{}/", tid.replace('.', "/"))}]
            }),
        };
        pattern_ids.insert(tid, object["id"].as_str().unwrap_or_default().to_string());
        emit(Dated {
            added: mapped,
            object,
        })?;
    }
    drop(patterns);
    for pass in passes.iter() {
        // One row per item of the pass with its mappings as a list (no sort holds the items' text).
        // The items are the hash join's build side (its left input): their text takes less memory
        // than the aggregated mapping lists, which failed a 1 GB pool as the build side at 1M items.
        let sql = format!(
            "SELECT t.item_id, t.item_version, t.source, t.title, t.text, CAST(t.observed_at AS VARCHAR), m.mappings \
             FROM threat_intelligence_data t \
             JOIN (SELECT item_id, item_version, \
                          array_agg(named_struct('technique_id', technique_id, 'method', method, 'score', score, \
                                                 'mapped_at', CAST(mapped_at AS VARCHAR))) AS mappings \
                   FROM mapped_threat_data WHERE {} GROUP BY item_id, item_version) m \
               ON m.item_id = t.item_id AND m.item_version = t.item_version \
             WHERE {}",
            pass.filter("item_id"),
            pass.filter("t.item_id")
        );
        let (_, mut stream) = engine.stream(&sql).await.map_err(sql_err)?;
        while let Some(b) = stream.next().await {
            let b = b.map_err(|e| sql_err(e.into()))?;
            let scalars = b
                .project(&[0, 1, 2, 3, 4, 5])
                .map_err(|e| sql_err(datafusion::error::DataFusionError::from(e).into()))?;
            // Per row its mappings as (technique, method, score, mapped at).
            let entries = crate::feeds::struct_list_rows(b.column(6).as_list::<i32>());
            for (r, row) in crate::feeds::rows_of(&scalars).into_iter().enumerate() {
                let get = |c: usize| row[c].clone();
                let (Some(item), Some(ver)) = (get(0), get(1)) else {
                    continue;
                };
                // (technique, method) → (best score, first mapped), in technique then method order.
                let mut mappings: BTreeMap<(String, String), (f64, DateTime<Utc>)> =
                    BTreeMap::new();
                for e in entries[r].iter().flatten() {
                    let Some(tid) = e[0].clone() else {
                        continue;
                    };
                    let score: f64 = e[2].as_deref().and_then(|x| x.parse().ok()).unwrap_or(0.0);
                    let mapped = parse_ts(e[3].as_deref()).unwrap_or(epoch);
                    let m = mappings
                        .entry((tid, e[1].clone().unwrap_or_default()))
                        .or_insert((score, mapped));
                    *m = (m.0.max(score), m.1.min(mapped));
                }
                let Some(first) = mappings.values().map(|(_, t)| *t).min() else {
                    continue;
                };
                let report_id = sid("report", &format!("{item}|{ver}"));
                let when = parse_ts(get(5).as_deref()).unwrap_or(first);
                let mut refs: Vec<String> = Vec::new();
                for ((tid, method), (score, mapped)) in mappings {
                    let pattern_id = pattern_ids
                        .get(&tid)
                        .cloned()
                        .unwrap_or_else(|| sid("attack-pattern", &tid));
                    let rel_id = sid("relationship", &format!("{item}|{ver}|{tid}|{method}"));
                    emit(Dated {
                        added: mapped,
                        object: json!({
                            "type": "relationship", "spec_version": "2.1", "id": rel_id,
                            "created": fmt_ts(mapped), "modified": fmt_ts(mapped), "created_by_ref": identity,
                            "relationship_type": "related-to", "source_ref": report_id, "target_ref": pattern_id,
                            "confidence": (score * 100.0).round().clamp(0.0, 100.0) as i64,
                            "description": format!("{method} mapping, score {score:.3}"),
                            "x_threatlake_score": score, "x_threatlake_method": method
                        }),
                    })?;
                    for id in [pattern_id, rel_id] {
                        if !refs.contains(&id) {
                            refs.push(id);
                        }
                    }
                }
                emit(Dated {
                    added: first,
                    object: json!({
                        "type": "report", "spec_version": "2.1", "id": report_id,
                        "created": fmt_ts(when), "modified": fmt_ts(when), "published": fmt_ts(when),
                        "created_by_ref": identity,
                        "name": get(3).unwrap_or_else(|| item.clone()),
                        "description": get(4).unwrap_or_default(),
                        "report_types": ["threat-report"],
                        "external_references": [{"source_name": get(2).unwrap_or_default(), "external_id": item}],
                        "object_refs": refs
                    }),
                })?;
            }
        }
    }
    Ok(())
}

/// Disjoint shares of the item ids, read one after another so that a query joining items with
/// their mappings holds one share: an item belongs to the share its id's MD5 says (the first hex
/// digits), the same in both tables, so every item lands in exactly one pass with all its
/// mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemPasses {
    /// Number of passes: a power of two, at most 256.
    count: usize,
}

/// Mapping rows per pass by default (`reports.rows_per_pass`): at 250k the biggest join of a pass
/// (the items' text) stays near 200 MB.
pub const ROWS_PER_PASS: usize = 250_000;

impl ItemPasses {
    /// Passes for `rows` mapping rows: the smallest power of two giving each at most
    /// `per_pass` (at least 1, at most 256).
    pub fn for_rows(rows: usize, per_pass: usize) -> Self {
        let want = rows.div_ceil(per_pass.max(1)).max(1);
        Self {
            count: want.next_power_of_two().min(256),
        }
    }

    /// Passes for the mapping rows of `engine`'s lake, `per_pass` each.
    pub async fn for_lake(engine: &Engine, per_pass: usize) -> Result<Self, ReportError> {
        let r = engine
            .run("SELECT count(*) FROM mapped_threat_data")
            .await
            .map_err(sql_err)?;
        let rows = r[0]
            .batches
            .first()
            .and_then(|b| crate::feeds::rows_of(b).into_iter().next())
            .and_then(|row| row[0].as_deref()?.parse().ok())
            .unwrap_or(0);
        Ok(Self::for_rows(rows, per_pass))
    }

    /// Each pass (`0..count`).
    pub fn iter(self) -> impl Iterator<Item = ItemPass> {
        (0..self.count).map(move |index| ItemPass {
            index,
            count: self.count,
        })
    }
}

/// One of the [`ItemPasses`].
#[derive(Debug, Clone, Copy)]
pub struct ItemPass {
    index: usize,
    count: usize,
}

impl ItemPass {
    /// A SQL condition true for the item ids of this pass in `column` (a column reference the
    /// caller wrote; the condition holds only hex literals made here). `TRUE` for a single pass.
    pub fn filter(&self, column: &str) -> String {
        if self.count == 1 {
            return "TRUE".into();
        }
        let digits = if self.count <= 16 { 1 } else { 2 };
        let prefixes: Vec<String> = (0..16usize.pow(digits))
            .filter(|v| v % self.count == self.index)
            .map(|v| format!("'{v:0width$x}'", width = digits as usize))
            .collect();
        format!("left(md5({column}), {digits}) IN ({})", prefixes.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_grow_with_the_rows_in_powers_of_two() {
        let n = |rows| ItemPasses::for_rows(rows, ROWS_PER_PASS).iter().count();
        assert_eq!(n(0), 1);
        assert_eq!(n(ROWS_PER_PASS), 1);
        assert_eq!(n(ROWS_PER_PASS + 1), 2);
        assert_eq!(n(1_000_000), 4);
        assert_eq!(n(3 * ROWS_PER_PASS), 4);
        assert_eq!(n(5_000_000), 32);
        assert_eq!(n(usize::MAX / 2), 256);
        assert_eq!(
            ItemPasses::for_rows(10, 0).iter().count(),
            16,
            "0 per pass taken as 1"
        );
        assert_eq!(
            ItemPasses::for_rows(10, ROWS_PER_PASS)
                .iter()
                .next()
                .map(|p| p.filter("x")),
            Some("TRUE".into())
        );
    }

    #[test]
    fn every_id_prefix_is_in_exactly_one_pass() {
        for count in [2usize, 4, 16, 32, 256] {
            let passes = ItemPasses { count };
            let digits = if count <= 16 { 1 } else { 2 };
            let mut seen = std::collections::BTreeMap::new();
            for p in passes.iter() {
                let f = p.filter("t.item_id");
                assert!(
                    f.starts_with(&format!("left(md5(t.item_id), {digits}) IN (")),
                    "{f}"
                );
                for lit in f.split('\'').skip(1).step_by(2) {
                    assert_eq!(lit.len(), digits);
                    *seen.entry(lit.to_string()).or_insert(0) += 1;
                }
            }
            assert_eq!(seen.len(), 16usize.pow(digits as u32), "{count} passes");
            assert!(seen.values().all(|&n| n == 1), "{count} passes overlap");
        }
    }
}
