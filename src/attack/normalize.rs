//! Turn a decoded ATT&CK bundle into the lake's tables (one RecordBatch per table).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use regex::Regex;
use serde::Serialize;

use super::stix::{Bundle, StixObject};

/// Column types used by the ATT&CK tables.
#[derive(Clone, Copy)]
enum Col {
    Text,
    List,
    Bool,
    Time,
    Int,
}

fn schema(cols: &[(&str, Col, bool)]) -> SchemaRef {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(name, ty, nullable)| {
            let dt = match ty {
                Col::Text => DataType::Utf8,
                Col::List => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                Col::Bool => DataType::Boolean,
                Col::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                Col::Int => DataType::Int32,
            };
            Field::new(*name, dt, *nullable)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

use Col::{Bool, Int, List, Text, Time};

/// Hive partition columns of every ATT&CK table.
pub const PARTITION_COLS: [&str; 2] = ["domain", "attack_version"];

/// The ATT&CK tables and their file schemas (partition columns excluded).
pub fn table_schemas() -> Vec<(&'static str, SchemaRef)> {
    let common_tail = [
        ("revoked", Bool, false),
        ("deprecated", Bool, false),
        ("created", Time, true),
        ("modified", Time, true),
        ("version", Text, true),
    ];
    let with_tail = |head: &[(&'static str, Col, bool)]| {
        let mut v = head.to_vec();
        v.extend_from_slice(&common_tail);
        schema(&v)
    };
    vec![
        (
            "mitre_attack_techniques",
            with_tail(&[
                ("technique_id", Text, false),
                ("stix_id", Text, false),
                ("name", Text, false),
                ("description", Text, true),
                ("tactics", List, true),
                ("platforms", List, true),
                ("is_subtechnique", Bool, false),
                ("parent_id", Text, true),
                ("detection", Text, true),
                ("url", Text, true),
                ("revoked_by", Text, true),
            ]),
        ),
        (
            "mitre_attack_tactics",
            with_tail(&[
                ("tactic_id", Text, false),
                ("stix_id", Text, false),
                ("name", Text, false),
                ("shortname", Text, false),
                ("description", Text, true),
                ("matrix", Text, true),
                ("matrix_order", Int, true),
                ("url", Text, true),
            ]),
        ),
        (
            "mitre_attack_groups",
            with_tail(&[
                ("group_id", Text, true),
                ("stix_id", Text, false),
                ("name", Text, false),
                ("aliases", List, true),
                ("description", Text, true),
                ("url", Text, true),
            ]),
        ),
        (
            "mitre_attack_software",
            with_tail(&[
                ("software_id", Text, true),
                ("stix_id", Text, false),
                ("name", Text, false),
                ("software_type", Text, false),
                ("aliases", List, true),
                ("platforms", List, true),
                ("description", Text, true),
                ("url", Text, true),
            ]),
        ),
        (
            "mitre_attack_campaigns",
            with_tail(&[
                ("campaign_id", Text, true),
                ("stix_id", Text, false),
                ("name", Text, false),
                ("aliases", List, true),
                ("description", Text, true),
                ("first_seen", Time, true),
                ("last_seen", Time, true),
                ("url", Text, true),
            ]),
        ),
        (
            "mitre_attack_mitigations",
            with_tail(&[
                ("mitigation_id", Text, true),
                ("stix_id", Text, false),
                ("name", Text, false),
                ("description", Text, true),
                ("url", Text, true),
            ]),
        ),
        (
            "mitre_attack_relationships",
            with_tail(&[
                ("stix_id", Text, false),
                ("relationship_type", Text, false),
                ("source_ref", Text, false),
                ("source_type", Text, false),
                ("source_attack_id", Text, true),
                ("source_name", Text, true),
                ("target_ref", Text, false),
                ("target_type", Text, false),
                ("target_attack_id", Text, true),
                ("target_name", Text, true),
                ("description", Text, true),
                ("citations", List, true),
            ]),
        ),
        (
            "mitre_attack_procedures",
            schema(&[
                ("relationship_id", Text, false),
                ("source_ref", Text, false),
                ("source_type", Text, false),
                ("source_attack_id", Text, true),
                ("source_name", Text, true),
                ("technique_id", Text, true),
                ("technique_ref", Text, false),
                ("technique_name", Text, true),
                ("description", Text, false),
                ("citations", List, true),
                ("citation_urls", List, true),
                ("created", Time, true),
                ("modified", Time, true),
            ]),
        ),
        (
            "mitre_attack_versions",
            schema(&[
                ("collection", Text, true),
                ("collection_modified", Time, true),
                ("attack_spec_version", Text, true),
                ("source", Text, false),
                ("sha256", Text, false),
                ("objects", Int, false),
                ("ingested_at", Time, false),
            ]),
        ),
    ]
}

/// The file schema of one ATT&CK table.
pub fn table_schema(name: &str) -> Option<SchemaRef> {
    table_schemas()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s)
}

static CITATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(Citation:\s*").expect("static regex"));
static MD_LINK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\[([^\]\[]+)\]\((?:https?://|/)[^)\s]*\)").expect("static regex")
});
static CODE_TAG: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"</?code>").expect("static regex"));
static SPACES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[ \t]{2,}").expect("static regex"));
static SPACE_PUNCT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r" +([.,;:])").expect("static regex"));

/// Clean ATT&CK prose: drop `(Citation: …)` markers (returned separately, in order, de-duplicated),
/// reduce markdown links to their text and `<code>` tags to their content, tidy spaces.
pub fn clean_text(text: &str) -> (String, Vec<String>) {
    // One pass pairs every '(' with its ')' (stack matching), so each marker's end is a lookup:
    // linear however many unbalanced markers hostile text holds.
    let mut closes: HashMap<usize, usize> = HashMap::new();
    let mut open: Vec<usize> = Vec::new();
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'(' => open.push(i),
            b')' => {
                if let Some(o) = open.pop() {
                    closes.insert(o, i);
                }
            }
            _ => {}
        }
    }
    let mut citations: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(m) = CITATION.find_at(text, pos) {
        out.push_str(&text[pos..m.start()]);
        // The citation name may itself contain balanced parentheses: "(Citation: Foo (2019))".
        match closes.get(&m.start()) {
            Some(&close) => {
                let name = text[m.end()..close].trim();
                if !name.is_empty() && seen.insert(name.to_string()) {
                    citations.push(name.to_string());
                }
                pos = close + 1;
            }
            None => {
                // Unbalanced marker: keep the text as is rather than swallow the rest.
                out.push_str(m.as_str());
                pos = m.end();
            }
        }
    }
    let rest = &text[pos..];
    out.push_str(rest);
    let out = MD_LINK.replace_all(&out, "$1");
    let out = CODE_TAG.replace_all(&out, "");
    let out = SPACES.replace_all(&out, " ");
    let out = SPACE_PUNCT.replace_all(&out, "$1");
    (out.trim().to_string(), citations)
}

#[derive(Serialize)]
struct TechniqueRow<'a> {
    technique_id: &'a str,
    stix_id: &'a str,
    name: &'a str,
    description: Option<String>,
    tactics: Vec<&'a str>,
    platforms: &'a [String],
    is_subtechnique: bool,
    parent_id: Option<String>,
    detection: Option<String>,
    url: Option<&'a str>,
    revoked_by: Option<&'a str>,
    revoked: bool,
    deprecated: bool,
    created: Option<&'a str>,
    modified: Option<&'a str>,
    version: Option<&'a str>,
}

#[derive(Serialize)]
struct TacticRow<'a> {
    tactic_id: &'a str,
    stix_id: &'a str,
    name: &'a str,
    shortname: &'a str,
    description: Option<String>,
    matrix: Option<&'a str>,
    matrix_order: Option<i32>,
    url: Option<&'a str>,
    revoked: bool,
    deprecated: bool,
    created: Option<&'a str>,
    modified: Option<&'a str>,
    version: Option<&'a str>,
}

/// Groups, software, campaigns and mitigations share one row shape; unused columns stay None and
/// are dropped by the table's schema.
#[derive(Serialize, Default)]
struct EntityRow<'a> {
    group_id: Option<&'a str>,
    software_id: Option<&'a str>,
    campaign_id: Option<&'a str>,
    mitigation_id: Option<&'a str>,
    stix_id: &'a str,
    name: &'a str,
    software_type: Option<&'a str>,
    aliases: Vec<&'a str>,
    platforms: &'a [String],
    description: Option<String>,
    first_seen: Option<&'a str>,
    last_seen: Option<&'a str>,
    url: Option<&'a str>,
    revoked: bool,
    deprecated: bool,
    created: Option<&'a str>,
    modified: Option<&'a str>,
    version: Option<&'a str>,
}

#[derive(Serialize)]
struct RelationshipRow<'a> {
    stix_id: &'a str,
    relationship_type: &'a str,
    source_ref: &'a str,
    source_type: &'a str,
    source_attack_id: Option<&'a str>,
    source_name: Option<&'a str>,
    target_ref: &'a str,
    target_type: &'a str,
    target_attack_id: Option<&'a str>,
    target_name: Option<&'a str>,
    description: Option<String>,
    citations: Vec<String>,
    revoked: bool,
    deprecated: bool,
    created: Option<&'a str>,
    modified: Option<&'a str>,
    version: Option<&'a str>,
}

#[derive(Serialize)]
struct ProcedureRow<'a> {
    relationship_id: &'a str,
    source_ref: &'a str,
    source_type: &'a str,
    source_attack_id: Option<&'a str>,
    source_name: Option<&'a str>,
    technique_id: Option<&'a str>,
    technique_ref: &'a str,
    technique_name: Option<&'a str>,
    description: String,
    citations: Vec<String>,
    citation_urls: Vec<Option<&'a str>>,
    created: Option<&'a str>,
    modified: Option<&'a str>,
}

#[derive(Serialize)]
struct VersionRow<'a> {
    collection: Option<&'a str>,
    collection_modified: Option<&'a str>,
    attack_spec_version: Option<&'a str>,
    source: &'a str,
    sha256: &'a str,
    objects: i32,
    ingested_at: String,
}

/// Facts about the ingest that land in `mitre_attack_versions`.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// Where the bundle came from (path or URL).
    pub source: String,
    /// SHA-256 of the bytes as received.
    pub sha256: String,
    /// Ingest time (RFC 3339).
    pub ingested_at: String,
}

fn to_batch<S: Serialize>(
    schema: &SchemaRef,
    rows: &[S],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .build_decoder()?;
    decoder.serialize(rows)?;
    Ok(decoder
        .flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

fn rel_ends(r: &StixObject) -> (&str, &str) {
    (
        r.source_ref.as_deref().unwrap_or(""),
        r.target_ref.as_deref().unwrap_or(""),
    )
}

/// The STIX type prefix of an id (`attack-pattern--…` → `attack-pattern`).
fn stix_type(id: &str) -> &str {
    id.split_once("--").map_or("", |(t, _)| t)
}

fn opt(s: &Option<String>) -> Option<&str> {
    s.as_deref()
}

fn clean_opt(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(|d| clean_text(d).0)
        .filter(|d| !d.is_empty())
}

/// Normalise a bundle into `(table name, batch)` pairs, in the order they should be written.
/// `mitre_attack_versions` comes last: its row is what makes a version visible to the current views.
pub fn normalize(
    bundle: &Bundle,
    prov: &Provenance,
) -> Result<Vec<(&'static str, RecordBatch)>, arrow::error::ArrowError> {
    let objs = &bundle.objects;
    let by_id: HashMap<&str, &StixObject> = objs.iter().map(|o| (o.id.as_str(), o)).collect();
    let rels: Vec<&StixObject> = objs.iter().filter(|o| o.kind == "relationship").collect();

    let mut parent_of: HashMap<&str, &str> = HashMap::new();
    let mut revoked_by: HashMap<&str, &str> = HashMap::new();
    let mut detections: BTreeMap<&str, Vec<&StixObject>> = BTreeMap::new();
    for r in &rels {
        let (s, t) = rel_ends(r);
        match r.relationship_type.as_deref() {
            Some("subtechnique-of") => {
                parent_of.insert(s, t);
            }
            Some("revoked-by") => {
                revoked_by.insert(s, t);
            }
            Some("detects") => {
                if let Some(ds) = by_id.get(s) {
                    detections.entry(t).or_default().push(ds);
                }
            }
            _ => {}
        }
    }
    let attack_id_of = |stix: &str| by_id.get(stix).and_then(|o| o.attack_id());
    let name_of = |stix: &str| by_id.get(stix).and_then(|o| o.name.as_deref());

    // Detection text: the legacy x_mitre_detection field where MITRE still fills it, else (v18+)
    // the detection strategies that `detects` the technique and the analytics they reference.
    let detection_text = |o: &StixObject| -> Option<String> {
        if let Some(d) = o
            .x_mitre_detection
            .as_deref()
            .filter(|d| !d.trim().is_empty())
        {
            return Some(clean_text(d).0);
        }
        let strategies = detections.get(o.id.as_str())?;
        let mut parts = Vec::new();
        for ds in strategies {
            if let Some(n) = &ds.name {
                parts.push(format!("{n}."));
            }
            for a in &ds.x_mitre_analytic_refs {
                if let Some(d) = by_id.get(a.as_str()).and_then(|a| a.description.as_deref()) {
                    parts.push(clean_text(d).0);
                }
            }
        }
        (!parts.is_empty()).then(|| parts.join("\n"))
    };

    let mut techniques = Vec::new();
    for o in objs.iter().filter(|o| o.kind == "attack-pattern") {
        let Some(tid) = o.attack_id() else { continue };
        let is_sub = o.x_mitre_is_subtechnique.unwrap_or(tid.contains('.'));
        let parent_id = if is_sub {
            parent_of
                .get(o.id.as_str())
                .and_then(|p| attack_id_of(p))
                .map(str::to_string)
                .or_else(|| tid.split_once('.').map(|(p, _)| p.to_string()))
        } else {
            None
        };
        techniques.push(TechniqueRow {
            technique_id: tid,
            stix_id: &o.id,
            name: o.name.as_deref().unwrap_or(""),
            description: clean_opt(&o.description),
            tactics: o
                .kill_chain_phases
                .iter()
                .filter(|k| k.kill_chain_name.starts_with("mitre-"))
                .map(|k| k.phase_name.as_str())
                .collect(),
            platforms: &o.x_mitre_platforms,
            is_subtechnique: is_sub,
            parent_id,
            detection: detection_text(o),
            url: o.url(),
            revoked_by: revoked_by.get(o.id.as_str()).and_then(|t| attack_id_of(t)),
            revoked: o.is_revoked(),
            deprecated: o.is_deprecated(),
            created: opt(&o.created),
            modified: opt(&o.modified),
            version: opt(&o.x_mitre_version),
        });
    }

    // Matrix order: position in the matrix that lists the tactic.
    // The main matrix (most tactics) wins for tactics listed in several (Mobile has two).
    let mut matrices: Vec<&StixObject> = objs
        .iter()
        .filter(|o| o.kind == "x-mitre-matrix" && !o.is_revoked() && !o.is_deprecated())
        .collect();
    matrices.sort_by_key(|m| std::cmp::Reverse(m.tactic_refs.len()));
    let mut order: HashMap<&str, (&str, i32)> = HashMap::new();
    for m in matrices {
        for (i, t) in m.tactic_refs.iter().enumerate() {
            order
                .entry(t.as_str())
                .or_insert((m.name.as_deref().unwrap_or(""), i as i32 + 1));
        }
    }
    let tactics: Vec<TacticRow> = objs
        .iter()
        .filter(|o| o.kind == "x-mitre-tactic")
        .filter_map(|o| {
            let (matrix, ord) = order.get(o.id.as_str()).copied().unzip();
            Some(TacticRow {
                tactic_id: o.attack_id()?,
                stix_id: &o.id,
                name: o.name.as_deref().unwrap_or(""),
                shortname: o.x_mitre_shortname.as_deref().unwrap_or(""),
                description: clean_opt(&o.description),
                matrix,
                matrix_order: ord,
                url: o.url(),
                revoked: o.is_revoked(),
                deprecated: o.is_deprecated(),
                created: opt(&o.created),
                modified: opt(&o.modified),
                version: opt(&o.x_mitre_version),
            })
        })
        .collect();

    fn entity(o: &StixObject) -> EntityRow<'_> {
        EntityRow {
            stix_id: &o.id,
            name: o.name.as_deref().unwrap_or(""),
            description: clean_opt(&o.description),
            url: o.url(),
            revoked: o.is_revoked(),
            deprecated: o.is_deprecated(),
            created: opt(&o.created),
            modified: opt(&o.modified),
            version: opt(&o.x_mitre_version),
            ..Default::default()
        }
    }
    let of_kind = |k: &'static str| objs.iter().filter(move |o| o.kind == k);
    let groups: Vec<EntityRow> = of_kind("intrusion-set")
        .map(|o| EntityRow {
            group_id: o.attack_id(),
            aliases: o.aliases.iter().map(String::as_str).collect(),
            ..entity(o)
        })
        .collect();
    let software: Vec<EntityRow> = objs
        .iter()
        .filter(|o| o.kind == "malware" || o.kind == "tool")
        .map(|o| EntityRow {
            software_id: o.attack_id(),
            software_type: Some(o.kind.as_str()),
            aliases: o.x_mitre_aliases.iter().map(String::as_str).collect(),
            platforms: &o.x_mitre_platforms,
            ..entity(o)
        })
        .collect();
    let campaigns: Vec<EntityRow> = of_kind("campaign")
        .map(|o| EntityRow {
            campaign_id: o.attack_id(),
            aliases: o.aliases.iter().map(String::as_str).collect(),
            first_seen: opt(&o.first_seen),
            last_seen: opt(&o.last_seen),
            ..entity(o)
        })
        .collect();
    let mitigations: Vec<EntityRow> = of_kind("course-of-action")
        .map(|o| EntityRow {
            mitigation_id: o.attack_id(),
            ..entity(o)
        })
        .collect();

    let mut relationships = Vec::with_capacity(rels.len());
    let mut procedures = Vec::new();
    for r in &rels {
        let (s, t) = rel_ends(r);
        let (description, citations) = match r.description.as_deref() {
            Some(d) => {
                let (c, cites) = clean_text(d);
                (Some(c).filter(|c| !c.is_empty()), cites)
            }
            None => (None, vec![]),
        };
        let rel_type = r.relationship_type.as_deref().unwrap_or("");
        if rel_type == "uses" && stix_type(t) == "attack-pattern" {
            let urls = citations
                .iter()
                .map(|c| {
                    r.external_references
                        .iter()
                        .find(|e| &e.source_name == c)
                        .and_then(|e| e.url.as_deref())
                })
                .collect();
            procedures.push(ProcedureRow {
                relationship_id: &r.id,
                source_ref: s,
                source_type: stix_type(s),
                source_attack_id: attack_id_of(s),
                source_name: name_of(s),
                technique_id: attack_id_of(t),
                technique_ref: t,
                technique_name: name_of(t),
                description: description.clone().unwrap_or_default(),
                citations: citations.clone(),
                citation_urls: urls,
                created: opt(&r.created),
                modified: opt(&r.modified),
            });
        }
        relationships.push(RelationshipRow {
            stix_id: &r.id,
            relationship_type: rel_type,
            source_ref: s,
            source_type: stix_type(s),
            source_attack_id: attack_id_of(s),
            source_name: name_of(s),
            target_ref: t,
            target_type: stix_type(t),
            target_attack_id: attack_id_of(t),
            target_name: name_of(t),
            description,
            citations,
            revoked: r.is_revoked(),
            deprecated: r.is_deprecated(),
            created: opt(&r.created),
            modified: opt(&r.modified),
            version: None,
        });
    }

    let collection = objs.iter().find(|o| o.kind == "x-mitre-collection");
    let versions = [VersionRow {
        collection: collection.and_then(|c| c.name.as_deref()),
        collection_modified: collection.and_then(|c| c.modified.as_deref()),
        attack_spec_version: collection.and_then(|c| c.x_mitre_attack_spec_version.as_deref()),
        source: &prov.source,
        sha256: &prov.sha256,
        objects: i32::try_from(objs.len()).unwrap_or(i32::MAX),
        ingested_at: prov.ingested_at.clone(),
    }];

    let schemas: HashMap<&str, SchemaRef> = table_schemas().into_iter().collect();
    // Each table name is written once: it picks the schema and labels the batch.
    macro_rules! batches {
        ($($name:literal => $rows:expr),* $(,)?) => {
            vec![$(($name, to_batch(&schemas[$name], $rows)?)),*]
        };
    }
    Ok(batches![
        "mitre_attack_techniques" => &techniques,
        "mitre_attack_tactics" => &tactics,
        "mitre_attack_groups" => &groups,
        "mitre_attack_software" => &software,
        "mitre_attack_campaigns" => &campaigns,
        "mitre_attack_mitigations" => &mitigations,
        "mitre_attack_relationships" => &relationships,
        "mitre_attack_procedures" => &procedures,
        "mitre_attack_versions" => &versions,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_citations_links_and_code() {
        let (t, c) = clean_text(
            " [Explosive](https://attack.mitre.org/software/S0569) has run <code>whoami</code> .(Citation: CheckPoint Volatile Cedar March 2015)(Citation: Foo (2019)) ",
        );
        assert_eq!(t, "Explosive has run whoami.");
        assert_eq!(
            c,
            vec!["CheckPoint Volatile Cedar March 2015", "Foo (2019)"]
        );
    }

    #[test]
    fn unbalanced_citation_keeps_text() {
        let (t, c) = clean_text("abc (Citation: never closed");
        assert_eq!(t, "abc (Citation: never closed");
        assert!(c.is_empty());
    }

    #[test]
    fn duplicate_citations_collapse() {
        let (_, c) = clean_text("a (Citation: X) b (Citation: X)");
        assert_eq!(c, vec!["X"]);
    }

    #[test]
    fn nested_and_unbalanced_markers_resolve_like_a_paren_scan() {
        // An unbalanced outer marker does not hide a balanced inner one.
        let (t, c) = clean_text("x (Citation: a (Citation: b) y");
        assert_eq!(t, "x (Citation: a y");
        assert_eq!(c, vec!["b"]);
        // Hostile text: many unclosed markers, then many citations (linear now; figures in bench).
        let text = format!(
            "{}{}",
            "(Citation: ".repeat(2_000),
            (0..2_000)
                .map(|i| format!("(Citation: C{})", i % 50))
                .collect::<String>()
        );
        let (t, c) = clean_text(&text);
        assert_eq!(
            c.len(),
            50,
            "balanced markers after unclosed ones still count"
        );
        assert_eq!(
            t.matches("(Citation:").count(),
            2_000,
            "unclosed markers stay"
        );
        let (_, c) = clean_text(&format!(
            "{}{}",
            "text ".repeat(100),
            (0..2_000)
                .map(|i| format!("(Citation: C{})", i % 50))
                .collect::<String>()
        ));
        assert_eq!(c.len(), 50);
        assert_eq!(c[49], "C49");
    }
}
