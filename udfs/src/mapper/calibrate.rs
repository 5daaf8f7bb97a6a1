//! Text calibration of mapping scores: the model's raw candidate logits turned into the probability
//! that a technique is a correct label of text written outside ATT&CK, from features of the whole
//! ranking (the candidate's logit, the best candidate's margin over the second, the text's length,
//! the share of its words the model knows) and of the candidate's evidence (how much each kind —
//! TF-IDF centroid, nearest example, prototypes, name, cited id, classifier — supports it), fitted
//! by logistic regression on labelled text that is not ATT&CK's own (`threatlake model calibrate`)
//! and saved beside the model as `calibration.json`.

use serde::{Deserialize, Serialize};

use super::algorithm::Components;

/// Number of calibration features.
pub const FEATURES: usize = 13;

/// Version of the calibration's features; a `calibration.json` of another version was fitted on
/// other features (or another ranking) and must be fitted again (3: the margin is taken over the
/// best candidate of another technique family).
pub const FORMAT: u32 = 3;

/// Features of one text's ranking that do not depend on the candidate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TextFeatures {
    /// Raw logit of the best candidate.
    pub z1: f32,
    /// Raw logit of the best candidate of another technique family than the first (`z1` when
    /// there is none): a parent and its sub-technique are one answer.
    pub z2: f32,
    /// Word tokens of the text.
    pub tokens: usize,
    /// Tokens the model has a term or a vector for.
    pub known: usize,
    /// Whether the text reads as prose (the kind of text the calibration was fitted on); command
    /// lines, code and indicator lists keep the model's ATT&CK-procedure calibration.
    pub prose: bool,
}

/// A candidate's features, whether it is a correct label, and its weight in the fit.
pub type Row = ([f64; FEATURES], bool, f64);

/// One logistic regression over [`features`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    /// Weights of [`features`].
    pub weights: [f64; FEATURES],
    /// Intercept.
    pub bias: f64,
}

impl Logistic {
    fn fit(rows: &[Row]) -> Self {
        let (weights, bias) = logistic(rows, 600, 1e-4);
        Self { weights, bias }
    }

    fn probability(&self, x: &[f64; FEATURES]) -> f64 {
        let z: f64 = self.bias + self.weights.iter().zip(x).map(|(w, v)| w * v).sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }
}

/// The fitted calibration, with provenance: one regression for a text's best candidate (the
/// score `map_technique` abstains on) and one for the candidates after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Feature version ([`FORMAT`]).
    pub format: u32,
    /// For the best candidate.
    pub best: Logistic,
    /// For the others.
    pub others: Logistic,
    /// The labelled files it was fitted on, with their row counts.
    pub fitted_on: Vec<String>,
    /// The abstain threshold chosen with it (see `threatlake model calibrate`).
    pub threshold: f64,
    /// Domain and ATT&CK release of the model it was fitted for.
    pub domain: String,
    /// ATT&CK release of that model.
    pub attack_version: String,
    /// The calibration of `map_report`'s scores (absent: they stay `1 − Π(1 − p)`).
    #[serde(default)]
    pub report: Option<ReportCalibration>,
}

/// The calibration of a technique's report score: Platt scaling of the log-odds of its
/// uncalibrated score `1 − Π(1 − p)` ([`super::document::Support::any`]), fitted on labelled
/// reports (`threatlake model calibrate`). Monotone, so it keeps the order of a report's
/// techniques. (The best sentence's score, the supporting sentences and the report's length as
/// further features calibrated the development sets no better, cross-validated.)
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReportCalibration {
    /// Weight of the log-odds.
    pub slope: f64,
    /// Intercept.
    pub bias: f64,
    /// The report threshold chosen with it: the one with the best F1 of the reports' technique
    /// sets, averaged over the labelled files, cross-validated.
    pub threshold: f64,
}

/// The log-odds of a probability, bounded.
fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    (p / (1.0 - p)).ln()
}

impl ReportCalibration {
    /// Fit on `(uncalibrated score, in the report's labels)` pairs; the threshold is the caller's.
    pub fn fit(pairs: &[(f64, bool)], threshold: f64) -> Self {
        let rows: Vec<([f64; 1], bool, f64)> =
            pairs.iter().map(|(p, y)| ([logit(*p)], *y, 1.0)).collect();
        let ([slope], bias) = logistic(&rows, 600, 1e-4);
        Self {
            slope,
            bias,
            threshold,
        }
    }

    /// Probability that a technique of uncalibrated report score `any` is one of the report's.
    pub fn probability(&self, any: f64) -> f64 {
        1.0 / (1.0 + (-(self.bias + self.slope * logit(any))).exp())
    }
}

/// The model's own probability of a raw logit (its ATT&CK-procedure calibration).
pub fn sigmoid(z: f32) -> f64 {
    1.0 / (1.0 + (-f64::from(z)).exp())
}

/// Where [`features`] puts the features the calibration reads by name.
pub mod feature {
    /// The candidate's raw logit (bounded).
    pub const LOGIT: usize = 0;
    /// 1 for the text's best candidate, else 0.
    pub const TOP: usize = 1;
    /// The candidate's cited-id evidence (above 0: the text cites it by id).
    pub const ID: usize = 11;
}

/// Longest margin that counts (beyond it the best candidate is simply clear).
const MAX_MARGIN: f32 = 8.0;

/// The features of a candidate with raw logit `z` and evidence `e` at `rank` (0 = best) in a text
/// with `t`.
pub fn features(z: f32, rank: usize, t: &TextFeatures, e: &Components) -> [f64; FEATURES] {
    let top = if rank == 0 { 1.0 } else { 0.0 };
    let margin = f64::from((t.z1 - t.z2).clamp(0.0, MAX_MARGIN));
    let len = (1.0 + t.tokens as f64).ln();
    let known = if t.tokens == 0 {
        0.0
    } else {
        t.known as f64 / t.tokens as f64
    };
    let z = z.clamp(-30.0, 30.0);
    let gap = f64::from((t.z1.clamp(-30.0, 30.0) - z).clamp(0.0, MAX_MARGIN));
    let z = f64::from(z);
    let e = [e.centroid, e.knn, e.embedding, e.name, e.id, e.lr].map(|v| {
        let v = f64::from(v);
        if v.is_finite() {
            v
        } else {
            0.0
        }
    });
    let x = [
        z,
        top,
        top * margin,
        (1.0 - top) * gap,
        len,
        known,
        z * len,
        e[0],
        e[1],
        e[2],
        e[3],
        e[4],
        e[5],
    ];
    debug_assert!(x[feature::LOGIT] == z && x[feature::TOP] == top && x[feature::ID] == e[4]);
    x
}

/// Read a `calibration.json`: `Err` names what is wrong (an older format, bad JSON) and the fix is
/// the caller's to say.
pub fn parse(bytes: &[u8]) -> Result<Calibration, String> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if head.format != FORMAT {
        return Err(format!(
            "it was fitted on the features of an older threatlake (format {}, this build reads {FORMAT})",
            head.format
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Whether the candidate of features `x` is cited by id in the text (its `id` evidence).
fn cited(x: &[f64; FEATURES]) -> bool {
    x[feature::ID] > 0.0
}

impl Calibration {
    /// Probability that the candidate with features `x` is a correct label. A technique the text
    /// cites by id keeps the model's own probability of its logit (feature 0), as command lines do:
    /// the development sets hold a few dozen such sentences, too few to calibrate them on (fitted
    /// anyway, a cited id with little other evidence fell to 0.17).
    pub fn probability(&self, x: &[f64; FEATURES]) -> f64 {
        if cited(x) {
            return sigmoid(x[feature::LOGIT] as f32);
        }
        if x[feature::TOP] > 0.5 {
            self.best.probability(x)
        } else {
            self.others.probability(x)
        }
    }

    /// Calibrated probabilities of a text's candidates given best first as raw logits with their
    /// evidence; never higher than the candidate ranked above (the ranking stays the model's). Text
    /// that is not prose keeps the model's own probabilities.
    pub fn ranked(&self, candidates: &[(f32, Components)], t: &TextFeatures) -> Vec<f64> {
        if !t.prose {
            return candidates.iter().map(|(z, _)| sigmoid(*z)).collect();
        }
        let mut out = Vec::with_capacity(candidates.len());
        let mut cap = 1.0f64;
        for (rank, (z, e)) in candidates.iter().enumerate() {
            let p = self.probability(&features(*z, rank, t, e)).min(cap);
            cap = p;
            out.push(p);
        }
        out
    }

    /// Fit on `(features, correct)` rows.
    pub fn fit(rows: &[Row], fitted_on: Vec<String>, domain: &str, attack_version: &str) -> Self {
        let (best, others): (Vec<Row>, Vec<Row>) =
            rows.iter().partition(|(x, _, _)| x[feature::TOP] > 0.5);
        Self {
            format: FORMAT,
            best: Logistic::fit(&best),
            others: Logistic::fit(&others),
            threshold: crate::DEFAULT_THRESHOLD,
            fitted_on,
            domain: domain.to_string(),
            attack_version: attack_version.to_string(),
            report: None,
        }
    }
}

/// Binary logistic regression by full-batch gradient descent on standardised features (a few
/// features, tens of thousands of rows); weights and bias on the original scale.
pub fn logistic<const N: usize>(
    data: &[([f64; N], bool, f64)],
    iters: usize,
    l2: f64,
) -> ([f64; N], f64) {
    let n = data.iter().map(|r| r.2).sum::<f64>().max(1e-9);
    let mut mean = [0f64; N];
    let mut sd = [0f64; N];
    for (x, _, w) in data {
        for j in 0..N {
            mean[j] += w * x[j] / n;
        }
    }
    for (x, _, w) in data {
        for j in 0..N {
            sd[j] += w * (x[j] - mean[j]).powi(2) / n;
        }
    }
    // A feature constant over the rows (e.g. "is the best candidate" among best candidates only)
    // keeps weight 0: the intercept carries it.
    let constant: [bool; N] = std::array::from_fn(|j| sd[j] < 1e-12);
    let sd: [f64; N] = std::array::from_fn(|j| if constant[j] { 1.0 } else { sd[j].sqrt() });
    let (mut w, mut b) = ([0f64; N], 0f64);
    // Adam on the mean log-loss: robust to the features' correlations without tuning a step size.
    let (mut m, mut v) = ([0f64; N], [0f64; N]);
    let (mut mb, mut vb) = (0f64, 0f64);
    let (lr, b1, b2, eps) = (0.05, 0.9, 0.999, 1e-8);
    for it in 1..=iters {
        let (mut gw, mut gb) = ([0f64; N], 0f64);
        for (x, y, weight) in data {
            let z: f64 = b + (0..N).map(|j| w[j] * (x[j] - mean[j]) / sd[j]).sum::<f64>();
            let g = weight * (1.0 / (1.0 + (-z).exp()) - f64::from(u8::from(*y)));
            for j in 0..N {
                gw[j] += g * (x[j] - mean[j]) / sd[j];
            }
            gb += g;
        }
        let t = it as i32;
        for j in 0..N {
            let g = gw[j] / n + l2 * w[j];
            if constant[j] {
                continue;
            }
            m[j] = b1 * m[j] + (1.0 - b1) * g;
            v[j] = b2 * v[j] + (1.0 - b2) * g * g;
            let (mh, vh) = (m[j] / (1.0 - b1.powi(t)), v[j] / (1.0 - b2.powi(t)));
            w[j] -= lr * mh / (vh.sqrt() + eps);
        }
        let g = gb / n;
        mb = b1 * mb + (1.0 - b1) * g;
        vb = b2 * vb + (1.0 - b2) * g * g;
        b -= lr * (mb / (1.0 - b1.powi(t))) / ((vb / (1.0 - b2.powi(t))).sqrt() + eps);
    }
    let mut out = [0f64; N];
    let mut bias = b;
    for j in 0..N {
        out[j] = w[j] / sd[j];
        bias -= w[j] * mean[j] / sd[j];
    }
    (out, bias)
}

/// One labelled text prepared for calibration.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Index of the file it came from.
    pub file: usize,
    /// Cross-validation group (texts of one report share it; folds never split a group).
    pub group: u64,
    /// Whether the text has labels (a negative has none).
    pub positive: bool,
    /// Whether it reads as prose (only prose is calibrated; see [`TextFeatures::prose`]).
    pub prose: bool,
    /// Its best candidates, best first: features (in [`features`]' order, 7–12 the
    /// candidate's evidence) and whether each is one of the labels.
    pub candidates: Vec<([f64; FEATURES], bool)>,
    /// The candidates' technique ids, in the same order.
    pub ids: Vec<String>,
}

/// Candidates per text used for fitting.
pub const CANDIDATES: usize = 5;

/// The samples of labelled texts `(text, labels, group)` of file `file`, scored in parallel
/// by the model's raw logits.
pub fn samples(
    m: &super::Mapper,
    file: usize,
    texts: &[(String, Vec<String>, u64)],
) -> Vec<Sample> {
    use rayon::prelude::*;
    texts
        .par_iter()
        .map_init(super::Scratch::default, |s, (text, labels, group)| {
            let (ranked, t) = m.model.ranked_logits(&m.vectors, text, CANDIDATES, s);
            let candidates = ranked
                .iter()
                .enumerate()
                .map(|(rank, (tech, z))| {
                    let id = &m.model.techniques[*tech].id;
                    let e = m.model.components(*tech, s);
                    (features(*z, rank, &t, &e), labels.iter().any(|l| l == id))
                })
                .collect();
            Sample {
                file,
                group: *group,
                positive: !labels.is_empty(),
                prose: t.prose,
                candidates,
                ids: ranked
                    .iter()
                    .map(|(tech, _)| m.model.techniques[*tech].id.clone())
                    .collect(),
            }
        })
        .collect()
}

/// The candidates of `samples` as fitting rows, each of weight 1 (weighing the files equally
/// was tried: the small rule-description sets then overfit and calibrate worse).
pub fn rows_of(samples: &[&Sample]) -> Vec<Row> {
    samples
        .iter()
        .filter(|s| s.prose)
        .flat_map(|s| s.candidates.iter().filter(|(x, _)| !cited(x)))
        .map(|(x, y)| (*x, *y, 1.0))
        .collect()
}

/// The fold of group `group` among `folds` in partition `partition`: partition 0 is `group %
/// folds`, the others shuffle the groups (another draw of the same cross-validation).
pub fn fold_of(group: u64, folds: u64, partition: u64) -> u64 {
    if partition == 0 {
        return group % folds;
    }
    // SplitMix64 of the group and the partition.
    let mut z = group ^ partition.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % folds
}

/// The top-1 probability of every sample from a calibration fitted without its fold (`folds`
/// folds by group, partition `partition` of [`fold_of`]), in sample order; `None` for a text with
/// no candidate.
pub fn cross_validated(samples: &[Sample], folds: u64, partition: u64) -> Vec<Option<f64>> {
    let folds = folds.max(2);
    held_out(samples, folds, |s| fold_of(s.group, folds, partition)).0
}

/// The top-1 probability of every sample from a calibration fitted on the other files only: how
/// the calibration carries over to a source of text it never saw. `None` for a text with no
/// candidate, and for every text when there is only one file. Also the calibrations, the `i`th
/// fitted without file `i` (none when there is only one file).
pub fn cross_validated_by_file(samples: &[Sample]) -> (Vec<Option<f64>>, Vec<Calibration>) {
    let files = samples.iter().map(|s| s.file + 1).max().unwrap_or(0);
    if files < 2 {
        return (vec![None; samples.len()], Vec::new());
    }
    held_out(samples, files as u64, |s| s.file as u64)
}

/// Each sample's top-1 probability from a calibration fitted on the samples outside its fold
/// (`fold(sample)` in `0..folds`), and the calibration of each fold.
fn held_out(
    samples: &[Sample],
    folds: u64,
    fold: impl Fn(&Sample) -> u64,
) -> (Vec<Option<f64>>, Vec<Calibration>) {
    let mut out = vec![None; samples.len()];
    let mut fitted = Vec::with_capacity(folds as usize);
    for f in 0..folds {
        let train: Vec<&Sample> = samples.iter().filter(|s| fold(s) != f).collect();
        let c = Calibration::fit(&rows_of(&train), vec![], "", "");
        for (o, s) in out.iter_mut().zip(samples) {
            if fold(s) == f {
                *o = s.candidates.first().map(|(x, _)| {
                    if s.prose {
                        c.probability(x)
                    } else {
                        sigmoid(x[feature::LOGIT] as f32)
                    }
                });
            }
        }
        fitted.push(c);
    }
    (out, fitted)
}

/// The lowest threshold (in steps of 0.01) at which at most `max_negatives` of the negatives
/// keep a technique and the kept positives (at least one) are right at least `min_precision` of
/// the time.
pub fn choose_threshold(
    positives: &[(f64, bool)],
    negatives: &[f64],
    max_negatives: f64,
    min_precision: f64,
) -> Option<f64> {
    (1..100).map(|i| i as f64 / 100.0).find(|&t| {
        let p = super::eval::operating_points(positives, negatives, &[t]);
        let p = &p[0];
        // A threshold that keeps no positive meets any precision vacuously: not a choice.
        p.negatives_mapped.is_none_or(|n| n <= max_negatives)
            && p.precision >= min_precision
            && (p.coverage > 0.0 || positives.is_empty())
    })
}

/// One technique a labelled report supports, prepared for the report calibration.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSample {
    /// Index of the file the report came from.
    pub file: usize,
    /// Cross-validation group (the report).
    pub group: u64,
    /// The uncalibrated report score, `1 − Π(1 − p)`.
    pub any: f64,
    /// Whether the technique is one of the report's labels.
    pub right: bool,
    /// The technique's id.
    pub id: String,
    /// Its supporting sentences and rows.
    pub sentences: usize,
    /// The best one's score.
    pub best: f64,
    /// Sentences and rows the report has.
    pub units: usize,
}

/// A labelled report: its text, its techniques, its group.
pub type LabelledReport = (String, std::collections::BTreeSet<String>, u64);

/// The techniques each report of file `file` supports (with the model's current text
/// calibration), scored in parallel.
pub fn report_samples(
    m: &super::Mapper,
    file: usize,
    reports: &[LabelledReport],
) -> Vec<ReportSample> {
    use rayon::prelude::*;
    reports
        .par_iter()
        .map_init(super::Scratch::default, |s, (text, labels, group)| {
            let (support, units) = super::document::report_support(m, text, s);
            support
                .iter()
                .map(|e| {
                    let id = &m.model.techniques[e.technique].id;
                    ReportSample {
                        file,
                        group: *group,
                        any: e.any,
                        right: labels.contains(id),
                        id: id.clone(),
                        sentences: e.sentences,
                        best: e.best,
                        units,
                    }
                })
                .collect::<Vec<_>>()
        })
        .flatten()
        .collect()
}

/// Fit the report calibration on `samples`, with the threshold `threshold`.
pub fn fit_reports(samples: &[ReportSample], threshold: f64) -> ReportCalibration {
    let pairs: Vec<(f64, bool)> = samples.iter().map(|s| (s.any, s.right)).collect();
    ReportCalibration::fit(&pairs, threshold)
}

/// Each report sample's probability from a report calibration fitted without its fold (`folds`
/// folds by report, partition `partition` of [`fold_of`]), in sample order.
pub fn cross_validated_reports(samples: &[ReportSample], folds: u64, partition: u64) -> Vec<f64> {
    let folds = folds.max(2);
    let mut out = vec![0.0; samples.len()];
    for f in 0..folds {
        let train: Vec<(f64, bool)> = samples
            .iter()
            .filter(|s| fold_of(s.group, folds, partition) != f)
            .map(|s| (s.any, s.right))
            .collect();
        let c = ReportCalibration::fit(&train, 0.0);
        for (o, s) in out.iter_mut().zip(samples) {
            if fold_of(s.group, folds, partition) == f {
                *o = c.probability(s.any);
            }
        }
    }
    out
}

/// Micro precision, recall and F1 of the report technique sets kept at `threshold`, from every
/// supported technique's `(score, right)` and the number of labels over the reports.
pub fn set_scores(scored: &[(f64, bool)], labels: usize, threshold: f64) -> (f64, f64, f64) {
    let kept = scored.iter().filter(|(p, _)| *p >= threshold);
    let (tp, n) = kept.fold((0usize, 0usize), |(tp, n), (_, right)| {
        (tp + usize::from(*right), n + 1)
    });
    let p = tp as f64 / n.max(1) as f64;
    let r = tp as f64 / labels.max(1) as f64;
    let f1 = if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    };
    (p, r, f1)
}

/// The threshold (in steps of 0.01) with the best F1 of the report sets averaged over `sets`
/// (each: every supported technique's `(score, right)` and its number of labels); the lowest of
/// equals.
pub fn best_f1_threshold(sets: &[(Vec<(f64, bool)>, usize)]) -> f64 {
    let mut best = (f64::NEG_INFINITY, crate::DEFAULT_THRESHOLD);
    for t in (1..100).map(|i| i as f64 / 100.0) {
        let f1 = sets
            .iter()
            .map(|(scored, labels)| set_scores(scored, *labels, t).2)
            .sum::<f64>()
            / sets.len().max(1) as f64;
        if f1 > best.0 + 1e-12 {
            best = (f1, t);
        }
    }
    best.1
}

/// A stable group number of a text's group key (a report id, a rule id).
pub fn group_of(key: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (the std hasher is not).
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(z1: f32, z2: f32, tokens: usize) -> TextFeatures {
        TextFeatures {
            z1,
            z2,
            tokens,
            known: tokens,
            prose: true,
        }
    }

    #[test]
    fn probability_rises_with_the_logit_and_keeps_the_ranking() {
        // Synthetic data where correctness follows the logit: the fitted calibration is monotone.
        let e = Components {
            centroid: 0.3,
            knn: 0.4,
            embedding: 0.5,
            ..Components::default()
        };
        let mut rows = Vec::new();
        for i in 0..2000 {
            let z = (i % 200) as f32 / 20.0 - 5.0;
            let p = 1.0 / (1.0 + (-(z as f64) * 1.5).exp());
            let correct = ((i * 7919) % 1000) as f64 / 1000.0 < p;
            rows.push((features(z, 0, &text(z, z - 1.0, 12), &e), correct, 1.0));
        }
        let c = Calibration::fit(&rows, vec![], "enterprise", "18.1");
        let t = text(2.0, 1.0, 12);
        let ps: Vec<f64> = (-40..40)
            .map(|z| c.probability(&features(z as f32 / 8.0, 0, &t, &e)))
            .collect();
        assert!(ps.windows(2).all(|w| w[1] >= w[0]), "{ps:?}");
        assert!(ps[0] < 0.2 && ps[79] > 0.8, "{} {}", ps[0], ps[79]);
        let ranked = c.ranked(
            &[3.0, 2.9, -1.0, -20.0].map(|z| (z, e)),
            &text(3.0, 2.9, 12),
        );
        assert!(ranked.windows(2).all(|w| w[1] <= w[0]), "{ranked:?}");
    }

    #[test]
    fn held_out_by_file_fits_on_the_other_files_only() {
        let e = Components {
            centroid: 0.3,
            ..Components::default()
        };
        // The same candidates in both files: always right in file 0, never in file 1.
        let samples: Vec<Sample> = (0..400)
            .map(|i| {
                let z = (i % 20) as f32 / 4.0 - 2.5;
                Sample {
                    file: (i % 2) as usize,
                    group: i,
                    positive: true,
                    prose: true,
                    candidates: vec![(features(z, 0, &text(z, z - 1.0, 12), &e), i % 2 == 0)],
                    ids: vec!["T1059".into()],
                }
            })
            .collect();
        let mean = |ps: &[Option<f64>], file: usize| {
            let v: Vec<f64> = samples
                .iter()
                .zip(ps)
                .filter(|(s, _)| s.file == file)
                .map(|(_, p)| p.expect("a candidate is scored"))
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        // Held out by file, each file is scored by the other's opposite answer …
        let (by_file, fitted) = cross_validated_by_file(&samples);
        // The `i`th calibration is the one that scored file `i`.
        assert_eq!(fitted.len(), 2);
        for (s, p) in samples.iter().zip(&by_file).take(4) {
            assert_eq!(Some(fitted[s.file].probability(&s.candidates[0].0)), *p);
        }
        assert!(mean(&by_file, 0) < 0.1 && mean(&by_file, 1) > 0.9);
        // … while folds by group mix both files: about one half either way.
        let by_group = cross_validated(&samples, 5, 0);
        assert!(
            (mean(&by_group, 0) - 0.5).abs() < 0.1,
            "{}",
            mean(&by_group, 0)
        );
        // One file has no other to fit on.
        let one: Vec<Sample> = samples.into_iter().filter(|s| s.file == 0).collect();
        let (scores, fitted) = cross_validated_by_file(&one);
        assert!(scores.iter().all(Option::is_none) && fitted.is_empty());
    }

    #[test]
    fn a_cited_technique_keeps_the_models_probability() {
        let e = Components {
            centroid: 0.3,
            ..Components::default()
        };
        let cited = Components { id: 1.0, ..e };
        // Every tenth candidate is cited and right: were it fitted on, the id would get a weight.
        let samples: Vec<Sample> = (0..400)
            .map(|i| {
                let z = (i % 40) as f32 / 4.0 - 5.0;
                let (ev, right) = if i % 10 == 0 {
                    (cited, true)
                } else {
                    (e, i % 3 == 0)
                };
                Sample {
                    file: 0,
                    group: i,
                    positive: true,
                    prose: true,
                    candidates: vec![(features(z, 0, &text(z, z - 1.0, 12), &ev), right)],
                    ids: vec!["T1059".into()],
                }
            })
            .collect();
        let rows = rows_of(&samples.iter().collect::<Vec<_>>());
        assert_eq!(rows.len(), 360);
        let c = Calibration::fit(&rows, vec![], "enterprise", "18.1");
        let t = text(3.3, 0.5, 10);
        assert_eq!(c.probability(&features(3.3, 0, &t, &cited)), sigmoid(3.3));
        // The same candidate without the citation is calibrated (here: right a third of the time).
        let p = c.probability(&features(3.3, 0, &t, &e));
        assert!((p - sigmoid(3.3)).abs() > 0.3, "{p}");
        // Cited candidates are not fitted on: the id weight stays 0.
        assert_eq!(c.best.weights[feature::ID], 0.0);
    }

    #[test]
    fn report_calibration_is_monotone_and_pulls_overconfident_scores_down() {
        // Uncalibrated report scores that run high: a technique scored p is right p² of the time.
        let pairs: Vec<(f64, bool)> = (0..4000)
            .map(|i| {
                let p = (i % 100) as f64 / 100.0 + 0.005;
                (p, ((i * 7919) % 1000) as f64 / 1000.0 < p * p)
            })
            .collect();
        let c = ReportCalibration::fit(&pairs, 0.3);
        assert_eq!(c.threshold, 0.3);
        let ps: Vec<f64> = (1..100).map(|i| c.probability(i as f64 / 100.0)).collect();
        assert!(ps.windows(2).all(|w| w[1] > w[0]), "{ps:?}");
        // Calibrated: the mean probability of a bin matches its share right.
        let cal: Vec<(f64, bool)> = pairs.iter().map(|(p, y)| (c.probability(*p), *y)).collect();
        let before = super::super::eval::reliability(&pairs, 10).ece;
        let after = super::super::eval::reliability(&cal, 10).ece;
        assert!(after < before / 2.0, "{before} → {after}");
        assert!(c.probability(0.5) < 0.45, "{}", c.probability(0.5));
        // Certain scores stay finite.
        assert!(c.probability(1.0).is_finite() && c.probability(0.0).is_finite());
    }

    #[test]
    fn report_threshold_has_the_best_mean_f1() {
        // Two sets: scores ≥ 0.5 are right; a threshold of 0.5 keeps all of them and nothing else.
        let a: Vec<(f64, bool)> = (0..20).map(|i| (i as f64 / 20.0, i >= 10)).collect();
        let b: Vec<(f64, bool)> = vec![(0.9, true), (0.6, true), (0.2, false)];
        assert_eq!(set_scores(&a, 10, 0.5), (1.0, 1.0, 1.0));
        // Labels never supported count against recall.
        assert_eq!(set_scores(&b, 4, 0.5), (1.0, 0.5, 2.0 / 3.0));
        assert_eq!(set_scores(&b, 4, 0.95), (0.0, 0.0, 0.0));
        assert!((best_f1_threshold(&[(a, 10), (b, 2)]) - 0.46).abs() < 1e-9);
    }

    #[test]
    fn partitions_keep_groups_whole_and_balance_the_folds() {
        let groups: Vec<u64> = (0..5000u64)
            .map(|i| group_of(&format!("report-{i}")))
            .collect();
        assert!(groups.iter().all(|g| fold_of(*g, 5, 0) == g % 5));
        for partition in 1..5 {
            let mut sizes = [0usize; 5];
            for g in &groups {
                let f = fold_of(*g, 5, partition);
                // A group's fold is the same every time it is asked for.
                assert_eq!(f, fold_of(*g, 5, partition));
                sizes[f as usize] += 1;
            }
            assert!(sizes.iter().all(|n| (900..1100).contains(n)), "{sizes:?}");
            // Another draw: a good share of groups changes fold.
            let moved = groups
                .iter()
                .filter(|g| fold_of(**g, 5, partition) != fold_of(**g, 5, partition + 1))
                .count();
            assert!(moved > 3000, "{moved}");
        }
    }

    #[test]
    fn no_evidence_gives_finite_features() {
        let e = Components {
            knn: f32::NEG_INFINITY,
            ..Components::default()
        };
        let x = features(f32::NEG_INFINITY, 1, &text(-30.0, -30.0, 0), &e);
        assert!(x.iter().all(|v| v.is_finite()), "{x:?}");
    }

    #[test]
    fn threshold_meets_both_targets() {
        let pos: Vec<(f64, bool)> = (0..100).map(|i| (i as f64 / 100.0, i >= 40)).collect();
        let neg: Vec<f64> = (0..100).map(|i| i as f64 / 200.0).collect();
        let t = choose_threshold(&pos, &neg, 0.03, 0.75).expect("a threshold");
        let p = &super::super::eval::operating_points(&pos, &neg, &[t])[0];
        assert!(p.negatives_mapped.unwrap() <= 0.03 && p.precision >= 0.75);
        assert!((t - 0.49).abs() < 1e-9, "{t}");
        assert_eq!(choose_threshold(&[(0.9, false)], &[], 0.03, 0.75), None);
    }
}
