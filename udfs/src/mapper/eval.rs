//! Measuring the mapper: ranking metrics, a leakage-free hold-out split of ATT&CK procedures, and a
//! TF-IDF + logistic-regression baseline (TRAM v1 style) trained on the same texts.

use std::collections::{BTreeSet, HashMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;

use super::algorithm::{training_texts, TrainingSet};
use super::text::Analyzer;

/// Ranking quality over a labelled set.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// Texts scored.
    pub n: usize,
    /// Best guess is one of the labels.
    pub top1: f64,
    /// Best guess's parent technique is one of the labels' parents.
    pub top1_parent: f64,
    /// Some label in the top 5.
    pub recall_at_5: f64,
    /// Mean reciprocal rank of the first label within the top 10.
    pub mrr_at_10: f64,
}

/// The parent technique id of a technique id (`T1059.001` → `T1059`; a parent is its own).
pub fn parent(id: &str) -> &str {
    id.split('.').next().unwrap_or(id)
}

/// Metrics of ranked predictions against label sets (same order).
pub fn evaluate(ranked: &[Vec<String>], labels: &[Vec<String>]) -> Metrics {
    let n = ranked.len().min(labels.len());
    if n == 0 {
        return Metrics::default();
    }
    let (mut top1, mut top1p, mut r5, mut mrr) = (0.0, 0.0, 0.0, 0.0);
    for (r, l) in ranked.iter().zip(labels) {
        let set: HashSet<&str> = l.iter().map(String::as_str).collect();
        let parents: HashSet<&str> = l.iter().map(|x| parent(x)).collect();
        if r.first().is_some_and(|x| set.contains(x.as_str())) {
            top1 += 1.0;
        }
        if r.first().is_some_and(|x| parents.contains(parent(x))) {
            top1p += 1.0;
        }
        if r.iter().take(5).any(|x| set.contains(x.as_str())) {
            r5 += 1.0;
        }
        if let Some(pos) = r.iter().take(10).position(|x| set.contains(x.as_str())) {
            mrr += 1.0 / (pos as f64 + 1.0);
        }
    }
    let n_f = n as f64;
    Metrics {
        n,
        top1: top1 / n_f,
        top1_parent: top1p / n_f,
        recall_at_5: r5 / n_f,
        mrr_at_10: mrr / n_f,
    }
}

/// One bin of a reliability table: top-1 scores in `[lo, hi)` (the last bin includes 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Bin {
    /// Lower edge.
    pub lo: f64,
    /// Upper edge.
    pub hi: f64,
    /// Texts whose top-1 score falls here.
    pub n: usize,
    /// Their mean score.
    pub mean_score: f64,
    /// Share whose top-1 technique is correct.
    pub accuracy: f64,
}

/// How well scores state the chance of being right: a reliability table of equal-width bins and
/// the expected calibration error (bin-size-weighted mean |accuracy − mean score|).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reliability {
    /// Non-empty bins, lowest first.
    pub bins: Vec<Bin>,
    /// Expected calibration error.
    pub ece: f64,
}

/// Reliability of `(score, correct)` pairs over `bins` equal-width bins of [0, 1].
pub fn reliability(pairs: &[(f64, bool)], bins: usize) -> Reliability {
    let bins = bins.max(1);
    let mut acc = vec![(0usize, 0.0f64, 0usize); bins];
    for &(score, correct) in pairs {
        let s = if score.is_finite() {
            score.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let b = ((s * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += s;
        acc[b].2 += usize::from(correct);
    }
    let total = pairs.len().max(1) as f64;
    let mut ece = 0.0;
    let mut out = Vec::new();
    for (i, (n, sum, ok)) in acc.into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (mean, accuracy) = (sum / n as f64, ok as f64 / n as f64);
        ece += n as f64 / total * (accuracy - mean).abs();
        out.push(Bin {
            lo: i as f64 / bins as f64,
            hi: (i + 1) as f64 / bins as f64,
            n,
            mean_score: mean,
            accuracy,
        });
    }
    Reliability { bins: out, ece }
}

/// The ECE a perfectly calibrated score would still show on these scores (mean over `draws`
/// simulated outcomes, each text right with probability its score): the noise floor of the
/// measured ECE on a set this size — a 99-text set has one near 0.09 at 10 bins.
pub fn ece_noise_floor(scores: &[f64], bins: usize, draws: usize) -> f64 {
    use rand::Rng;
    // A fixed seed, so the figure is the same on every run.
    let mut rng = Xoshiro256Plus::seed_from_u64(7);
    let draws = draws.max(1);
    let mut pairs = Vec::with_capacity(scores.len());
    let mut total = 0.0;
    for _ in 0..draws {
        pairs.clear();
        pairs.extend(scores.iter().map(|&p| (p, rng.gen::<f64>() < p)));
        total += reliability(&pairs, bins).ece;
    }
    total / draws as f64
}

/// What a threshold keeps: the labelled texts still mapped (their top-1 score at or above it), how
/// many of those are right, and the share of texts without a technique that still get one.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Operating {
    /// The threshold.
    pub threshold: f64,
    /// Share of labelled texts mapped.
    pub coverage: f64,
    /// Share of the mapped labelled texts whose top-1 is correct (1 when none is mapped).
    pub precision: f64,
    /// Share of negatives (texts with no technique) mapped; None without negatives.
    pub negatives_mapped: Option<f64>,
}

/// Coverage, precision and negatives mapped at each threshold, from the labelled texts' top-1
/// `(score, correct)` and the negatives' top-1 scores.
pub fn operating_points(
    positives: &[(f64, bool)],
    negatives: &[f64],
    thresholds: &[f64],
) -> Vec<Operating> {
    thresholds
        .iter()
        .map(|&t| {
            let kept: Vec<bool> = positives
                .iter()
                .filter(|(s, _)| *s >= t)
                .map(|(_, c)| *c)
                .collect();
            let right = kept.iter().filter(|c| **c).count();
            Operating {
                threshold: t,
                coverage: kept.len() as f64 / positives.len().max(1) as f64,
                precision: if kept.is_empty() {
                    1.0
                } else {
                    right as f64 / kept.len() as f64
                },
                negatives_mapped: (!negatives.is_empty()).then(|| {
                    negatives.iter().filter(|s| **s >= t).count() as f64 / negatives.len() as f64
                }),
            }
        })
        .collect()
}

/// Precision of the `coverage` share of the labelled texts whose top-1 `(score, correct)` scores
/// highest (ties broken against the correct ones, so it never flatters): the best precision any
/// threshold on these scores can give at that coverage — it depends on how the scores order the
/// texts, not on where the threshold is. `None` without labelled texts.
pub fn precision_at_coverage(positives: &[(f64, bool)], coverage: f64) -> Option<f64> {
    if positives.is_empty() {
        return None;
    }
    let mut sorted = positives.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let n = ((positives.len() as f64 * coverage.clamp(0.0, 1.0)).ceil() as usize).max(1);
    let right = sorted[..n].iter().filter(|(_, c)| *c).count();
    Some(right as f64 / n as f64)
}

/// Which of `rows` (text, report key) measure `m` honestly: `false` for every row of a report
/// (rows sharing a key; a row without one is a report of its own) that the model learnt a sentence
/// of (labelled examples, workbench feedback): scores there measure memory.
pub fn not_learnt(m: &super::Mapper, rows: &[(&str, Option<&str>)]) -> Vec<bool> {
    let key = |i: usize, g: Option<&str>| g.map_or_else(|| format!("\0{i}"), str::to_string);
    let learnt: HashSet<String> = rows
        .iter()
        .enumerate()
        .filter(|(_, (text, _))| m.model.learnt(text))
        .map(|(i, (_, g))| key(i, *g))
        .collect();
    rows.iter()
        .enumerate()
        .map(|(i, (_, g))| !learnt.contains(&key(i, *g)))
        .collect()
}

/// How `map_report` did on labelled reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DocumentScores {
    /// Micro precision of the reports' technique sets.
    pub precision: f64,
    /// Micro recall.
    pub recall: f64,
    /// Their F1.
    pub f1: f64,
    /// Precision, recall and F1 with every id taken to its parent technique on both sides (a
    /// sub-technique implies its parent; report annotators label the parent unless the text
    /// singles the sub-technique out, rule authors often list both).
    pub parent: (f64, f64, f64),
    /// The threshold the sets were cut at.
    pub threshold: f64,
    /// 10-bin ECE of the report scores of every technique the reports support (right: one of the
    /// report's labels).
    pub ece: f64,
    /// How many (report, technique) scores that is.
    pub scored: usize,
    /// The ECE a perfectly calibrated score would show on them ([`ece_noise_floor`]).
    pub noise_floor: f64,
}

/// Document-level precision, recall and F1 (micro) of `map_report` on reports with their labelled
/// technique sets, at `threshold` (`None`: the model's own for reports), and the calibration of
/// its scores.
pub fn document_scores(
    m: &super::Mapper,
    docs: &[(String, std::collections::BTreeSet<String>)],
    threshold: Option<f64>,
) -> DocumentScores {
    // Every supported technique (score > 0), cut below.
    let found = crate::mapping_kernels::par_documents(m, docs.len(), Some(0.0), |i| {
        Some(docs[i].0.as_str())
    });
    let threshold = threshold.unwrap_or_else(|| m.report_threshold());
    let mut scored = Vec::new();
    let mut sets = Vec::with_capacity(docs.len());
    for ((_, want), got) in docs.iter().zip(found) {
        let mut kept = BTreeSet::new();
        for f in got.unwrap_or_default() {
            let id = &m.model.techniques[f.technique].id;
            scored.push((f.score, want.contains(id)));
            if f.score >= threshold {
                kept.insert(id.clone());
            }
        }
        sets.push((kept, want));
    }
    let parent = parent_set_scores(&sets);
    let labels = docs.iter().map(|(_, w)| w.len()).sum();
    let (precision, recall, f1) = super::calibrate::set_scores(&scored, labels, threshold);
    DocumentScores {
        precision,
        recall,
        f1,
        parent,
        threshold,
        ece: reliability(&scored, 10).ece,
        scored: scored.len(),
        noise_floor: ece_noise_floor(&scored.iter().map(|(p, _)| *p).collect::<Vec<_>>(), 10, 200),
    }
}

/// Micro precision, recall and F1 of technique sets `(found, labels)` with every id taken to its
/// parent technique on both sides.
pub fn parent_set_scores(sets: &[(BTreeSet<String>, &BTreeSet<String>)]) -> (f64, f64, f64) {
    let parents = |ids: &BTreeSet<String>| -> BTreeSet<String> {
        ids.iter().map(|id| parent(id).to_string()).collect()
    };
    let (mut tp, mut found, mut labels) = (0usize, 0usize, 0usize);
    for (got, want) in sets {
        let (got, want) = (parents(got), parents(want));
        tp += got.intersection(&want).count();
        found += got.len();
        labels += want.len();
    }
    let (p, r) = (
        tp as f64 / found.max(1) as f64,
        tp as f64 / labels.max(1) as f64,
    );
    (
        p,
        r,
        if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        },
    )
}

/// A labelled text for evaluation.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Labelled {
    /// The text.
    pub text: String,
    /// Correct technique ids.
    pub labels: Vec<String>,
}

/// Hold out every procedure of a random `fraction` of sources (groups, software, campaigns): the
/// training set keeps the rest plus all technique descriptions; the test set is the held-out
/// procedures (names were already stripped from every procedure text). Identical texts held out
/// under several techniques become one test item with several labels. Only ATT&CK's own sources
/// are held out: sentences learnt besides them (labelled examples, workbench feedback) always stay
/// in training, so what the hold-out teaches (the evidence weights) and measures is ATT&CK's.
pub fn holdout(set: &TrainingSet, fraction: f64, seed: u64) -> (TrainingSet, Vec<Labelled>) {
    let sources: BTreeSet<&str> = set
        .examples
        .iter()
        .map(|e| e.source.as_str())
        .filter(|s| !super::learnt_source(s))
        .collect();
    let mut sources: Vec<&str> = sources.into_iter().collect();
    sources.shuffle(&mut Xoshiro256Plus::seed_from_u64(seed));
    let n_test = ((sources.len() as f64) * fraction).round() as usize;
    let test_sources: HashSet<&str> = sources.into_iter().take(n_test).collect();
    let mut train = set.clone();
    train
        .examples
        .retain(|e| !test_sources.contains(e.source.as_str()));
    let mut by_text: HashMap<&str, Vec<String>> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for e in set
        .examples
        .iter()
        .filter(|e| test_sources.contains(e.source.as_str()))
    {
        let entry = by_text.entry(e.text.as_str()).or_insert_with(|| {
            order.push(e.text.as_str());
            Vec::new()
        });
        if !entry.contains(&e.technique) {
            entry.push(e.technique.clone());
        }
    }
    let test = order
        .into_iter()
        .map(|t| Labelled {
            text: t.to_string(),
            labels: by_text[t].clone(),
        })
        .collect();
    (train, test)
}

/// TF-IDF features + multinomial logistic regression (SGD, L2), the classic TRAM-style baseline.
pub struct Baseline {
    terms: HashMap<String, u32>,
    idf: Vec<f32>,
    weights: Vec<f32>,
    bias: Vec<f32>,
    classes: Vec<String>,
    analyzer: Analyzer,
}

impl Baseline {
    fn features(&self, text: &str, grow: Option<&mut HashMap<String, u32>>) -> Vec<(u32, f32)> {
        let (mut s, mut t) = (Vec::new(), Vec::new());
        self.analyzer.terms(text, &mut s, &mut t);
        let mut counts: HashMap<u32, f32> = HashMap::new();
        match grow {
            Some(vocab) => {
                for term in t {
                    let next = vocab.len() as u32;
                    *counts
                        .entry(*vocab.entry(term).or_insert(next))
                        .or_default() += 1.0;
                }
            }
            None => {
                for term in t {
                    if let Some(id) = self.terms.get(&term) {
                        *counts.entry(*id).or_default() += 1.0;
                    }
                }
            }
        }
        let mut v: Vec<(u32, f32)> = counts.into_iter().collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }

    fn weigh(&self, v: &mut [(u32, f32)]) {
        for (i, x) in v.iter_mut() {
            *x = (1.0 + x.ln()) * self.idf.get(*i as usize).copied().unwrap_or(0.0);
        }
        let n = v.iter().map(|(_, x)| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|(_, x)| *x /= n);
        }
    }

    /// Train on the same texts the mapper learns from.
    pub fn fit(set: &TrainingSet, epochs: usize, seed: u64) -> Self {
        let texts = training_texts(set);
        let classes: Vec<String> = set.techniques.iter().map(|t| t.id.clone()).collect();
        let mut b = Baseline {
            terms: HashMap::new(),
            idf: vec![],
            weights: vec![],
            bias: vec![0.0; classes.len()],
            classes,
            analyzer: Analyzer::default(),
        };
        let mut vocab = HashMap::new();
        let mut rows: Vec<(usize, Vec<(u32, f32)>)> = texts
            .iter()
            .map(|(c, t)| (*c, b.features(t, Some(&mut vocab))))
            .collect();
        let mut df = vec![0f32; vocab.len()];
        for (_, v) in &rows {
            for (i, _) in v {
                df[*i as usize] += 1.0;
            }
        }
        let n = rows.len() as f32;
        b.idf = df
            .iter()
            .map(|d| ((n + 1.0) / (d + 1.0)).ln() + 1.0)
            .collect();
        b.terms = vocab;
        for (_, v) in rows.iter_mut() {
            b.weigh(v);
        }
        let (weights, bias) = train_softmax(&rows, b.terms.len(), b.classes.len(), epochs, seed);
        b.weights = weights;
        b.bias = bias;
        b
    }

    /// Technique ids ranked for `text`, best first.
    pub fn rank(&self, text: &str, k: usize) -> Vec<String> {
        let mut x = self.features(text, None);
        self.weigh(&mut x);
        let n = self.classes.len();
        let mut logits = self.bias.clone();
        for &(i, xi) in &x {
            let w = &self.weights[i as usize * n..(i as usize + 1) * n];
            for (p, wj) in logits.iter_mut().zip(w) {
                *p += xi * wj;
            }
        }
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
        idx.into_iter()
            .take(k)
            .map(|i| self.classes[i].clone())
            .collect()
    }
}

/// Multinomial logistic regression on sparse rows `(class, [(feature, value)])` by SGD with a
/// decaying step and light L2; returns a dense `features × classes` weight matrix and class biases.
/// Shared by the baseline and the mapper's discriminative evidence so both learn the same way.
pub fn train_softmax(
    rows: &[(usize, Vec<(u32, f32)>)],
    n_features: usize,
    k: usize,
    epochs: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let mut weights = vec![0f32; n_features * k];
    let mut bias = vec![0f32; k];
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = Xoshiro256Plus::seed_from_u64(seed);
    let mut probs = vec![0f32; k];
    let l2 = 1e-6f32;
    for epoch in 0..epochs {
        order.shuffle(&mut rng);
        let lr = 0.5 / (1.0 + epoch as f32);
        for &r in &order {
            let (class, x) = &rows[r];
            probs.copy_from_slice(&bias);
            for &(i, xi) in x {
                let w = &weights[i as usize * k..(i as usize + 1) * k];
                for (p, wj) in probs.iter_mut().zip(w) {
                    *p += xi * wj;
                }
            }
            softmax(&mut probs);
            probs[*class] -= 1.0;
            for (bj, g) in bias.iter_mut().zip(&probs) {
                *bj -= lr * g;
            }
            for &(i, xi) in x {
                let w = &mut weights[i as usize * k..(i as usize + 1) * k];
                for (wj, g) in w.iter_mut().zip(&probs) {
                    *wj -= lr * (g * xi + l2 * *wj);
                }
            }
        }
    }
    (weights, bias)
}

/// In-place softmax.
pub fn softmax(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    v.iter_mut().for_each(|x| *x /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_level_sets_count_a_sub_technique_as_its_parent() {
        let ids = |v: &[&str]| {
            v.iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<String>>()
        };
        // Found T1566.001 and T1566 (one parent), T1059.001 (parent T1059, labelled) and T1486
        // (wrong); labelled T1566, T1059.003 and T1105 (never found).
        let want = ids(&["T1566", "T1059.003", "T1105"]);
        let sets = vec![(ids(&["T1566.001", "T1566", "T1059.001", "T1486"]), &want)];
        let (p, r, f1) = parent_set_scores(&sets);
        assert_eq!((p, r), (2.0 / 3.0, 2.0 / 3.0));
        assert!((f1 - 2.0 / 3.0).abs() < 1e-12);
        // Nothing found: no precision to speak of, no recall.
        assert_eq!(parent_set_scores(&[(ids(&[]), &want)]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn calibration_error_is_zero_when_scores_match_accuracy_and_grows_when_they_do_not() {
        // 10 texts at 0.85 of which 8.5 right is impossible; use 0.8 with 8 of 10 right.
        let fair: Vec<(f64, bool)> = (0..10).map(|i| (0.8, i < 8)).collect();
        let r = reliability(&fair, 10);
        assert_eq!(r.bins.len(), 1);
        assert!(r.ece.abs() < 1e-9, "{r:?}");
        let over: Vec<(f64, bool)> = (0..10).map(|i| (0.95, i < 5)).collect();
        let r = reliability(&over, 10);
        assert!((r.ece - 0.45).abs() < 1e-9, "{r:?}");
        assert_eq!((r.bins[0].lo, r.bins[0].hi), (0.9, 1.0));
        // A score of exactly 1 lands in the last bin; NaN in the first.
        let r = reliability(&[(1.0, true), (f64::NAN, false)], 10);
        assert_eq!((r.bins[0].lo, r.bins[1].hi), (0.0, 1.0));
    }

    #[test]
    fn ece_noise_floor_shrinks_with_the_set() {
        // Scores spread over [0, 1]: the floor of a perfectly calibrated score falls as the set
        // grows (about 1/sqrt(n)), and is exactly 0 for certain scores.
        let spread =
            |n: usize| -> Vec<f64> { (0..n).map(|i| (i as f64 + 0.5) / n as f64).collect() };
        let small = ece_noise_floor(&spread(99), 10, 200);
        let large = ece_noise_floor(&spread(4_000), 10, 200);
        assert!(small > 0.05 && small < 0.15, "{small}");
        assert!(large < small / 4.0, "{large} vs {small}");
        assert_eq!(ece_noise_floor(&[0.0, 1.0, 1.0], 10, 50), 0.0);
    }

    #[test]
    fn operating_points_trade_coverage_for_precision() {
        let pos = [(0.9, true), (0.6, true), (0.4, false), (0.1, false)];
        let neg = [0.5, 0.05];
        let p = operating_points(&pos, &neg, &[0.0, 0.5, 0.95]);
        assert_eq!(
            (p[0].coverage, p[0].precision, p[0].negatives_mapped),
            (1.0, 0.5, Some(1.0))
        );
        assert_eq!(
            (p[1].coverage, p[1].precision, p[1].negatives_mapped),
            (0.5, 1.0, Some(0.5))
        );
        assert_eq!((p[2].coverage, p[2].precision), (0.0, 1.0));
        assert_eq!(
            operating_points(&pos, &[], &[0.5])[0].negatives_mapped,
            None
        );
    }

    #[test]
    fn precision_at_coverage_takes_the_highest_scored_share() {
        let pos = [
            (0.9, true),
            (0.8, false),
            (0.7, true),
            (0.2, true),
            (0.1, false),
        ];
        // The best two of five: one right.
        assert_eq!(precision_at_coverage(&pos, 0.4), Some(0.5));
        // 60% of five is three: two right.
        assert!((precision_at_coverage(&pos, 0.6).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(precision_at_coverage(&pos, 1.0), Some(0.6));
        // Ties count the wrong ones first; nothing labelled, nothing to say.
        let tied = [(0.5, true), (0.5, false)];
        assert_eq!(precision_at_coverage(&tied, 0.5), Some(0.0));
        assert_eq!(precision_at_coverage(&[], 0.6), None);
    }

    #[test]
    fn metrics_count_hits() {
        let ranked = vec![
            vec!["T1059.001".to_string(), "T1059".to_string()],
            vec!["T1003.002".to_string(), "T1003.001".to_string()],
            vec!["T1105".to_string()],
        ];
        let labels = vec![
            vec!["T1059.001".to_string()],
            vec!["T1003.001".to_string()],
            vec!["T1027".to_string()],
        ];
        let m = evaluate(&ranked, &labels);
        assert_eq!(m.n, 3);
        assert!((m.top1 - 1.0 / 3.0).abs() < 1e-9);
        assert!((m.top1_parent - 2.0 / 3.0).abs() < 1e-9);
        assert!((m.recall_at_5 - 2.0 / 3.0).abs() < 1e-9);
        assert!((m.mrr_at_10 - (1.0 + 0.5) / 3.0).abs() < 1e-9);
    }
}
