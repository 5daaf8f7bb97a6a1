//! OTX and VirusTotal against real HTTP servers on 127.0.0.1 that speak the APIs (paging, auth,
//! `modified_since`, quotas), shaped after the recordings in `../shared/data/samples/`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, run, sql};

const KEY: &str = "otx-key-5f3a9c71e2";
const VT_KEY: &str = "vt-key-91be07d4aa";

/// What the fake service answers.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    retry_after: Option<&'static str>,
    location: Option<String>,
    delay: Duration,
    /// Send the body one byte per this interval (a slow-drip server).
    drip: Option<Duration>,
}

impl Reply {
    fn json(v: &Value) -> Self {
        Self::raw(200, serde_json::to_vec(v).unwrap())
    }
    fn raw(status: u16, body: Vec<u8>) -> Self {
        Reply {
            status,
            body,
            retry_after: None,
            location: None,
            delay: Duration::ZERO,
            drip: None,
        }
    }
    fn redirect(to: &str) -> Self {
        Reply {
            location: Some(to.to_string()),
            ..Self::raw(302, Vec::new())
        }
    }
}

type Handler = dyn Fn(&str, Option<&str>, usize) -> Reply + Send + Sync;
/// Requests seen: URL and API-key header.
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A loopback HTTP server running `handler(url, api key header, request number)` until dropped
/// (or 120 s pass). Records every request URL and key header.
struct Fake {
    base: String,
    log: RequestLog,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    fn start(key_header: &'static str, handler: Box<Handler>) -> Self {
        Self::start_on("127.0.0.1:0", key_header, handler)
    }

    /// [`Fake::start`] on another loopback address (another "host" for redirect tests).
    fn start_on(addr: &str, key_header: &'static str, handler: Box<Handler>) -> Self {
        let server = tiny_http::Server::http(addr).unwrap();
        let base = format!("http://{}", server.server_addr().to_ip().unwrap());
        let log: RequestLog = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let key = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv(key_header))
                    .map(|h| h.value.to_string());
                let url = req.url().to_string();
                log2.lock().unwrap().push((url.clone(), key.clone()));
                let r = handler(&url, key.as_deref(), n);
                n += 1;
                std::thread::sleep(r.delay);
                if let Some(every) = r.drip {
                    // Headers at once, then the body a byte at a time (tiny_http's own responses
                    // are buffered until complete, so write the exchange by hand).
                    use std::io::Write;
                    let mut w = req.into_writer();
                    let _ = write!(
                        w,
                        "HTTP/1.1 {} OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        r.status,
                        r.body.len()
                    );
                    let _ = w.flush();
                    for b in r.body {
                        std::thread::sleep(every);
                        if w.write_all(&[b]).and_then(|()| w.flush()).is_err() {
                            break;
                        }
                    }
                    continue;
                }
                let mut resp = tiny_http::Response::from_data(r.body).with_status_code(r.status);
                if let Some(ra) = r.retry_after {
                    resp = resp.with_header(
                        tiny_http::Header::from_bytes(&b"Retry-After"[..], ra.as_bytes()).unwrap(),
                    );
                }
                if let Some(to) = &r.location {
                    resp = resp.with_header(
                        tiny_http::Header::from_bytes(&b"Location"[..], to.as_bytes()).unwrap(),
                    );
                }
                let _ = req.respond(resp);
            }
        });
        Fake {
            base,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn samples() -> std::path::PathBuf {
    common::attack_dir().join("../samples")
}

/// Pulses to serve: the current-format pulse from the Elastic recording and the five 2015 pulses
/// from IntelMQ's (old format, no attack_ids/tlp).
fn sample_pulses() -> Vec<Value> {
    let page: Value = serde_json::from_slice(
        &std::fs::read(samples().join("otx/elastic_pulses_subscribed_page1.body.json")).unwrap(),
    )
    .unwrap();
    let old: Vec<Value> = serde_json::from_slice(
        &std::fs::read(samples().join("otx/intelmq_otx_getall_pulses_2015.json")).unwrap(),
    )
    .unwrap();
    let mut out = page["results"].as_array().unwrap().clone();
    out.extend(old);
    out
}

/// The OTX subscribed endpoint over `pulses`: `limit` per page, `modified_since` honoured (strictly
/// newer), absolute `next` links, 403 without the right key.
fn otx_page(base: &str, url: &str, key: Option<&str>, pulses: &[Value]) -> Reply {
    if key != Some(KEY) {
        return Reply::raw(403, br#"{"detail": "Authentication required"}"#.to_vec());
    }
    let u = url::Url::parse(&format!("http://x{url}")).unwrap();
    if u.path() != "/api/v1/pulses/subscribed" {
        return Reply::raw(404, b"{}".to_vec());
    }
    let q: std::collections::HashMap<String, String> = u.query_pairs().into_owned().collect();
    let limit: usize = q.get("limit").map_or(50, |l| l.parse().unwrap());
    let page: usize = q.get("page").map_or(1, |p| p.parse().unwrap());
    let since = q.get("modified_since").cloned();
    let mut matching: Vec<&Value> = pulses
        .iter()
        .filter(|p| {
            since.as_ref().is_none_or(|s| {
                let m = p["modified"].as_str().unwrap();
                // OTX compares times; our pulses' text sorts like their times once normalised.
                normalise(m) > normalise(s)
            })
        })
        .collect();
    matching.sort_by_key(|p| p["id"].as_str().unwrap().to_string());
    let chunk: Vec<&Value> = matching
        .iter()
        .skip((page - 1) * limit)
        .take(limit)
        .copied()
        .collect();
    let next = (page * limit < matching.len()).then(|| {
        let mut n = u.clone();
        n.query_pairs_mut().clear();
        for (k, v) in &q {
            if k != "page" {
                n.query_pairs_mut().append_pair(k, v);
            }
        }
        n.query_pairs_mut()
            .append_pair("page", &(page + 1).to_string());
        format!("{base}{}?{}", n.path(), n.query().unwrap())
    });
    Reply::json(&json!({"count": matching.len(), "results": chunk, "next": next, "previous": null}))
}

fn normalise(t: &str) -> String {
    let t = t.trim_end_matches('Z');
    let (a, b) = t.split_once('.').unwrap_or((t, ""));
    format!("{a}.{:0<6}", &b[..b.len().min(6)])
}

/// A fake OTX serving `pulses` (shared, so a test can add pulses between runs); its `next` links
/// point back at itself.
fn otx_fake(pulses: Arc<Mutex<Vec<Value>>>) -> Fake {
    let base_cell: Arc<Mutex<String>> = Arc::default();
    let b2 = base_cell.clone();
    let fake = Fake::start(
        "X-OTX-API-KEY",
        Box::new(move |url, key, _| {
            otx_page(&b2.lock().unwrap(), url, key, &pulses.lock().unwrap())
        }),
    );
    *base_cell.lock().unwrap() = fake.base.clone();
    fake
}

/// The CLI on `dir`'s lake, talking to the fake OTX at `base` with fast retries.
fn otx_cmd(dir: &Path, base: &str) -> std::process::Command {
    let mut c = common::cli_on(dir);
    c.env("THREATLAKE_OTX_BASE_URL", base)
        .env("THREATLAKE_OTX_API_KEY", KEY)
        .env("THREATLAKE_OTX_PAGE_SIZE", "2")
        .env(
            "THREATLAKE_OTX_HTTP",
            "{timeout_secs: 1, attempts: 3, backoff_secs: 0.05, max_wait_secs: 2}",
        )
        .env_remove("THREATLAKE_VIRUSTOTAL_API_KEY");
    c
}

/// No file under `dir` contains `needle`.
pub(crate) fn assert_absent(dir: &Path, needle: &str) {
    for (p, _, _) in common::listing(dir) {
        let bytes = std::fs::read(dir.join(&p)).unwrap();
        let mut text = bytes.clone();
        if p.ends_with(".gz") {
            use std::io::Read;
            text.clear();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut text)
                .unwrap();
        }
        assert!(
            !text.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} found in {p}"
        );
    }
}

#[test]
fn otx_pages_incremental_revisions_and_keys() {
    let dir = common::scratch("otx");
    let pulses = Arc::new(Mutex::new(sample_pulses()));
    let fake = otx_fake(pulses.clone());

    // First run: 6 pulses over 3 pages, old and current formats.
    let (ok, out, err) = run(otx_cmd(&dir, &fake.base).args(["ingest", "otx"]));
    assert!(ok, "{err}");
    assert!(
        out.contains("3 page(s), 6 new or revised pulse(s)"),
        "{out}"
    );
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n6\n");
    let ind = sql(&dir, "SELECT count(*) AS n FROM otx_indicators");
    let expected: usize = pulses
        .lock()
        .unwrap()
        .iter()
        .map(|p| p["indicators"].as_array().unwrap().len())
        .sum();
    assert_eq!(ind, format!("n\n{expected}\n"));
    assert_eq!(
        sql(&dir, "SELECT array_to_string(attack_ids, ' ') AS a FROM otx_data WHERE pulse_id = '64e38336d783f91d6948a7b1'"),
        "a\nT1531 T1059 T1566\n"
    );
    assert!(fake
        .requests()
        .iter()
        .all(|(_, k)| k.as_deref() == Some(KEY)));

    // Second run: nothing modified since the watermark → nothing stored, the watermark was sent.
    let (ok, out, err) = run(otx_cmd(&dir, &fake.base).args(["ingest", "otx"]));
    assert!(ok, "{err}");
    assert!(out.contains("0 new or revised pulse(s)"), "{out}");
    let last = fake.requests().last().unwrap().0.clone();
    assert!(
        last.contains("modified_since=2023-08-22T09%3A43%3A18.855000Z"),
        "{last}"
    );

    // A revised pulse replaces its row (the log keeps both versions).
    {
        let mut p = pulses.lock().unwrap();
        let old = p
            .iter_mut()
            .find(|x| x["id"] == "55e6bfb14637f22cb605746e")
            .unwrap();
        old["name"] = json!("Rocket Kitten, revised");
        old["revision"] = json!(3);
        old["modified"] = json!("2024-01-02T03:04:05.000000");
    }
    let (ok, out, err) = run(otx_cmd(&dir, &fake.base).args(["ingest", "otx"]));
    assert!(ok, "{err}");
    assert!(out.contains("1 new or revised pulse(s)"), "{out}");
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n6\n");
    assert_eq!(
        sql(&dir, "SELECT count(*) AS n FROM otx_pulse_log"),
        "n\n7\n"
    );
    assert_eq!(
        sql(
            &dir,
            "SELECT name, revision FROM otx_data WHERE pulse_id = '55e6bfb14637f22cb605746e'"
        ),
        "name,revision\n\"Rocket Kitten, revised\",3\n"
    );
    assert_eq!(
        ind,
        sql(&dir, "SELECT count(*) AS n FROM otx_indicators"),
        "indicators not duplicated"
    );

    // Raw pages kept as received; the key is in no file of the lake or raw store, nor in any output.
    assert!(common::listing(&dir.join("raw"))
        .iter()
        .any(|(p, _, _)| p.starts_with("otx/")));
    assert_absent(&dir, KEY);
    assert!(!out.contains(KEY) && !err.contains(KEY));

    // Wrong key: a clear message naming the variable, never the key.
    let (ok, out, err) = run(otx_cmd(&dir, &fake.base)
        .env("THREATLAKE_OTX_API_KEY", "wrong-key-123")
        .args(["-v", "ingest", "otx"]));
    assert!(!ok);
    assert!(
        err.contains("rejected the API key") && err.contains("THREATLAKE_OTX_API_KEY"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-key-123") && !out.contains("wrong-key-123"),
        "{err}"
    );
}

#[test]
fn otx_retries_429_and_500_and_keeps_pages_before_a_bad_one() {
    let dir = common::scratch("otx-faults");
    let pulses = sample_pulses();
    let base_cell: Arc<Mutex<String>> = Arc::default();
    let b2 = base_cell.clone();
    // Request 0: 429 (Retry-After 1); 1: page 1; 2: 500; 3: page 2; 4: page 3 truncated.
    let fake = Fake::start(
        "X-OTX-API-KEY",
        Box::new(move |url, key, n| {
            let good = otx_page(&b2.lock().unwrap(), url, key, &pulses);
            match n {
                0 => Reply {
                    retry_after: Some("1"),
                    ..Reply::raw(429, b"slow down".to_vec())
                },
                2 => Reply::raw(500, b"oops".to_vec()),
                4 => Reply::raw(200, good.body[..good.body.len() / 2].to_vec()),
                _ => good,
            }
        }),
    );
    *base_cell.lock().unwrap() = fake.base.clone();
    let t = Instant::now();
    let (ok, _out, err) = run(otx_cmd(&dir, &fake.base).args(["ingest", "otx"]));
    assert!(!ok, "a truncated page must fail the run");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "Retry-After was not honoured"
    );
    assert!(
        err.contains("malformed response") && err.contains("page=3"),
        "{err}"
    );
    // Pages 1 and 2 are stored; the watermark did not move, so a re-run fetches everything again.
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n4\n");
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM feed_state"), "n\n0\n");
    let requests = fake.requests();
    assert_eq!(requests.len(), 5, "{requests:?}");
    drop(fake);

    // A server that never answers in time: bounded, clear, nothing lost.
    let slow = Fake::start(
        "X-OTX-API-KEY",
        Box::new(|_, _, _| Reply {
            delay: Duration::from_millis(1500),
            ..Reply::raw(200, b"{}".to_vec())
        }),
    );
    let (ok, _, err) = run(otx_cmd(&dir, &slow.base)
        .env(
            "THREATLAKE_OTX_HTTP",
            "{timeout_secs: 0.3, attempts: 2, backoff_secs: 0.05, max_wait_secs: 1}",
        )
        .args(["ingest", "otx"]));
    assert!(!ok);
    assert!(
        err.contains("timed out") && err.contains("2 attempt(s)"),
        "{err}"
    );
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n4\n");
    drop(slow);

    // A server that answers at once but drips the body: a timeout while reading, said so.
    let drip = Fake::start(
        "X-OTX-API-KEY",
        Box::new(|_, _, _| Reply {
            drip: Some(Duration::from_millis(100)),
            ..Reply::raw(
                200,
                br#"{"count": 0, "results": [], "next": null}"#.to_vec(),
            )
        }),
    );
    let (ok, _, err) = run(otx_cmd(&dir, &drip.base)
        .env(
            "THREATLAKE_OTX_HTTP",
            "{timeout_secs: 0.5, attempts: 1, backoff_secs: 0.05, max_wait_secs: 1}",
        )
        .args(["ingest", "otx"]));
    assert!(!ok);
    assert!(
        err.contains("timed out") && err.contains("while reading the body"),
        "{err}"
    );
}

/// A service that answers every request with a redirect to another host (127.0.0.2, which serves
/// pulses to anyone): the key must not travel there and nothing it serves may be stored. A redirect
/// within the base URL is still followed, with the key.
#[test]
fn redirects_off_the_base_url_never_carry_the_api_keys() {
    let dir = common::scratch("redirect");
    let pulse = sample_pulses().remove(0);
    let elsewhere = Fake::start_on(
        "127.0.0.2:0",
        "X-OTX-API-KEY",
        Box::new(move |_, _, _| {
            Reply::json(&json!({"count": 1, "results": [pulse.clone()], "next": null}))
        }),
    );
    let elsewhere_vt = Fake::start_on(
        "127.0.0.2:0",
        "x-apikey",
        Box::new(|url, _, _| vt_routes(url, Some(VT_KEY))),
    );
    let (to_otx, to_vt) = (elsewhere.base.clone(), elsewhere_vt.base.clone());
    let otx = Fake::start(
        "X-OTX-API-KEY",
        Box::new(move |url, _, _| Reply::redirect(&format!("{to_otx}{url}"))),
    );
    let vt = Fake::start(
        "x-apikey",
        Box::new(move |url, _, _| Reply::redirect(&format!("{to_vt}{url}"))),
    );

    let (ok, out, err) = run(otx_cmd(&dir, &otx.base).args(["ingest", "otx"]));
    assert!(!ok, "{out}");
    assert!(
        err.contains("redirected to") && err.contains("127.0.0.2") && err.contains("not sent"),
        "{err}"
    );
    let (_, out, err) = run(vt_cmd(&dir, &vt.base, 10).args(["ingest", "vt", "github.com"]));
    assert!(
        err.contains("redirected to") || out.contains("redirected to"),
        "VirusTotal redirect not reported: {out} {err}"
    );
    assert!(
        elsewhere.requests().is_empty() && elsewhere_vt.requests().is_empty(),
        "the other host was contacted: {:?} {:?}",
        elsewhere.requests(),
        elsewhere_vt.requests()
    );
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n0\n");
    assert_eq!(
        sql(
            &dir,
            "SELECT count(*) AS n FROM virustotal_data WHERE found"
        ),
        "n\n0\n"
    );

    // A redirect that stays under the base URL (an API moving a path) is followed with the key.
    let pulses = sample_pulses();
    let base_cell: Arc<Mutex<String>> = Arc::default();
    let b2 = base_cell.clone();
    let moved = Fake::start(
        "X-OTX-API-KEY",
        Box::new(move |url, key, _| match url.strip_prefix("/api/v1/") {
            Some(rest) => Reply::redirect(&format!("/moved/{rest}")),
            None => otx_page(
                &b2.lock().unwrap(),
                &url.replacen("/moved/", "/api/v1/", 1),
                key,
                &pulses,
            ),
        }),
    );
    *base_cell.lock().unwrap() = moved.base.clone();
    let (ok, out, err) = run(otx_cmd(&dir, &moved.base).args(["ingest", "otx"]));
    assert!(ok, "{err}");
    assert!(out.contains("6 new or revised pulse(s)"), "{out}");
    assert!(moved
        .requests()
        .iter()
        .all(|(_, k)| k.as_deref() == Some(KEY)));
}

/// A body over `http.max_body_mb` is refused without being buffered whole, and nothing is stored.
#[test]
fn oversized_feed_bodies_are_refused() {
    let dir = common::scratch("otx-big");
    let big = Fake::start(
        "X-OTX-API-KEY",
        Box::new(|_, _, _| {
            let mut body = br#"{"count": 1, "next": null, "results": [{"id": ""#.to_vec();
            body.extend(std::iter::repeat_n(b'a', 3 << 20));
            body.extend(br#""}]}"#);
            Reply::raw(200, body)
        }),
    );
    let (ok, _, err) = run(otx_cmd(&dir, &big.base)
        .env(
            "THREATLAKE_OTX_HTTP",
            "{timeout_secs: 5, attempts: 1, backoff_secs: 0.05, max_wait_secs: 1, max_body_mb: 1}",
        )
        .args(["ingest", "otx"]));
    assert!(!ok);
    assert!(
        err.contains("larger than 1 MB") && err.contains("max_body_mb"),
        "{err}"
    );
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n0\n");
}

/// A `next` link that points back at a page already fetched ends paging at once with a clear
/// error; the pulses of the pages before are stored, and a pulse with a wrongly typed field is
/// rejected (counted) instead of being stored with a coerced value.
#[test]
fn otx_paging_loops_end_and_bad_pulses_are_rejected() {
    let dir = common::scratch("otx-loop");
    let mut pulses = sample_pulses();
    pulses.truncate(2);
    let mut bad = pulses[0].clone();
    bad["id"] = json!("bad0000000000000000000001");
    bad["modified"] = json!(12345);
    pulses.push(bad);
    let base_cell: Arc<Mutex<String>> = Arc::default();
    let b2 = base_cell.clone();
    let served = pulses.clone();
    let fake = Fake::start(
        "X-OTX-API-KEY",
        Box::new(move |url, key, n| {
            if key != Some(KEY) {
                return Reply::raw(403, b"{}".to_vec());
            }
            // Page 1 links page 2; page 2 links itself.
            let base = b2.lock().unwrap().clone();
            let (results, next) = match n {
                0 => (
                    json!(served),
                    format!("{base}/api/v1/pulses/subscribed?page=2"),
                ),
                _ => (json!([]), format!("{base}{url}")),
            };
            Reply::json(&json!({"count": 3, "results": results, "next": next}))
        }),
    );
    *base_cell.lock().unwrap() = fake.base.clone();
    let (ok, _, err) = run(otx_cmd(&dir, &fake.base).args(["ingest", "otx"]));
    assert!(!ok);
    assert!(
        err.contains("stopped paging") && err.contains("repeats a page"),
        "{err}"
    );
    assert_eq!(fake.requests().len(), 2, "{:?}", fake.requests());
    assert_eq!(sql(&dir, "SELECT count(*) AS n FROM otx_data"), "n\n2\n");
    drop(fake);

    // The same pulses from a well-behaved server: the good ones are unchanged, the bad one is
    // rejected with its reason and never stored.
    let fake = otx_fake(Arc::new(Mutex::new(pulses)));
    let (ok, out, err) = run(otx_cmd(&dir, &fake.base).args(["ingest", "otx"]));
    assert!(ok, "{err}");
    assert!(out.contains("2 unchanged"), "{out}");
    assert!(
        err.contains("1 pulse(s) rejected") && err.contains("'modified' is the number 12345"),
        "{err}"
    );
    assert_eq!(
        sql(
            &dir,
            "SELECT count(*) AS n FROM otx_pulse_log WHERE pulse_id = 'bad0000000000000000000001'"
        ),
        "n\n0\n"
    );
}

fn vt_routes(url: &str, key: Option<&str>) -> Reply {
    if key != Some(VT_KEY) {
        return Reply::raw(
            401,
            br#"{"error": {"code": "WrongCredentialsError"}}"#.to_vec(),
        );
    }
    let file = |p: &str| std::fs::read(samples().join("virustotal").join(p)).unwrap();
    let sha = "020876e69dac4b2cb5b75a616dbdac8b913f3cc06fbabd8f8dd3277691ba48b6";
    match url {
        u if u == format!("/api/v3/files/{sha}") => {
            Reply::raw(200, file("azul_files_powershell_script.json"))
        }
        u if u == format!("/api/v3/files/{sha}/behaviour_mitre_trees") => Reply::raw(
            200,
            file("synthetic_mocks/deploymenttheory_file_behaviours_validate_get_mitre_trees.json"),
        ),
        u if u == format!("/api/v3/files/{sha}/behaviour_summary") => {
            Reply::json(&json!({"data": {
            "mitre_attack_techniques": [
                {"id": "T1059.001", "signature_description": "Executes PowerShell with an encoded command", "severity": "IMPACT_SEVERITY_HIGH"},
                {"id": "T1082", "signature_description": "Queries system information", "severity": "IMPACT_SEVERITY_INFO"}
            ]}}))
        }
        "/api/v3/domains/github.com" => Reply::raw(200, file("virustotalx_domain.body.json")),
        "/api/v3/ip_addresses/1.1.1.1" => Reply::raw(200, file("virustotalx_ip_address.body.json")),
        _ => Reply::raw(404, br#"{"error": {"code": "NotFoundError"}}"#.to_vec()),
    }
}

/// The CLI on `dir`'s lake, talking to the fake VirusTotal at `base` with a daily `budget`.
fn vt_cmd(dir: &Path, base: &str, budget: u32) -> std::process::Command {
    let mut c = common::cli_on(dir);
    c.env("THREATLAKE_VIRUSTOTAL_BASE_URL", format!("{base}/api/v3"))
        .env("THREATLAKE_VIRUSTOTAL_API_KEY", VT_KEY)
        .env("THREATLAKE_VIRUSTOTAL_REQUESTS_PER_MINUTE", "600")
        .env("THREATLAKE_VIRUSTOTAL_DAILY_BUDGET", budget.to_string())
        .env("THREATLAKE_VIRUSTOTAL_ENRICH_FROM_OTX", "0")
        .env(
            "THREATLAKE_VIRUSTOTAL_HTTP",
            "{timeout_secs: 2, attempts: 3, backoff_secs: 0.05, max_wait_secs: 2}",
        )
        .env_remove("THREATLAKE_OTX_API_KEY");
    c
}

#[test]
fn virustotal_lookups_budget_cache_and_not_found() {
    let dir = common::scratch("vt");
    let fake = Fake::start(
        "x-apikey",
        Box::new(|url, key, n| {
            // The very first request is rate limited once.
            if n == 0 {
                return Reply {
                    retry_after: Some("0.2"),
                    ..Reply::raw(429, b"{}".to_vec())
                };
            }
            vt_routes(url, key)
        }),
    );
    let iocs = dir.join("iocs.txt");
    std::fs::write(
        &iocs,
        "# IOCs from a report\n020876E69DAC4B2CB5B75A616DBDAC8B913F3CC06FBABD8F8DD3277691BA48B6\ngithub.com\nunknown-domain.example\n=HYPERLINK(\"x\")\n",
    )
    .unwrap();
    let lookup = ["ingest", "vt", "--iocs", iocs.to_str().unwrap(), "1.1.1.1"];
    // Budget 4: the file costs 3 requests (+1 retried 429), so the domains wait for the next run.
    let (ok, out, err) = run(vt_cmd(&dir, &fake.base, 4).args(lookup));
    assert!(ok, "{err}");
    assert!(
        out.contains("1 looked up") && out.contains("3 deferred"),
        "{out}"
    );
    assert!(out.contains("1 input(s) are not a hash"), "{out}");
    let row = sql(
        &dir,
        "SELECT kind, found, threat_label, malicious > 0 AS bad, cardinality(sigma_hits) > 0 AS sigma FROM virustotal_data",
    );
    assert_eq!(
        row,
        "kind,found,threat_label,bad,sigma\nfile,true,hacktool.powershell,true,true\n"
    );
    assert_eq!(
        sql(&dir, "SELECT technique_id, sandbox, severity FROM virustotal_techniques ORDER BY 1, 2"),
        "technique_id,sandbox,severity\nT1055,Zenbox,HIGH\nT1059.001,behaviour_summary,IMPACT_SEVERITY_HIGH\nT1082,VirusTotal Jujubox,INFO\nT1082,behaviour_summary,IMPACT_SEVERITY_INFO\n"
    );

    // Next run (budget allows): the file is fresh in the lake (cache), the rest is looked up; the
    // unknown domain is recorded as not found.
    let before = fake.requests().len();
    let (ok, out, err) = run(vt_cmd(&dir, &fake.base, 100).args(lookup));
    assert!(ok, "{err}");
    assert!(
        out.contains("3 looked up (1 not found), 1 fresh in the lake"),
        "{out}"
    );
    assert_eq!(fake.requests().len() - before, 3);
    assert_eq!(
        sql(
            &dir,
            "SELECT kind, found, country FROM virustotal_data ORDER BY kind, observable"
        ),
        "kind,found,country\ndomain,true,\ndomain,false,\nfile,true,\nip,true,AU\n"
    );
    assert_eq!(
        sql(
            &dir,
            "SELECT count(*) AS n FROM threat_intelligence_data WHERE source = 'virustotal'"
        ),
        "n\n3\n"
    );
    assert_absent(&dir, VT_KEY);

    // Wrong key → clear error, key not shown, nothing lost.
    let (ok, _, err) = run(vt_cmd(&dir, &fake.base, 100)
        .env("THREATLAKE_VIRUSTOTAL_API_KEY", "nope-nope-42")
        .env("THREATLAKE_VIRUSTOTAL_CACHE_TTL_HOURS", "0")
        .args(["ingest", "vt", "8.8.8.8"]));
    assert!(!ok);
    assert!(
        err.contains("VirusTotal rejected the API key") && !err.contains("nope-nope-42"),
        "{err}"
    );
    assert_eq!(
        sql(&dir, "SELECT count(*) AS n FROM virustotal_data"),
        "n\n4\n"
    );
}

/// `run` end to end on an ICS lake: OTX pull, model build, mapping (model + source-stated), threat-model
/// snapshot; a second run after new intel, then `model diff`.
#[tokio::test(flavor = "multi_thread")]
async fn run_maps_intel_and_diffs_threat_models() {
    let dir = common::scratch("run");
    common::ingest(&dir, &["ics"]).await;
    let mut extra = json!({
        "id": "aa0000000000000000000001", "name": "=HYPERLINK(\"http://evil.example\") Water utility intrusion",
        "description": "The actor sent unauthorized command messages to the PLC over Modbus to change setpoints and used the engineering workstation to modify the controller program.",
        "author_name": "analyst", "created": "2026-11-01T10:00:00", "modified": "2026-11-01T10:00:00",
        "revision": 1, "tlp": "green", "tags": ["ics", "<script>alert(1)</script>"],
        "attack_ids": ["T0855"], "targeted_countries": ["United States"], "industries": ["Water"],
        "malware_families": [], "references": [], "adversary": "", "indicators": []
    });
    let pulses = Arc::new(Mutex::new(sample_pulses()));
    pulses.lock().unwrap().push(extra.clone());
    let fake = otx_fake(pulses.clone());
    let job = |args: &[&str]| {
        run(otx_cmd(&dir, &fake.base)
            .env("THREATLAKE_LAKE_MODELS", dir.join("models"))
            .env("THREATLAKE_MAPPING_DOMAIN", "ics")
            .args(args))
    };
    let (ok, out, err) = job(&["run"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("VirusTotal skipped: no API key"), "{out}");
    assert!(out.contains("7 new or revised pulse(s)"), "{out}");
    assert!(
        out.contains("map-intel: 7 item(s) mapped with model ics-"),
        "{out}"
    );
    // Source-stated techniques land with their ATT&CK name and tactic where the lake knows them
    // (only ICS is ingested here, so the Enterprise ids of the sample pulse keep no name).
    assert_eq!(
        sql(&dir, "SELECT item_id, technique_id, technique_name, tactic, score FROM mapped_threat_data WHERE method = 'source' ORDER BY 1, 2"),
        "item_id,technique_id,technique_name,tactic,score\n\
         otx:64e38336d783f91d6948a7b1,T1059,,,1.0\n\
         otx:64e38336d783f91d6948a7b1,T1531,,,1.0\n\
         otx:64e38336d783f91d6948a7b1,T1566,,,1.0\n\
         otx:aa0000000000000000000001,T0855,Unauthorized Command Message,impair-process-control,1.0\n"
    );
    // The model maps the ICS pulse's text to ICS techniques above the threshold.
    let model = sql(
        &dir,
        "SELECT technique_id FROM mapped_threat_data WHERE method = 'model' AND item_id = 'otx:aa0000000000000000000001' ORDER BY score DESC",
    );
    assert!(
        model.lines().count() > 1 && model.contains("T0855"),
        "{model}"
    );
    let tm = sql(
        &dir,
        "SELECT count(DISTINCT run_id) AS runs, max(score) AS top FROM threat_model",
    );
    assert_eq!(tm, "runs,top\n1,1.0\n");

    // Nothing new: map-intel maps nothing.
    let (ok, out, err) = job(&["map-intel"]);
    assert!(ok && out.contains("0 item(s) mapped"), "{out}{err}");

    // New intel about another technique; the second snapshot differs from the first.
    extra["id"] = json!("aa0000000000000000000002");
    extra["name"] = json!("Spearphishing against operators");
    extra["description"] = json!("Operators received spearphishing attachments; the payload then altered alarm settings to hide the intrusion.");
    extra["attack_ids"] = json!(["T0865", "T0838"]);
    extra["modified"] = json!("2026-11-20T10:00:00");
    pulses.lock().unwrap().push(extra);
    let (ok, out, err) = job(&["run"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("1 new or revised pulse(s)"), "{out}");
    let (ok, out, err) = job(&["model", "diff"]);
    assert!(ok, "{err}");
    // Both techniques the new pulse states gained evidence: each is new to the model or rising,
    // whatever the model inferred from the first run's text.
    let has = |change: &str, id: &str| out.lines().any(|l| l.starts_with(change) && l.contains(id));
    for id in ["T0838", "T0865"] {
        assert!(has("new", id) || has("rising", id), "{id}: {out}");
    }
    assert!(
        out.lines().any(|l| l.starts_with("fading")),
        "the first pulse's share shrank: {out}"
    );
    // Agreement of the model with what the ICS pulses state (T0855; T0865 and T0838).
    let (ok, out, err) = job(&["model", "eval", "--from-lake", "--domain", "ics"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("6 source-stated technique(s), 3 not in the model's domain"),
        "{out}"
    );
    let line = out.lines().find(|l| l.starts_with("agreement")).unwrap();
    let n: usize = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    // At least T0855 (the model ranks it, asserted above), at most the 3 in-domain statements.
    assert!((1..=3).contains(&n), "{out}");

    // Reports over this lake: every dataset, CSV neutralised, Navigator layers valid.
    let out_dir = dir.join("reports");
    let (ok, out, err) = job(&["report", "--out", out_dir.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    let index: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("index.json")).unwrap()).unwrap();
    let reports = index["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 9);
    assert!(
        reports.iter().all(|r| r["rows"].as_u64().unwrap() > 0),
        "{index}"
    );
    // With a model, the threat-cluster chart lays the mapped items out (a point per item).
    let clusters = reports
        .iter()
        .find(|r| r["name"] == "threat_clusters")
        .unwrap();
    assert!(clusters["chart_error"].is_null(), "{clusters}");
    let svg = std::fs::read_to_string(out_dir.join("threat_clusters.svg")).unwrap();
    let (points, rows) = (
        svg.matches("<circle").count(),
        clusters["rows"].as_u64().unwrap() as usize,
    );
    // A point per item plus one legend marker per cluster (2..=8 of them).
    assert!(
        points >= rows + 2 && points <= rows + 8,
        "{points} circles, {rows} rows"
    );
    assert!(out_dir.join("index.html").is_file() && out_dir.join("attack_matrix.pdf").is_file());
    let top = std::fs::read_to_string(out_dir.join("top_mapped_techniques.csv")).unwrap();
    assert!(top.contains("'=HYPERLINK"), "{top}");
    assert!(
        !top.lines().any(|l| l
            .split(',')
            .any(|c| c.trim_start_matches('"').starts_with('='))),
        "{top}"
    );
    let diff = std::fs::read_to_string(out_dir.join("threat_model_diff.csv")).unwrap();
    assert!(diff.lines().any(|l| l.starts_with("new,T0838,")), "{diff}");
    let layer: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("technique_frequency.layer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(layer["versions"]["layer"], "4.5");
    assert_eq!(layer["domain"], "ics-attack");
    let techniques = layer["techniques"].as_array().unwrap();
    assert!(techniques.len() > 3);
    assert!(techniques.iter().all(|t| {
        let id = t["techniqueID"].as_str().unwrap();
        id.len() >= 5 && id.starts_with('T') && t["score"].as_f64().unwrap() > 0.0
    }));
    let t0855 = techniques
        .iter()
        .find(|t| t["techniqueID"] == "T0855")
        .unwrap();
    assert_eq!(t0855["tactic"], "impair-process-control");
    // STIX 2.1 bundle: parses, ids are `type--uuid`, every reference resolves, T0855 is MITRE's object.
    let bundle: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("mapped_intel.stix.json")).unwrap())
            .unwrap();
    assert_eq!(bundle["type"], "bundle");
    let objects = bundle["objects"].as_array().unwrap();
    let ids: std::collections::HashSet<&str> =
        objects.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), objects.len(), "duplicate ids");
    for o in objects {
        let (ty, id) = (o["type"].as_str().unwrap(), o["id"].as_str().unwrap());
        let (prefix, uuid) = id.split_once("--").unwrap();
        assert_eq!(prefix, ty);
        assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{id}");
        assert_eq!(o["spec_version"], "2.1");
        assert!(o["created"].as_str().unwrap().ends_with('Z'));
        let mut refs: Vec<&str> = o["object_refs"]
            .as_array()
            .map(|a| a.iter().map(|r| r.as_str().unwrap()).collect())
            .unwrap_or_default();
        for k in ["source_ref", "target_ref", "created_by_ref"] {
            refs.extend(o[k].as_str());
        }
        for r in refs {
            assert!(ids.contains(r), "{id} refers to missing {r}");
        }
    }
    let reports = objects.iter().filter(|o| o["type"] == "report").count();
    assert_eq!(reports, 8, "one report per mapped item");
    let t0855 = objects
        .iter()
        .find(|o| {
            o["type"] == "attack-pattern" && o["external_references"][0]["external_id"] == "T0855"
        })
        .unwrap();
    assert!(t0855["id"]
        .as_str()
        .unwrap()
        .starts_with("attack-pattern--"));
    // A dataset without technique ids gets no layer.
    assert!(!out_dir.join("threats_over_time.layer.json").exists());
    let (ok, _, err) = job(&["report", "nope"]);
    assert!(
        !ok && err.contains("known reports: technique_frequency"),
        "{err}"
    );

    // A report pasted into a pulse is mapped sentence by sentence (map_report): with one technique
    // per text (top_k 1) it still gets every technique its sentences describe.
    let report = "In March the actor gained access to the utility network through a spearphishing attachment sent to an engineer, and a remote access tool was installed on the engineering workstation. \
        From the engineering workstation the actor sent unauthorized command messages to the PLC over Modbus to change the setpoints of the chlorine pumps.\n\n\
        The actor then downloaded a modified program to the controller, replacing the logic that limits the pump speed. \
        To hide the intrusion, the malware suppressed alarms on the HMI and spoofed reporting messages so that operators saw normal values on their screens.\n\n\
        The operators lost view of the process for several hours, and the plant was stopped manually to restore safe operation. \
        Before the attack the actor had collected project files from the engineering workstation and the data historian, which describe the controller logic and the network layout. \
        The same actor also brute forced the default credentials of the remote terminal units and switched the controllers into program mode so that the new logic could be written.";
    let long = json!({
        "id": "aa0000000000000000000003", "name": "Incident report", "description": report,
        "author_name": "analyst", "created": "2026-11-25T10:00:00", "modified": "2026-11-25T10:00:00",
        "revision": 1, "tlp": "green", "tags": [], "attack_ids": [], "targeted_countries": [],
        "industries": [], "malware_families": [], "references": [], "adversary": "", "indicators": []
    });
    pulses.lock().unwrap().push(long);
    let (ok, out, err) = run(otx_cmd(&dir, &fake.base)
        .env("THREATLAKE_LAKE_MODELS", dir.join("models"))
        .env("THREATLAKE_MAPPING_DOMAIN", "ics")
        .env("THREATLAKE_MAPPING_TOP_K", "1")
        .args(["run"]));
    assert!(ok, "{out}\n{err}");
    let item = "item_id = 'otx:aa0000000000000000000003'";
    assert_eq!(
        sql(&dir, &format!("SELECT character_length(text) > {} AS long FROM threat_intelligence_data WHERE {item}", threatlake::feeds::intel::REPORT_CHARS)),
        "long\ntrue\n"
    );
    let mapped = sql(
        &dir,
        &format!("SELECT technique_id FROM mapped_threat_data WHERE method = 'model' AND {item} ORDER BY 1"),
    );
    let q = format!("SELECT x['technique_id'] AS technique_id FROM (SELECT unnest(map_report(text)) AS x FROM threat_intelligence_data WHERE {item}) r ORDER BY 1");
    let (ok, found, err) = job(&["sql", "--format", "csv", "--quiet", "-c", &q]);
    assert!(ok, "{err}");
    assert_eq!(mapped, found);
    assert!(
        mapped.lines().count() > 3 && mapped.contains("T0855"),
        "{mapped}"
    );
    // A model an older threatlake built (another model format) is built again, not loaded.
    let model_dir = std::fs::read_dir(dir.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").is_file())
        .expect("the run built a model");
    let manifest = |dir: &std::path::Path| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let mut old = manifest(&model_dir);
    let format = old["format"].as_u64().unwrap();
    old["format"] = json!(format - 1);
    std::fs::write(model_dir.join("manifest.json"), old.to_string()).unwrap();
    let (ok, out, err) = job(&["run"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("was built by an older threatlake") && out.contains("building a new model"),
        "{out}"
    );
    assert_eq!(manifest(&model_dir)["format"].as_u64(), Some(format));
}

/// `run --offline --samples`: the shipped sample responses go through the same parsers, no network,
/// and a second run adds nothing; without ATT&CK, --offline says what to do.
#[tokio::test(flavor = "multi_thread")]
async fn offline_run_with_the_shipped_samples() {
    let dir = common::scratch("offline");
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let job = |args: &[&str]| {
        let mut c = common::cli_on(&dir);
        c.env("THREATLAKE_LAKE_MODELS", dir.join("models"))
            .env("THREATLAKE_MAPPING_DOMAIN", "ics")
            .env("THREATLAKE_OTX_API_KEY", KEY)
            .env("THREATLAKE_OTX_BASE_URL", "http://127.0.0.1:9")
            .args(args);
        if args[0] == "run" {
            c.args(["--samples-dir", samples.to_str().unwrap()]);
        }
        run(&mut c)
    };
    let (ok, _, err) = job(&["run", "--offline", "--samples"]);
    assert!(
        !ok && err.contains("threatlake ingest attack --from"),
        "{err}"
    );
    common::ingest(&dir, &["ics"]).await;
    let (ok, out, err) = job(&["run", "--offline", "--samples"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("samples: 3 new or revised pulse(s) from 1 OTX file(s), 3 VirusTotal report(s), 3 sandbox technique row(s)"),
        "{out}"
    );
    assert!(
        out.contains("OTX: offline, not contacted")
            && out.contains("VirusTotal: offline, not contacted"),
        "{out}"
    );
    assert_eq!(
        sql(&dir, "SELECT source, kind, count(*) AS n FROM threat_intelligence_data GROUP BY 1, 2 ORDER BY 1, 2"),
        "source,kind,n\notx,pulse,3\nvirustotal,domain,1\nvirustotal,file,1\nvirustotal,ip,1\n"
    );
    assert_eq!(
        sql(
            &dir,
            "SELECT country, asn FROM virustotal_data WHERE kind = 'ip'"
        ),
        "country,asn\nNL,64500\n"
    );
    let (ok, out, err) = job(&["run", "--offline", "--samples"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "samples: 0 new or revised pulse(s) from 1 OTX file(s), 0 VirusTotal report(s)"
        ),
        "{out}"
    );
    assert!(out.contains("0 item(s) mapped"), "{out}");
    assert_eq!(
        sql(&dir, "SELECT count(*) AS n FROM otx_pulse_log"),
        "n\n3\n"
    );
    // The samples state Enterprise techniques; this ICS model knows none of them, and says so.
    let (ok, _, err) = job(&["model", "eval", "--from-lake", "--domain", "ics"]);
    assert!(
        !ok && err.contains("no feed items with source-stated techniques"),
        "{err}"
    );
}

/// `map-intel` commits `mapping.items_per_commit` items at a time (their evidence, then the
/// items): an item per commit maps exactly what one commit for all does.
#[test]
fn map_intel_in_commits_of_one_item_maps_what_one_commit_does() {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let prep = common::scratch("intel-commits-prep");
    let (ok, _, err) = run(common::cli_on(&prep)
        .args(["ingest", "attack", "--domain", "ics", "--from"])
        .arg(common::bundle("ics")));
    assert!(ok, "{err}");
    let (ok, _, err) = run(common::cli_on(&prep)
        .env("THREATLAKE_LAKE_MODELS", prep.join("models"))
        .args(["model", "build", "--domain", "ics", "--no-pretrained"]));
    assert!(ok, "{err}");
    let mapped = |per_commit: &str| {
        let dir = common::scratch(&format!("intel-commits-{per_commit}"));
        common::copy_dir(&prep, &dir);
        let (ok, out, err) = run(common::cli_on(&dir)
            .env("THREATLAKE_LAKE_MODELS", dir.join("models"))
            .env("THREATLAKE_MAPPING_DOMAIN", "ics")
            .env("THREATLAKE_MAPPING_ITEMS_PER_COMMIT", per_commit)
            .env("THREATLAKE_OTX_API_KEY", KEY)
            .env("THREATLAKE_OTX_BASE_URL", "http://127.0.0.1:9")
            .args(["run", "--offline", "--samples", "--samples-dir"])
            .arg(&samples));
        assert!(ok, "{out}\n{err}");
        let evidence = sql(
            &dir,
            "SELECT item_id, technique_id, method, round(score, 6) AS score FROM mapped_threat_data ORDER BY 1, 2, 3",
        );
        let items = sql(
            &dir,
            "SELECT item_id, techniques FROM mapped_items ORDER BY 1",
        );
        let files = walk(&dir.join("lake/mapped_items"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count();
        (evidence, items, files)
    };
    let (evidence, items, files) = mapped("10000");
    let (evidence_1, items_1, files_1) = mapped("1");
    let n = items.lines().count() - 1;
    assert!(n >= 6, "{items}");
    assert!(
        evidence.contains(",model,") && evidence.contains(",source,"),
        "{evidence}"
    );
    assert_eq!(evidence, evidence_1);
    assert_eq!(items, items_1);
    // One commit (one file) for all the items, against one per item.
    assert_eq!((files, files_1), (1, n));
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
