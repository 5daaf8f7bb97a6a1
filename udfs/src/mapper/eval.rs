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

fn parent(id: &str) -> &str {
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
/// under several techniques become one test item with several labels.
pub fn holdout(set: &TrainingSet, fraction: f64, seed: u64) -> (TrainingSet, Vec<Labelled>) {
    let sources: BTreeSet<&str> = set.examples.iter().map(|e| e.source.as_str()).collect();
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
