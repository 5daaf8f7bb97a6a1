//! S3 lake locations: an `object_store` client configured like the AWS CLI (environment, then
//! `~/.aws/credentials` and `~/.aws/config`), with bounded retries, and error hints that say what to fix.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use url::Url;

use crate::config::StoreSettings;

/// The S3 client for `bucket`, configured from `env` (the process environment, normally) as
/// `AmazonS3Builder::from_env` would, then from the shared AWS files for what `env` leaves unset.
pub fn store_with_env(
    bucket: &str,
    opts: &StoreSettings,
    env: &BTreeMap<String, String>,
) -> Result<AmazonS3, String> {
    let mut b = AmazonS3Builder::new().with_bucket_name(bucket);
    for (k, v) in env {
        if k.starts_with("AWS_") {
            if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                b = b.with_config(key, v);
            }
        }
    }
    let var = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let profile = shared_profile(env);
    // The shared files fill in only what the environment left unset (the AWS CLI's precedence).
    let fill = [
        (
            "AWS_ACCESS_KEY_ID",
            "aws_access_key_id",
            AmazonS3ConfigKey::AccessKeyId,
        ),
        (
            "AWS_SECRET_ACCESS_KEY",
            "aws_secret_access_key",
            AmazonS3ConfigKey::SecretAccessKey,
        ),
        (
            "AWS_SESSION_TOKEN",
            "aws_session_token",
            AmazonS3ConfigKey::Token,
        ),
        (
            "AWS_ENDPOINT_URL",
            "endpoint_url",
            AmazonS3ConfigKey::Endpoint,
        ),
    ];
    for (env_key, file_key, cfg) in fill {
        if var(env_key).is_none() {
            if let Some(v) = profile.get(file_key) {
                b = b.with_config(cfg, v);
            }
        }
    }
    if var("AWS_REGION").is_none() && var("AWS_DEFAULT_REGION").is_none() {
        let region = profile
            .get("region")
            .map(String::as_str)
            .unwrap_or("us-east-1");
        b = b.with_region(region);
    }
    // An endpoint the user spelled with http:// (a local MinIO, moto, LocalStack) is meant to be used.
    let endpoint = var("AWS_ENDPOINT_URL")
        .or_else(|| var("AWS_ENDPOINT"))
        .or_else(|| profile.get("endpoint_url").cloned());
    let mut client = ClientOptions::new()
        .with_connect_timeout(secs(opts.connect_timeout_secs))
        .with_timeout(secs(opts.request_timeout_secs));
    if endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"))
    {
        client = client.with_allow_http(true);
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: opts.max_retries,
        retry_timeout: secs(opts.retry_timeout_secs),
    };
    b.with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| format!("{}{}", condense(&e), hint(&e)))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

/// Keys of the active profile (`AWS_PROFILE`, else `default`) from the shared credentials file and
/// the config file (`[profile name]` sections there), credentials file first.
fn shared_profile(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let home = env.get("HOME").map(PathBuf::from);
    let path = |var: &str, default: &str| {
        env.get(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let name = env
        .get("AWS_PROFILE")
        .filter(|p| !p.is_empty())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let mut out = BTreeMap::new();
    let files = [
        (path("AWS_SHARED_CREDENTIALS_FILE", "credentials"), false),
        (path("AWS_CONFIG_FILE", "config"), true),
    ];
    for (file, is_config) in files {
        let Some(text) = file.and_then(|f| std::fs::read_to_string(f).ok()) else {
            continue;
        };
        for (k, v) in ini_section(&text, &name, is_config) {
            out.entry(k).or_insert(v);
        }
    }
    out
}

/// `key = value` pairs of one section of an AWS shared file. In the config file a named profile's
/// section is `[profile name]`; `[default]` is spelled the same in both files.
fn ini_section(text: &str, profile: &str, is_config: bool) -> Vec<(String, String)> {
    let wanted: Vec<String> = if is_config && profile != "default" {
        vec![format!("profile {profile}")]
    } else {
        vec![profile.to_string()]
    };
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(sec) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let sec = sec.split_whitespace().collect::<Vec<_>>().join(" ");
            inside = wanted.contains(&sec);
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

/// What to do about a failed S3 request, judged from the error text (empty when nothing useful).
pub fn hint(err: &object_store::Error) -> &'static str {
    let auth = matches!(
        err,
        object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. }
    );
    hint_text(&format!("{err:?} {err}"), auth)
}

/// [`hint`] for an error already turned into text (e.g. wrapped by delta-rs); `auth` when the
/// store said the credentials were refused.
pub fn hint_text(text: &str, auth: bool) -> &'static str {
    let has = |s: &str| text.contains(s);
    // An HTTP status as a number of its own, not digits inside a duration ("270.404037ms").
    let status = |code: &str| {
        text.match_indices(code).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + code.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
                && !after.is_some_and(|c| c.is_ascii_digit() || c == '.')
        })
    };
    if has("169.254.169.254") || has("Missing AccessKeyId") {
        "; no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials), or run where an instance or task role provides them"
    } else if has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || status("403")
        || has("Forbidden")
        || auth
    {
        "; the S3 server refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and ~/.aws/credentials)"
    } else if has("NoSuchBucket") {
        "; the bucket does not exist at this endpoint: create it, or fix the bucket in lake.root / --lake (and AWS_ENDPOINT_URL)"
    } else if has("error sending request")
        || has("Connection refused")
        || has("connection closed")
        || has("timed out")
        || has("Timeout")
        || has("dns error")
    {
        "; the S3 endpoint did not answer: check AWS_ENDPOINT_URL and the network. What was already committed is intact; re-run the command to continue"
    } else {
        ""
    }
}

/// An object-store error in one line: S3's error code and message and the request, instead of
/// the client's nested chain that repeats the XML body at every level.
pub fn condense(err: &object_store::Error) -> String {
    condense_text(&err.to_string())
}

/// [`condense`] for an error already turned into text (e.g. wrapped by delta-rs).
pub fn condense_text(text: &str) -> String {
    let text = text.to_string();
    let between = |open: &str, close: &str| {
        let start = text.find(open)? + open.len();
        let len = text[start..].find(close)?;
        Some(text[start..start + len].to_string())
    };
    let request = regex::Regex::new(r"Error performing ([A-Z]+) (\S+)")
        .ok()
        .and_then(|re| re.captures(&text).map(|c| format!("{} {}", &c[1], &c[2])));
    let status = regex::Regex::new(r"status code: (\d{3}[^:]*)")
        .ok()
        .and_then(|re| re.captures(&text).map(|c| c[1].trim().to_string()));
    match (
        between("<Code>", "</Code>"),
        between("<Message>", "</Message>"),
    ) {
        (Some(code), msg) => format!(
            "S3 answered {}{code}{}{}",
            status.map(|s| format!("{s} ")).unwrap_or_default(),
            msg.map(|m| format!(": {m}")).unwrap_or_default(),
            request.map(|r| format!(" ({r})")).unwrap_or_default()
        ),
        (None, _) => {
            let first = text.lines().next().unwrap_or_default();
            let mut out: String = first.chars().take(400).collect();
            if out.len() < text.len() {
                out.push('…');
            }
            out
        }
    }
}

/// Bucket and key prefix of an `s3://bucket/prefix` URL.
pub fn parse(spec: &str) -> Result<(String, String), String> {
    let url = Url::parse(spec).map_err(|e| e.to_string())?;
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or("no bucket: write s3://bucket/prefix")?
        .to_string();
    if url.query().is_some() || url.fragment().is_some() {
        return Err("no query or fragment allowed: write s3://bucket/prefix".into());
    }
    let prefix = url.path().trim_matches('/').to_string();
    // (the URL parser would silently resolve them; a lake path should say what it means)
    let raw_path = spec["s3://".len()..].split_once('/').map_or("", |(_, p)| p);
    if raw_path.split('/').any(|s| s == ".." || s == ".") {
        return Err("'.' and '..' are not allowed in the prefix".into());
    }
    Ok((bucket, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_403_inside_a_duration_is_not_a_refusal() {
        let dying = "Generic S3 error: Error performing PUT http://127.0.0.1:33603/b/x.json in 270.404037ms, after 2 retries - HTTP error: error sending request";
        assert!(hint_text(dying, false).contains("did not answer"));
        let refused = "Error performing PUT http://127.0.0.1:9000/b/x.json in 12ms - Server returned non-2xx status code: 403 Forbidden";
        assert!(hint_text(refused, false).contains("refused the credentials"));
        assert!(hint_text("status: 403", false).contains("refused the credentials"));
    }

    #[test]
    fn errors_are_condensed_to_code_message_and_request() {
        let xml = "<?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        let e = object_store::Error::Generic {
            store: "S3",
            source: format!("Error performing list request: Error performing GET http://127.0.0.1:9/nob?list-type=2 in 5ms - Server returned non-2xx status code: 404 Not Found: {xml}: {xml}").into(),
        };
        let c = condense(&e);
        assert_eq!(
            c,
            "S3 answered 404 Not Found NoSuchBucket: The specified bucket does not exist (GET http://127.0.0.1:9/nob?list-type=2)"
        );
        assert!(hint(&e).contains("bucket does not exist"));
    }

    #[test]
    fn parses_bucket_and_prefix() {
        assert_eq!(
            parse("s3://intel/lake/prod/").unwrap(),
            ("intel".into(), "lake/prod".into())
        );
        assert_eq!(parse("s3://intel").unwrap(), ("intel".into(), "".into()));
        assert!(parse("s3:///lake").is_err());
        assert!(parse("s3://b/../x").is_err());
    }

    #[test]
    fn shared_files_fill_what_the_environment_leaves_unset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("credentials"),
            "[default]\naws_access_key_id = DEF\n[ci]\naws_access_key_id = CIKEY\naws_secret_access_key = CISECRET\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config"),
            "[default]\nregion = eu-west-1\n[profile ci]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:9\n",
        )
        .unwrap();
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            let mut m: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            m.insert(
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                dir.path().join("credentials").display().to_string(),
            );
            m.insert(
                "AWS_CONFIG_FILE".into(),
                dir.path().join("config").display().to_string(),
            );
            m
        };
        let p = shared_profile(&env(&[("AWS_PROFILE", "ci")]));
        assert_eq!(p["aws_access_key_id"], "CIKEY");
        assert_eq!(p["region"], "eu-north-1");
        assert_eq!(p["endpoint_url"], "http://127.0.0.1:9");
        let d = shared_profile(&env(&[]));
        assert_eq!(d["aws_access_key_id"], "DEF");
        assert_eq!(d["region"], "eu-west-1");
        assert!(!d.contains_key("endpoint_url"));
        // the client builds from them (an http endpoint is allowed because the user wrote it)
        store_with_env(
            "b",
            &StoreSettings::default(),
            &env(&[("AWS_PROFILE", "ci")]),
        )
        .unwrap();
    }
}
