//! MITRE ATT&CK ingestion: fetch a STIX bundle, keep it raw, normalise it into Parquet tables.
//!
//! Order of work is what makes bad input harmless: the bundle is fetched, decoded, validated and
//! fully normalised in memory before anything is written, so a failure leaves the lake untouched.
//! Then the raw bundle, the tables, and last the `mitre_attack_versions` row (which the
//! `*_current` views key on) are written, each atomically.

pub mod normalize;
pub mod stix;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::Domain;
use crate::lake::{Lake, LakeError, Location};
pub use normalize::{table_schema, table_schemas, PARTITION_COLS};

/// Errors ingesting ATT&CK. Every variant names the input and says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// A local file is missing or unreadable.
    #[error("cannot read {path}: {source}; pass --from with a STIX bundle (.json or .json.gz), or omit --from to download MITRE's bundle")]
    ReadFile {
        /// The path.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// An HTTP download failed.
    #[error("downloading {url} failed: {message}; check the URL and network, or pass --from with a local bundle")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong (status or transport error).
        message: String,
    },
    /// The gzip stream is corrupt or truncated.
    #[error("{source_name}: not a valid gzip stream ({message}); the file is truncated or corrupt — download it again")]
    Gzip {
        /// The input.
        source_name: String,
        /// Decoder message.
        message: String,
    },
    /// The bytes are not UTF-8.
    #[error("{source_name}: not UTF-8 text (first invalid byte at offset {offset}); STIX bundles are UTF-8 JSON — check the file is a bundle and not another encoding")]
    NotUtf8 {
        /// The input.
        source_name: String,
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// The JSON is malformed.
    #[error("{source_name}: invalid JSON: {message}")]
    Json {
        /// The input.
        source_name: String,
        /// Parser message with line and column.
        message: String,
    },
    /// Valid JSON, but not an ATT&CK STIX bundle.
    #[error("{source_name}: not a STIX ATT&CK bundle: {reason}; use MITRE's enterprise/mobile/ics-attack.json from attack-stix-data")]
    NotABundle {
        /// The input.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A spec version this build does not understand.
    #[error("{source_name}: unsupported {what}; threatlake reads STIX 2.0/2.1 and ATT&CK data model 3.x — upgrade threatlake for newer bundles")]
    UnsupportedSpec {
        /// The input.
        source_name: String,
        /// Which version field and value.
        what: String,
    },
    /// The input is over a configured cap.
    #[error("{source_name}: refused: {what}; if this is a genuine bundle, raise {setting} in config/settings.yaml")]
    TooLarge {
        /// The input.
        source_name: String,
        /// Which cap and by how much.
        what: String,
        /// The setting that raises the cap.
        setting: &'static str,
    },
    /// The bundle would replace a much larger current release (a subset or a broken export).
    #[error("{source_name}: ATT&CK {domain} {version} has {new} techniques but the current release {current_version} has {current}; refusing to replace it with a subset. Pass --force if this is intended")]
    Shrinks {
        /// The input.
        source_name: String,
        /// Domain.
        domain: Domain,
        /// The bundle's version.
        version: String,
        /// Its technique count.
        new: usize,
        /// The current release.
        current_version: String,
        /// Its technique count.
        current: usize,
    },
    /// The bundle carries no ATT&CK version.
    #[error("{source_name}: the bundle has no x-mitre-collection with x_mitre_version; pass --attack-version to say which release it is")]
    NoVersion {
        /// The input.
        source_name: String,
    },
    /// The ATT&CK version string cannot be used.
    #[error("{source_name}: ATT&CK version {version:?} is not of the form MAJOR.MINOR (digits only, e.g. 18.1); pass --attack-version to give it")]
    BadVersion {
        /// The input.
        source_name: String,
        /// The version string.
        version: String,
    },
    /// The bundle's domain cannot be told, or differs from the one asked for.
    #[error("{source_name}: {message}")]
    Domain {
        /// The input.
        source_name: String,
        /// Explanation.
        message: String,
    },
    /// Building Arrow batches failed (a bug or an object with unexpected field types).
    #[error("{source_name}: cannot normalise: {source}")]
    Normalize {
        /// The input.
        source_name: String,
        /// Arrow error.
        source: arrow::error::ArrowError,
    },
    /// Writing to the lake failed.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// Reading the current release from the lake failed.
    #[error("reading the lake's current ATT&CK release: {0}")]
    Sql(Box<crate::sql::SqlError>),
}

pub use stix::BundleLimits;

/// How [`ingest`] treats one bundle.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// The domain asked for (`--domain`); the bundle must be of it.
    pub expected: Option<Domain>,
    /// `--attack-version`, for bundles without a collection object.
    pub version_override: Option<String>,
    /// Download timeout.
    pub timeout: Duration,
    /// Size caps.
    pub limits: BundleLimits,
    /// Replace the current release even with one that has far fewer techniques.
    pub force: bool,
}

/// The canonical spelling of an ATT&CK version: `v18.1`, `18.01`, ` 18.1 ` → `18.1`. Signs, empty
/// parts, non-digits and more than three parts are refused, so two spellings of one release can
/// never become two partitions.
pub fn canonical_version(v: &str) -> Option<String> {
    let v = v.trim();
    let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
    let parts: Vec<&str> = v.split('.').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in parts {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        nums.push(p.parse::<u32>().ok()?.to_string());
    }
    if nums.len() == 1 {
        nums.push("0".into());
    }
    Some(nums.join("."))
}

/// What one ingest did.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// Domain ingested.
    pub domain: Domain,
    /// ATT&CK version.
    pub attack_version: String,
    /// Rows per table.
    pub rows: BTreeMap<String, usize>,
    /// Raw object written (relative to the raw root).
    pub raw_path: String,
    /// Time per stage: fetch, decode, parse, normalise, write.
    pub timings: Vec<(&'static str, Duration)>,
}

/// Fetch a source: an http(s) URL, a `file://` URL, or a local path.
pub async fn fetch(
    source: &str,
    timeout: Duration,
    limits: &BundleLimits,
) -> Result<Bytes, IngestError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let http = |message: String| IngestError::Http {
            url: source.to_string(),
            message,
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("threatlake/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| http(e.to_string()))?;
        let mut resp = client
            .get(source)
            .send()
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(http(format!("HTTP {status}")));
        }
        use crate::feeds::http::{read_capped, CappedError};
        read_capped(&mut resp, limits.max_bytes)
            .await
            .map_err(|e| match e {
                CappedError::TooLarge => limits.too_large(source, "the download is"),
                CappedError::Transport { error, .. } => http(format!("reading the body: {error}")),
            })
    } else {
        let path = source.strip_prefix("file://").unwrap_or(source);
        let read_err = |e| IngestError::ReadFile {
            path: path.to_string(),
            source: e,
        };
        let len = tokio::fs::metadata(path).await.map_err(read_err)?.len();
        if len > limits.max_bytes {
            return Err(limits.too_large(source, "the file is"));
        }
        tokio::fs::read(path)
            .await
            .map(Bytes::from)
            .map_err(read_err)
    }
}

/// A bundle decoded, validated and normalised in memory, not yet written.
pub struct Prepared {
    /// Domain of the bundle.
    pub domain: Domain,
    /// ATT&CK version.
    pub attack_version: String,
    /// Tables in write order.
    pub tables: Vec<(&'static str, arrow::array::RecordBatch)>,
    raw: Bytes,
    raw_is_gzip: bool,
    timings: Vec<(&'static str, Duration)>,
}

/// Decode, validate and normalise bundle bytes. Nothing is written.
pub fn prepare(
    source: &str,
    bytes: Bytes,
    expected: Option<Domain>,
    version_override: Option<&str>,
    limits: &BundleLimits,
) -> Result<Prepared, IngestError> {
    let mut timings = Vec::new();
    let t = Instant::now();
    let json = stix::decode_bytes(source, &bytes, limits)?;
    timings.push(("decode", t.elapsed()));
    let t = Instant::now();
    let bundle = stix::parse_bundle(source, &json, limits)?;
    drop(json);
    timings.push(("parse", t.elapsed()));

    let domain = bundle_domain(source, &bundle, expected)?;
    let collection = bundle
        .objects
        .iter()
        .find(|o| o.kind == "x-mitre-collection");
    let version = match (
        version_override,
        collection.and_then(|c| c.x_mitre_version.as_deref()),
    ) {
        (Some(v), _) | (None, Some(v)) => v.to_string(),
        (None, None) => {
            return Err(IngestError::NoVersion {
                source_name: source.to_string(),
            })
        }
    };
    let Some(version) = canonical_version(&version) else {
        return Err(IngestError::BadVersion {
            source_name: source.to_string(),
            version,
        });
    };

    let t = Instant::now();
    let prov = normalize::Provenance {
        source: source.to_string(),
        sha256: hex(&Sha256::digest(&bytes)),
        ingested_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let tables =
        normalize::normalize(&bundle, &prov).map_err(|source_err| IngestError::Normalize {
            source_name: source.to_string(),
            source: source_err,
        })?;
    timings.push(("normalise", t.elapsed()));
    let raw_is_gzip = bytes.starts_with(&[0x1f, 0x8b]);
    Ok(Prepared {
        domain,
        attack_version: version,
        tables,
        raw: bytes,
        raw_is_gzip,
        timings,
    })
}

impl Prepared {
    /// Write raw bundle, tables, then the version row.
    pub async fn commit(self, lake: &Lake, raw: &Location) -> Result<IngestReport, IngestError> {
        let t = Instant::now();
        let raw_path = format!("attack/{}/{}.json.gz", self.domain, self.attack_version);
        let gz = if self.raw_is_gzip {
            self.raw
        } else {
            Bytes::from(gzip(&self.raw))
        };
        raw.put_atomic(&raw_path, gz).await?;
        let partition = [
            (PARTITION_COLS[0], self.domain.as_str()),
            (PARTITION_COLS[1], self.attack_version.as_str()),
        ];
        let mut rows = BTreeMap::new();
        for (name, batch) in &self.tables {
            lake.replace_partition(
                name,
                &partition,
                batch.schema(),
                std::slice::from_ref(batch),
                &format!("ingest attack {} {}", self.domain, self.attack_version),
            )
            .await?;
            rows.insert(name.to_string(), batch.num_rows());
        }
        let mut timings = self.timings;
        timings.push(("write", t.elapsed()));
        Ok(IngestReport {
            domain: self.domain,
            attack_version: self.attack_version,
            rows,
            raw_path,
            timings,
        })
    }
}

/// Fetch, prepare and commit one bundle. A bundle that would become current with less than half
/// the techniques of the current release is refused unless `options.force`.
pub async fn ingest(
    lake: &Lake,
    raw: &Location,
    source: &str,
    options: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let t = Instant::now();
    let bytes = fetch(source, options.timeout, &options.limits).await?;
    let fetched = t.elapsed();
    let source_owned = source.to_string();
    let (expected, version_owned, limits) = (
        options.expected,
        options.version_override.clone(),
        options.limits,
    );
    // Decoding and normalising 45 MB of JSON is CPU work; keep it off the async workers.
    let prepared = tokio::task::spawn_blocking(move || {
        prepare(
            &source_owned,
            bytes,
            expected,
            version_owned.as_deref(),
            &limits,
        )
    })
    .await
    .expect("ingest worker panicked")?;
    if !options.force {
        refuse_shrinking(lake, source, &prepared).await?;
    }
    let mut report = prepared.commit(lake, raw).await?;
    report.timings.insert(0, ("fetch", fetched));
    Ok(report)
}

/// Refuse a bundle that would become current with fewer than half the techniques of the current
/// release of its domain (a subset or a broken export silently shrinking every view).
async fn refuse_shrinking(
    lake: &Lake,
    source: &str,
    prepared: &Prepared,
) -> Result<(), IngestError> {
    let sql_err = |e: crate::sql::SqlError| IngestError::Sql(Box::new(e));
    let engine = crate::sql::Engine::open(lake).await.map_err(sql_err)?;
    let r = engine
        .run(
            "SELECT t.domain, t.attack_version, count(*) AS n \
             FROM mitre_attack_techniques t JOIN attack_versions_current v \
               ON t.domain = v.domain AND t.attack_version = v.attack_version \
             GROUP BY 1, 2",
        )
        .await
        .map_err(sql_err)?;
    let new = prepared
        .tables
        .iter()
        .find(|(n, _)| *n == "mitre_attack_techniques")
        .map_or(0, |(_, b)| b.num_rows());
    let key = threatlake_udfs::kernels::version_key;
    for b in &r[0].batches {
        let domains = crate::feeds::column_strings(b, 0);
        let versions = crate::feeds::column_strings(b, 1);
        let counts = b
            .column(2)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .map(|a| a.values().to_vec())
            .unwrap_or_default();
        for ((d, v), n) in domains.into_iter().zip(versions).zip(counts) {
            let (Some(d), Some(v)) = (d, v) else { continue };
            let current = n as usize;
            if d == prepared.domain.as_str()
                && key(&prepared.attack_version) >= key(&v)
                && new * 2 < current
            {
                return Err(IngestError::Shrinks {
                    source_name: source.to_string(),
                    domain: prepared.domain,
                    version: prepared.attack_version.clone(),
                    new,
                    current_version: v,
                    current,
                });
            }
        }
    }
    Ok(())
}

fn bundle_domain(
    source: &str,
    bundle: &stix::Bundle,
    expected: Option<Domain>,
) -> Result<Domain, IngestError> {
    // The collection and matrices name their domain in x_mitre_domains; fall back to a vote over
    // attack-patterns for bundles without them.
    let mut votes: BTreeMap<Domain, usize> = BTreeMap::new();
    for o in &bundle.objects {
        if matches!(
            o.kind.as_str(),
            "attack-pattern" | "x-mitre-matrix" | "x-mitre-tactic"
        ) {
            for d in &o.x_mitre_domains {
                if let Some(d) = Domain::parse(d) {
                    *votes.entry(d).or_default() += 1;
                }
            }
        }
    }
    let found = votes.iter().max_by_key(|(_, n)| **n).map(|(d, _)| *d);
    match (found, expected) {
        (Some(f), Some(e)) if f != e => Err(IngestError::Domain {
            source_name: source.to_string(),
            message: format!("this is a {f} bundle but --domain {e} was given; pass --domain {f} or the {e} bundle"),
        }),
        (Some(f), _) => Ok(f),
        (None, Some(e)) => Ok(e),
        (None, None) => Err(IngestError::Domain {
            source_name: source.to_string(),
            message: "cannot tell the ATT&CK domain (no x_mitre_domains); pass --domain".into(),
        }),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 5),
        flate2::Compression::fast(),
    );
    enc.write_all(data).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::canonical_version;

    #[test]
    fn versions_have_one_spelling() {
        for (given, canonical) in [
            ("18.1", "18.1"),
            ("v18.1", "18.1"),
            ("V18.01", "18.1"),
            (" 18.1 ", "18.1"),
            ("18", "18.0"),
            ("9.0.2", "9.0.2"),
        ] {
            assert_eq!(
                canonical_version(given).as_deref(),
                Some(canonical),
                "{given}"
            );
        }
        for bad in [
            "+18.1", "-1.0", "18.", ".1", "18.1.2.3", "18,1", "1e2", "", "v", "1234.0", "18 .1",
        ] {
            assert_eq!(canonical_version(bad), None, "{bad}");
        }
    }
}
