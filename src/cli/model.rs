//! `threatlake model build|eval` and `threatlake map`: CLI over the mapping engine.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use threatlake::mapping;
use threatlake::{Domain, Engine, Lake, Settings};
use threatlake_udfs::mapper::eval::{self, Baseline, Labelled, Metrics};
use threatlake_udfs::mapper::{self, Mapper, MapperParams, Scratch};

/// Resolve the model directory: explicit, else the newest for the domain.
pub fn resolve_model(settings: &Settings, model: Option<&Path>, domain: Domain) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let root = Path::new(&settings.lake.models);
    mapper::find_latest(root, domain.as_str()).with_context(|| {
        format!(
            "no {domain} mapping model in {}; run `threatlake model build --domain {domain}` first",
            root.display()
        )
    })
}

/// `model build`.
pub async fn build(
    settings: &Settings,
    domain: Domain,
    options: threatlake::pipeline::BuildOptions,
) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open(&lake).await?;
    let built = threatlake::pipeline::build_model(settings, &engine, domain, options).await?;
    println!("{}", built.summary);
    Ok(())
}

/// `model feedback export`: the workbench decisions as labelled JSON lines, to `output` or stdout.
pub async fn feedback_export(settings: &Settings, output: Option<&Path>) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open_with(
        &lake,
        &threatlake::sql::EngineOptions::from_settings(settings),
    )
    .await?;
    let examples = threatlake::feedback::export(&engine).await?;
    let mut text = String::new();
    for e in &examples {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    match output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "{} labelled sentences written to {}",
                examples.len(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// `model feedback import`: record a labelled file's sentences as decisions in `mapping_feedback`.
pub async fn feedback_import(settings: &Settings, input: &Path, who: Option<&str>) -> Result<()> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: threatlake::feedback::Labelled = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"text\": \"…\", \"labels\": [\"T…\"], \"rejected\"?: [\"T…\"]}}",
                input.display(),
                i + 1
            )
        })?;
        lines.push((i + 1, l));
    }
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let who = who.map_or_else(|| format!("import:{name}"), str::to_string);
    let at = threatlake::feeds::fixed(chrono::Utc::now());
    let decisions = threatlake::feedback::decisions_of(&lines, &who, &at)
        .map_err(|e| anyhow::anyhow!("{}: {e}; fix the file and import again", input.display()))?;
    let lake = Lake::from_settings(&settings.lake)?;
    threatlake::feedback::record_all(&lake, &decisions).await?;
    let sentences = lines
        .iter()
        .filter(|(_, l)| !l.labels.is_empty() || !l.rejected.is_empty())
        .count();
    println!(
        "{} decisions on {sentences} of {} sentences recorded in mapping_feedback as {who}{}",
        decisions.len(),
        lines.len(),
        if sentences < lines.len() {
            " (sentences without labels or rejections say nothing to learn and were skipped)"
        } else {
            ""
        }
    );
    Ok(())
}

/// The texts of an input file, one at a time: JSON lines with a `text` field
/// (.jsonl/.ndjson/.json), CSV with a `text` column (.csv), else one text per line. A bad line
/// is an error naming the file and line, where it comes.
pub fn texts_of(path: &Path) -> Result<Box<dyn Iterator<Item = Result<String>>>> {
    let name = path.to_string_lossy().to_lowercase();
    let shown = path.display().to_string();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open input {}", path.display()))?;
    let reader = std::io::BufReader::new(file);
    let lines = reader.lines().enumerate().map(move |(i, line)| {
        line.map(|l| (i + 1, l))
            .with_context(|| format!("{shown} line {}: not UTF-8 text", i + 1))
    });
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
        let shown = path.display().to_string();
        let text_of = move |(n, line): (usize, String)| -> Result<String> {
            let v: serde_json::Value = serde_json::from_str(&line).with_context(|| {
                format!("{shown} line {n}: not JSON; expected {{\"text\": \"…\"}} per line")
            })?;
            let text = v.get("text").and_then(|t| t.as_str());
            text.map(str::to_string)
                .with_context(|| format!("{shown} line {n}: no string field \"text\""))
        };
        Ok(Box::new(
            lines
                .filter(|l| !matches!(l, Ok((_, l)) if l.trim().is_empty()))
                .map(move |l| l.and_then(&text_of)),
        ))
    } else if name.ends_with(".csv") {
        let mut rdr = std::io::BufReader::new(std::fs::File::open(path)?);
        let (schema, _) = arrow::csv::reader::Format::default()
            .with_header(true)
            .infer_schema(&mut rdr, Some(1000))
            .with_context(|| format!("{}: not a CSV file with a header", path.display()))?;
        let idx = schema.index_of("text").map_err(|_| {
            anyhow::anyhow!(
                "{}: no \"text\" column (columns: {:?})",
                path.display(),
                schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
            )
        })?;
        let file = std::fs::File::open(path)?;
        let schema = Arc::new(arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| {
                    arrow::datatypes::Field::new(f.name(), arrow::datatypes::DataType::Utf8, true)
                })
                .collect::<Vec<_>>(),
        ));
        let csv = arrow::csv::ReaderBuilder::new(schema)
            .with_header(true)
            .build(file)?;
        let shown = path.display().to_string();
        Ok(Box::new(csv.flat_map(move |b| -> Vec<Result<String>> {
            match b {
                Ok(b) => arrow::array::AsArray::as_string::<i32>(b.column(idx))
                    .iter()
                    .map(|t| Ok(t.unwrap_or("").to_string()))
                    .collect(),
                Err(e) => vec![Err(
                    anyhow::Error::new(e).context(format!("reading {shown}"))
                )],
            }
        })))
    } else {
        Ok(Box::new(lines.map(|l| l.map(|(_, l)| l))))
    }
}

/// Texts `map` holds at a time: it reads, maps and prints a file a batch at a time, so its
/// memory is a batch's, not the file's.
const BATCH_TEXTS: usize = 4096;
/// Bytes of text in a batch, at most (and at least one text).
const BATCH_BYTES: usize = 8 << 20;

/// Move the next texts of `source` into the empty `batch`, up to [`BATCH_TEXTS`] and
/// [`BATCH_BYTES`]; whether it stopped at a limit (more texts may follow).
fn next_batch(
    source: &mut dyn Iterator<Item = Result<String>>,
    batch: &mut Vec<String>,
) -> Result<bool> {
    let mut bytes = 0;
    while batch.len() < BATCH_TEXTS && bytes < BATCH_BYTES {
        let Some(text) = source.next() else {
            return Ok(false);
        };
        let text = text?;
        bytes += text.len();
        batch.push(text);
    }
    Ok(true)
}

/// JSON line of one mapped row, in exactly the documented shape.
pub fn jsonl_line(row: usize, ranked: &[(String, f64)]) -> String {
    let items: Vec<String> = ranked
        .iter()
        .map(|(id, score)| {
            format!(
                "{{\"technique_id\": {}, \"score\": {}}}",
                serde_json::to_string(id).expect("string"),
                round4(*score)
            )
        })
        .collect();
    format!("{{\"row\": {row}, \"techniques\": [{}]}}", items.join(", "))
}

/// Files read whole as one report by `map --document --input` (text, markdown, HTML, PDF).
fn is_whole_document(p: &Path) -> bool {
    threatlake::extract::ReportKind::of(&p.to_string_lossy(), b"").is_some()
}

/// JSON line of one mapped report: `{"row", "techniques": [{"technique_id", "score", "sentences", "sentence"}]}`.
pub fn document_line(
    m: &Mapper,
    row: usize,
    found: &[threatlake_udfs::mapper::document::Found],
) -> String {
    let techniques: Vec<serde_json::Value> = found
        .iter()
        .map(|f| {
            serde_json::json!({
                "technique_id": m.model.techniques[f.technique].id,
                "score": round4(f.score),
                "sentences": f.sentences,
                "sentence": f.sentence,
            })
        })
        .collect();
    serde_json::json!({"row": row, "techniques": techniques}).to_string()
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// How `map` prints.
pub struct MapOutput {
    /// Techniques per text.
    pub top: usize,
    /// JSON lines instead of text.
    pub jsonl: bool,
    /// Each text is a whole report (`map_report`).
    pub document: bool,
}

/// `map`.
pub fn map(
    settings: &Settings,
    model: Option<&Path>,
    domain: Domain,
    text: Option<String>,
    input: Option<PathBuf>,
    output: MapOutput,
) -> Result<()> {
    let MapOutput {
        top,
        jsonl,
        document,
    } = output;
    let dir = resolve_model(settings, model, domain)?;
    let m = Mapper::load(&dir)?;
    let mut source: Box<dyn Iterator<Item = Result<String>>> = match (text, input) {
        (Some(t), None) => Box::new(std::iter::once(Ok(t))),
        (None, Some(p)) if document && is_whole_document(&p) => {
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let text = threatlake::extract::report_text(&p.display().to_string(), &bytes)?;
            Box::new(std::iter::once(Ok(text)))
        }
        (None, Some(p)) => texts_of(&p)?,
        (Some(_), Some(_)) => bail!("give either TEXT or --input FILE, not both"),
        (None, None) => bail!("give a TEXT to map or --input FILE"),
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let printer = Printer {
        m: &m,
        top,
        jsonl,
        threshold: settings.mapping.threshold,
    };
    let (mut batch, mut first, mut numbered) = (Vec::new(), 0, None);
    loop {
        let more = next_batch(&mut *source, &mut batch)?;
        if batch.is_empty() {
            break;
        }
        // Rows are numbered when the input has more than one text (known from the first batch).
        let several = *numbered.get_or_insert(more || batch.len() > 1);
        if document {
            printer.documents(&batch, first, several, &mut out)?;
        } else {
            printer.ranked(&batch, first, several, &mut out)?;
        }
        first += batch.len();
        batch.clear();
        if !more {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

/// How `map` prints a batch of texts.
struct Printer<'a> {
    m: &'a Mapper,
    top: usize,
    jsonl: bool,
    threshold: Option<f64>,
}

impl Printer<'_> {
    /// Each text of `texts` (rows `first…`) mapped as a whole report.
    fn documents(
        &self,
        texts: &[String],
        first: usize,
        several: bool,
        out: &mut impl Write,
    ) -> Result<()> {
        let m = self.m;
        let docs =
            threatlake_udfs::mapping_kernels::par_documents(m, texts.len(), self.threshold, |i| {
                Some(texts[i].as_str())
            });
        for (i, found) in docs.into_iter().enumerate() {
            let (row, found) = (first + i, found.unwrap_or_default());
            if self.jsonl {
                writeln!(out, "{}", document_line(m, row, &found))?;
                continue;
            }
            if several {
                writeln!(out, "row {row}: {} techniques", found.len())?;
            }
            for (rank, f) in found.iter().enumerate() {
                let t = &m.model.techniques[f.technique];
                writeln!(
                    out,
                    "{:>3}. {:<10} {:.3}  {} [{}], {} sentence{}\n       \"{}\"",
                    rank + 1,
                    t.id,
                    f.score,
                    t.name,
                    t.tactics.join(", "),
                    f.sentences,
                    if f.sentences == 1 { "" } else { "s" },
                    f.sentence.chars().take(160).collect::<String>()
                )?;
            }
        }
        Ok(())
    }

    /// Each text of `texts` (rows `first…`): its best techniques, and the evidence of the first.
    fn ranked(
        &self,
        texts: &[String],
        first: usize,
        several: bool,
        out: &mut impl Write,
    ) -> Result<()> {
        let m = self.m;
        let rows = threatlake_udfs::mapping_kernels::par_top_k(m, texts, self.top);
        let mut s = Scratch::default();
        for (i, ranked) in rows.iter().enumerate() {
            let row = first + i;
            if self.jsonl {
                let r: Vec<(String, f64)> = ranked
                    .iter()
                    .map(|x| (m.model.techniques[x.technique].id.clone(), x.score))
                    .collect();
                writeln!(out, "{}", jsonl_line(row, &r))?;
                continue;
            }
            if several {
                writeln!(
                    out,
                    "row {row}: {}",
                    texts[i].chars().take(100).collect::<String>()
                )?;
            }
            for (rank, x) in ranked.iter().enumerate() {
                let t = &m.model.techniques[x.technique];
                writeln!(
                    out,
                    "{:>2}. {:<10} {:.3}  {} [{}]",
                    rank + 1,
                    t.id,
                    x.score,
                    t.name,
                    t.tactics.join(", ")
                )?;
            }
            if let Some(e) = m.explain(&texts[i], self.threshold, &mut s) {
                writeln!(out, "    evidence: {e}")?;
            }
        }
        Ok(())
    }
}

fn read_labelled(path: &Path) -> Result<Vec<Labelled>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Labelled = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"text\": \"…\", \"labels\": [\"T…\"]}}",
                path.display(),
                i + 1
            )
        })?;
        out.push(l);
    }
    if out.is_empty() {
        bail!("{} has no labelled lines", path.display());
    }
    Ok(out)
}

fn print_metrics_header() {
    println!(
        "{:<34} {:>6} {:>7} {:>11} {:>9} {:>8} {:>7}",
        "method", "n", "top1", "top1_parent", "recall@5", "mrr@10", "fit s"
    );
}

fn print_metrics(name: &str, m: &Metrics, fit_s: f64) {
    println!(
        "{:<34} {:>6} {:>7.3} {:>11.3} {:>9.3} {:>8.3} {:>7.1}",
        name, m.n, m.top1, m.top1_parent, m.recall_at_5, m.mrr_at_10, fit_s
    );
}

fn rank_with(m: &Mapper, test: &[Labelled]) -> Vec<Vec<String>> {
    let texts: Vec<String> = test.iter().map(|l| l.text.clone()).collect();
    threatlake_udfs::mapping_kernels::par_top_k(m, &texts, 10)
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|x| m.model.techniques[x.technique].id.clone())
                .collect()
        })
        .collect()
}

/// `model eval --input FILE`: ranking metrics on the labelled texts; how well the top-1 score states
/// the chance of being right (expected calibration error, reliability table); and, per threshold,
/// the share of labelled texts still mapped, their precision and the share of negatives (texts
/// labelled `[]`) that get a technique anyway.
pub fn eval_file(
    settings: &Settings,
    model: Option<&Path>,
    domain: Domain,
    input: &Path,
) -> Result<()> {
    let dir = resolve_model(settings, model, domain)?;
    let m = Mapper::load(&dir)?;
    let test = unlearnt(&m, read_grouped(input)?, input)?;
    let texts: Vec<String> = test.iter().map(|l| l.text.clone()).collect();
    let ranked = threatlake_udfs::mapping_kernels::par_top_k(&m, &texts, 10);
    let (mut ids, mut labels, mut pairs, mut negatives) = (vec![], vec![], vec![], vec![]);
    // The same, right when the best technique's parent is one of the labels' parents.
    let mut parent_pairs = vec![];
    for (l, r) in test.iter().zip(&ranked) {
        let top = r.first().map_or(0.0, |x| x.score);
        if l.labels.is_empty() {
            negatives.push(top);
            continue;
        }
        let r_ids: Vec<String> = r
            .iter()
            .map(|x| m.model.techniques[x.technique].id.clone())
            .collect();
        pairs.push((top, r_ids.first().is_some_and(|t| l.labels.contains(t))));
        parent_pairs.push((
            top,
            r_ids
                .first()
                .is_some_and(|t| l.labels.iter().any(|l| eval::parent(l) == eval::parent(t))),
        ));
        ids.push(r_ids);
        labels.push(l.labels.clone());
    }
    let metrics = eval::evaluate(&ids, &labels);
    println!("model      {}", dir.display());
    println!("n          {}", metrics.n);
    println!("top1       {:.4}", metrics.top1);
    println!("top1_parent {:.4}", metrics.top1_parent);
    println!("recall@5   {:.4}", metrics.recall_at_5);
    println!("mrr@10     {:.4}", metrics.mrr_at_10);
    if !negatives.is_empty() {
        println!("negatives  {} (texts labelled [])", negatives.len());
    }
    if pairs.is_empty() {
        return Ok(());
    }
    // A negative's best technique is never a correct label: every text counts, as map_technique
    // sees them.
    let mut every = pairs.clone();
    every.extend(negatives.iter().map(|p| (*p, false)));
    let rel = eval::reliability(&every, 10);
    let scores: Vec<f64> = every.iter().map(|p| p.0).collect();
    println!();
    println!(
        "top-1 score calibration: ECE {:.4} (10 bins{}; a perfectly calibrated score would show {:.4} on {} texts)",
        rel.ece,
        if negatives.is_empty() {
            ""
        } else {
            ", negatives counted as wrong"
        },
        eval::ece_noise_floor(&scores, 10, 200),
        every.len()
    );
    if !negatives.is_empty() {
        println!(
            "labelled texts only: ECE {:.4}",
            eval::reliability(&pairs, 10).ece
        );
    }
    println!(
        "{:>11} {:>6} {:>10} {:>9}",
        "score", "n", "mean score", "accuracy"
    );
    for b in &rel.bins {
        println!(
            "{:>4.1} - {:<4.1} {:>6} {:>10.3} {:>9.3}",
            b.lo, b.hi, b.n, b.mean_score, b.accuracy
        );
    }
    let mut thresholds = vec![
        0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
    ];
    let threshold = settings
        .mapping
        .threshold
        .unwrap_or_else(|| m.default_threshold());
    if !thresholds.contains(&threshold) {
        thresholds.push(threshold);
        thresholds.sort_by(f64::total_cmp);
    }
    println!();
    println!(
        "{:>9} {:>9} {:>10} {:>17} {:>19}",
        "threshold", "coverage", "precision", "negatives mapped", "precision (parent)"
    );
    let parents = eval::operating_points(&parent_pairs, &negatives, &thresholds);
    for (p, pp) in eval::operating_points(&pairs, &negatives, &thresholds)
        .into_iter()
        .zip(parents)
    {
        let here = if (p.threshold - threshold).abs() < 1e-9 {
            "  ← mapping.threshold"
        } else {
            ""
        };
        println!(
            "{:>9.2} {:>9.3} {:>10.3} {:>17} {:>19.3}{here}",
            p.threshold,
            p.coverage,
            p.precision,
            p.negatives_mapped
                .map_or("-".to_string(), |x| format!("{x:.3}")),
            pp.precision
        );
    }
    if let (Some(p), Some(pp)) = (
        eval::precision_at_coverage(&pairs, GOAL_COVERAGE),
        eval::precision_at_coverage(&parent_pairs, GOAL_COVERAGE),
    ) {
        println!(
            "precision of the best-scored {:.0}% of labelled texts (at any threshold): {p:.3} (parent {pp:.3})",
            GOAL_COVERAGE * 100.0
        );
    }
    eval_documents(settings, &m, test)
}

/// The share of labelled texts the default threshold should keep a technique for (with precision
/// ≥ 0.75): `model eval` and `model calibrate` print the precision the scores give that share at
/// any threshold, which says how far the ranking is from the goal whatever the threshold.
const GOAL_COVERAGE: f64 = 0.60;

/// `model eval --from-lake`: the model against the techniques feeds state for their own items (OTX
/// `attack_ids`, VirusTotal sandbox trees), on the items' real text. Labels the model's domain does not
/// know are dropped; items left without labels are not counted.
pub async fn eval_from_lake(
    settings: &Settings,
    model: Option<&Path>,
    domain: Domain,
) -> Result<()> {
    let dir = resolve_model(settings, model, domain)?;
    let m = Mapper::load(&dir)?;
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open(&lake).await?;
    let mapping::FeedLabels {
        test,
        stated,
        unknown,
    } = mapping::feed_labelled(&engine, |t| m.model.technique_index(t).is_some()).await?;
    if test.is_empty() {
        bail!(
            "no feed items with source-stated techniques the model knows; run `threatlake run` (OTX attack_ids, VirusTotal sandbox techniques) first"
        );
    }
    let metrics = eval::evaluate(
        &rank_with(&m, &test),
        &test.iter().map(|l| l.labels.clone()).collect::<Vec<_>>(),
    );
    println!("model      {}", dir.display());
    println!(
        "labels     {stated} source-stated technique(s), {unknown} not in the model's domain (dropped)"
    );
    print_metrics_header();
    print_metrics("agreement with feed-stated techniques", &metrics, 0.0);
    Ok(())
}

/// `model eval --holdout`: leakage-free development evaluation with ablations and the baseline.
pub async fn eval_holdout(
    settings: &Settings,
    domain: Domain,
    fraction: f64,
    seed: u64,
    pretrained: Option<String>,
) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open(&lake).await?;
    let set = mapping::training_set(&engine, domain).await?;
    let (train, test) = eval::holdout(&set, fraction, seed);
    println!(
        "hold-out: {domain} ATT&CK {}: {:.0}% of groups/software/campaigns held out (seed {seed}); train {} procedures, test {} texts (names stripped)",
        set.attack_version,
        fraction * 100.0,
        train.examples.len(),
        test.len()
    );
    let labels: Vec<Vec<String>> = test.iter().map(|l| l.labels.clone()).collect();
    print_metrics_header();
    let base = MapperParams::default();
    let mut variants: Vec<(String, MapperParams, bool)> = vec![
        ("threatlake (learned fusion)".into(), base.clone(), false),
        (
            "  fixed fusion weights".into(),
            base.clone().learn_fusion(false),
            false,
        ),
        (
            "  - classifier evidence".into(),
            MapperParams {
                lr_epochs: 0,
                weights: threatlake_udfs::mapper::FusionWeights {
                    lr: 0.0,
                    ..base.weights
                },
                ..base.clone()
            },
            false,
        ),
        (
            "  - embeddings".into(),
            base.clone()
                .weights(threatlake_udfs::mapper::FusionWeights {
                    embedding: 0.0,
                    ..base.weights
                }),
            false,
        ),
        (
            "  - k-means (1 prototype)".into(),
            base.clone().max_prototypes(1),
            false,
        ),
        ("  + PCA whitening".into(), base.clone().whiten(true), false),
        (
            "  embeddings only".into(),
            base.clone()
                .weights(threatlake_udfs::mapper::FusionWeights {
                    centroid: 0.0,
                    knn: 0.0,
                    name: 0.0,
                    lr: 0.0,
                    ..base.weights
                }),
            false,
        ),
    ];
    let pre_path = pretrained.or_else(|| settings.mapping.pretrained_vectors.clone());
    if pre_path.is_some() {
        variants.push(("  + pretrained vectors".into(), base.clone(), true));
    }
    let pre = match &pre_path {
        Some(p) => Some(mapping::load_pretrained(Path::new(p), &train)?),
        None => None,
    };
    for (name, params, use_pre) in variants {
        let t = Instant::now();
        let m = Mapper::build(params, &train, if use_pre { pre.as_ref() } else { None })?;
        let fit_s = t.elapsed().as_secs_f64();
        print_metrics(
            &name,
            &eval::evaluate(&rank_with(&m, &test), &labels),
            fit_s,
        );
    }
    let t = Instant::now();
    let b = tokio::task::spawn_blocking(move || Baseline::fit(&train, 8, seed)).await?;
    let fit_s = t.elapsed().as_secs_f64();
    let ranked: Vec<Vec<String>> = test.iter().map(|l| b.rank(&l.text, 10)).collect();
    print_metrics(
        "baseline TF-IDF + LR",
        &eval::evaluate(&ranked, &labels),
        fit_s,
    );
    Ok(())
}

/// A labelled row with the report or rule it belongs to (AnnoCTR's `doc`, else `id`).
#[derive(Clone)]
struct GroupedRow {
    text: String,
    labels: Vec<String>,
    group: Option<String>,
}

/// `rows` without the reports (rows of one `doc`/`id`; a row without one is its own) that the model
/// learnt a sentence of (`mapping.examples`, workbench feedback): scores there measure memory. Says
/// how many were left out; an error when that is every row.
fn unlearnt(m: &Mapper, rows: Vec<GroupedRow>, path: &Path) -> Result<Vec<GroupedRow>> {
    let keep = eval::not_learnt(
        m,
        &rows
            .iter()
            .map(|r| (r.text.as_str(), r.group.as_deref()))
            .collect::<Vec<_>>(),
    );
    if keep.iter().all(|k| *k) {
        return Ok(rows);
    }
    if !keep.iter().any(|k| *k) {
        bail!(
            "{}: the model learnt every report of it (mapping.examples or workbench feedback), so its scores there \
             measure memory; evaluate on other text, or keep some workbench reports out of the model with \
             mapping.feedback_holdout (e.g. 0.2) and run `threatlake model build` again",
            path.display()
        );
    }
    let n = rows.len();
    // Reports left out: their keys, and each row without one.
    let left_out = rows.iter().zip(&keep).filter(|(_, k)| !**k);
    let keys: std::collections::HashSet<&str> = left_out
        .clone()
        .filter_map(|(r, _)| r.group.as_deref())
        .collect();
    let reports = keys.len() + left_out.filter(|(r, _)| r.group.is_none()).count();
    let kept: Vec<GroupedRow> = rows
        .into_iter()
        .zip(keep)
        .filter_map(|(r, k)| k.then_some(r))
        .collect();
    println!(
        "{}: left out {} of {n} rows, those of {reports} report(s) the model learnt sentences of",
        path.display(),
        n - kept.len(),
    );
    Ok(kept)
}

fn read_grouped(path: &Path) -> Result<Vec<GroupedRow>> {
    let labelled = read_labelled(path)?;
    let text = std::fs::read_to_string(path)?;
    let groups = text.lines().filter(|l| !l.trim().is_empty()).map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        ["doc", "id"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string))
    });
    Ok(labelled
        .into_iter()
        .zip(groups)
        .map(|(l, group)| GroupedRow {
            text: l.text,
            labels: l.labels,
            group,
        })
        .collect())
}

/// Files `model calibrate` writes besides the model's `calibration.json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CalibrateOutputs<'a> {
    /// A copy of the calibration (e.g. the shipped `config/mapping_calibration.json`).
    pub write: Option<&'a Path>,
    /// Every sample's candidates as JSON lines.
    pub samples: Option<&'a Path>,
    /// Every labelled report's supported techniques as JSON lines.
    pub report_samples: Option<&'a Path>,
}

/// `model calibrate`: fit the text calibration on labelled files, report it cross-validated
/// (5 folds by report/rule, so sentences of one report never sit on both sides) and save it.
pub fn calibrate(
    settings: &Settings,
    model: Option<&Path>,
    domain: Domain,
    inputs: &[PathBuf],
    outputs: CalibrateOutputs<'_>,
) -> Result<()> {
    use threatlake_udfs::mapper::calibrate::{self as cal, Calibration};
    let dir = resolve_model(settings, model, domain)?;
    let mut m = Mapper::load_uncalibrated(&dir)?;
    let mut all = Vec::new();
    let mut names = Vec::new();
    let mut reports = Vec::new();
    for (fi, p) in inputs.iter().enumerate() {
        let grouped = unlearnt(&m, read_grouped(p)?, p)?;
        reports.push(
            reports_of(grouped.clone())
                .into_iter()
                .map(|(t, l, g)| (t, l, cal::group_of(&g)))
                .collect::<Vec<cal::LabelledReport>>(),
        );
        let rows: Vec<(String, Vec<String>, u64)> = grouped
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let g = r.group.map_or(i as u64, |g| cal::group_of(&g));
                (r.text, r.labels, g)
            })
            .collect();
        let name = p
            .file_name()
            .map_or(p.display().to_string(), |n| n.to_string_lossy().to_string());
        names.push(format!("{name} ({} rows)", rows.len()));
        all.extend(cal::samples(&m, fi, &rows));
    }
    if let Some(path) = outputs.samples {
        write_json_lines(path, &all)?;
    }
    let cv = cal::cross_validated(&all, 5, 0);
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    println!("model {}", dir.display());
    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>12} {:>10} {:>12}",
        "file", "positives", "negatives", "ECE before", "after (CV)", "with negs", "after (CV)"
    );
    let (mut pos_all, mut neg_all) = (Vec::new(), Vec::new());
    let mut per_file = Vec::new();
    for (fi, name) in names.iter().enumerate() {
        let (mut before, mut after, mut negs) = (Vec::new(), Vec::new(), Vec::new());
        let mut negs_before = Vec::new();
        for (s, p) in all.iter().zip(&cv) {
            if s.file != fi {
                continue;
            }
            let (Some((x, ok)), Some(p)) = (s.candidates.first(), p) else {
                continue;
            };
            if s.positive {
                before.push((sigmoid(x[cal::feature::LOGIT]), *ok));
                after.push((*p, *ok));
            } else {
                negs.push(*p);
                negs_before.push(sigmoid(x[cal::feature::LOGIT]));
            }
        }
        let with_negatives = |pos: &[(f64, bool)], negs: Vec<f64>| {
            let mut all = pos.to_vec();
            all.extend(negs.into_iter().map(|p| (p, false)));
            eval::reliability(&all, 10).ece
        };
        println!(
            "{:<28} {:>9} {:>9} {:>10.4} {:>12.4} {:>10.4} {:>12.4}",
            name.split(" (").next().unwrap_or(name),
            after.len(),
            negs.len(),
            eval::reliability(&before, 10).ece,
            eval::reliability(&after, 10).ece,
            with_negatives(&before, negs_before.clone()),
            with_negatives(&after, negs.clone()),
        );
        pos_all.extend(after.iter().copied());
        neg_all.extend(negs.iter().copied());
        per_file.push((name.clone(), after, negs));
    }
    // The figures above are one partition of the reports into folds; another draw moves a
    // small set's ECE by ±0.01, so print its spread.
    let partitions: Vec<Vec<Option<f64>>> = (1..PARTITIONS)
        .map(|k| cal::cross_validated(&all, 5, k))
        .collect();
    println!();
    println!("ECE with negatives (CV) over {PARTITIONS} partitions into folds: mean (min – max)");
    for (fi, name) in names.iter().enumerate() {
        let e: Vec<f64> = std::iter::once(&cv)
            .chain(&partitions)
            .map(|cv| top1_ece(&all, cv, fi))
            .collect();
        print_spread(name, &e);
    }
    // The abstain threshold: the lowest at which at most 3% of the negatives keep a technique.
    let chosen = cal::choose_threshold(&pos_all, &neg_all, 0.03, 0.0);
    let precise = cal::choose_threshold(&pos_all, &neg_all, 0.03, 0.75);
    println!();
    match chosen {
        Some(t) => println!(
            "threshold for ≤ 3% of negatives mapped (pooled, cross-validated): {t:.2} (saved as the model's own)"
        ),
        None => println!("no threshold keeps ≤ 3% of negatives unmapped; the model keeps 0.03"),
    }
    match precise {
        Some(t) => println!("with precision ≥ 0.75 on the pooled positives as well: {t:.2}"),
        None => println!("no threshold also reaches precision ≥ 0.75 on the pooled positives"),
    }
    let mut thresholds = vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8];
    thresholds.extend(chosen);
    thresholds.extend(settings.mapping.threshold);
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>17}",
        "file", "threshold", "coverage", "precision", "negatives mapped"
    );
    for (name, pos, negs) in &per_file {
        for p in eval::operating_points(pos, negs, &thresholds) {
            println!(
                "{:<28} {:>9.2} {:>9.3} {:>10.3} {:>17}",
                name.split(" (").next().unwrap_or(name),
                p.threshold,
                p.coverage,
                p.precision,
                p.negatives_mapped
                    .map_or("-".to_string(), |x| format!("{x:.3}"))
            );
        }
    }
    println!(
        "precision of each file's best-scored {:.0}% of labelled texts (cross-validated, at any threshold):",
        GOAL_COVERAGE * 100.0
    );
    for (name, pos, _) in &per_file {
        if let Some(p) = eval::precision_at_coverage(pos, GOAL_COVERAGE) {
            println!("{:<28} {p:.3}", name.split(" (").next().unwrap_or(name));
        }
    }
    if names.len() > 1 {
        print_held_out_files(&mut m, &all, &names, &reports);
    }
    let rows = cal::rows_of(&all.iter().collect::<Vec<_>>());
    let mut c = Calibration::fit(
        &rows,
        names.clone(),
        &m.model.domain,
        &m.model.attack_version,
    );
    if let Some(t) = chosen {
        c.threshold = t;
    }
    // The report calibration, on the reports' support under the text calibration just fitted.
    m.model.calibration = Some(c.clone());
    c.report = calibrate_reports(&m, &names, &reports, outputs.report_samples)?;
    m.save_calibration(&dir, &c)?;
    println!();
    println!(
        "calibration saved to {}",
        dir.join(mapper::CALIBRATION_FILE).display()
    );
    if let Some(w) = outputs.write {
        let bytes = serde_json::to_vec_pretty(&c)?;
        std::fs::write(w, bytes).with_context(|| format!("cannot write {}", w.display()))?;
        println!("and to {}", w.display());
    }
    Ok(())
}

/// Print how the calibrations carry over to a source of text they never saw: each file scored by
/// a text calibration, and its reports by a report calibration (threshold included), fitted on
/// the other files only. Leaves `m` without a calibration.
fn print_held_out_files(
    m: &mut Mapper,
    all: &[threatlake_udfs::mapper::calibrate::Sample],
    names: &[String],
    reports: &[Vec<threatlake_udfs::mapper::calibrate::LabelledReport>],
) {
    use threatlake_udfs::mapper::calibrate as cal;
    let (by_file, fitted) = cal::cross_validated_by_file(all);
    println!();
    println!("fitted on the other files only (a source of text the calibrations never saw):");
    println!(
        "{:<28} {:>10} {:>10} {:>14} {:>11} {:>10}",
        "file", "ECE", "with negs", "precision@60%", "report ECE", "report F1"
    );
    for (fi, name) in names.iter().enumerate() {
        let labelled: Vec<(f64, bool)> = all
            .iter()
            .zip(&by_file)
            .filter(|(s, _)| s.file == fi && s.positive)
            .filter_map(|(s, p)| Some(((*p)?, s.candidates.first()?.1)))
            .collect();
        // The text calibration fitted without this file scores the reports' sentences.
        m.model.calibration = fitted.get(fi).cloned();
        let samples: Vec<cal::ReportSample> = reports
            .iter()
            .enumerate()
            .flat_map(|(f, r)| cal::report_samples(m, f, r))
            .collect();
        let train: Vec<cal::ReportSample> =
            samples.iter().filter(|s| s.file != fi).cloned().collect();
        let rc = cal::fit_reports(&train, 0.0);
        let labels = |f: usize| report_labels(reports, f);
        let scored = |f: usize| -> Vec<(f64, bool)> {
            samples
                .iter()
                .filter(|s| s.file == f)
                .map(|s| (rc.probability(s.any), s.right))
                .collect()
        };
        let sets: Vec<(Vec<(f64, bool)>, usize)> = (0..reports.len())
            .filter(|f| *f != fi)
            .map(|f| (scored(f), labels(f)))
            .filter(|(p, _)| !p.is_empty())
            .collect();
        let report = samples.iter().any(|s| s.file == fi).then(|| {
            let held = scored(fi);
            let t = cal::best_f1_threshold(&sets);
            (
                eval::reliability(&held, 10).ece,
                cal::set_scores(&held, labels(fi), t).2,
            )
        });
        let show = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "{:<28} {:>10} {:>10.4} {:>14} {:>11} {:>10}",
            name.split(" (").next().unwrap_or(name),
            show((!labelled.is_empty()).then(|| eval::reliability(&labelled, 10).ece)),
            top1_ece(all, &by_file, fi),
            show(eval::precision_at_coverage(&labelled, GOAL_COVERAGE)),
            show(report.map(|r| r.0)),
            show(report.map(|r| r.1)),
        );
    }
    m.model.calibration = None;
}

/// The labels of file `file`'s reports, counted over the reports.
fn report_labels(
    reports: &[Vec<threatlake_udfs::mapper::calibrate::LabelledReport>],
    file: usize,
) -> usize {
    reports[file].iter().map(|(_, l, _)| l.len()).sum()
}

/// Draws of the cross-validation's folds `model calibrate` prints the ECE over.
const PARTITIONS: u64 = 5;

/// One file's line of an ECE spread over the partitions: mean (min – max).
fn print_spread(name: &str, e: &[f64]) {
    let (lo, hi) = e
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    println!(
        "{:<28} {:.4} ({lo:.4} – {hi:.4})",
        name.split(" (").next().unwrap_or(name),
        e.iter().sum::<f64>() / e.len().max(1) as f64
    );
}

/// 10-bin ECE of the cross-validated top-1 probabilities `cv` of file `file`'s samples, a
/// negative's counted as wrong.
fn top1_ece(
    all: &[threatlake_udfs::mapper::calibrate::Sample],
    cv: &[Option<f64>],
    file: usize,
) -> f64 {
    let pairs: Vec<(f64, bool)> = all
        .iter()
        .zip(cv)
        .filter(|(s, _)| s.file == file)
        // A negative's best candidate is never right.
        .filter_map(|(s, p)| Some(((*p)?, s.candidates.first()?.1)))
        .collect();
    eval::reliability(&pairs, 10).ece
}

/// Fit `map_report`'s calibration on the labelled reports of each file (`reports[file]`), print it
/// cross-validated (5 folds by report) per file, and choose its threshold for the best F1 of the
/// reports' technique sets averaged over the files. `None` when there are no reports with a supported technique.
fn calibrate_reports(
    m: &Mapper,
    names: &[String],
    reports: &[Vec<threatlake_udfs::mapper::calibrate::LabelledReport>],
    dump: Option<&Path>,
) -> Result<Option<threatlake_udfs::mapper::calibrate::ReportCalibration>> {
    use threatlake_udfs::mapper::calibrate as cal;
    let samples: Vec<cal::ReportSample> = reports
        .iter()
        .enumerate()
        .flat_map(|(fi, r)| cal::report_samples(m, fi, r))
        .collect();
    if let Some(path) = dump {
        write_json_lines(path, &samples)?;
    }
    if samples.is_empty() {
        return Ok(None);
    }
    let cv = cal::cross_validated_reports(&samples, 5, 0);
    let labels = |fi: usize| report_labels(reports, fi);
    // File `fi`'s supported techniques as `(score, right)`, scored by `scores` (one per sample).
    let scored = |scores: &[f64], fi: usize| -> Vec<(f64, bool)> {
        samples
            .iter()
            .zip(scores)
            .filter(|(s, _)| s.file == fi)
            .map(|(s, p)| (*p, s.right))
            .collect()
    };
    let uncalibrated: Vec<f64> = samples.iter().map(|s| s.any).collect();
    let pairs =
        |fi: usize, calibrated: bool| scored(if calibrated { &cv } else { &uncalibrated }, fi);
    let sets: Vec<(Vec<(f64, bool)>, usize)> = (0..reports.len())
        .map(|fi| (pairs(fi, true), labels(fi)))
        .filter(|(p, _)| !p.is_empty())
        .collect();
    let threshold = cal::best_f1_threshold(&sets);
    let before_threshold = m.default_threshold();
    println!();
    println!(
        "map_report scores: 1 − Π(1 − p) before (cut at {before_threshold:.2}), calibrated after (cross-validated, cut at {threshold:.2}: the best F1 averaged over the files)"
    );
    println!(
        "{:<28} {:>8} {:>8} {:>10} {:>12} {:>10} {:>12}",
        "file", "reports", "scores", "ECE before", "after (CV)", "F1 before", "after (CV)"
    );
    for (fi, name) in names.iter().enumerate() {
        let (before, after) = (pairs(fi, false), pairs(fi, true));
        if before.is_empty() {
            continue;
        }
        println!(
            "{:<28} {:>8} {:>8} {:>10.4} {:>12.4} {:>10.4} {:>12.4}",
            name.split(" (").next().unwrap_or(name),
            reports[fi].len(),
            before.len(),
            eval::reliability(&before, 10).ece,
            eval::reliability(&after, 10).ece,
            cal::set_scores(&before, labels(fi), before_threshold).2,
            cal::set_scores(&after, labels(fi), threshold).2,
        );
    }
    // As for the sentences: 16 reports in 5 folds move with the draw, so print the spread.
    let partitions: Vec<Vec<f64>> = (1..PARTITIONS)
        .map(|k| cal::cross_validated_reports(&samples, 5, k))
        .collect();
    println!();
    println!("report-score ECE (CV) over {PARTITIONS} partitions into folds: mean (min – max)");
    for (fi, name) in names.iter().enumerate() {
        if !samples.iter().any(|s| s.file == fi) {
            continue;
        }
        let e: Vec<f64> = std::iter::once(&cv)
            .chain(&partitions)
            .map(|cv| eval::reliability(&scored(cv, fi), 10).ece)
            .collect();
        print_spread(name, &e);
    }
    Ok(Some(cal::fit_reports(&samples, threshold)))
}

/// `rows` as JSON lines in `path` (`model calibrate --samples`, `--report-samples`).
fn write_json_lines<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// The reports of labelled rows that name their report (`doc`, or a rule's `id`): each report's
/// rows joined, with the union of their labels, and its group key; reports with no label are
/// left out.
fn reports_of(rows: Vec<GroupedRow>) -> Vec<(String, std::collections::BTreeSet<String>, String)> {
    let mut docs: std::collections::BTreeMap<
        String,
        (Vec<String>, std::collections::BTreeSet<String>),
    > = Default::default();
    for r in rows {
        let Some(g) = r.group else { continue };
        let d = docs.entry(g).or_default();
        d.0.push(r.text);
        d.1.extend(r.labels);
    }
    docs.into_iter()
        .filter(|(_, (_, l))| !l.is_empty())
        .map(|(g, (t, l))| (t.join("\n\n"), l, g))
        .collect()
}

/// Document-level scores of `map_report` on a labelled file whose rows name their report (`doc`):
/// each report's sentences joined are mapped as one document, its technique set compared with
/// the union of its sentences' labels.
fn eval_documents(settings: &Settings, m: &Mapper, rows: Vec<GroupedRow>) -> Result<()> {
    let docs: Vec<(String, std::collections::BTreeSet<String>)> = reports_of(rows)
        .into_iter()
        .map(|(t, l, _)| (t, l))
        .collect();
    if docs.len() < 2 {
        return Ok(());
    }
    let configured = settings.mapping.threshold;
    let d = eval::document_scores(m, &docs, configured);
    println!();
    println!(
        "documents  {} (rows grouped by report; map_report at threshold {}{})",
        docs.len(),
        d.threshold,
        if configured.is_some() {
            " (mapping.threshold)"
        } else {
            " (the model's own for reports)"
        }
    );
    println!(
        "doc precision {:.4}  recall {:.4}  F1 {:.4}",
        d.precision, d.recall, d.f1
    );
    println!(
        "parent level  precision {:.4}  recall {:.4}  F1 {:.4} (every id taken to its parent technique)",
        d.parent.0, d.parent.1, d.parent.2
    );
    println!(
        "report score calibration: ECE {:.4} over {} (report, technique) scores (a perfectly calibrated score would show {:.4})",
        d.ece,
        d.scored,
        d.noise_floor
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stop_at_the_text_and_byte_limits_and_lose_no_text() {
        let texts = (0..BATCH_TEXTS * 2 + 7).map(|i| Ok(format!("text {i}")));
        let mut source: Box<dyn Iterator<Item = Result<String>>> = Box::new(texts);
        let mut batch = Vec::new();
        let mut sizes = Vec::new();
        let mut seen = 0;
        loop {
            let more = next_batch(&mut *source, &mut batch).unwrap();
            sizes.push((batch.len(), more));
            for (i, t) in batch.iter().enumerate() {
                assert_eq!(t, &format!("text {}", seen + i));
            }
            seen += batch.len();
            batch.clear();
            if !more {
                break;
            }
        }
        assert_eq!(
            sizes,
            [(BATCH_TEXTS, true), (BATCH_TEXTS, true), (7, false)]
        );
        // Long texts: a batch ends at the first text that takes it to the byte limit.
        let long = "x".repeat(BATCH_BYTES / 3 + 1);
        let mut source = std::iter::repeat_n(long, 4).map(Ok);
        assert!(next_batch(&mut source, &mut batch).unwrap());
        assert_eq!(batch.len(), 3);
        // A bad text is an error, where it comes.
        let mut source = [Ok("a".to_string()), Err(anyhow::anyhow!("line 2: bad"))].into_iter();
        batch.clear();
        let e = next_batch(&mut source, &mut batch).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn texts_of_reads_json_lines_text_lines_and_csv_naming_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let all = |p: &Path| texts_of(p).unwrap().collect::<Result<Vec<_>>>();
        let jsonl = write(
            "a.jsonl",
            "{\"text\": \"one\"}\n\n  \n{\"text\": \"two\"}\n",
        );
        assert_eq!(all(&jsonl).unwrap(), ["one", "two"]);
        let bad = write("b.jsonl", "{\"text\": \"one\"}\n{\"title\": \"two\"}\n");
        let e = all(&bad).unwrap_err().to_string();
        assert!(
            e.contains("b.jsonl line 2") && e.contains("\"text\""),
            "{e}"
        );
        let lines = write("c.txt", "one\ntwo, three\n");
        assert_eq!(all(&lines).unwrap(), ["one", "two, three"]);
        let csv = write("d.csv", "id,text\n1,one\n2,\"two, three\"\n");
        assert_eq!(all(&csv).unwrap(), ["one", "two, three"]);
        let no_text = write("e.csv", "id,title\n1,one\n");
        let e = texts_of(&no_text).err().unwrap().to_string();
        assert!(e.contains("no \"text\" column"), "{e}");
    }
}
