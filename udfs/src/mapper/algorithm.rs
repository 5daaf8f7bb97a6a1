//! Fitting and scoring of the ATT&CK mapper: lexical evidence (TF-IDF centroids, nearest example,
//! technique names and ids) fused with embedding evidence (SIF sentence vectors over finalfusion word
//! vectors, PCA-projected, against k-means prototypes per technique).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use linfa::prelude::*;
use linfa_clustering::KMeans;
use linfa_reduction::Pca;
use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;
use serde::{Deserialize, Serialize};

use super::embed::{self, WordVectors};
use super::hyperparams::ValidParams;
use super::text::{self, Analyzer};
use super::MapperError;

/// A technique the mapper can name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TechniqueInfo {
    /// ATT&CK id (T1059.001).
    pub id: String,
    /// Name.
    pub name: String,
    /// Tactic shortnames.
    pub tactics: Vec<String>,
    /// Description (prose).
    pub description: String,
    /// Detection text.
    pub detection: String,
}

/// One labelled piece of text (a procedure example).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Example {
    /// Technique id it describes.
    pub technique: String,
    /// The text (actor and software names already removed).
    pub text: String,
    /// Who the procedure is about (group, software or campaign id): the unit of the dev hold-out.
    pub source: String,
}

/// Everything the mapper learns from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainingSet {
    /// ATT&CK domain.
    pub domain: String,
    /// ATT&CK release.
    pub attack_version: String,
    /// Active techniques and sub-techniques.
    pub techniques: Vec<TechniqueInfo>,
    /// Procedure examples.
    pub examples: Vec<Example>,
    /// Revoked id → replacement id.
    pub revoked: Vec<(String, String)>,
}

/// Kind of a training unit (for explanations).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum UnitKind {
    /// The technique name.
    Name,
    /// A description sentence.
    Description,
    /// A detection sentence.
    Detection,
    /// A procedure example.
    Procedure,
}

/// Fitted model (everything but the word vectors, which live in the finalfusion file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    /// Domain and release it was built from.
    pub domain: String,
    /// ATT&CK release.
    pub attack_version: String,
    /// Parameters used.
    pub params: ValidParams,
    /// Techniques, indexed by position.
    pub techniques: Vec<TechniqueMeta>,
    /// Revoked id → replacement id.
    pub revoked: HashMap<String, String>,
    terms: HashMap<String, u32>,
    idf: Vec<f32>,
    centroid_postings: Vec<Vec<(u16, f32)>>,
    unit_postings: Vec<Vec<(u32, f32)>>,
    unit_tech: Vec<u16>,
    unit_kind: Vec<UnitKind>,
    unit_text: Vec<String>,
    name_postings: Vec<Vec<u16>>,
    name_len: Vec<u16>,
    word_prob: HashMap<String, f32>,
    proj: Vec<f32>,
    proj_offset: Vec<f32>,
    proj_in: usize,
    proj_out: usize,
    prototypes: Vec<f32>,
    proto_tech: Vec<u16>,
    lr_postings: Vec<Vec<(u16, f32)>>,
    lr_bias: Vec<f32>,
    /// Keys ([`super::text_key`]) of the texts learnt besides ATT&CK's own (labelled examples and
    /// workbench feedback), sorted: evaluation leaves them out.
    learnt: Vec<u64>,
    /// Prototypes of technique `t` are `proto_start[t]..proto_start[t + 1]` (derived on load).
    #[serde(skip)]
    proto_start: Vec<u32>,
    /// Distinguishes loaded models, so a thread's token cache never serves another model.
    #[serde(skip)]
    instance: u64,
    /// Flat copies of the inverted lists for scoring (derived on load).
    #[serde(skip)]
    flat: FlatPostings,
    /// Text calibration of the scores (`calibration.json` beside the model), if fitted.
    #[serde(skip)]
    pub calibration: Option<super::calibrate::Calibration>,
    /// Index of each sub-technique's parent technique (derived on load; `u32::MAX` for none).
    #[serde(skip)]
    parent: Vec<u32>,
}

/// A term's postings as contiguous runs: `start[term]..start[term + 1]` indexes the columns.
#[derive(Debug, Clone, Default)]
struct Csr<I> {
    start: Vec<u32>,
    idx: Vec<I>,
    w: Vec<f32>,
}

impl<I: Copy> Csr<I> {
    fn from_lists(lists: &[Vec<(I, f32)>]) -> Self {
        let mut c = Csr {
            start: Vec::with_capacity(lists.len() + 1),
            idx: Vec::new(),
            w: Vec::new(),
        };
        c.start.push(0);
        for l in lists {
            c.idx.extend(l.iter().map(|(i, _)| *i));
            c.w.extend(l.iter().map(|(_, w)| *w));
            c.start.push(c.idx.len() as u32);
        }
        c
    }

    fn range(&self, term: u32) -> std::ops::Range<usize> {
        self.start[term as usize] as usize..self.start[term as usize + 1] as usize
    }
}

/// Per-technique postings where long lists are kept as dense rows: adding a dense row vectorises,
/// scattering hundreds of entries does not.
#[derive(Debug, Clone, Default)]
struct TechPostings {
    sparse: Csr<u16>,
    /// Row of `dense` for a term, or `u32::MAX` when the term's list is short.
    dense_row: Vec<u32>,
    dense: Vec<f32>,
    width: usize,
}

impl TechPostings {
    fn new(lists: &[Vec<(u16, f32)>], n_tech: usize) -> Self {
        let mut p = TechPostings {
            sparse: Csr::from_lists(lists),
            dense_row: Vec::with_capacity(lists.len()),
            dense: Vec::new(),
            width: n_tech,
        };
        for l in lists {
            if l.len() * 8 > n_tech {
                let row = p.dense.len() / n_tech;
                p.dense.resize(p.dense.len() + n_tech, 0.0);
                let r = &mut p.dense[row * n_tech..];
                for &(t, w) in l {
                    r[t as usize] = w;
                }
                p.dense_row.push(row as u32);
            } else {
                p.dense_row.push(u32::MAX);
            }
        }
        p
    }

    /// `acc += qw * row(term)`.
    fn add_into(&self, term: u32, qw: f32, acc: &mut [f32]) {
        let row = self.dense_row[term as usize];
        if row != u32::MAX {
            let r = &self.dense[row as usize * self.width..(row as usize + 1) * self.width];
            for (a, w) in acc.iter_mut().zip(r) {
                *a += qw * w;
            }
        } else {
            let rg = self.sparse.range(term);
            for (&t, &w) in self.sparse.idx[rg.clone()].iter().zip(&self.sparse.w[rg]) {
                acc[t as usize] += qw * w;
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct FlatPostings {
    centroid: TechPostings,
    lr: TechPostings,
    units: Csr<u32>,
    /// Technique of each entry of `units` (so the shortlist filter reads sequentially).
    unit_tech: Vec<u16>,
}

/// Public facts about a technique.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TechniqueMeta {
    /// ATT&CK id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Tactic shortnames.
    pub tactics: Vec<String>,
}

/// One ranked technique.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// Index into [`Model::techniques`].
    pub technique: usize,
    /// Calibrated score in [0, 1].
    pub score: f64,
}

/// Per-component scores of a technique (for explanations and ablations).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Components {
    /// TF-IDF centroid cosine.
    pub centroid: f32,
    /// Best single-example cosine.
    pub knn: f32,
    /// Best prototype cosine.
    pub embedding: f32,
    /// Name matched (0/1).
    pub name: f32,
    /// Id mentioned (0/1).
    pub id: f32,
    /// Softmax classifier probability.
    pub lr: f32,
}

/// Techniques that get the full (stage 2) evidence per row, at least.
pub const SHORTLIST: usize = 48;

/// How far (in logits) a sub-technique must lead its own parent technique to be named before it:
/// a smaller lead puts the parent first (see [`Model::ranked_logits`]). A sub-technique implies its
/// parent, so the parent is the right answer whenever the text does not single the sub-technique out.
/// Chosen on the development sets (README "Mapping scores"): at 3 every set's exact-id top-1,
/// recall@5 and MRR@10 are above those without the rule (0.5–6 checked: smaller leads gain less, 6
/// lowers Splunk's recall@5); clear sub-technique text leads its parent by 9 or more.
pub const SUB_TECHNIQUE_LEAD: f32 = 3.0;

/// Distinct tokens a thread remembers before its cache is cleared (bounds memory on hostile input).
const TOKEN_CACHE_MAX: usize = 50_000;

/// What one surface token contributes, computed once per thread and model.
struct CachedToken {
    term: Option<u32>,
    /// SIF weight; 0 when the token has no vector or is skipped.
    sif: f32,
    /// The token's word vector in the projected sentence space (linear part only).
    vector: Box<[f32]>,
}

/// Reusable per-thread buffers so scoring a row allocates little.
#[derive(Default)]
pub struct Scratch {
    owner: u64,
    cache: rustc_hash::FxHashMap<String, CachedToken>,
    prelim: Vec<f32>,
    keys: Vec<u64>,
    cand: Vec<u32>,
    is_cand: Vec<bool>,
    unit_touched: Vec<u32>,
    tokens: Vec<String>,
    qvec: Vec<(u32, f32)>,
    unit_acc: Vec<f32>,
    touched: Vec<u32>,
    centroid: Vec<f32>,
    knn: Vec<f32>,
    knn_unit: Vec<u32>,
    emb: Vec<f32>,
    name_hits: Vec<u16>,
    ids: Vec<f32>,
    lr: Vec<f32>,
    fused: Vec<f32>,
    word: Vec<f32>,
    projected: Vec<f32>,
    /// Word tokens of the last text scored, and how many of them the model knows.
    n_tokens: usize,
    n_known: usize,
}

impl Scratch {
    /// Calibrated score of technique `t` from the last [`Model::score_with`] call.
    pub fn fused_score(&self, t: usize) -> f64 {
        self.fused.get(t).map_or(0.0, |x| sigmoid(*x) as f64)
    }
}

struct Unit {
    tech: usize,
    kind: UnitKind,
    text: String,
}

/// The labelled texts a model learns from (technique index, text): names, description and detection
/// sentences, and procedure examples. Baselines train on exactly the same texts.
pub fn training_texts(set: &TrainingSet) -> Vec<(usize, String)> {
    units_of(set)
        .into_iter()
        .map(|u| (u.tech, u.text))
        .collect()
}

fn units_of(set: &TrainingSet) -> Vec<Unit> {
    let tech_index: HashMap<&str, usize> = set
        .techniques
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    let mut units = Vec::new();
    for (i, t) in set.techniques.iter().enumerate() {
        units.push(Unit {
            tech: i,
            kind: UnitKind::Name,
            text: t.name.clone(),
        });
        for s in text::sentences(&t.description) {
            units.push(Unit {
                tech: i,
                kind: UnitKind::Description,
                text: s.to_string(),
            });
        }
        for s in text::sentences(&t.detection).take(24) {
            units.push(Unit {
                tech: i,
                kind: UnitKind::Detection,
                text: s.to_string(),
            });
        }
    }
    let revoked: HashMap<&str, &str> = set
        .revoked
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    for e in &set.examples {
        let id = revoked
            .get(e.technique.as_str())
            .copied()
            .unwrap_or(e.technique.as_str());
        if let Some(&i) = tech_index.get(id) {
            if !e.text.trim().is_empty() {
                units.push(Unit {
                    tech: i,
                    kind: UnitKind::Procedure,
                    text: e.text.clone(),
                });
            }
        }
    }
    // Grouped by technique, so the examples of the few techniques scored in full sit together.
    units.sort_by_key(|u| u.tech);
    units
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Dot product with eight independent accumulators, so the compiler can use SIMD lanes (a plain
/// `zip().sum()` is a serial chain of float adds it may not reorder). Hot: one per prototype per row.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Fit a model. Deterministic for a given training set and parameters.
///
/// With `learn_fusion`, the evidence weights and the calibration are learned first: a model is fitted
/// on the procedures of 80% of the sources, the other 20% are scored, and a logistic regression of
/// "is this candidate a correct label" on the per-technique evidence gives both the weights (its
/// coefficients) and calibrated probabilities (its output). Then the model is refitted on everything.
pub fn fit(
    params: &ValidParams,
    set: &TrainingSet,
    pretrained: Option<&embed::Pretrained>,
) -> Result<(Model, WordVectors), MapperError> {
    let mut params = params.clone();
    if params.learn_fusion {
        if let Some((weights, bias)) = learn_fusion(&params, set, pretrained)? {
            params.0.weights = weights;
            params.0.calibration = (1.0, bias);
        }
    }
    fit_once(&params, set, pretrained)
}

/// Evidence of one candidate: centroid, knn, embedding, name, id.
fn features(c: &Components) -> [f32; 6] {
    [c.centroid, c.knn, c.embedding, c.name, c.id, c.lr]
}

fn learn_fusion(
    params: &ValidParams,
    set: &TrainingSet,
    pretrained: Option<&embed::Pretrained>,
) -> Result<Option<(super::FusionWeights, f32)>, MapperError> {
    use rayon::prelude::*;
    let (train, test) = super::eval::holdout(set, 0.2, params.seed);
    if test.len() < 50 || train.examples.is_empty() {
        return Ok(None);
    }
    let mut inner = params.clone();
    inner.0.learn_fusion = false;
    let (model, wv) = fit_once(&inner, &train, pretrained)?;
    // Candidates: the top 20 under the default weights plus every true label.
    let rows: Vec<Vec<([f32; 6], f32)>> = test
        .par_iter()
        .map(|l| {
            let mut s = Scratch::default();
            let labels: Vec<usize> = l
                .labels
                .iter()
                .filter_map(|id| model.technique_index(id))
                .collect();
            model.score_with(&wv, &l.text, 20, &labels, &mut s);
            let mut cands: Vec<usize> = s.cand.iter().map(|t| *t as usize).collect();
            cands.sort_by(|a, b| s.fused[*b].total_cmp(&s.fused[*a]).then(a.cmp(b)));
            cands.truncate(20);
            for t in &labels {
                if !cands.contains(t) {
                    cands.push(*t);
                }
            }
            cands
                .into_iter()
                .map(|t| {
                    (
                        features(&model.components(t, &s)),
                        if labels.contains(&t) { 1.0 } else { 0.0 },
                    )
                })
                .collect()
        })
        .collect();
    // A component switched off in the parameters (weight 0) stays off: it is masked out of the fit.
    let pw = params.weights;
    let mask = [
        pw.centroid,
        pw.knn,
        pw.embedding,
        pw.name,
        pw.id,
        if params.lr_epochs > 0 { pw.lr } else { 0.0 },
    ]
    .map(|w| if w > 0.0 { 1.0 } else { 0.0 });
    let data: Vec<([f32; 6], f32)> = rows
        .into_iter()
        .flatten()
        .map(|(x, y)| (std::array::from_fn(|j| x[j] * mask[j]), y))
        .collect();
    let (w, b) = logistic(&data, 400, 1e-3);
    let weights = super::FusionWeights {
        centroid: w[0].max(0.0),
        knn: w[1].max(0.0),
        embedding: w[2].max(0.0),
        name: w[3].max(0.0),
        // Procedures never cite technique ids, so the hold-out cannot teach this weight; an explicit
        // "T1059.001" in the text is near-certain evidence, so it gets a fixed large logit.
        id: if w[4] > 0.0 { w[4] } else { EXPLICIT_ID_LOGIT },
        lr: w[5].max(0.0),
    };
    Ok(Some((weights, b)))
}

/// Number of evidence features.
const F: usize = 6;

/// Longest unit postings list kept per term.
const MAX_POSTINGS: usize = 150;

/// Logit added when the text names a technique id (see `learn_fusion`).
const EXPLICIT_ID_LOGIT: f32 = 8.0;

/// Binary logistic regression by full-batch gradient descent with feature standardisation (five
/// features and a few tens of thousands of rows: a dedicated solver would not pay for itself).
/// Returns weights and bias on the original feature scale.
fn logistic(data: &[([f32; F], f32)], iters: usize, l2: f64) -> ([f32; F], f32) {
    let n = data.len().max(1) as f64;
    let mut mean = [0f64; F];
    let mut sd = [0f64; F];
    for (x, _) in data {
        for j in 0..F {
            mean[j] += x[j] as f64 / n;
        }
    }
    for (x, _) in data {
        for j in 0..F {
            sd[j] += (x[j] as f64 - mean[j]).powi(2) / n;
        }
    }
    let sd: Vec<f64> = sd.iter().map(|v| v.sqrt().max(1e-6)).collect();
    let (mut w, mut b) = ([0f64; F], 0f64);
    let lr = 0.5;
    for _ in 0..iters {
        let (mut gw, mut gb) = ([0f64; F], 0f64);
        for (x, y) in data {
            let z: f64 = b
                + (0..F)
                    .map(|j| w[j] * (x[j] as f64 - mean[j]) / sd[j])
                    .sum::<f64>();
            let g = 1.0 / (1.0 + (-z).exp()) - *y as f64;
            for j in 0..F {
                gw[j] += g * (x[j] as f64 - mean[j]) / sd[j];
            }
            gb += g;
        }
        for j in 0..F {
            w[j] -= lr * (gw[j] / n + l2 * w[j]);
        }
        b -= lr * gb / n;
    }
    let mut out = [0f32; F];
    let mut bias = b;
    for j in 0..F {
        out[j] = (w[j] / sd[j]) as f32;
        bias -= w[j] * mean[j] / sd[j];
    }
    (out, bias as f32)
}

fn fit_once(
    params: &ValidParams,
    set: &TrainingSet,
    pretrained: Option<&embed::Pretrained>,
) -> Result<(Model, WordVectors), MapperError> {
    if set.techniques.is_empty() {
        return Err(MapperError::NoTraining("no active techniques".into()));
    }
    if set.techniques.len() > u16::MAX as usize {
        return Err(MapperError::NoTraining("too many techniques".into()));
    }
    let units = units_of(set);
    let analyzer = Analyzer::default();
    let (mut scratch, mut terms_buf) = (Vec::new(), Vec::new());

    // Lexical: vocabulary, IDF over units, unit TF-IDF vectors.
    let mut terms: HashMap<String, u32> = HashMap::new();
    let mut unit_terms: Vec<Vec<(u32, f32)>> = Vec::with_capacity(units.len());
    let mut unit_tokens: Vec<Vec<String>> = Vec::with_capacity(units.len());
    let mut df: Vec<u32> = Vec::new();
    for u in &units {
        analyzer.terms(&u.text, &mut scratch, &mut terms_buf);
        unit_tokens.push(scratch.clone());
        let mut counts: HashMap<u32, f32> = HashMap::new();
        for t in &terms_buf {
            let next = terms.len() as u32;
            let id = *terms.entry(t.clone()).or_insert(next);
            if id as usize == df.len() {
                df.push(0);
            }
            *counts.entry(id).or_default() += 1.0;
        }
        for id in counts.keys() {
            df[*id as usize] += 1;
        }
        let mut v: Vec<(u32, f32)> = counts.into_iter().collect();
        v.sort_by_key(|(id, _)| *id);
        unit_terms.push(v);
    }
    let n_units = units.len() as f32;
    let idf: Vec<f32> = df
        .iter()
        .map(|d| ((n_units + 1.0) / (*d as f32 + 1.0)).ln() + 1.0)
        .collect();
    for v in &mut unit_terms {
        for (id, tf) in v.iter_mut() {
            *tf = (1.0 + tf.ln()) * idf[*id as usize];
        }
        let n = v.iter().map(|(_, w)| w * w).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|(_, w)| *w /= n);
        }
    }

    // Inverted index over units (nearest example) and over technique centroids.
    let mut unit_postings: Vec<Vec<(u32, f32)>> = vec![Vec::new(); terms.len()];
    let mut centroid_acc: Vec<HashMap<u32, f32>> = vec![HashMap::new(); set.techniques.len()];
    for (ui, v) in unit_terms.iter().enumerate() {
        for &(id, w) in v {
            unit_postings[id as usize].push((ui as u32, w));
            *centroid_acc[units[ui].tech].entry(id).or_default() += w;
        }
    }
    // Impact-ordered truncation: a very common term keeps only the units where it weighs most, which
    // bounds the work per query term (the dropped entries add little to any cosine).
    for p in unit_postings.iter_mut() {
        if p.len() > MAX_POSTINGS {
            p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            p.truncate(MAX_POSTINGS);
        }
    }
    let mut centroid_postings: Vec<Vec<(u16, f32)>> = vec![Vec::new(); terms.len()];
    for (ti, acc) in centroid_acc.into_iter().enumerate() {
        let mut v: Vec<(u32, f32)> = acc.into_iter().collect();
        v.sort_by_key(|(id, _)| *id);
        let n = v.iter().map(|(_, w)| w * w).sum::<f32>().sqrt();
        for (id, w) in v {
            let w = w / n;
            if w >= 0.005 {
                centroid_postings[id as usize].push((ti as u16, w));
            }
        }
    }

    // Discriminative evidence: a softmax classifier over the same TF-IDF vectors, kept sparse.
    let n_tech = set.techniques.len();
    let mut lr_postings: Vec<Vec<(u16, f32)>> = vec![Vec::new(); terms.len()];
    let mut lr_bias = vec![0f32; n_tech];
    if params.lr_epochs > 0 {
        let rows: Vec<(usize, Vec<(u32, f32)>)> = unit_terms
            .iter()
            .zip(&units)
            .map(|(v, u)| (u.tech, v.clone()))
            .collect();
        let (w, b) =
            super::eval::train_softmax(&rows, terms.len(), n_tech, params.lr_epochs, params.seed);
        for (f, postings) in lr_postings.iter_mut().enumerate() {
            for (c, &x) in w[f * n_tech..(f + 1) * n_tech].iter().enumerate() {
                if x.abs() >= 0.02 {
                    postings.push((c as u16, x));
                }
            }
        }
        lr_bias = b;
    }

    // Names: a technique whose every name term appears in the text gets the name bonus.
    let mut name_postings: Vec<Vec<u16>> = vec![Vec::new(); terms.len()];
    let mut name_len = Vec::with_capacity(set.techniques.len());
    for (ti, t) in set.techniques.iter().enumerate() {
        analyzer.terms(&t.name, &mut scratch, &mut terms_buf);
        terms_buf.sort();
        terms_buf.dedup();
        let ids: Vec<u32> = terms_buf
            .iter()
            .filter_map(|t| terms.get(t).copied())
            .collect();
        name_len.push(ids.len() as u16);
        for id in ids {
            name_postings[id as usize].push(ti as u16);
        }
    }

    // Word vectors (finalfusion, with subword n-grams) from the word × technique association.
    let (word_vectors, word_prob) = embed::train(
        params,
        &units.iter().map(|u| u.tech).collect::<Vec<_>>(),
        &unit_tokens,
        set.techniques.len(),
        pretrained,
    )?;

    // Sentence vectors for every unit, then PCA of that space.
    let dim_in = word_vectors.dims();
    let mut sents = Array2::<f64>::zeros((units.len(), dim_in));
    let mut sent = vec![0f32; dim_in];
    let mut word = vec![0f32; dim_in];
    for (i, toks) in unit_tokens.iter().enumerate() {
        sif_embed(
            &word_vectors,
            &word_prob,
            params.sif_a,
            toks,
            &mut sent,
            &mut word,
        );
        for (j, x) in sent.iter().enumerate() {
            sents[[i, j]] = *x as f64;
        }
    }
    let keep = params
        .sentence_dims
        .min(dim_in - 1)
        .min(units.len().saturating_sub(1))
        .max(2);
    let pca = Pca::params(keep)
        .whiten(params.whiten)
        .fit(&DatasetBase::from(sents.clone()))
        .map_err(|e| MapperError::Fit(format!("PCA: {e}")))?;
    // Recover the affine map of the fitted PCA: f(x) = (x - mean) E^T = x E^T + f(0).
    let zero = pca.predict(&Array2::<f64>::zeros((1, dim_in)));
    let eye = pca.predict(&Array2::<f64>::eye(dim_in));
    let drop = params.drop_components.min(keep - 1);
    let proj_out = keep - drop;
    let mut proj = vec![0f32; dim_in * proj_out];
    for i in 0..dim_in {
        for j in 0..proj_out {
            proj[i * proj_out + j] = (eye[[i, j + drop]] - zero[[0, j + drop]]) as f32;
        }
    }
    let proj_offset: Vec<f32> = (0..proj_out).map(|j| zero[[0, j + drop]] as f32).collect();

    let mut projected = Array2::<f64>::zeros((units.len(), proj_out));
    let mut out = vec![0f32; proj_out];
    for i in 0..units.len() {
        let row: Vec<f32> = sents.row(i).iter().map(|x| *x as f32).collect();
        project(&proj, &proj_offset, proj_out, &row, &mut out);
        for (j, x) in out.iter().enumerate() {
            projected[[i, j]] = *x as f64;
        }
    }

    // Prototypes: k-means over each technique's unit vectors (one centroid per way of describing it).
    let mut by_tech: Vec<Vec<usize>> = vec![Vec::new(); set.techniques.len()];
    for (i, u) in units.iter().enumerate() {
        by_tech[u.tech].push(i);
    }
    let mut prototypes = Vec::new();
    let mut proto_tech = Vec::new();
    for (ti, members) in by_tech.iter().enumerate() {
        let k = (members.len() / params.examples_per_prototype).clamp(1, params.max_prototypes);
        let data = projected.select(Axis(0), members);
        let centroids: Array2<f64> = if k == 1 {
            data.mean_axis(Axis(0))
                .expect("non-empty")
                .insert_axis(Axis(0))
        } else {
            let rng = Xoshiro256Plus::seed_from_u64(
                params.seed ^ (ti as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let model = KMeans::params_with_rng(k, rng)
                .max_n_iterations(50)
                .tolerance(1e-4)
                .n_runs(2)
                .fit(&DatasetBase::from(data.clone()))
                .map_err(|e| {
                    MapperError::Fit(format!("k-means for {}: {e}", set.techniques[ti].id))
                })?;
            model.centroids().clone()
        };
        for c in centroids.rows() {
            let mut v: Vec<f32> = c.iter().map(|x| *x as f32).collect();
            normalize(&mut v);
            prototypes.extend_from_slice(&v);
            proto_tech.push(ti as u16);
        }
    }

    let model = Model {
        domain: set.domain.clone(),
        attack_version: set.attack_version.clone(),
        params: params.clone(),
        techniques: set
            .techniques
            .iter()
            .map(|t| TechniqueMeta {
                id: t.id.clone(),
                name: t.name.clone(),
                tactics: t.tactics.clone(),
            })
            .collect(),
        revoked: set.revoked.iter().cloned().collect(),
        terms,
        idf,
        centroid_postings,
        unit_postings,
        unit_tech: units.iter().map(|u| u.tech as u16).collect(),
        unit_kind: units.iter().map(|u| u.kind).collect(),
        unit_text: units.iter().map(|u| u.text.clone()).collect(),
        name_postings,
        name_len,
        word_prob,
        proj,
        proj_offset,
        proj_in: dim_in,
        proj_out,
        prototypes,
        proto_tech,
        lr_postings,
        lr_bias,
        learnt: Vec::new(),
        proto_start: Vec::new(),
        instance: 0,
        flat: FlatPostings::default(),
        calibration: None,
        parent: Vec::new(),
    };
    Ok((model.prepared(), word_vectors))
}

/// The fitted PCA applied to `x`, normalised: `offset + x·P`.
fn project(proj: &[f32], offset: &[f32], out_dims: usize, x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(offset);
    add_projected(proj, out_dims, x, out);
    normalize(out);
}

/// The linear part of the projection: `out += x·P`.
fn add_projected(proj: &[f32], out_dims: usize, x: &[f32], out: &mut [f32]) {
    for (i, xi) in x.iter().enumerate() {
        if *xi == 0.0 {
            continue;
        }
        let row = &proj[i * out_dims..(i + 1) * out_dims];
        for (o, p) in out.iter_mut().zip(row) {
            *o += xi * p;
        }
    }
}

/// SIF-weighted mean of word vectors (`a / (a + p(w))`), stopwords skipped.
fn sif_embed(
    wv: &WordVectors,
    prob: &HashMap<String, f32>,
    a: f32,
    tokens: &[String],
    out: &mut [f32],
    word: &mut [f32],
) {
    out.iter_mut().for_each(|x| *x = 0.0);
    let mut total = 0.0;
    for t in tokens {
        if t.len() < 2 || text::is_stopword(t) || t.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if !wv.embedding_into(t, word) {
            continue;
        }
        let p = prob.get(t.as_str()).copied().unwrap_or(0.0);
        let w = a / (a + p);
        for (o, x) in out.iter_mut().zip(word.iter()) {
            *o += w * x;
        }
        total += w;
    }
    if total > 0.0 {
        out.iter_mut().for_each(|x| *x /= total);
    }
}

static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Model {
    /// Derive the lookup tables that are not stored (call after deserialising).
    pub fn prepared(mut self) -> Self {
        self.instance = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.proto_start = vec![0; self.techniques.len() + 1];
        for &t in &self.proto_tech {
            self.proto_start[t as usize + 1] += 1;
        }
        for t in 0..self.techniques.len() {
            self.proto_start[t + 1] += self.proto_start[t];
        }
        // Example lists in example order: examples are grouped by technique, so the shortlist filter
        // sees runs and the accumulators are touched in address order.
        let by_unit: Vec<Vec<(u32, f32)>> = self
            .unit_postings
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.sort_by_key(|(u, _)| *u);
                l
            })
            .collect();
        let units = Csr::from_lists(&by_unit);
        let index: HashMap<&str, u32> = self
            .techniques
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.as_str(), i as u32))
            .collect();
        self.parent = self
            .techniques
            .iter()
            .map(|t| {
                t.id.split_once('.')
                    .and_then(|(p, _)| index.get(p).copied())
                    .unwrap_or(u32::MAX)
            })
            .collect();
        self.flat = FlatPostings {
            centroid: TechPostings::new(&self.centroid_postings, self.techniques.len()),
            lr: TechPostings::new(&self.lr_postings, self.techniques.len()),
            unit_tech: units
                .idx
                .iter()
                .map(|u| self.unit_tech[*u as usize])
                .collect(),
            units,
        };
        self
    }

    /// Index of a technique id (revoked ids resolve to their replacement).
    pub fn technique_index(&self, id: &str) -> Option<usize> {
        let id = id.trim();
        let id = self.revoked.get(id).map(String::as_str).unwrap_or(id);
        self.techniques.iter().position(|t| t.id == id)
    }

    /// Two-stage scoring, leaving raw logits (see [`Scratch::fused_score`]) in `scratch.fused` for the
    /// shortlisted techniques and `-inf` for the rest. Stage 1 scores every technique with the cheap
    /// technique-level evidence (TF-IDF centroid, classifier, name, explicit id); the best
    /// `max(want, SHORTLIST)` of those, plus
    /// `force` and cited ids, form the shortlist. Stage 2 adds the per-example and embedding evidence
    /// (nearest example, k-means prototypes) for the shortlist only, so the cost per row no longer
    /// grows with every technique's examples and prototypes. On the development hold-out the shortlist
    /// costs 0.007 top-1 against full scoring and makes scoring about 4× faster. The stage functions
    /// are kept out of line so profiles attribute cost per stage.
    pub fn score_with(
        &self,
        wv: &WordVectors,
        input: &str,
        want: usize,
        force: &[usize],
        s: &mut Scratch,
    ) {
        let n_tech = self.techniques.len();
        if s.owner != self.instance {
            s.cache.clear();
            s.owner = self.instance;
        }
        for v in [
            &mut s.centroid,
            &mut s.knn,
            &mut s.emb,
            &mut s.ids,
            &mut s.lr,
            &mut s.fused,
        ] {
            v.clear();
            v.resize(n_tech, 0.0);
        }
        s.knn_unit.clear();
        s.knn_unit.resize(n_tech, u32::MAX);
        s.name_hits.clear();
        s.name_hits.resize(n_tech, 0);
        self.query(wv, input, s);
        self.technique_evidence(input, s);
        self.shortlist(want, force, s);
        let has_text = !s.qvec.is_empty();
        if has_text && self.params.weights.knn > 0.0 {
            self.nearest_examples(s);
        }
        if has_text && self.params.weights.embedding > 0.0 {
            self.prototype_evidence(s);
        }
        let w = self.params.weights;
        let (scale, bias) = self.params.calibration;
        s.fused.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        for &t in &s.cand {
            let t = t as usize;
            if has_text || s.ids[t] > 0.0 {
                let fused = w.centroid * s.centroid[t]
                    + w.knn * s.knn[t]
                    + w.embedding * s.emb[t]
                    + w.name * self.name_match(t, s)
                    + w.id * s.ids[t]
                    + w.lr * s.lr[t];
                // Raw logit; the sigmoid is monotone, so it is applied only to what is returned.
                s.fused[t] = scale * fused + bias;
            }
        }
    }

    fn name_match(&self, t: usize, s: &Scratch) -> f32 {
        if self.name_len[t] > 0 && s.name_hits[t] == self.name_len[t] {
            1.0
        } else {
            0.0
        }
    }

    /// Tokens → TF-IDF query vector and the (unnormalised) SIF sentence vector in the projected
    /// space, through the per-thread token cache.
    #[inline(never)]
    fn query(&self, wv: &WordVectors, input: &str, s: &mut Scratch) {
        text::tokens(input, &mut s.tokens);
        if s.cache.len() > TOKEN_CACHE_MAX {
            s.cache.clear();
        }
        let dims = self.proj_out;
        s.touched.clear();
        s.projected.clear();
        s.projected.resize(dims, 0.0);
        let mut total = 0.0f32;
        let mut tokens = std::mem::take(&mut s.tokens);
        s.n_tokens = tokens.len();
        s.n_known = 0;
        for t in tokens.drain(..) {
            let entry = match s.cache.entry(t) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let e = self.token_entry(wv, v.key(), &mut s.word);
                    v.insert(e)
                }
            };
            if let Some(id) = entry.term {
                s.touched.push(id);
            }
            if entry.term.is_some() || entry.sif > 0.0 {
                s.n_known += 1;
            }
            if entry.sif > 0.0 {
                for (o, x) in s.projected.iter_mut().zip(entry.vector.iter()) {
                    *o += entry.sif * x;
                }
                total += entry.sif;
            }
        }
        s.tokens = tokens;
        // SIF mean, projected: offset + (Σ wᵢ·P vᵢ) / Σ wᵢ (the projection is affine).
        if total > 0.0 {
            s.projected.iter_mut().for_each(|x| *x /= total);
        }
        for (o, off) in s.projected.iter_mut().zip(&self.proj_offset) {
            *o += off;
        }
        normalize(&mut s.projected);
        // Sort + run-length: linear-ithmic even for a megabyte of text.
        s.touched.sort_unstable();
        s.qvec.clear();
        for chunk in s.touched.chunk_by(|a, b| a == b) {
            let (id, tf) = (chunk[0], chunk.len() as f32);
            s.qvec.push((id, (1.0 + tf.ln()) * self.idf[id as usize]));
        }
        let qn = s.qvec.iter().map(|(_, w)| w * w).sum::<f32>().sqrt();
        if qn > 0.0 {
            s.qvec.iter_mut().for_each(|(_, w)| *w /= qn);
        }
    }

    /// What one token contributes (term id, SIF weight, projected vector); cached per thread.
    fn token_entry(&self, wv: &WordVectors, t: &str, word: &mut Vec<f32>) -> CachedToken {
        let analyzer = analyzer();
        let term = analyzer
            .term(t)
            .and_then(|term| self.terms.get(&term).copied());
        let mut entry = CachedToken {
            term,
            sif: 0.0,
            vector: Box::default(),
        };
        let skip = t.len() < 2 || text::is_stopword(t) || t.chars().all(|c| c.is_ascii_digit());
        if self.params.weights.embedding > 0.0 && !skip {
            word.resize(self.proj_in, 0.0);
            if wv.embedding_into(t, word) {
                let p = self.word_prob.get(t).copied().unwrap_or(0.0);
                entry.sif = self.params.sif_a / (self.params.sif_a + p);
                let mut v = vec![0f32; self.proj_out];
                add_projected(&self.proj, self.proj_out, word, &mut v);
                entry.vector = v.into_boxed_slice();
            }
        }
        entry
    }

    /// Stage 1: centroid cosine, name terms, classifier and explicit ids for every technique.
    #[inline(never)]
    fn technique_evidence(&self, input: &str, s: &mut Scratch) {
        let f = &self.flat;
        for &(id, qw) in &s.qvec {
            f.centroid.add_into(id, qw, &mut s.centroid);
            for &t in &self.name_postings[id as usize] {
                s.name_hits[t as usize] += 1;
            }
        }
        // Discriminative classifier (only when the text has known terms; else it would echo priors).
        if !s.qvec.is_empty() && self.params.weights.lr > 0.0 {
            s.lr.copy_from_slice(&self.lr_bias);
            for &(id, qw) in &s.qvec {
                f.lr.add_into(id, qw, &mut s.lr);
            }
            super::eval::softmax(&mut s.lr);
        }
        // Explicit technique ids in the text ("T1059.001", "t1003").
        for id in super::text::cited_ids(input) {
            if let Some(t) = self.technique_index(&id) {
                s.ids[t] = 1.0;
            }
        }
    }

    /// The parent technique of sub-technique `t` (None for a technique without one).
    pub fn parent_technique(&self, t: usize) -> Option<usize> {
        self.parent
            .get(t)
            .filter(|p| **p != u32::MAX)
            .map(|p| *p as usize)
    }

    /// The family of technique `t`: its parent, or itself when it has none.
    fn family(&self, t: usize) -> usize {
        self.parent_technique(t).unwrap_or(t)
    }

    /// The techniques `input` cites by id (revoked ids as their replacement), in order, once each.
    pub fn cited_techniques(&self, input: &str) -> Vec<usize> {
        let mut out = Vec::new();
        for id in super::text::cited_ids(input) {
            if let Some(t) = self.technique_index(&id) {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// The best `max(want, SHORTLIST)` techniques by stage-1 evidence, plus `force` and every
    /// technique whose id the text cites (ties broken by index, so the choice is deterministic).
    #[inline(never)]
    fn shortlist(&self, want: usize, force: &[usize], s: &mut Scratch) {
        let n_tech = self.techniques.len();
        let w = self.params.weights;
        let mut prelim = std::mem::take(&mut s.prelim);
        prelim.clear();
        // Written as zips over equal-length slices so it vectorises.
        prelim.extend(
            s.centroid
                .iter()
                .zip(&s.lr)
                .zip(&s.ids)
                .zip(s.name_hits.iter().zip(&self.name_len))
                .map(|(((c, lr), id), (hits, len))| {
                    let name = if *len > 0 && hits == len { 1.0 } else { 0.0 };
                    w.centroid * c + w.name * name + w.id * id + w.lr * lr
                }),
        );
        s.prelim = prelim;
        s.is_cand.clear();
        s.is_cand.resize(n_tech, false);
        s.cand.clear();
        // Without any stage-1 evidence (an ablation that keeps only embeddings), every technique is
        // scored fully.
        let cheap = w.centroid + w.name + w.lr;
        let c = if cheap > 0.0 {
            want.max(SHORTLIST).min(n_tech)
        } else {
            n_tech
        };
        if c == n_tech {
            s.cand.extend(0..n_tech as u32);
        } else {
            // One integer key per technique: descending score (order-preserving float bits, inverted),
            // then ascending index.
            s.keys.clear();
            s.keys.extend(s.prelim.iter().enumerate().map(|(t, x)| {
                let b = x.to_bits();
                let ord = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
                (u64::from(!ord) << 32) | t as u64
            }));
            s.keys.select_nth_unstable(c - 1);
            s.cand
                .extend(s.keys[..c].iter().map(|k| (*k & 0xFFFF_FFFF) as u32));
        }
        for &t in &s.cand {
            s.is_cand[t as usize] = true;
        }
        let cited = (0..n_tech).filter(|t| s.ids[*t] > 0.0);
        for t in force.iter().copied().chain(cited) {
            if t < n_tech && !s.is_cand[t] {
                s.is_cand[t] = true;
                s.cand.push(t as u32);
            }
        }
    }

    /// Stage 2: best single-example cosine for shortlisted techniques (the inverted lists are walked
    /// in order; only shortlisted examples are accumulated).
    #[inline(never)]
    fn nearest_examples(&self, s: &mut Scratch) {
        let f = &self.flat;
        // Split borrows so the hot loop keeps its slices in registers.
        let Scratch {
            qvec,
            is_cand,
            unit_acc,
            unit_touched,
            knn,
            knn_unit,
            ..
        } = s;
        unit_acc.resize(self.unit_tech.len(), 0.0);
        unit_touched.clear();
        for &(id, qw) in qvec.iter() {
            let r = f.units.range(id);
            let entries = f.units.idx[r.clone()]
                .iter()
                .zip(&f.units.w[r.clone()])
                .zip(&f.unit_tech[r]);
            for ((&u, &w), &t) in entries {
                if !is_cand[t as usize] {
                    continue;
                }
                let acc = &mut unit_acc[u as usize];
                if *acc == 0.0 {
                    unit_touched.push(u);
                }
                *acc += qw * w;
            }
        }
        for &u in unit_touched.iter() {
            let t = self.unit_tech[u as usize] as usize;
            let v = std::mem::take(&mut unit_acc[u as usize]);
            if v > knn[t] {
                knn[t] = v;
                knn_unit[t] = u;
            }
        }
    }

    /// Stage 2: best k-means prototype cosine for shortlisted techniques.
    #[inline(never)]
    fn prototype_evidence(&self, s: &mut Scratch) {
        let d = self.proj_out;
        for &t in &s.cand {
            let t = t as usize;
            let (a, b) = (
                self.proto_start[t] as usize,
                self.proto_start[t + 1] as usize,
            );
            let mut best = 0.0f32;
            for proto in self.prototypes[a * d..b * d].chunks_exact(d) {
                best = best.max(dot(proto, &s.projected));
            }
            s.emb[t] = best;
        }
    }

    /// The text's unit-length SIF sentence vector in the model's projected space — the vector the
    /// embedding evidence compares with examples and prototypes (all zeros for a text with no known
    /// words). Used to lay mapped intel out in two dimensions.
    pub fn sentence_vector(&self, wv: &WordVectors, input: &str, s: &mut Scratch) -> Vec<f32> {
        if s.owner != self.instance {
            s.cache.clear();
            s.owner = self.instance;
        }
        self.query(wv, input, s);
        s.projected.clone()
    }

    /// Top `k` techniques for a text, best first (ties broken by technique id for determinism).
    pub fn top_k(&self, wv: &WordVectors, input: &str, k: usize, s: &mut Scratch) -> Vec<Ranked> {
        let k = k.min(self.techniques.len());
        if k == 0 {
            return vec![];
        }
        let (ranked, text) = self.ranked_logits(wv, input, k, s);
        let scores: Vec<f64> = match &self.calibration {
            Some(c) => {
                let candidates: Vec<(f32, Components)> = ranked
                    .iter()
                    .map(|(t, z)| (*z, self.components(*t, s)))
                    .collect();
                c.ranked(&candidates, &text)
            }
            None => ranked.iter().map(|(_, z)| sigmoid(*z) as f64).collect(),
        };
        ranked
            .into_iter()
            .zip(scores)
            .take(k)
            .map(|((technique, _), score)| Ranked { technique, score })
            .collect()
    }

    /// The best `k` candidates of `input` with their raw (uncalibrated) logits, best first, and
    /// the text's features for the calibration (`prose`: whether the text reads as prose, which also
    /// decides whether parents lead their sub-techniques).
    pub fn ranked_logits(
        &self,
        wv: &WordVectors,
        input: &str,
        k: usize,
        s: &mut Scratch,
    ) -> (Vec<(usize, f32)>, super::calibrate::TextFeatures) {
        let k = k.min(self.techniques.len());
        self.score_with(wv, input, k, &[], s);
        let mut idx: Vec<usize> = s.cand.iter().map(|t| *t as usize).collect();
        let cmp = |a: &usize, b: &usize| {
            s.fused[*b]
                .total_cmp(&s.fused[*a])
                .then_with(|| self.techniques[*a].id.cmp(&self.techniques[*b].id))
        };
        if k == 0 {
            idx.clear();
        } else if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        let mut ranked: Vec<(usize, f32)> = idx.into_iter().map(|t| (t, s.fused[t])).collect();
        let prose = super::document::reads_as_prose(input);
        if prose {
            self.parents_lead(&mut ranked, &s.fused);
        }
        let text = self.text_features(&ranked, s, prose);
        (ranked, text)
    }

    /// Put a parent technique before its sub-technique when the sub-technique leads it by less than
    /// [`SUB_TECHNIQUE_LEAD`]: the first sub-technique of a family in `ranked` (best first, raw
    /// logits) trades places and logits with its parent, when the parent was scored (`fused` finite).
    /// A parent ranked below the list's end takes the sub-technique's place, which then leaves the
    /// list. Only a family's first member moves; the rest of the order is kept. Prose only: the rule
    /// follows how people label report and rule text; a command line or code names its tool, and a
    /// sub-technique named there (PowerShell, schtasks) is what it runs.
    fn parents_lead(&self, ranked: &mut [(usize, f32)], fused: &[f32]) {
        for i in 0..ranked.len() {
            let (t, z) = ranked[i];
            let parent = self.family(t);
            if parent == t || ranked[..i].iter().any(|r| self.family(r.0) == parent) {
                continue;
            }
            let zp = fused[parent];
            if !zp.is_finite() || z - zp >= SUB_TECHNIQUE_LEAD {
                continue;
            }
            if let Some(j) = ranked[i + 1..].iter().position(|r| r.0 == parent) {
                ranked[i + 1 + j] = (t, zp);
            }
            ranked[i] = (parent, z);
        }
    }

    fn text_features(
        &self,
        ranked: &[(usize, f32)],
        s: &Scratch,
        prose: bool,
    ) -> super::calibrate::TextFeatures {
        // Candidates without evidence have logit -inf: bounded here so differences stay finite.
        let z1 = ranked.first().map_or(-30.0, |r| r.1.clamp(-30.0, 30.0));
        // The runner-up is the best scored candidate of another family, ranked or not: a
        // sub-technique and its parent are one answer (the one implies the other), so the margin
        // between them says nothing about whether the answer is right.
        let z2 = ranked.first().map_or(z1, |&(first, _)| {
            let first = self.family(first);
            s.cand
                .iter()
                .map(|c| *c as usize)
                .filter(|c| self.family(*c) != first)
                .map(|c| s.fused[c])
                .filter(|z| z.is_finite())
                .reduce(f32::max)
                .map_or(z1, |z| z.clamp(-30.0, 30.0))
        });
        super::calibrate::TextFeatures {
            z1,
            z2,
            tokens: s.n_tokens,
            known: s.n_known,
            prose,
        }
    }

    /// Calibrated score of one technique for `input` (always fully scored, shortlisted or not).
    pub fn technique_score(&self, wv: &WordVectors, input: &str, t: usize, s: &mut Scratch) -> f64 {
        self.score_with(wv, input, 2, &[t], s);
        if !s.fused[t].is_finite() {
            return 0.0;
        }
        // Ranked as in `top_k` (parents leading their sub-techniques), so a technique scores here what
        // it scores in the ranking.
        let mut ranked: Vec<(usize, f32)> = s
            .cand
            .iter()
            .map(|c| *c as usize)
            .filter(|c| s.fused[*c].is_finite())
            .map(|c| (c, s.fused[c]))
            .collect();
        ranked.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| self.techniques[a.0].id.cmp(&self.techniques[b.0].id))
        });
        let prose = super::document::reads_as_prose(input);
        if prose {
            self.parents_lead(&mut ranked, &s.fused);
        }
        let rank = ranked.iter().position(|r| r.0 == t).unwrap_or(ranked.len());
        let z = ranked.get(rank).map_or(s.fused[t], |r| r.1);
        let Some(c) = &self.calibration else {
            return f64::from(sigmoid(z));
        };
        if !prose {
            return f64::from(sigmoid(z));
        }
        let text = self.text_features(&ranked, s, prose);
        let features = |rank: usize| {
            let (t, z) = ranked.get(rank).copied().unwrap_or((t, z));
            super::calibrate::features(z, rank, &text, &self.components(t, s))
        };
        let p = c.probability(&features(rank));
        if rank == 0 {
            p
        } else {
            // Never above the best candidate's, as in `top_k`.
            p.min(c.probability(&features(0)))
        }
    }

    /// Component scores of one technique for the last [`Model::score`] call.
    pub fn components(&self, t: usize, s: &Scratch) -> Components {
        Components {
            centroid: s.centroid[t],
            knn: s.knn[t],
            embedding: s.emb[t],
            name: self.name_match(t, s),
            id: s.ids[t],
            lr: s.lr[t],
        }
    }

    /// Human-readable evidence for the best match of `input`, or None when nothing matched.
    pub fn explain(
        &self,
        wv: &WordVectors,
        input: &str,
        threshold: f64,
        s: &mut Scratch,
    ) -> Option<String> {
        let top = self.top_k(wv, input, 1, s).into_iter().next()?;
        if top.score <= 0.0 {
            return None;
        }
        let t = top.technique;
        let c = self.components(t, s);
        // Query terms that weigh most in this technique's centroid.
        let mut contrib: Vec<(f32, &str)> = Vec::new();
        let inverse: HashMap<u32, &str> = s
            .qvec
            .iter()
            .filter_map(|(id, _)| {
                self.terms
                    .iter()
                    .find(|(_, v)| **v == *id)
                    .map(|(k, _)| (*id, k.as_str()))
            })
            .collect();
        for &(id, qw) in &s.qvec {
            if let Some(&(_, w)) = self.centroid_postings[id as usize]
                .iter()
                .find(|(tt, _)| *tt as usize == t)
            {
                contrib.push((qw * w, inverse.get(&id).copied().unwrap_or("?")));
            }
        }
        contrib.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let terms: Vec<&str> = contrib.iter().take(6).map(|(_, t)| *t).collect();
        let tm = &self.techniques[t];
        let mut out = format!(
            "{} {} (score {:.2}{}): terms [{}]",
            tm.id,
            tm.name,
            top.score,
            if top.score < threshold {
                ", below threshold"
            } else {
                ""
            },
            terms.join(", ")
        );
        if c.name > 0.0 {
            out.push_str("; names the technique");
        }
        if c.id > 0.0 {
            out.push_str("; cites its id");
        }
        out.push_str(&format!(
            "; lexical {:.2}, nearest example {:.2}, embedding {:.2}, classifier {:.2}",
            c.centroid, c.knn, c.embedding, c.lr
        ));
        let u = s.knn_unit[t];
        if u != u32::MAX {
            let kind = match self.unit_kind[u as usize] {
                UnitKind::Name => "name",
                UnitKind::Description => "description",
                UnitKind::Detection => "detection",
                UnitKind::Procedure => "procedure",
            };
            let text: String = self.unit_text[u as usize].chars().take(160).collect();
            out.push_str(&format!("; nearest {kind}: \"{text}\""));
        }
        Some(out)
    }

    /// Number of k-means prototypes (for reports).
    pub fn prototype_count(&self) -> usize {
        self.proto_tech.len()
    }

    /// Number of training units (names, sentences, procedures).
    pub fn unit_count(&self) -> usize {
        self.unit_tech.len()
    }

    /// Record the texts learnt besides ATT&CK's own (see [`Model::learnt`]).
    pub fn set_learnt<'a>(&mut self, texts: impl IntoIterator<Item = &'a str>) {
        let mut keys: Vec<u64> = texts.into_iter().map(super::text_key).collect();
        keys.sort_unstable();
        keys.dedup();
        self.learnt = keys;
    }

    /// Whether the model learnt `text` (a labelled example or workbench sentence): a score on it
    /// measures memory, not mapping.
    pub fn learnt(&self, text: &str) -> bool {
        self.learnt.binary_search(&super::text_key(text)).is_ok()
    }

    /// How many texts the model learnt besides ATT&CK's own.
    pub fn learnt_count(&self) -> usize {
        self.learnt.len()
    }
}

fn analyzer() -> &'static Analyzer {
    static A: std::sync::OnceLock<Analyzer> = std::sync::OnceLock::new();
    A.get_or_init(Analyzer::default)
}
