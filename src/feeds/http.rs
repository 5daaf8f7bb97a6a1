//! HTTP for feeds: API key in a header (never in URLs or messages, never sent outside the configured
//! base URL, redirects included), a token-bucket throttle, retries with `Retry-After` for 429 and
//! jittered exponential backoff for 5xx/timeouts, a cap on body size, and a request counter for
//! daily budgets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::FeedError;

/// Retry behaviour.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per request (≥ 1).
    pub attempts: u32,
    /// First backoff; doubles per retry.
    pub backoff: Duration,
    /// Longest wait honoured from a `Retry-After` header or backoff.
    pub max_wait: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Largest response body accepted, in bytes (after decompression).
    pub max_body: u64,
}

/// Outcome of a GET that reached the service.
#[derive(Debug)]
pub enum Fetched {
    /// 2xx with its body.
    Body(Bytes),
    /// 404: the service does not know the item (recorded, not an error).
    NotFound,
}

/// Token bucket: `per_minute` requests per minute, bursts up to the same number.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        let p = per_minute.max(1) as f64;
        Self {
            per_minute: p,
            state: Mutex::new((p, Instant::now())),
        }
    }

    async fn take(&self) {
        let mut s = self.state.lock().await;
        loop {
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.per_minute / 60.0;
            s.0 = (s.0 + refill).min(self.per_minute);
            s.1 = now;
            if s.0 >= 1.0 {
                s.0 -= 1.0;
                return;
            }
            let wait = (1.0 - s.0) * 60.0 / self.per_minute;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// A client for one service.
#[derive(Debug)]
pub struct FeedClient {
    http: reqwest::Client,
    /// Service name for messages ("OTX", "VirusTotal").
    pub service: &'static str,
    /// Base URL every request must stay under.
    pub base: Url,
    key_header: &'static str,
    /// Redacted in `Debug`, so a logged client never shows it.
    key: crate::config::Secret,
    env: &'static str,
    accept: &'static str,
    policy: RetryPolicy,
    bucket: Option<Bucket>,
    requests: AtomicU32,
}

impl FeedClient {
    /// A client for `base` sending `key` in `key_header`; `per_minute` throttles when set.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        service: &'static str,
        base: &str,
        key_header: &'static str,
        key: &str,
        env: &'static str,
        policy: RetryPolicy,
        per_minute: Option<u32>,
    ) -> Result<Self, FeedError> {
        let bad = |message: String| FeedError::Http {
            service,
            url: base.to_string(),
            attempts: 0,
            message,
        };
        let mut base_url = Url::parse(base).map_err(|e| bad(format!("invalid base URL: {e}")))?;
        if !base_url.path().ends_with('/') {
            base_url.set_path(&format!("{}/", base_url.path()));
        }
        // reqwest strips `Authorization` and `Cookie` on a cross-host redirect but not our key
        // headers, so a redirect is followed only when it stays under the base URL; any other is
        // stopped and reported (the key never leaves for another host).
        let allowed = base_url.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("more than 10 redirects")
            } else if under(&allowed, attempt.url()) {
                attempt.follow()
            } else {
                attempt.stop()
            }
        });
        let http = reqwest::Client::builder()
            .redirect(redirects)
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .user_agent(concat!("threatlake/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            http,
            service,
            base: base_url,
            key_header,
            key: crate::config::Secret::new(key),
            env,
            accept: "application/json",
            policy,
            bucket: per_minute.map(Bucket::new),
            requests: AtomicU32::new(0),
        })
    }

    /// Send `accept` as the `Accept` header (TAXII wants its own media type).
    pub fn with_accept(mut self, accept: &'static str) -> Self {
        self.accept = accept;
        self
    }

    /// `path` (relative, e.g. `api/v1/pulses/subscribed`) resolved under the base URL.
    pub fn url(&self, path: &str) -> Result<Url, FeedError> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| FeedError::Http {
                service: self.service,
                url: path.to_string(),
                attempts: 0,
                message: format!("invalid path: {e}"),
            })
    }

    /// True when `url` is under the configured base (same scheme, host, port and path prefix).
    pub fn is_under_base(&self, url: &Url) -> bool {
        under(&self.base, url)
    }

    /// Requests sent so far (every attempt counts: that is what the service bills).
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// GET with throttling and retries.
    pub async fn get(&self, url: &Url) -> Result<Fetched, FeedError> {
        Ok(self.get_with_headers(url).await?.0)
    }

    /// GET with throttling and retries, with the headers of the answer (empty for a 404).
    pub async fn get_with_headers(
        &self,
        url: &Url,
    ) -> Result<(Fetched, reqwest::header::HeaderMap), FeedError> {
        if !self.is_under_base(url) {
            return Err(FeedError::ForeignLink {
                service: self.service,
                url: url.to_string(),
                base: self.base.to_string(),
            });
        }
        let mut last = String::new();
        let attempts = self.policy.attempts.max(1);
        for attempt in 1..=attempts {
            if let Some(b) = &self.bucket {
                b.take().await;
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let backoff = jittered(
                self.policy
                    .backoff
                    .saturating_mul(1 << (attempt - 1).min(10))
                    .min(self.policy.max_wait),
            );
            let mut req = self.http.get(url.clone()).header("accept", self.accept);
            // An empty key: a service open to anyone (a public TAXII collection).
            // A key that is no valid header value goes unsent: the service's 401 then names its variable.
            if let Some(Ok(mut v)) = self
                .key
                .expose()
                .map(reqwest::header::HeaderValue::from_str)
            {
                v.set_sensitive(true);
                req = req.header(self.key_header, v);
            }
            let resp = req.send().await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    last = if e.is_timeout() {
                        format!("timed out after {:?}", self.policy.timeout)
                    } else {
                        format!("transport error: {}", without_url(&e))
                    };
                    tracing::warn!(service = self.service, %url, attempt, "{last}");
                    if attempt < attempts {
                        tokio::time::sleep(backoff).await;
                    }
                    continue;
                }
            };
            let status = resp.status();
            match status.as_u16() {
                200..=299 => match self.read_body(url, resp).await? {
                    Ok((b, headers)) => return Ok((Fetched::Body(b), headers)),
                    Err(message) => last = message,
                },
                300..=399 => {
                    // Only redirects away from the base stop here (the policy follows the others).
                    let to = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|l| resp.url().join(l).ok())
                        .map_or_else(|| "(no Location)".to_string(), |u| u.to_string());
                    return Err(FeedError::ForeignRedirect {
                        service: self.service,
                        url: url.to_string(),
                        to,
                        base: self.base.to_string(),
                    });
                }
                404 => return Ok((Fetched::NotFound, reqwest::header::HeaderMap::new())),
                401 | 403 => {
                    return Err(FeedError::Auth {
                        service: self.service,
                        status: status.as_u16(),
                        url: url.to_string(),
                        env: self.env,
                    })
                }
                429 => {
                    let wait = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, chrono::Utc::now()))
                        .map(|d| d.min(self.policy.max_wait))
                        .unwrap_or(backoff);
                    last = "HTTP 429 Too Many Requests (quota)".to_string();
                    tracing::warn!(service = self.service, %url, attempt, ?wait, "rate limited");
                    if attempt < attempts {
                        tokio::time::sleep(wait).await;
                    }
                    continue;
                }
                500..=599 => {
                    last = format!("HTTP {status}");
                }
                _ => {
                    return Err(FeedError::Http {
                        service: self.service,
                        url: url.to_string(),
                        attempts: attempt,
                        message: format!("HTTP {status}"),
                    })
                }
            }
            tracing::warn!(service = self.service, %url, attempt, "{last}");
            if attempt < attempts {
                tokio::time::sleep(backoff).await;
            }
        }
        Err(FeedError::Http {
            service: self.service,
            url: url.to_string(),
            attempts,
            message: last,
        })
    }
}

impl FeedClient {
    /// The body of a 2xx answer, at most `max_body` bytes. `Ok(Err(message))` is a transport
    /// failure worth a retry; a body over the cap is an error at once (retrying would not shrink it).
    async fn read_body(
        &self,
        url: &Url,
        mut resp: reqwest::Response,
    ) -> Result<Result<(Bytes, reqwest::header::HeaderMap), String>, FeedError> {
        let headers = resp.headers().clone();
        let too_large = || FeedError::TooLarge {
            service: self.service,
            url: url.to_string(),
            limit_mb: self.policy.max_body as f64 / 1_048_576.0,
        };
        match read_capped(&mut resp, self.policy.max_body).await {
            Ok(b) => Ok(Ok((b, headers))),
            Err(CappedError::TooLarge) => Err(too_large()),
            Err(CappedError::Transport { error, received }) if error.is_timeout() => Ok(Err(format!(
                "timed out after {:?} while reading the body ({received} bytes received): the server sent it too slowly",
                self.policy.timeout
            ))),
            Err(CappedError::Transport { error, .. }) => {
                Ok(Err(format!("reading the body: {}", without_url(&error))))
            }
        }
    }
}

/// Why [`read_capped`] stopped.
#[derive(Debug)]
pub enum CappedError {
    /// The body is larger than the cap (by its Content-Length, or as it streamed in).
    TooLarge,
    /// The connection failed while reading, after `received` bytes.
    Transport {
        /// reqwest's error.
        error: reqwest::Error,
        /// Bytes read before it.
        received: usize,
    },
}

/// A response body of at most `max` bytes, refused by its Content-Length or as soon as it streams
/// past the cap, so an oversized answer is never buffered whole.
pub async fn read_capped(resp: &mut reqwest::Response, max: u64) -> Result<Bytes, CappedError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(CappedError::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > max {
                    return Err(CappedError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(error) => {
                return Err(CappedError::Transport {
                    error,
                    received: body.len(),
                })
            }
        }
    }
}

/// True when `url` is under `base` (same scheme, host, port and path prefix).
fn under(base: &Url, url: &Url) -> bool {
    url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.path().starts_with(base.path())
}

/// A `Retry-After` value: delay seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(v: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return secs
            .is_finite()
            .then(|| Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// Equal jitter: half the backoff plus a random share of the other half, so clients that failed
/// together do not retry together.
pub fn jittered(d: Duration) -> Duration {
    use rand::Rng;
    d / 2 + d.mul_f64(rand::thread_rng().gen_range(0.0..0.5))
}

/// reqwest errors print their URL; ours are already in the message, so drop it.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(&format!(" ({u})"), "").replace(u.as_str(), "");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> FeedClient {
        FeedClient::new(
            "OTX",
            base,
            "X-OTX-API-KEY",
            "k",
            "THREATLAKE_OTX_API_KEY",
            RetryPolicy {
                attempts: 1,
                backoff: Duration::from_millis(1),
                max_wait: Duration::from_millis(1),
                timeout: Duration::from_secs(1),
                max_body: 1 << 20,
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_logged_client_never_shows_its_key() {
        let c = FeedClient::new(
            "TAXII",
            "http://127.0.0.1:1/api1/collections/x/",
            "authorization",
            "Basic c2VjcmV0LXZhbHVl",
            "THREATLAKE_TAXII_PASSWORD",
            client("http://127.0.0.1:1/").policy,
            None,
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("c2VjcmV0LXZhbHVl"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn links_outside_the_base_are_refused() {
        let c = client("http://127.0.0.1:9/otx");
        assert!(c.is_under_base(&Url::parse("http://127.0.0.1:9/otx/api/v1/x?page=2").unwrap()));
        for bad in [
            "http://evil.example/otx/api",
            "https://127.0.0.1:9/otx/api",
            "http://127.0.0.1:10/otx/api",
            "http://127.0.0.1:9/other",
        ] {
            assert!(!c.is_under_base(&Url::parse(bad).unwrap()), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_spaces_requests_after_the_burst() {
        let b = Bucket::new(4);
        let t = Instant::now();
        for _ in 0..6 {
            b.take().await;
        }
        // 4 at once, then one every 15 s.
        let waited = t.elapsed().as_secs_f64();
        assert!((29.0..31.0).contains(&waited), "{waited}");
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now".
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("NaN", now), None);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let d = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        assert!(waits.iter().all(|w| *w >= d / 2 && *w < d), "{waits:?}");
        let first = waits[0];
        assert!(waits.iter().any(|w| *w != first), "no jitter: {first:?}");
    }
}
