//! Mapper hyper-parameters: a builder, validated by `check()` before anything is fitted.

use serde::{Deserialize, Serialize};

use super::MapperError;

/// Weights of the evidence that the fused score adds up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FusionWeights {
    /// TF-IDF cosine to the technique centroid (all its text).
    pub centroid: f32,
    /// TF-IDF cosine to the nearest single example (procedure, description or detection sentence).
    pub knn: f32,
    /// Embedding cosine to the nearest k-means prototype of the technique.
    pub embedding: f32,
    /// All words of the technique's name appear in the text.
    pub name: f32,
    /// The text names the technique id (T1059.001).
    pub id: f32,
    /// Probability from the discriminative TF-IDF softmax classifier.
    pub lr: f32,
}

/// Parameters of [`super::fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapperParams {
    /// Word-vector dimensions (PCA of the word × technique PPMI matrix).
    pub word_dims: usize,
    /// Sentence-vector dimensions after PCA of sentence embeddings.
    pub sentence_dims: usize,
    /// Whiten the sentence PCA (unit variance per component).
    pub whiten: bool,
    /// Leading sentence components removed (the "common discourse" direction of SIF).
    pub drop_components: usize,
    /// Most k-means prototypes per technique.
    pub max_prototypes: usize,
    /// One prototype per this many examples (up to `max_prototypes`).
    pub examples_per_prototype: usize,
    /// Words seen fewer times get no vector of their own (n-grams cover them).
    pub min_count: usize,
    /// Shortest and longest character n-gram of the subword vocabulary.
    pub ngram_range: (u32, u32),
    /// SIF smoothing `a` in `a / (a + p(w))`.
    pub sif_a: f32,
    /// How the evidence is fused.
    pub weights: FusionWeights,
    /// Logistic calibration of the fused score: `sigmoid(scale * fused + bias)`.
    pub calibration: (f32, f32),
    /// Seed for k-means and PCA.
    pub seed: u64,
    /// SGD epochs of the softmax classifier (0 = no discriminative evidence).
    pub lr_epochs: usize,
    /// Weight of the general-English vectors appended to the domain vectors (when given).
    pub pretrained_weight: f32,
    /// Learn the fusion weights and calibration from an internal hold-out of procedure sources
    /// (logistic regression on per-technique evidence); else use `weights` and `calibration` as given.
    pub learn_fusion: bool,
}

impl Default for MapperParams {
    fn default() -> Self {
        Self {
            word_dims: 100,
            sentence_dims: 64,
            whiten: false,
            drop_components: 1,
            max_prototypes: 4,
            examples_per_prototype: 12,
            min_count: 2,
            ngram_range: (3, 6),
            sif_a: 1e-3,
            weights: FusionWeights {
                centroid: 1.0,
                knn: 0.6,
                embedding: 0.5,
                name: 0.25,
                id: 1.0,
                lr: 1.0,
            },
            lr_epochs: 8,
            calibration: (9.0, -5.0),
            seed: 42,
            pretrained_weight: 0.5,
            learn_fusion: true,
        }
    }
}

impl MapperParams {
    /// Set the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Set the fusion weights.
    pub fn weights(mut self, w: FusionWeights) -> Self {
        self.weights = w;
        self
    }
    /// Set the most prototypes per technique (1 = no clustering, one centroid).
    pub fn max_prototypes(mut self, n: usize) -> Self {
        self.max_prototypes = n;
        self
    }
    /// Learn fusion weights and calibration from an internal hold-out.
    pub fn learn_fusion(mut self, on: bool) -> Self {
        self.learn_fusion = on;
        self
    }
    /// Whiten the sentence PCA.
    pub fn whiten(mut self, on: bool) -> Self {
        self.whiten = on;
        self
    }

    /// Validate; the only way to get parameters [`super::fit`] accepts.
    pub fn check(self) -> Result<ValidParams, MapperError> {
        let bad = |m: &str| Err(MapperError::Params(m.to_string()));
        if self.word_dims < 2 || self.word_dims > 1024 {
            return bad("word_dims must be in 2..=1024");
        }
        if self.sentence_dims < 2 || self.sentence_dims > self.word_dims {
            return bad("sentence_dims must be in 2..=word_dims");
        }
        if self.drop_components >= self.sentence_dims {
            return bad("drop_components must be below sentence_dims");
        }
        if self.max_prototypes == 0 || self.examples_per_prototype == 0 {
            return bad("max_prototypes and examples_per_prototype must be positive");
        }
        if self.ngram_range.0 == 0 || self.ngram_range.0 > self.ngram_range.1 {
            return bad("ngram_range must be (min, max) with 0 < min <= max");
        }
        if self.sif_a.is_nan() || self.sif_a <= 0.0 {
            return bad("sif_a must be positive");
        }
        let w = self.weights;
        if [w.centroid, w.knn, w.embedding, w.name, w.id, w.lr]
            .iter()
            .any(|x| !x.is_finite() || *x < 0.0)
        {
            return bad("fusion weights must be finite and non-negative");
        }
        Ok(ValidParams(self))
    }
}

/// Parameters that passed [`MapperParams::check`]. Deserialising (a saved model) checks them
/// again, so a model file can never smuggle in parameters `check` refuses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MapperParams")]
pub struct ValidParams(pub(crate) MapperParams);

impl TryFrom<MapperParams> for ValidParams {
    type Error = MapperError;
    fn try_from(p: MapperParams) -> Result<Self, MapperError> {
        p.check()
    }
}

impl std::ops::Deref for ValidParams {
    type Target = MapperParams;
    fn deref(&self) -> &MapperParams {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialising_checks_the_params() {
        let good = MapperParams::default().check().unwrap();
        let json = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<ValidParams>(&json).unwrap(), good);
        let mut bad: serde_json::Value = serde_json::from_str(&json).unwrap();
        bad["sentence_dims"] = serde_json::json!(0);
        let e = serde_json::from_value::<ValidParams>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sentence_dims"), "{e}");
    }
}
