//! Mapping models from the lake: collect ATT&CK training text with SQL, fit, save a versioned artifact.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use datafusion::prelude::{col, lit};
use regex::Regex;
use threatlake_udfs::mapper::{
    self, text, Example, Manifest, Mapper, MapperError, MapperParams, Pretrained, TechniqueInfo,
    TrainingSet,
};

use crate::config::Domain;
use crate::sql::{Engine, SqlError};

/// Errors building or finding a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// Reading training data failed.
    #[error("reading training data: {0}")]
    Sql(#[from] SqlError),
    /// No ATT&CK data for the domain.
    #[error(
        "the lake has no ATT&CK {0} techniques; run `threatlake ingest attack --domain {0}` first"
    )]
    NoData(Domain),
    /// Fitting, saving or loading failed.
    #[error(transparent)]
    Mapper(#[from] MapperError),
}

async fn collect(
    engine: &Engine,
    table: &str,
    domain: Domain,
    cols: &[&str],
) -> Result<Vec<RecordBatch>, MappingError> {
    let df = engine
        .ctx
        .table(table)
        .await
        .map_err(SqlError::from)?
        .filter(col("domain").eq(lit(domain.as_str())))
        .map_err(SqlError::from)?
        .select_columns(cols)
        .map_err(SqlError::from)?;
    Ok(df.collect().await.map_err(SqlError::from)?)
}

fn strings(b: &RecordBatch, i: usize) -> Vec<Option<String>> {
    let a =
        arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).expect("text column");
    a.as_string::<i32>()
        .iter()
        .map(|s| s.map(str::to_string))
        .collect()
}

fn lists(b: &RecordBatch, i: usize) -> Vec<Vec<String>> {
    let l = b.column(i).as_list::<i32>();
    (0..l.len())
        .map(|r| {
            if l.is_null(r) {
                return vec![];
            }
            let v = l.value(r);
            v.as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// The training set of a domain's newest release: active techniques with their description and
/// detection text, procedure examples with actor/software names removed, revoked-id redirects.
pub async fn training_set(engine: &Engine, domain: Domain) -> Result<TrainingSet, MappingError> {
    let mut set = TrainingSet {
        domain: domain.to_string(),
        ..Default::default()
    };
    let cols = [
        "technique_id",
        "name",
        "tactics",
        "description",
        "detection",
        "attack_version",
    ];
    for b in collect(engine, "attack_techniques_current", domain, &cols).await? {
        let (id, name, desc, det, ver) = (
            strings(&b, 0),
            strings(&b, 1),
            strings(&b, 3),
            strings(&b, 4),
            strings(&b, 5),
        );
        let tactics = lists(&b, 2);
        for r in 0..b.num_rows() {
            set.attack_version = ver[r].clone().unwrap_or_default();
            set.techniques.push(TechniqueInfo {
                id: id[r].clone().unwrap_or_default(),
                name: name[r].clone().unwrap_or_default(),
                tactics: tactics[r].clone(),
                description: desc[r].clone().unwrap_or_default(),
                detection: det[r].clone().unwrap_or_default(),
            });
        }
    }
    if set.techniques.is_empty() {
        return Err(MappingError::NoData(domain));
    }
    set.techniques.sort_by(|a, b| a.id.cmp(&b.id));

    // Revoked ids of the same release point at their replacement.
    let cols = ["technique_id", "revoked_by", "attack_version"];
    for b in collect(engine, "mitre_attack_techniques", domain, &cols).await? {
        let (id, by, ver) = (strings(&b, 0), strings(&b, 1), strings(&b, 2));
        for r in 0..b.num_rows() {
            if let (Some(i), Some(by)) = (&id[r], &by[r]) {
                if ver[r].as_deref() == Some(set.attack_version.as_str()) {
                    set.revoked.push((i.clone(), by.clone()));
                }
            }
        }
    }
    set.revoked.sort();

    // Names and aliases of every group, software and campaign, to strip from procedure text: the
    // mapper must learn what was done, not who did it.
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    for table in [
        "mitre_attack_groups",
        "mitre_attack_software",
        "mitre_attack_campaigns",
    ] {
        for b in collect(engine, table, domain, &["stix_id", "name", "aliases"]).await? {
            let (id, name) = (strings(&b, 0), strings(&b, 1));
            let aliases = lists(&b, 2);
            for r in 0..b.num_rows() {
                let e = names.entry(id[r].clone().unwrap_or_default()).or_default();
                e.extend(name[r].clone());
                e.extend(aliases[r].iter().cloned());
            }
        }
    }
    let mut strippers: HashMap<String, Option<Regex>> = HashMap::new();
    let cols = [
        "technique_id",
        "description",
        "source_ref",
        "relationship_id",
    ];
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    for b in collect(engine, "attack_procedures_current", domain, &cols).await? {
        let (t, d, s, rid) = (
            strings(&b, 0),
            strings(&b, 1),
            strings(&b, 2),
            strings(&b, 3),
        );
        for r in 0..b.num_rows() {
            if let (Some(t), Some(d), Some(s), Some(rid)) = (&t[r], &d[r], &s[r], &rid[r]) {
                rows.push((rid.clone(), t.clone(), d.clone(), s.clone()));
            }
        }
    }
    rows.sort();
    for (_, technique, description, source) in rows {
        let re = strippers
            .entry(source.clone())
            .or_insert_with(|| name_regex(names.get(&source)));
        let text = match re {
            Some(re) => re
                .replace_all(&description, "")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            None => description,
        };
        set.examples.push(Example {
            technique,
            text,
            source,
        });
    }
    Ok(set)
}

/// How many times a labelled sentence (`mapping.examples`, workbench feedback) is learnt: ATT&CK's
/// own texts outnumber the shipped report sentences 18 to 1, and text written the way reports and
/// rules are written is what the mapper meets. Chosen on the development sets (README "Labelled
/// report sentences"): at 3 every set's top-1, recall@5 and MRR@10 are at least those of 1, and the
/// cross-validated ECE of AnnoCTR and Splunk is below 0.05 in every partition; 2 and 4 lower CAR's
/// top-1, 4 its recall@5, and 6 its calibration.
pub const LABELLED_WEIGHT: usize = 3;

/// Add labelled sentences `(text, labels, source)` to `set` as procedure examples of their
/// techniques, each [`LABELLED_WEIGHT`] times; returns how many sentences were added. Techniques
/// the domain does not know are skipped (so Enterprise sentences teach a Mobile or ICS model
/// nothing).
fn add_labelled(
    set: &mut TrainingSet,
    rows: impl IntoIterator<Item = (String, Vec<String>, String)>,
) -> usize {
    let known: HashSet<String> = set
        .techniques
        .iter()
        .map(|t| t.id.clone())
        .chain(set.revoked.iter().map(|(a, _)| a.clone()))
        .collect();
    let mut sentences = 0;
    for (text, labels, source) in rows {
        let labels: Vec<String> = labels.into_iter().filter(|l| known.contains(l)).collect();
        if labels.is_empty() || text.trim().is_empty() {
            continue;
        }
        for technique in labels {
            let example = Example {
                technique,
                text: text.clone(),
                source: source.clone(),
            };
            set.examples
                .extend(std::iter::repeat_n(example, LABELLED_WEIGHT));
        }
        sentences += 1;
    }
    sentences
}

/// What `model build` did with the workbench's labelled sentences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedbackLearnt {
    /// Sentences learnt.
    pub sentences: usize,
    /// Labelled sentences held out (`mapping.feedback_holdout`).
    pub held_out: usize,
    /// The reports they belong to.
    pub held_out_reports: usize,
}

/// Whether the workbench report `doc` is held out of the model at `fraction`
/// (`mapping.feedback_holdout`): a stable draw per report, so a report stays on its side as
/// feedback grows, and all its sentences with it (`model eval` leaves out whole reports the model
/// learnt a sentence of).
pub fn feedback_held_out(doc: &str, fraction: f64) -> bool {
    const BUCKETS: u64 = 10_000;
    let bucket = mapper::calibrate::fold_of(mapper::calibrate::group_of(doc), BUCKETS, 1);
    (bucket as f64) < fraction * BUCKETS as f64
}

/// Add the sentences analysts labelled in the mapping workbench (`mapping_feedback`: accepted and
/// corrected techniques, the newest decision per suggestion) to `set` as procedure examples of
/// their techniques, except the reports [`feedback_held_out`] at `holdout`. Techniques the domain
/// does not know are skipped; rejections are not learnt (the mapper has no negative examples).
pub async fn add_feedback(
    engine: &Engine,
    set: &mut TrainingSet,
    holdout: f64,
) -> Result<FeedbackLearnt, MappingError> {
    let (held, learn): (Vec<_>, Vec<_>) = crate::feedback::export(engine)
        .await?
        .into_iter()
        .partition(|ex| feedback_held_out(&ex.doc, holdout));
    let held: Vec<_> = held
        .into_iter()
        .filter(|ex| !ex.labels.is_empty())
        .collect();
    let reports: HashSet<&str> = held.iter().map(|ex| ex.doc.as_str()).collect();
    let rows = learn
        .into_iter()
        .map(|ex| (ex.text, ex.labels, format!("workbench:{}", ex.doc)));
    Ok(FeedbackLearnt {
        sentences: add_labelled(set, rows),
        held_out: held.len(),
        held_out_reports: reports.len(),
    })
}

/// A parent technique's sub-technique that `text` names (its ATT&CK name as written, at word
/// boundaries; names of three characters or more), for a labelled example: report annotators label
/// the parent even where the text names the sub-technique (AnnoCTR labels "PowerShell" sentences
/// T1059), and learnt as the parent such a sentence would teach the mapper to prefer the parent over
/// the sub-technique it plainly describes. The sub-technique implies the parent, so learning it
/// loses nothing.
fn named_sub_techniques(set: &TrainingSet) -> impl Fn(&str, &str) -> Option<String> {
    let mut subs: HashMap<String, Vec<(String, Regex)>> = HashMap::new();
    for t in &set.techniques {
        let Some((parent, _)) = t.id.split_once('.') else {
            continue;
        };
        if t.name.chars().count() < 3 {
            continue;
        }
        if let Ok(re) = Regex::new(&format!(r"\b{}\b", regex::escape(&t.name))) {
            subs.entry(parent.to_string())
                .or_default()
                .push((t.id.clone(), re));
        }
    }
    move |label: &str, text: &str| {
        let named: Vec<&String> = subs
            .get(label)?
            .iter()
            .filter(|(_, re)| re.is_match(text))
            .map(|(id, _)| id)
            .collect();
        // One sub-technique named: that one; none or several: the label as given.
        match named.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    }
}

/// The labelled report sentences shipped with threatlake (`mapping.examples: builtin`): AnnoCTR's
/// train documents (`data/mapping/README.md`).
pub const BUILTIN_EXAMPLES: &str = include_str!("../data/mapping/annoctr-train.jsonl");

/// The labelled sentences `mapping.examples` names: `builtin` or a JSON-lines file of
/// `{"text", "labels", "doc"?}`; the error names the file, the line and the fix.
pub fn examples_setting(value: &str) -> Result<Vec<crate::feedback::Labelled>, String> {
    let (name, text) = if value == "builtin" {
        (
            "the built-in examples".to_string(),
            BUILTIN_EXAMPLES.to_string(),
        )
    } else {
        let text = std::fs::read_to_string(value).map_err(|e| {
            format!(
                "cannot read the examples {value}: {e}; fix mapping.examples (null learns none)"
            )
        })?;
        (value.to_string(), text)
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                format!(
                    "{name} line {}: {e}; expected {{\"text\": \"…\", \"labels\": [\"T…\"]}} (fix the file or mapping.examples)",
                    i + 1
                )
            })
        })
        .collect()
}

/// What a model learns besides ATT&CK's own text.
#[derive(Debug, Clone, Default)]
pub struct Learn {
    /// The workbench's accepted and corrected sentences (`mapping_feedback`).
    pub feedback: bool,
    /// The share of the workbench's reports held out of the model (`mapping.feedback_holdout`).
    pub feedback_holdout: f64,
    /// Labelled sentences (`mapping.examples`).
    pub examples: Vec<crate::feedback::Labelled>,
}

fn name_regex(names: Option<&Vec<String>>) -> Option<Regex> {
    let mut names: Vec<&String> = names?.iter().filter(|n| n.chars().count() >= 3).collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    names.dedup();
    if names.is_empty() {
        return None;
    }
    let alt: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
    Regex::new(&format!(r"(?i)\b(?:{})(?:'s)?\b", alt.join("|"))).ok()
}

/// Load general-English vectors restricted to the words of the training set.
pub fn load_pretrained(path: &Path, set: &TrainingSet) -> Result<Pretrained, MappingError> {
    let mut words: HashSet<String> = HashSet::new();
    let mut toks = Vec::new();
    for (_, t) in mapper::algorithm::training_texts(set) {
        text::tokens(&t, &mut toks);
        words.extend(toks.drain(..));
    }
    Ok(Pretrained::load(path, &|w: &str| {
        words.contains(&w.to_lowercase())
    })?)
}

/// What `model build` did.
#[derive(Debug)]
pub struct BuildReport {
    /// Model directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Wall time of reading, fitting and saving.
    pub timings: Vec<(&'static str, Duration)>,
    /// Bytes on disk.
    pub bytes: u64,
    /// What it did with the workbench's labelled sentences.
    pub feedback: FeedbackLearnt,
}

/// The text calibration shipped with threatlake (`mapping.calibration: builtin`): fitted by
/// `model calibrate` on the public development sets for the Enterprise model (README: Mapping scores).
pub const BUILTIN_CALIBRATION: &str = include_str!("../config/mapping_calibration.json");

/// The calibration `mapping.calibration` names: `builtin` or a file; the error says what is wrong
/// and how to fix it.
pub fn calibration_setting(value: &str) -> Result<mapper::calibrate::Calibration, String> {
    if value == "builtin" {
        return mapper::calibrate::parse(BUILTIN_CALIBRATION.as_bytes())
            .map_err(|e| format!("the built-in calibration does not parse ({e}); set mapping.calibration to a file or null"));
    }
    read_calibration(Path::new(value))
}

/// Read a text calibration file; the error says what is wrong and how to fix it.
pub fn read_calibration(path: &Path) -> Result<mapper::calibrate::Calibration, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the calibration {}: {e}; fix mapping.calibration (null builds an uncalibrated model)",
            path.display()
        )
    })?;
    mapper::calibrate::parse(&bytes).map_err(|e| {
        format!(
            "{} is not a calibration file this build reads ({e}); write one with `threatlake model calibrate --write`",
            path.display()
        )
    })
}

/// Build and save the model for `domain` under `models_root/<domain>-<version>/`.
pub async fn build_model(
    engine: &Engine,
    domain: Domain,
    models_root: &Path,
    pretrained: Option<&Path>,
    params: MapperParams,
    calibration: Option<mapper::calibrate::Calibration>,
    learn: Learn,
) -> Result<BuildReport, MappingError> {
    let mut timings = Vec::new();
    let t = Instant::now();
    let mut set = training_set(engine, domain).await?;
    let attack_examples = set.examples.len();
    let learnt = if learn.feedback {
        add_feedback(engine, &mut set, learn.feedback_holdout).await?
    } else {
        FeedbackLearnt::default()
    };
    let named = named_sub_techniques(&set);
    let examples = add_labelled(
        &mut set,
        learn.examples.into_iter().map(|l| {
            let source = format!("examples:{}", l.doc.as_deref().unwrap_or(""));
            let labels = l
                .labels
                .into_iter()
                .map(|label| named(&label, &l.text).unwrap_or(label))
                .collect();
            (l.text, labels, source)
        }),
    );
    timings.push(("read lake", t.elapsed()));
    let t = Instant::now();
    let pre = pretrained.map(|p| load_pretrained(p, &set)).transpose()?;
    if pre.is_some() {
        timings.push(("load pretrained", t.elapsed()));
    }
    let t = Instant::now();
    let (m, set) = tokio::task::spawn_blocking(move || {
        let m = Mapper::build(params, &set, pre.as_ref());
        (m, set)
    })
    .await
    .expect("model build worker panicked");
    let mut m = m?;
    m.model.calibration = calibration.filter(|c| c.domain == m.model.domain);
    m.model.set_learnt(
        set.examples[attack_examples..]
            .iter()
            .map(|e| e.text.as_str()),
    );
    timings.push(("fit", t.elapsed()));
    let t = Instant::now();
    let dir = mapper::model_dir(models_root, domain.as_str(), &set.attack_version);
    let mut manifest = m.manifest(pretrained.map(|p| p.display().to_string()));
    manifest.feedback = learnt.sentences;
    manifest.feedback_held_out = learnt.held_out;
    manifest.examples = examples;
    m.save(&dir, &manifest)?;
    timings.push(("save", t.elapsed()));
    let bytes = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Ok(BuildReport {
        dir,
        manifest,
        timings,
        bytes,
        feedback: learnt,
    })
}

/// Feed items labelled with the techniques their source states (OTX `attack_ids`, VirusTotal
/// sandbox trees), on the items' real text: what `model eval --from-lake` measures against.
pub struct FeedLabels {
    /// Items with at least one label the model knows.
    pub test: Vec<threatlake_udfs::mapper::eval::Labelled>,
    /// Source-stated technique rows seen.
    pub stated: usize,
    /// Of which the model's domain does not know (dropped).
    pub unknown: usize,
}

/// [`FeedLabels`] of the lake; `known` says whether the model knows a technique id.
pub async fn feed_labelled(
    engine: &Engine,
    known: impl Fn(&str) -> bool,
) -> Result<FeedLabels, crate::sql::SqlError> {
    let r = engine
        .run(
            "SELECT t.item_id, t.source, t.text, m.technique_id \
             FROM threat_intelligence_data t JOIN mapped_threat_data m \
               ON m.item_id = t.item_id AND m.item_version = t.item_version AND m.method = 'source' \
             ORDER BY t.item_id, m.technique_id",
        )
        .await?;
    let mut items: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
    let (mut stated, mut unknown) = (0usize, 0usize);
    for b in &r[0].batches {
        let col = |i| crate::feeds::column_strings(b, i);
        let rows = col(0).into_iter().zip(col(2)).zip(col(3));
        for ((id, text), t) in rows {
            let (Some(id), Some(text), Some(t)) = (id, text, t) else {
                continue;
            };
            stated += 1;
            let e = items.entry(id).or_insert_with(|| (text, vec![]));
            if known(&t) {
                e.1.push(t);
            } else {
                unknown += 1;
            }
        }
    }
    let test = items
        .into_values()
        .filter(|(_, l)| !l.is_empty())
        .map(|(text, labels)| threatlake_udfs::mapper::eval::Labelled { text, labels })
        .collect();
    Ok(FeedLabels {
        test,
        stated,
        unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_holdout_draws_whole_reports_stably_and_in_proportion() {
        let docs: Vec<String> = (0..2000).map(|i| format!("report-{i}.pdf")).collect();
        let held = |f: f64| -> Vec<bool> { docs.iter().map(|d| feedback_held_out(d, f)).collect() };
        assert!(held(0.0).iter().all(|h| !h), "0 learns every report");
        let share = |h: &[bool]| h.iter().filter(|h| **h).count() as f64 / h.len() as f64;
        let (fifth, half) = (held(0.2), held(0.5));
        assert!((share(&fifth) - 0.2).abs() < 0.03, "{}", share(&fifth));
        assert!((share(&half) - 0.5).abs() < 0.04, "{}", share(&half));
        // A report held out at 0.2 stays held out at 0.5: raising the share only moves reports out.
        assert!(fifth.iter().zip(&half).all(|(a, b)| !a || *b));
        // The same draw at every build and in every version (FNV-1a, SplitMix64): a change would
        // silently swap which reports train the model and which measure it.
        let first: Vec<usize> = (0..10).filter(|i| fifth[*i]).collect();
        assert_eq!(first, [2, 5, 7, 8]);
    }

    fn technique(id: &str, name: &str) -> TechniqueInfo {
        TechniqueInfo {
            id: id.into(),
            name: name.into(),
            tactics: vec![],
            description: String::new(),
            detection: String::new(),
        }
    }

    #[test]
    fn a_parent_label_is_learnt_for_the_one_sub_technique_the_text_names() {
        let set = TrainingSet {
            techniques: vec![
                technique("T1059", "Command and Scripting Interpreter"),
                technique("T1059.001", "PowerShell"),
                technique("T1059.007", "JavaScript"),
                technique("T1053", "Scheduled Task/Job"),
                technique("T1053.002", "At"),
            ],
            ..TrainingSet::default()
        };
        let named = named_sub_techniques(&set);
        let ps = "The loader ran PowerShell scripts to fetch the payload.";
        assert_eq!(named("T1059", ps).as_deref(), Some("T1059.001"));
        // Names as ATT&CK writes them, at word boundaries.
        assert_eq!(named("T1059", "It ran powershellish things."), None);
        // Two sub-techniques named: the label as given.
        assert_eq!(named("T1059", "PowerShell and JavaScript droppers."), None);
        // A sub-technique label, or a parent none of whose sub-techniques is named, stays.
        assert_eq!(named("T1059.001", ps), None);
        assert_eq!(named("T1053", "They scheduled it At logon."), None);

        let mut set = set;
        let n = add_labelled(
            &mut set,
            [
                (
                    ps.to_string(),
                    vec!["T1059.001".into()],
                    "examples:r1".into(),
                ),
                (
                    "Mobile only.".to_string(),
                    vec!["T1437".into()],
                    "examples:r1".into(),
                ),
            ],
        );
        assert_eq!(n, 1, "a sentence with no known technique is not learnt");
        // Learnt LABELLED_WEIGHT times, for the one technique it names.
        assert_eq!(set.examples.len(), LABELLED_WEIGHT);
        assert!(set.examples.iter().all(|e| e.technique == "T1059.001"
            && e.text == ps
            && threatlake_udfs::mapper::learnt_source(&e.source)));
    }

    #[test]
    fn bad_examples_are_refused_naming_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("tl-examples-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ex.jsonl");
        std::fs::write(
            &f,
            "{\"text\": \"a\", \"labels\": [\"T1059\"]}\n{\"text\": 3}\n",
        )
        .unwrap();
        let err = examples_setting(f.to_str().unwrap()).unwrap_err();
        assert!(
            err.contains("ex.jsonl line 2") && err.contains("mapping.examples"),
            "{err}"
        );
        let err = examples_setting(dir.join("missing.jsonl").to_str().unwrap()).unwrap_err();
        assert!(
            err.contains("missing.jsonl") && err.contains("null"),
            "{err}"
        );
        let builtin = examples_setting("builtin").unwrap();
        assert_eq!(builtin.len(), 1461);
        assert!(builtin.iter().all(|l| !l.labels.is_empty()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
