//! The mapping model SQL functions share, loaded on first use: engine-neutral, so the DataFusion
//! adapters and the DuckDB functions (embedded and loadable extension) resolve models the same way.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::mapper::{self, Mapper};

/// Where the model comes from.
#[derive(Debug, Clone)]
enum Source {
    /// The newest `<domain>-<version>` under a models root.
    Newest { root: PathBuf, domain: String },
    /// One model directory.
    Dir(PathBuf),
}

/// The mapping model a session's functions use, loaded on first use (sessions that never map
/// never pay for it) and shared by all four functions.
#[derive(Debug)]
pub struct LazyMapper {
    source: Source,
    /// Configured abstain threshold; `None` takes the model's own.
    threshold: Option<f64>,
    /// Only a loaded model is kept: a failed load (no model yet, a model being written) is tried
    /// again on the next use, so `model build` in another process is picked up without a restart.
    cell: RwLock<Option<Arc<Mapper>>>,
}

/// Abstain threshold of a model without a text calibration (its scores are calibrated on ATT&CK
/// procedures only); a calibrated model carries its own (see `mapping.threshold` in the settings).
pub const DEFAULT_THRESHOLD: f64 = 0.03;

impl LazyMapper {
    /// The newest model for `domain` under `models_root`, loaded when first needed.
    pub fn new(
        models_root: impl Into<PathBuf>,
        domain: impl Into<String>,
        threshold: Option<f64>,
    ) -> Self {
        Self {
            source: Source::Newest {
                root: models_root.into(),
                domain: domain.into(),
            },
            threshold,
            cell: RwLock::new(None),
        }
    }

    /// An already-loaded model.
    pub fn loaded(m: Arc<Mapper>, threshold: Option<f64>) -> Self {
        Self {
            source: Source::Dir(m.path.clone().unwrap_or_default()),
            threshold,
            cell: RwLock::new(Some(m)),
        }
    }

    /// From the environment, for hosts without threatlake's settings (the DuckDB extension):
    /// `THREATLAKE_MODEL` (a model directory), else the newest `THREATLAKE_MAPPING_DOMAIN` model
    /// (default enterprise) under `THREATLAKE_LAKE_MODELS` (default `data/models`);
    /// `THREATLAKE_MAPPING_THRESHOLD` (default: the model's own, see [`Mapper::default_threshold`]).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let threshold = var("THREATLAKE_MAPPING_THRESHOLD").and_then(|t| t.parse().ok());
        let source = match var("THREATLAKE_MODEL") {
            Some(dir) => Source::Dir(dir.into()),
            None => Source::Newest {
                root: var("THREATLAKE_LAKE_MODELS")
                    .unwrap_or_else(|| "data/models".into())
                    .into(),
                domain: var("THREATLAKE_MAPPING_DOMAIN").unwrap_or_else(|| "enterprise".into()),
            },
        };
        Self {
            source,
            threshold,
            cell: RwLock::new(None),
        }
    }

    fn load(source: &Source) -> Result<Arc<Mapper>, String> {
        let dir = match source {
            Source::Dir(d) => d.clone(),
            Source::Newest { root, domain } => mapper::find_latest(root, domain).ok_or_else(|| {
                format!(
                    "no {domain} mapping model in {}; run `threatlake model build --domain {domain}`, \
                     or point THREATLAKE_MODEL at a model directory",
                    root.display()
                )
            })?,
        };
        Mapper::load(&dir).map(Arc::new).map_err(|e| match source {
            Source::Dir(_) => format!(
                "{e}; point THREATLAKE_MODEL (or `SELECT threatlake_use_model('<dir>')` in DuckDB) at a directory written by `threatlake model build`"
            ),
            Source::Newest { .. } => e.to_string(),
        })
    }

    /// The model, or a message that says how to get one.
    pub fn get(&self) -> Result<Arc<Mapper>, String> {
        if let Some(m) = self.cell.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(m.clone());
        }
        let mut w = self.cell.write().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = w.as_ref() {
            return Ok(m.clone());
        }
        let m = Self::load(&self.source)?;
        *w = Some(m.clone());
        Ok(m)
    }

    /// Switch to the model in `dir` (loaded now; on error the current model stays).
    pub fn use_dir(&self, dir: impl Into<PathBuf>) -> Result<Arc<Mapper>, String> {
        let m = Self::load(&Source::Dir(dir.into()))?;
        *self.cell.write().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
        Ok(m)
    }

    /// The configured abstain threshold; `None` takes the model's own per text
    /// ([`Mapper::threshold_for_text`]).
    pub fn threshold(&self) -> Option<f64> {
        self.threshold
    }
}

impl Default for LazyMapper {
    fn default() -> Self {
        Self::from_env()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_load_is_retried() {
        let root = std::env::temp_dir().join(format!("threatlake-slot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let slot = LazyMapper::new(&root, "enterprise", None);
        let first = slot.get().unwrap_err();
        assert!(first.contains("no enterprise mapping model"), "{first}");
        // A model directory appears (a broken one here): the next use looks again and reports
        // what it found now, not the first error.
        let dir = root.join("enterprise-18.1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.json"), b"{}").unwrap();
        std::fs::write(dir.join("model.bin"), 7u32.to_le_bytes()).unwrap();
        let second = slot.get().unwrap_err();
        let _ = std::fs::remove_dir_all(&root);
        assert!(second.contains("has format 7"), "{second}");
        assert_ne!(first, second);
    }
}
