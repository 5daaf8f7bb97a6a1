//! A MISP feed of mapped intel (`report --format misp-feed`): a directory MISP and OpenCTI pull as a
//! "MISP Feed" — `manifest.json`, `hashes.csv` and one event JSON per current threat item, its
//! techniques as `misp-galaxy:mitre-attack-pattern` tags and its observables as attributes.

use std::path::Path;

use arrow::array::AsArray;

use md5::Digest;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{write_atomic, AtomicFile, ReportError};
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
    id: String,
    version: String,
    source: String,
    title: Option<String>,
    text: Option<String>,
    observed: Option<chrono::DateTime<chrono::Utc>>,
    /// (technique, name, best score) in technique order.
    techniques: Vec<(String, Option<String>, f64)>,
}

/// Items whose observables are read with one query.
const CHUNK: usize = 2000;

/// Write the feed into `dir` (replacing its events); returns the number of events.
///
/// Streams: items come from the lake in item order a chunk at a time (a chunk's observables are
/// read with one query), each event is written as it is made, and `hashes.csv` and
/// `manifest.json` are written entry by entry into temporary files renamed into place at the
/// end, so memory does not grow with the number of items.
pub async fn write_feed(engine: &Engine, dir: &Path) -> Result<usize, ReportError> {
    use futures::StreamExt;
    let err = |source| ReportError::Sql {
        name: "misp-feed".into(),
        source,
    };
    // One row per item with its techniques (best score and name per technique) as a list; the
    // sort by item spills to disk under the report memory pool.
    let sql = "SELECT t.item_id, t.item_version, t.source, t.title, t.text, CAST(t.observed_at AS VARCHAR), m.techniques \
         FROM threat_intelligence_data t \
         JOIN (SELECT item_id, item_version, \
                      array_agg(named_struct('technique_id', technique_id, 'name', technique_name, 'score', score)) AS techniques \
               FROM (SELECT item_id, item_version, technique_id, max(technique_name) AS technique_name, \
                            max(score) AS score \
                     FROM mapped_threat_data GROUP BY item_id, item_version, technique_id) \
               GROUP BY item_id, item_version) m \
           ON m.item_id = t.item_id AND m.item_version = t.item_version \
         ORDER BY t.item_id, t.item_version";
    let (_, mut stream) = engine.stream(sql).await.map_err(err)?;
    // Events of an earlier run that are not current any more go away with it.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut feed = Feed {
        dir,
        hashes: AtomicFile::create(&dir.join("hashes.csv"))?,
        manifest: AtomicFile::create(&dir.join("manifest.json"))?,
        events: 0,
        now: chrono::Utc::now(),
    };
    let mut chunk: Vec<Item> = Vec::with_capacity(CHUNK);
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| err(e.into()))?;
        let scalars = b
            .project(&[0, 1, 2, 3, 4, 5])
            .map_err(|e| err(datafusion::error::DataFusionError::from(e).into()))?;
        // Per row its techniques as (technique, name, score).
        let entries = crate::feeds::struct_list_rows(b.column(6).as_list::<i32>());
        for (r, row) in crate::feeds::rows_of(&scalars).into_iter().enumerate() {
            let mut row = row.into_iter();
            let mut next = || row.next().flatten();
            let (Some(id), version) = (next(), next()) else {
                continue;
            };
            let mut item = Item {
                id,
                version: version.unwrap_or_default(),
                source: next().unwrap_or_default(),
                title: next(),
                text: next(),
                observed: next().and_then(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .ok()
                        .map(|d| d.with_timezone(&chrono::Utc))
                }),
                techniques: vec![],
            };
            for e in entries[r].iter().flatten() {
                if let Some(tid) = e[0].clone() {
                    let score = e[2].as_deref().and_then(|s| s.parse().ok()).unwrap_or(0.0);
                    item.techniques.push((tid, e[1].clone(), score));
                }
            }
            item.techniques.sort_by(|a, b| a.0.cmp(&b.0));
            if item.techniques.is_empty() {
                continue;
            }
            chunk.push(item);
            if chunk.len() == CHUNK {
                feed.write_chunk(engine, &mut chunk).await?;
            }
        }
    }
    feed.write_chunk(engine, &mut chunk).await?;
    feed.finish()
}

/// The feed being written.
struct Feed<'a> {
    dir: &'a Path,
    hashes: AtomicFile,
    manifest: AtomicFile,
    events: usize,
    now: chrono::DateTime<chrono::Utc>,
}

impl Feed<'_> {
    fn write_err(&self, e: impl std::fmt::Display) -> ReportError {
        ReportError::Write {
            path: self.dir.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Write the events of `chunk` (emptied).
    async fn write_chunk(
        &mut self,
        engine: &Engine,
        chunk: &mut Vec<Item>,
    ) -> Result<(), ReportError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = chunk.iter().map(|i| i.id.as_str()).collect();
        let observed = observables(engine, &ids, MAX_ATTRIBUTES)
            .await
            .map_err(|e| self.write_err(format!("reading observables: {e}")))?;
        for item in chunk.drain(..) {
            let obs = observed
                .get(&item.id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            self.write_event(&item, obs)?;
        }
        Ok(())
    }

    fn write_event(&mut self, item: &Item, observed: &[Observable]) -> Result<(), ReportError> {
        use std::io::Write;
        let id = &item.id;
        let uuid = Uuid::new_v5(&NS, format!("{id}\u{1f}{}", item.version).as_bytes()).to_string();
        let when = item.observed.unwrap_or(self.now);
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
        for o in observed {
            let (kind, category) = attribute_type(o);
            let a_uuid = Uuid::new_v5(&NS, format!("{uuid}|{kind}|{}", o.value).as_bytes());
            attributes.push(json!({
                "uuid": a_uuid.to_string(), "type": kind, "category": category, "value": o.value,
                "to_ids": kind != "text", "timestamp": ts, "comment": comment,
                "distribution": "5", "disable_correlation": false
            }));
            writeln!(
                self.hashes.writer(),
                "{:x},{uuid}",
                md5::Md5::digest(o.value.as_bytes())
            )
            .map_err(|e| self.write_err(e))?;
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
        let bytes = serde_json::to_vec(&event).map_err(|e| self.write_err(e))?;
        write_atomic(&self.dir.join(format!("{uuid}.json")), &bytes)?;
        // The manifest entry, laid out as `serde_json::to_vec_pretty` lays out an object's member.
        let entry = json!({
            "info": event["Event"]["info"], "date": date, "analysis": "2",
            "threat_level_id": threat_level, "timestamp": ts, "publish_timestamp": ts,
            "Orgc": org(), "Tag": event["Event"]["Tag"]
        });
        let pretty = serde_json::to_string_pretty(&entry).map_err(|e| self.write_err(e))?;
        let w = self.manifest.writer();
        let sep = if self.events == 0 { "{\n  " } else { ",\n  " };
        write!(w, "{sep}\"{uuid}\": {}", pretty.replace('\n', "\n  "))
            .map_err(|e| self.write_err(e))?;
        self.events += 1;
        Ok(())
    }

    /// Close the manifest and put `hashes.csv` and then `manifest.json` in place (the manifest
    /// last: a client that reads it finds every event it lists).
    fn finish(mut self) -> Result<usize, ReportError> {
        use std::io::Write;
        let end: &[u8] = if self.events == 0 { b"{}" } else { b"\n}" };
        self.manifest
            .writer()
            .write_all(end)
            .map_err(|e| self.write_err(e))?;
        self.hashes.commit()?;
        self.manifest.commit()?;
        Ok(self.events)
    }
}
