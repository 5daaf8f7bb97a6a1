//! A MISP feed of mapped intel (`report --format misp-feed`): a directory MISP and OpenCTI pull as a
//! "MISP Feed" — `manifest.json`, `hashes.csv` and one event JSON per current threat item, its
//! techniques as `misp-galaxy:mitre-attack-pattern` tags and its observables as attributes.

use std::collections::BTreeMap;
use std::path::Path;

use md5::Digest;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{write_atomic, ReportError};
use crate::integrations::record::{observables, Observable};
use crate::sql::Engine;

/// Directory under the report output.
pub const DIR: &str = "misp-feed";
/// Attributes per event at most.
const MAX_ATTRIBUTES: usize = 1000;
const NS: Uuid = Uuid::from_u128(0x51d6_7c2a_93e4_4b8f_a1c0_6e2d_9f3b_7a45);
/// The feed's organisation.
const ORG: &str = "threatlake";

fn org() -> Value {
    json!({"name": ORG, "uuid": Uuid::new_v5(&NS, ORG.as_bytes()).to_string()})
}

/// MISP attribute type and category of an observable.
fn attribute_type(o: &Observable) -> (&'static str, &'static str) {
    match o.kind {
        "ip" => ("ip-dst", "Network activity"),
        "domain" => ("domain", "Network activity"),
        "url" => ("url", "Network activity"),
        "email" => ("email-src", "Payload delivery"),
        "md5" => ("md5", "Payload delivery"),
        "sha1" => ("sha1", "Payload delivery"),
        "sha256" => ("sha256", "Payload delivery"),
        "cve" => ("vulnerability", "External analysis"),
        _ => ("text", "Other"),
    }
}

struct Item {
    version: String,
    source: String,
    title: Option<String>,
    text: Option<String>,
    observed: Option<chrono::DateTime<chrono::Utc>>,
    techniques: Vec<(String, Option<String>, f64)>,
}

/// Write the feed into `dir` (replacing its events); returns the number of events.
pub async fn write_feed(engine: &Engine, dir: &Path) -> Result<usize, ReportError> {
    let err = |source| ReportError::Sql {
        name: "misp-feed".into(),
        source,
    };
    let r = engine
        .run(
            "SELECT t.item_id, t.item_version, t.source, t.title, t.text, CAST(t.observed_at AS VARCHAR), \
                    m.technique_id, max(m.technique_name), max(m.score) \
             FROM threat_intelligence_data t \
             JOIN mapped_threat_data m ON m.item_id = t.item_id AND m.item_version = t.item_version \
             GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 7",
        )
        .await
        .map_err(err)?;
    let mut items: BTreeMap<String, Item> = BTreeMap::new();
    for b in &r[0].batches {
        for row in crate::feeds::rows_of(b) {
            let get = |c: usize| row[c].clone();
            let (Some(id), Some(tid)) = (get(0), get(6)) else {
                continue;
            };
            let item = items.entry(id).or_insert_with(|| Item {
                version: get(1).unwrap_or_default(),
                source: get(2).unwrap_or_default(),
                title: get(3),
                text: get(4),
                observed: get(5).and_then(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .ok()
                        .map(|d| d.with_timezone(&chrono::Utc))
                }),
                techniques: vec![],
            });
            let score = get(8).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            item.techniques.push((tid, get(7), score));
        }
    }
    let ids: Vec<&str> = items.keys().map(String::as_str).collect();
    let observed = observables(engine, &ids, MAX_ATTRIBUTES)
        .await
        .map_err(|e| ReportError::Write {
            path: dir.display().to_string(),
            message: format!("reading observables: {e}"),
        })?;
    let write = |name: &str, bytes: &[u8]| write_atomic(&dir.join(name), bytes);
    // Events of an earlier run that are not current any more go away with it.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut manifest = serde_json::Map::new();
    let mut hashes = String::new();
    let now = chrono::Utc::now();
    for (id, item) in &items {
        let uuid = Uuid::new_v5(&NS, format!("{id}\u{1f}{}", item.version).as_bytes()).to_string();
        let when = item.observed.unwrap_or(now);
        let ts = when.timestamp().to_string();
        let mut tags = vec![
            json!({"name": "tlp:clear"}),
            json!({"name": format!("threatlake:source=\"{}\"", item.source.replace('"', "'"))}),
        ];
        for (tid, name, _) in &item.techniques {
            let label = match name {
                Some(n) => format!("{} - {tid}", n.replace('"', "'")),
                None => tid.clone(),
            };
            tags.push(json!({"name": format!("misp-galaxy:mitre-attack-pattern=\"{label}\"")}));
        }
        let mut attributes = vec![];
        let comment = format!("{id} ({})", item.source);
        for o in observed.get(id).into_iter().flatten() {
            let (kind, category) = attribute_type(o);
            let a_uuid = Uuid::new_v5(&NS, format!("{uuid}|{kind}|{}", o.value).as_bytes());
            attributes.push(json!({
                "uuid": a_uuid.to_string(), "type": kind, "category": category, "value": o.value,
                "to_ids": kind != "text", "timestamp": ts, "comment": comment,
                "distribution": "5", "disable_correlation": false
            }));
            hashes.push_str(&format!(
                "{:x},{uuid}\n",
                md5::Md5::digest(o.value.as_bytes())
            ));
        }
        if let Some(text) = item.text.as_deref().filter(|t| !t.is_empty()) {
            attributes.push(json!({
                "uuid": Uuid::new_v5(&NS, format!("{uuid}|description").as_bytes()).to_string(),
                "type": "text", "category": "Other", "value": text, "to_ids": false,
                "timestamp": ts, "comment": "the text threatlake mapped", "distribution": "5",
                "disable_correlation": true
            }));
        }
        let info = item.title.clone().unwrap_or_else(|| id.clone());
        let best = item.techniques.iter().map(|t| t.2).fold(0.0, f64::max);
        let threat_level = match best {
            s if s >= 0.75 => "1",
            s if s >= 0.4 => "2",
            _ => "3",
        };
        let date = when.format("%Y-%m-%d").to_string();
        let event = json!({"Event": {
            "uuid": uuid, "info": info, "date": date, "analysis": "2",
            "threat_level_id": threat_level, "timestamp": ts, "publish_timestamp": ts,
            "published": true, "distribution": "3", "Orgc": org(), "Tag": tags,
            "Attribute": attributes
        }});
        let bytes = serde_json::to_vec(&event).map_err(|e| ReportError::Write {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        write(&format!("{uuid}.json"), &bytes)?;
        manifest.insert(
            uuid,
            json!({
                "info": event["Event"]["info"], "date": date, "analysis": "2",
                "threat_level_id": threat_level, "timestamp": ts, "publish_timestamp": ts,
                "Orgc": org(), "Tag": event["Event"]["Tag"]
            }),
        );
    }
    write("hashes.csv", hashes.as_bytes())?;
    let bytes =
        serde_json::to_vec_pretty(&Value::Object(manifest)).map_err(|e| ReportError::Write {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
    // The manifest last: a client that reads it finds every event it lists.
    write("manifest.json", &bytes)?;
    Ok(items.len())
}
