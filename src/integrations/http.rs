//! HTTP for push targets: one client per target (its timeout and extra CA, no redirects so a secret
//! header never follows one), and the reading of a receiver's answer as delivered, retry later,
//! stop this target, or rejected.

use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;

use super::settings::TargetSettings;
use super::{Failure, SendError};

/// The target's client.
pub fn client(t: &TargetSettings) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(t.timeout_secs.max(1.0)))
        .connect_timeout(Duration::from_secs_f64(t.timeout_secs.clamp(1.0, 10.0)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("threatlake/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &t.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            format!(
                "integration {:?}: ca_file {path}: {e}; give a readable PEM file",
                t.name
            )
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "integration {:?}: ca_file {path} is not PEM certificates: {e}",
                t.name
            )
        })?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| format!("integration {:?}: HTTP client: {e}", t.name))
}

/// The secret named by `secret_env`, or a message naming the variable.
pub fn secret(t: &TargetSettings) -> Result<Option<String>, String> {
    let Some(var) = &t.secret_env else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
        _ => Err(format!(
            "integration {:?}: the environment variable {var} (secret_env) is not set; set it to the target's secret",
            t.name
        )),
    }
}

/// A transport failure (connection refused, timeout, TLS): try again later.
pub fn transport(what: &str, e: &reqwest::Error) -> SendError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut msg = format!("{what}: {kind}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    SendError {
        message: msg,
        failure: Failure::Transient(None),
    }
}

/// A 2xx answer's status and body, or the failure its status means.
pub async fn answer(
    resp: reqwest::Response,
    what: &str,
    secret_env: Option<&str>,
) -> Result<(StatusCode, Bytes), SendError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::feeds::http::retry_after(v, chrono::Utc::now()));
    let body = resp
        .bytes()
        .await
        .map_err(|e| transport(&format!("{what}: reading the answer"), &e))?;
    if status.is_success() {
        return Ok((status, body));
    }
    let message = format!("{what}: HTTP {status}: {}", excerpt(&body));
    let failure = match status.as_u16() {
        408 | 429 | 500..=599 => Failure::Transient(retry_after),
        401 | 403 => {
            return Err(SendError {
                message: format!(
                    "{message} (the receiver refused the credentials: check the secret in {})",
                    secret_env.unwrap_or("secret_env")
                ),
                failure: Failure::Stop,
            })
        }
        404 | 405 | 413 => Failure::Stop,
        _ => Failure::Reject,
    };
    Err(SendError { message, failure })
}

/// The start of a body for an error message: one line, printable, short.
pub fn excerpt(body: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    super::escape::cap(s.trim(), 300)
}
