//! Model artifacts beside an S3 lake: `model build` publishes a model directory to `lake.models`
//! (an `s3://` URL), and commands that map text first fetch the models into `lake.models_cache`,
//! because a model is memory-mapped from local disk.
//!
//! A model directory counts as present only when its `manifest.json` is (that is what the loader
//! looks for), so both directions move the manifest last: an interrupted copy is never loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::LakeSettings;
use crate::lake::{LakeError, Location};

const MANIFEST: &str = "manifest.json";

/// Whether `lake.models` names an object store rather than a directory.
pub fn is_remote(spec: &str) -> bool {
    spec.starts_with("s3://")
}

/// Files under a local directory, relative with `/`, skipping temporaries (`.name.tmp`).
fn local_files(root: &Path) -> std::io::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if !e.file_name().to_string_lossy().starts_with('.') {
                let rel = p
                    .strip_prefix(root)
                    .expect("under root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                out.insert(rel, e.metadata()?.len());
            }
        }
    }
    Ok(out)
}

/// Manifests last, so a copy cut short never looks like a model.
fn manifest_last(mut files: Vec<String>) -> Vec<String> {
    files.sort_by_key(|f| (f.ends_with(MANIFEST), f.clone()));
    files
}

fn io_err(path: &Path, e: std::io::Error) -> LakeError {
    LakeError::Location {
        spec: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Copy the model directory `dir` (under the local models root) to the remote models location.
/// Returns the files uploaded.
pub async fn publish(
    settings: &LakeSettings,
    remote: &str,
    dir: &Path,
) -> Result<usize, LakeError> {
    let loc = Location::open_with(remote, &settings.store)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let files = local_files(dir).map_err(|e| io_err(dir, e))?;
    let order = manifest_last(files.keys().cloned().collect());
    for rel in &order {
        let bytes = std::fs::read(dir.join(rel)).map_err(|e| io_err(&dir.join(rel), e))?;
        loc.put_atomic(&format!("{name}/{rel}"), bytes.into())
            .await?;
    }
    Ok(order.len())
}

/// Bring the local cache up to date with the remote models (files missing or of another size) and
/// return the cache directory. Returns how many files were downloaded too.
pub async fn fetch(settings: &LakeSettings, remote: &str) -> Result<(PathBuf, usize), LakeError> {
    let loc = Location::open_with(remote, &settings.store)?;
    let cache = PathBuf::from(&settings.models_cache);
    std::fs::create_dir_all(&cache).map_err(|e| io_err(&cache, e))?;
    let have = local_files(&cache).map_err(|e| io_err(&cache, e))?;
    let mut want = Vec::new();
    for obj in loc.list("").await? {
        let rel = loc.relative_parts(&obj.location).join("/");
        if rel
            .split('/')
            .any(|s| s.is_empty() || s == ".." || s.starts_with('.'))
        {
            continue;
        }
        if have.get(&rel) != Some(&obj.size) {
            want.push(rel);
        }
    }
    let order = manifest_last(want);
    for rel in &order {
        let bytes = loc.get(rel).await?;
        let target = cache.join(rel);
        let parent = target.parent().expect("file under cache");
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        let tmp = parent.join(format!(
            ".{}.tmp",
            target.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &target))
            .map_err(|e| io_err(&target, e))?;
    }
    Ok((cache, order.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_go_last() {
        let v = manifest_last(vec![
            "a/manifest.json".into(),
            "a/model.bin".into(),
            "b/manifest.json".into(),
            "a/vectors.fifu".into(),
        ]);
        assert_eq!(&v[2..], ["a/manifest.json", "b/manifest.json"]);
    }
}
