//! Is there a newer ATT&CK release? MITRE's collection index (`attack.index`, a ~100 KB JSON listing
//! every release of every domain with its bundle URL) against the releases the lake holds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::PipelineError;
use crate::config::AttackSettings;
use crate::sql::Engine;
use crate::Domain;

/// Largest index accepted (MITRE's is ~100 KB).
const MAX_INDEX_BYTES: usize = 8 << 20;
/// The index request is cheap; do not let a stalled server hold the job.
const INDEX_TIMEOUT: Duration = Duration::from_secs(30);

/// A collection index (ATT&CK Workbench format: `collections[].versions[]`).
#[derive(Debug, Clone, Deserialize)]
pub struct ReleaseIndex {
    /// One per dataset (Enterprise ATT&CK, Mobile ATT&CK, ICS ATT&CK).
    pub collections: Vec<Collection>,
}

/// One dataset's releases.
#[derive(Debug, Clone, Deserialize)]
pub struct Collection {
    /// "Enterprise ATT&CK", "Mobile ATT&CK", "ICS ATT&CK".
    pub name: String,
    /// Its releases.
    #[serde(default)]
    pub versions: Vec<Release>,
}

/// One release.
#[derive(Debug, Clone, Deserialize)]
pub struct Release {
    /// "18.1".
    pub version: String,
    /// Its bundle.
    pub url: String,
}

/// A release to ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Domain.
    pub domain: Domain,
    /// Release (None when taken from `attack.sources` without an index).
    pub version: Option<String>,
    /// Bundle URL or path.
    pub url: String,
}

/// (major, minor, patch) of "18.1"; None when not a version.
fn key(v: &str) -> Option<(u32, u32, u32)> {
    let c = crate::attack::canonical_version(v)?;
    let mut it = c.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Some((
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    ))
}

impl ReleaseIndex {
    /// The newest release of `domain`.
    pub fn newest(&self, domain: Domain) -> Option<&Release> {
        let c = self.collections.iter().find(|c| {
            c.name
                .split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(domain.as_str()))
        })?;
        c.versions
            .iter()
            .filter_map(|r| Some((key(&r.version)?, r)))
            .max_by_key(|(k, _)| *k)
            .map(|(_, r)| r)
    }
}

/// The releases to ingest: per domain, the index's newest when the lake has none or an older one.
pub fn plan(
    index: &ReleaseIndex,
    domains: &[Domain],
    current: &BTreeMap<Domain, String>,
) -> Vec<Planned> {
    domains
        .iter()
        .filter_map(|d| {
            let newest = index.newest(*d)?;
            let newer = match current.get(d) {
                None => true,
                Some(have) => key(&newest.version) > key(have),
            };
            newer.then(|| Planned {
                domain: *d,
                version: Some(newest.version.clone()),
                url: newest.url.clone(),
            })
        })
        .collect()
}

/// Fetch and parse the index (`attack.index`: an http(s) URL or a local path).
pub async fn fetch_index(settings: &AttackSettings) -> Result<ReleaseIndex, PipelineError> {
    let url = settings.index.as_deref().unwrap_or("").trim();
    let err = |message: String| PipelineError::Index {
        url: url.to_string(),
        message,
    };
    if url.is_empty() {
        return Err(err("not set".into()));
    }
    let bytes = if url.starts_with("http://") || url.starts_with("https://") {
        let client = reqwest::Client::builder()
            .timeout(INDEX_TIMEOUT)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| err(format!("request failed: {e}")))?;
        if !resp.status().is_success() {
            return Err(err(format!("HTTP {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| err(format!("reading the body: {e}")))?
        {
            if body.len() + chunk.len() > MAX_INDEX_BYTES {
                return Err(err(format!(
                    "larger than {} MB; not an ATT&CK collection index",
                    MAX_INDEX_BYTES >> 20
                )));
            }
            body.extend_from_slice(&chunk);
        }
        body
    } else {
        let path = url.strip_prefix("file://").unwrap_or(url);
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > MAX_INDEX_BYTES as u64 {
            return Err(err(format!(
                "larger than {} MB; not an ATT&CK collection index",
                MAX_INDEX_BYTES >> 20
            )));
        }
        std::fs::read(path).map_err(|e| err(e.to_string()))?
    };
    serde_json::from_slice(&bytes).map_err(|e| err(format!("not an ATT&CK collection index ({e})")))
}

/// The lake's current release per domain.
pub async fn lake_versions(engine: &Engine) -> Result<BTreeMap<Domain, String>, PipelineError> {
    let r = engine
        .run("SELECT domain, attack_version FROM attack_versions_current")
        .await?;
    let mut out = BTreeMap::new();
    for b in &r[0].batches {
        let d = crate::feeds::column_strings(b, 0);
        let v = crate::feeds::column_strings(b, 1);
        for (d, v) in d.into_iter().zip(v) {
            if let (Some(d), Some(v)) = (d.as_deref().and_then(Domain::parse), v) {
                out.insert(d, v);
            }
        }
    }
    Ok(out)
}

/// "enterprise 18.1, ics 18.1" (or "no ATT&CK release").
pub fn describe(current: &BTreeMap<Domain, String>) -> String {
    if current.is_empty() {
        return "no ATT&CK release".into();
    }
    current
        .iter()
        .map(|(d, v)| format!("{d} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> ReleaseIndex {
        serde_json::from_str(
            r#"{"id": "x", "name": "MITRE ATT&CK", "collections": [
              {"id": "a", "name": "Enterprise ATT&CK", "versions": [
                {"version": "9.0", "url": "e9"}, {"version": "18.1", "url": "e18.1"}, {"version": "17.0", "url": "e17"}]},
              {"id": "b", "name": "ICS ATT&CK", "versions": [{"version": "18.1", "url": "i18.1"}]}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn newest_is_by_number_not_text() {
        assert_eq!(index().newest(Domain::Enterprise).unwrap().url, "e18.1");
        assert!(index().newest(Domain::Mobile).is_none());
    }

    #[test]
    fn plans_only_missing_or_older_domains() {
        let mut current = BTreeMap::new();
        current.insert(Domain::Enterprise, "9.0".to_string());
        current.insert(Domain::Ics, "18.1".to_string());
        let p = plan(&index(), &Domain::ALL, &current);
        assert_eq!(
            p,
            vec![Planned {
                domain: Domain::Enterprise,
                version: Some("18.1".into()),
                url: "e18.1".into()
            }]
        );
        current.insert(Domain::Enterprise, "18.1".to_string());
        assert!(plan(&index(), &Domain::ALL, &current).is_empty());
        assert_eq!(plan(&index(), &[Domain::Ics], &BTreeMap::new()).len(), 1);
    }
}
