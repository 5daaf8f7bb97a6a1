//! STIX 2.x bundle decoding and validation for MITRE ATT&CK bundles.

use std::io::Read;

use serde::Deserialize;

use super::IngestError;

/// One external reference (`mitre-attack` ids, citations).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExternalReference {
    /// Source name (`mitre-attack`, or a citation key).
    #[serde(default)]
    pub source_name: String,
    /// ATT&CK id for MITRE references.
    #[serde(default)]
    pub external_id: Option<String>,
    /// URL.
    #[serde(default)]
    pub url: Option<String>,
    /// Citation text.
    #[serde(default)]
    pub description: Option<String>,
}

/// A kill-chain phase (tactic shortname).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KillChainPhase {
    /// `mitre-attack`, `mitre-mobile-attack`, `mitre-ics-attack`.
    #[serde(default)]
    pub kill_chain_name: String,
    /// Tactic shortname.
    #[serde(default)]
    pub phase_name: String,
}

/// The fields of any STIX object that ATT&CK normalisation reads; everything else is ignored
/// (the raw bundle is kept for anything not modelled here).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StixObject {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub spec_version: Option<String>,
    pub created: Option<String>,
    pub modified: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub revoked: Option<bool>,
    pub x_mitre_deprecated: Option<bool>,
    pub external_references: Vec<ExternalReference>,
    pub kill_chain_phases: Vec<KillChainPhase>,
    pub x_mitre_platforms: Vec<String>,
    pub x_mitre_is_subtechnique: Option<bool>,
    pub x_mitre_detection: Option<String>,
    pub x_mitre_shortname: Option<String>,
    pub x_mitre_version: Option<String>,
    pub x_mitre_attack_spec_version: Option<String>,
    pub x_mitre_domains: Vec<String>,
    pub x_mitre_analytic_refs: Vec<String>,
    pub x_mitre_aliases: Vec<String>,
    pub aliases: Vec<String>,
    pub tactic_refs: Vec<String>,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub relationship_type: Option<String>,
    pub source_ref: Option<String>,
    pub target_ref: Option<String>,
}

impl StixObject {
    /// The ATT&CK reference (`mitre-attack`, `mitre-mobile-attack`, `mitre-ics-attack`), if any.
    pub fn attack_ref(&self) -> Option<&ExternalReference> {
        self.external_references.iter().find(|r| {
            r.source_name.starts_with("mitre-")
                && r.source_name.ends_with("attack")
                && r.external_id.is_some()
        })
    }
    /// ATT&CK id like T1059.001, G0082, S0061, TA0006.
    pub fn attack_id(&self) -> Option<&str> {
        self.attack_ref().and_then(|r| r.external_id.as_deref())
    }
    /// attack.mitre.org URL.
    pub fn url(&self) -> Option<&str> {
        self.attack_ref().and_then(|r| r.url.as_deref())
    }
    /// Revoked flag (absent = false).
    pub fn is_revoked(&self) -> bool {
        self.revoked.unwrap_or(false)
    }
    /// Deprecated flag (absent = false).
    pub fn is_deprecated(&self) -> bool {
        self.x_mitre_deprecated.unwrap_or(false)
    }
}

#[derive(Debug, Deserialize)]
struct RawBundle {
    #[serde(rename = "type")]
    kind: Option<String>,
    spec_version: Option<String>,
    objects: Option<Vec<StixObject>>,
}

/// A decoded bundle.
#[derive(Debug)]
pub struct Bundle {
    /// All objects in file order.
    pub objects: Vec<StixObject>,
}

/// STIX spec versions we understand.
const STIX_VERSIONS: [&str; 2] = ["2.0", "2.1"];
/// Highest ATT&CK data-model major version we understand.
const MAX_ATTACK_SPEC_MAJOR: u32 = 3;

/// Caps on one bundle, so a gzip bomb or a flood of objects fails early with a clear error
/// instead of exhausting memory (settings `attack.max_bundle_mb`, `attack.max_objects`).
#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    /// Largest bundle, in bytes once decompressed (and as downloaded or read).
    pub max_bytes: u64,
    /// Most STIX objects in one bundle.
    pub max_objects: usize,
}

impl Default for BundleLimits {
    /// 256 MB and 250,000 objects: ATT&CK v18.1 Enterprise is 45 MB with 24,771 objects.
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_objects: 250_000,
        }
    }
}

impl BundleLimits {
    /// The error for a bundle over the byte cap.
    pub fn too_large(&self, source: &str, what: &str) -> IngestError {
        IngestError::TooLarge {
            source_name: source.to_string(),
            what: format!(
                "{what} more than {} MB",
                self.max_bytes as f64 / 1_048_576.0
            ),
            setting: "attack.max_bundle_mb",
        }
    }
}

/// Gunzip (if the bytes are gzip) and check UTF-8; names `source` in every error. Decompression
/// stops at `limits.max_bytes`.
pub fn decode_bytes(
    source: &str,
    bytes: &[u8],
    limits: &BundleLimits,
) -> Result<Vec<u8>, IngestError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(limits.too_large(source, "it is"));
    }
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity((bytes.len() * 6).min(limits.max_bytes as usize));
        flate2::read::MultiGzDecoder::new(bytes)
            .take(limits.max_bytes + 1)
            .read_to_end(&mut out)
            .map_err(|e| IngestError::Gzip {
                source_name: source.to_string(),
                message: e.to_string(),
            })?;
        if out.len() as u64 > limits.max_bytes {
            return Err(limits.too_large(source, "decompressed, it is"));
        }
        out
    } else {
        bytes.to_vec()
    };
    if let Err(e) = std::str::from_utf8(&data) {
        return Err(IngestError::NotUtf8 {
            source_name: source.to_string(),
            offset: e.valid_up_to(),
        });
    }
    Ok(data)
}

/// Marks the error of [`CappedObjects`] inside serde_json's message.
const TOO_MANY_OBJECTS: &str = "threatlake: more objects than attack.max_objects";

/// Reads the bundle's top level, counting objects as they are decoded so a flood of objects stops
/// at the cap rather than after it has been held in memory.
struct BundleSeed(usize);

impl<'de> serde::de::DeserializeSeed<'de> for BundleSeed {
    type Value = RawBundle;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<RawBundle, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BundleSeed {
    type Value = RawBundle;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a STIX bundle object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawBundle, A::Error> {
        let mut raw = RawBundle {
            kind: None,
            spec_version: None,
            objects: None,
        };
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "type" => raw.kind = map.next_value()?,
                "spec_version" => raw.spec_version = map.next_value()?,
                "objects" => raw.objects = Some(map.next_value_seed(CappedObjects(self.0))?),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(raw)
    }
}

/// The `objects` array, refused past `.0` objects.
struct CappedObjects(usize);

impl<'de> serde::de::DeserializeSeed<'de> for CappedObjects {
    type Value = Vec<StixObject>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CappedObjects {
    type Value = Vec<StixObject>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of STIX objects")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut out = Vec::new();
        while let Some(o) = seq.next_element::<StixObject>()? {
            if out.len() >= self.0 {
                return Err(A::Error::custom(TOO_MANY_OBJECTS));
            }
            out.push(o);
        }
        Ok(out)
    }
}

/// Parse and validate a STIX bundle from UTF-8 JSON bytes.
pub fn parse_bundle(
    source: &str,
    json: &[u8],
    limits: &BundleLimits,
) -> Result<Bundle, IngestError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(json);
    let parsed = BundleSeed(limits.max_objects)
        .deserialize(&mut de)
        .and_then(|raw| de.end().map(|()| raw));
    let raw: RawBundle = parsed.map_err(|e| {
        use serde_json::error::Category;
        if e.to_string().contains(TOO_MANY_OBJECTS) {
            return IngestError::TooLarge {
                source_name: source.to_string(),
                what: format!("it holds more than {} STIX objects", limits.max_objects),
                setting: "attack.max_objects",
            };
        }
        match e.classify() {
            Category::Eof => IngestError::Json {
                source_name: source.to_string(),
                message: format!(
                    "the JSON ends early ({e}); the file is truncated — download it again"
                ),
            },
            Category::Syntax | Category::Io => IngestError::Json {
                source_name: source.to_string(),
                message: e.to_string(),
            },
            Category::Data => IngestError::NotABundle {
                source_name: source.to_string(),
                reason: format!("unexpected JSON shape: {e}"),
            },
        }
    })?;
    if raw.kind.as_deref() != Some("bundle") {
        return Err(IngestError::NotABundle {
            source_name: source.to_string(),
            reason: match raw.kind {
                Some(k) => format!("top-level \"type\" is \"{k}\", not \"bundle\""),
                None => "it has no top-level \"type\": \"bundle\"".into(),
            },
        });
    }
    let Some(objects) = raw.objects else {
        return Err(IngestError::NotABundle {
            source_name: source.to_string(),
            reason: "it has no \"objects\" array".into(),
        });
    };
    if let Some(v) = raw
        .spec_version
        .as_deref()
        .filter(|v| !STIX_VERSIONS.contains(v))
    {
        return Err(unsupported(source, format!("bundle spec_version \"{v}\"")));
    }
    for o in &objects {
        if let Some(v) = o
            .spec_version
            .as_deref()
            .filter(|v| !STIX_VERSIONS.contains(v))
        {
            return Err(unsupported(
                source,
                format!("spec_version \"{v}\" on {}", o.id),
            ));
        }
        if let Some(v) = o.x_mitre_attack_spec_version.as_deref() {
            let major = v.split('.').next().and_then(|m| m.parse::<u32>().ok());
            if major.is_none_or(|m| m > MAX_ATTACK_SPEC_MAJOR) {
                return Err(unsupported(
                    source,
                    format!("x_mitre_attack_spec_version \"{v}\" on {}", o.id),
                ));
            }
        }
    }
    if !objects.iter().any(|o| o.kind == "attack-pattern") {
        return Err(IngestError::NotABundle {
            source_name: source.to_string(),
            reason: "it is a STIX bundle but holds no attack-pattern objects, so it is not an ATT&CK bundle".into(),
        });
    }
    // Each object once: a repeated id would double every current view built from the bundle.
    let mut ids: std::collections::HashSet<&str> =
        std::collections::HashSet::with_capacity(objects.len());
    if let Some(dup) = objects.iter().find(|o| !ids.insert(o.id.as_str())) {
        return Err(IngestError::NotABundle {
            source_name: source.to_string(),
            reason: format!(
                "STIX id {} occurs more than once (every object must be unique in a bundle)",
                dup.id
            ),
        });
    }
    // Techniques are known by their ATT&CK ids (T1059); without them nothing would be current.
    if !objects
        .iter()
        .any(|o| o.kind == "attack-pattern" && o.attack_id().is_some())
    {
        return Err(IngestError::NotABundle {
            source_name: source.to_string(),
            reason:
                "no attack-pattern has a mitre-attack external reference with an ATT&CK id (T…)"
                    .into(),
        });
    }
    Ok(Bundle { objects })
}

fn unsupported(source: &str, what: String) -> IngestError {
    IngestError::UnsupportedSpec {
        source_name: source.to_string(),
        what,
    }
}
