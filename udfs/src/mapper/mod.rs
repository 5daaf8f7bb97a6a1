//! The ATT&CK mapping engine behind `map_technique`: a fitted [`Model`] plus finalfusion
//! [`WordVectors`], saved as a versioned artifact directory and loaded once per process.

pub mod algorithm;
pub mod calibrate;
pub mod document;
pub mod embed;
pub mod eval;
pub mod hyperparams;
pub mod text;

use std::path::{Path, PathBuf};

pub use algorithm::{fit, Example, Model, Ranked, Scratch, TechniqueInfo, TrainingSet, SHORTLIST};
pub use embed::{Pretrained, WordVectors};
pub use hyperparams::{FusionWeights, MapperParams, ValidParams};

/// Errors building, saving, loading or using a mapping model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapperError {
    /// Parameters failed validation.
    #[error("invalid mapper parameters: {0}")]
    Params(String),
    /// Not enough training data.
    #[error("cannot build a mapping model: {0}; ingest ATT&CK first (`threatlake ingest attack`)")]
    NoTraining(String),
    /// A fitting step (PCA, k-means) failed.
    #[error("fitting the mapping model failed: {0}")]
    Fit(String),
    /// Reading or writing model files failed.
    #[error("model file {0}: {1}")]
    Io(String, String),
    /// No model where one was expected.
    #[error("no mapping model found in {0}; run `threatlake model build` first")]
    NotFound(String),
    /// A model file from another threatlake version.
    #[error("model in {path} has format {found}, this build reads {expected}; rebuild it with `threatlake model build`")]
    Format {
        /// Model directory.
        path: String,
        /// Its format version.
        found: u32,
        /// Ours.
        expected: u32,
    },
}

/// Bumped whenever the on-disk model changes shape, or what its text calibration reads changes so
/// that the `calibration.json` beside it must be fitted again (3: the margin over another family).
pub const FORMAT_VERSION: u32 = 3;
const MODEL_FILE: &str = "model.bin";
const VECTORS_FILE: &str = "embeddings.fifu";
const MANIFEST_FILE: &str = "manifest.json";
/// The text calibration (optional; see [`calibrate`]).
pub const CALIBRATION_FILE: &str = "calibration.json";

/// A model ready to score text.
#[derive(Debug)]
pub struct Mapper {
    /// Fitted parameters and indexes.
    pub model: Model,
    /// Word vectors.
    pub vectors: WordVectors,
    /// Where it was loaded from, if anywhere.
    pub path: Option<PathBuf>,
}

/// Summary written beside the model (`manifest.json`) and printed by the CLI.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// On-disk format version.
    pub format: u32,
    /// Domain.
    pub domain: String,
    /// ATT&CK release the model was built from.
    pub attack_version: String,
    /// Techniques it can name.
    pub techniques: usize,
    /// Training texts (names, sentences, procedures).
    pub units: usize,
    /// k-means prototypes.
    pub prototypes: usize,
    /// Word-vector vocabulary size and dimensions.
    pub words: usize,
    /// Dimensions of the word vectors.
    pub dims: usize,
    /// Whether general-English vectors were mixed in.
    pub pretrained: Option<String>,
    /// Sentences analysts labelled in the mapping workbench, learnt as procedure examples.
    #[serde(default)]
    pub feedback: usize,
    /// Labelled workbench sentences held out of the model (`mapping.feedback_holdout`: whole
    /// reports), so `model eval` on `model feedback export` measures the model on them.
    #[serde(default)]
    pub feedback_held_out: usize,
    /// Labelled sentences of `mapping.examples` (report sentences labelled by others), learnt as
    /// procedure examples.
    #[serde(default)]
    pub examples: usize,
}

/// Whether a training example's source is text learnt besides ATT&CK's own: a labelled example of
/// `mapping.examples` (`examples:<doc>`) or a workbench decision (`workbench:<doc>`).
pub fn learnt_source(source: &str) -> bool {
    source.starts_with("examples:") || source.starts_with("workbench:")
}

/// The key of a text for [`algorithm::Model::learnt`]: a stable hash of its words, lower case.
pub fn text_key(text: &str) -> u64 {
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    calibrate::group_of(&words.join(" "))
}

impl Mapper {
    /// Fit on a training set.
    pub fn build(
        params: MapperParams,
        set: &TrainingSet,
        pretrained: Option<&Pretrained>,
    ) -> Result<Self, MapperError> {
        let params = params.check()?;
        let (model, vectors) = fit(&params, set, pretrained)?;
        Ok(Self {
            model,
            vectors,
            path: None,
        })
    }

    /// Manifest describing this model.
    pub fn manifest(&self, pretrained: Option<String>) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            domain: self.model.domain.clone(),
            attack_version: self.model.attack_version.clone(),
            techniques: self.model.techniques.len(),
            units: self.model.unit_count(),
            prototypes: self.model.prototype_count(),
            words: self.vectors.words(),
            dims: self.vectors.dims(),
            pretrained,
            feedback: 0,
            feedback_held_out: 0,
            examples: 0,
        }
    }

    /// Save into `dir` (created if needed): files are written under temporary names and renamed, so
    /// a reader never loads half a model.
    pub fn save(&self, dir: &Path, manifest: &Manifest) -> Result<(), MapperError> {
        let io =
            |p: &Path, e: std::io::Error| MapperError::Io(p.display().to_string(), e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let tmp = |name: &str| dir.join(format!(".{name}.tmp"));
        let model = bincode::serialize(&(FORMAT_VERSION, &self.model))
            .map_err(|e| MapperError::Io(dir.display().to_string(), e.to_string()))?;
        std::fs::write(tmp(MODEL_FILE), model).map_err(|e| io(&tmp(MODEL_FILE), e))?;
        self.vectors.save(&tmp(VECTORS_FILE))?;
        let m = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        std::fs::write(tmp(MANIFEST_FILE), m).map_err(|e| io(&tmp(MANIFEST_FILE), e))?;
        match &self.model.calibration {
            Some(c) => self.save_calibration(dir, c)?,
            None => {
                let _ = std::fs::remove_file(dir.join(CALIBRATION_FILE));
            }
        }
        // The manifest goes last: its presence marks a complete model.
        for name in [MODEL_FILE, VECTORS_FILE, MANIFEST_FILE] {
            std::fs::rename(tmp(name), dir.join(name)).map_err(|e| io(&dir.join(name), e))?;
        }
        Ok(())
    }

    /// Write `calibration` into the model directory `dir` (under a temporary name, renamed).
    pub fn save_calibration(
        &self,
        dir: &Path,
        calibration: &calibrate::Calibration,
    ) -> Result<(), MapperError> {
        let path = dir.join(CALIBRATION_FILE);
        let tmp = dir.join(format!(".{CALIBRATION_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(calibration).expect("calibration serialises");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| MapperError::Io(path.display().to_string(), e.to_string()))
    }

    /// Load a model directory written by [`Mapper::save`] without its text calibration (the
    /// model's raw scores, what `model calibrate` fits on).
    pub fn load_uncalibrated(dir: &Path) -> Result<Self, MapperError> {
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(MapperError::NotFound(dir.display().to_string()));
        }
        let p = dir.join(MODEL_FILE);
        let bytes = std::fs::read(&p)
            .map_err(|e| MapperError::Io(p.display().to_string(), e.to_string()))?;
        let corrupt = |e: bincode::Error| {
            MapperError::Io(
                p.display().to_string(),
                format!("{e}; rebuild with `threatlake model build`"),
            )
        };
        // The format version leads the file: check it before decoding a model of another layout
        // (which would fail obscurely or allocate by stale lengths).
        let format: u32 = bincode::deserialize(&bytes).map_err(corrupt)?;
        if format != FORMAT_VERSION {
            return Err(MapperError::Format {
                path: dir.display().to_string(),
                found: format,
                expected: FORMAT_VERSION,
            });
        }
        let (_, model): (u32, Model) = bincode::deserialize(&bytes).map_err(corrupt)?;
        let vectors = WordVectors::load(&dir.join(VECTORS_FILE))?;
        Ok(Self {
            model: model.prepared(),
            vectors,
            path: Some(dir.to_path_buf()),
        })
    }

    /// Load a model directory written by [`Mapper::save`], with its text calibration when it has one.
    pub fn load(dir: &Path) -> Result<Self, MapperError> {
        let mut m = Self::load_uncalibrated(dir)?;
        let cal = dir.join(CALIBRATION_FILE);
        if cal.is_file() {
            let bytes = std::fs::read(&cal)
                .map_err(|e| MapperError::Io(cal.display().to_string(), e.to_string()))?;
            m.model.calibration = Some(calibrate::parse(&bytes).map_err(|e| {
                MapperError::Io(
                    cal.display().to_string(),
                    format!("{e}; write it again with `threatlake model calibrate` or rebuild the model with `threatlake model build`"),
                )
            })?);
        }
        Ok(m)
    }

    /// The abstain threshold this model's prose scores call for: the one its text calibration
    /// chose, else [`crate::DEFAULT_THRESHOLD`].
    pub fn default_threshold(&self) -> f64 {
        self.model
            .calibration
            .as_ref()
            .map_or(crate::DEFAULT_THRESHOLD, |c| c.threshold)
    }

    /// The threshold of `map_report`: its report calibration's, else [`Mapper::default_threshold`].
    pub fn report_threshold(&self) -> f64 {
        match &self.model.calibration {
            Some(c) => c.report.map_or(c.threshold, |r| r.threshold),
            None => crate::DEFAULT_THRESHOLD,
        }
    }

    /// The abstain threshold for `text`: `configured` when given; else the calibration's for prose
    /// and [`crate::DEFAULT_THRESHOLD`] for command lines, code and indicator lists (whose scores
    /// keep the model's ATT&CK-procedure calibration).
    pub fn threshold_for_text(&self, configured: Option<f64>, text: &str) -> f64 {
        configured.unwrap_or_else(|| match &self.model.calibration {
            Some(c) if document::reads_as_prose(text) => c.threshold,
            _ => crate::DEFAULT_THRESHOLD,
        })
    }

    /// The text's sentence vector in the model's projected space (see [`Model::sentence_vector`]).
    pub fn sentence_vector(&self, text: &str, scratch: &mut Scratch) -> Vec<f32> {
        self.model.sentence_vector(&self.vectors, text, scratch)
    }

    /// Why the text's best match scored (see [`Model::explain`]), at the text's threshold
    /// ([`Mapper::threshold_for_text`] of `configured`); None when nothing matched.
    pub fn explain(
        &self,
        text: &str,
        configured: Option<f64>,
        scratch: &mut Scratch,
    ) -> Option<String> {
        self.model.explain(
            &self.vectors,
            text,
            self.threshold_for_text(configured, text),
            scratch,
        )
    }

    /// Top-k techniques of one text.
    pub fn top_k(&self, text: &str, k: usize, scratch: &mut Scratch) -> Vec<Ranked> {
        self.model.top_k(&self.vectors, text, k, scratch)
    }
}

/// The format version a model directory's manifest states (`None`: no readable manifest).
pub fn manifest_format(dir: &Path) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Head {
        format: u32,
    }
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    serde_json::from_slice::<Head>(&bytes)
        .ok()
        .map(|h| h.format)
}

/// The model directory for a domain and release under a models root: `<root>/<domain>-<version>`.
pub fn model_dir(root: &Path, domain: &str, attack_version: &str) -> PathBuf {
    root.join(format!("{domain}-{attack_version}"))
}

/// The newest model for `domain` under `root` (numeric release order), if any.
pub fn find_latest(root: &Path, domain: &str) -> Option<PathBuf> {
    let prefix = format!("{domain}-");
    let mut best: Option<(i64, PathBuf)> = None;
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(v) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(key) = crate::kernels::version_key(v) else {
            continue;
        };
        if e.path().join(MANIFEST_FILE).is_file() && best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, e.path()));
        }
    }
    best.map(|(_, p)| p)
}
