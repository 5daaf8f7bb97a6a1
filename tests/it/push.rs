//! `threatlake push` against real receivers where one installs here — osmem-server (an
//! OpenSearch-API server) for Elastic `_bulk`, rsyslogd over TCP, UDP and TLS for CEF/LEEF — and
//! loopback servers speaking the documented Splunk HEC, TheHive 5, Sentinel upload and webhook
//! protocols, with their error answers. Each receiver counts what it holds, so "exactly once" is
//! checked at the receiver, across target outages and a `kill -9` mid-push.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

/// An OTX pulse whose every field is hostile: CEF/LEEF delimiters, escapes, line breaks, markup.
const HOSTILE_TITLE: &str =
    "Evil|Pulse=1 act=blocked \\ CEF:0|x|y|z\nsecond line\tcol <script>alert(1)</script> \"q\" '";

fn hostile_samples() -> PathBuf {
    let dir = common::scratch("push-samples");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    common::copy_dir(&src, &dir);
    let pulse = serde_json::json!({
        "count": 1, "next": null, "previous": null,
        "results": [{
            "id": "aaaaaaaaaaaaaaaaaaaaaaaa", "name": HOSTILE_TITLE,
            "description": "The implant runs PowerShell scripts and modifies the control logic of the PLC.\r\nact=blocked",
            "author_name": "x", "created": "2026-10-05T08:00:00.000000", "modified": "2026-10-05T09:00:00.000000",
            "revision": 1, "tlp": "white", "public": 1, "adversary": "Group|=x", "tags": ["a|b", "c=d"],
            "references": [], "targeted_countries": ["Germany"], "industries": [], "malware_families": ["fam\\ily"],
            "attack_ids": ["T0853"],
            "indicators": [
                {"id": 4200000001_u64, "indicator": "evil.example", "type": "domain", "created": "2026-10-05T08:00:00", "title": "", "description": "", "expiration": null, "is_active": 1, "role": null},
                {"id": 4200000002_u64, "indicator": "198.51.100.7", "type": "IPv4", "created": "2026-10-05T08:00:00", "title": "", "description": "", "expiration": null, "is_active": 1, "role": null},
                {"id": 4200000003_u64, "indicator": "http://evil.example/a?b=c|d'e", "type": "URL", "created": "2026-10-05T08:00:00", "title": "", "description": "", "expiration": null, "is_active": 1, "role": null}
            ]
        }]
    });
    std::fs::write(
        dir.join("otx/zz_hostile.json"),
        serde_json::to_vec(&pulse).unwrap(),
    )
    .unwrap();
    dir
}

/// ICS ATT&CK, an ICS model, the sample intel plus the hostile pulse mapped; copied per test.
fn base_lake() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        std::thread::spawn(|| {
            let dir = common::scratch("push-base");
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(common::ingest(&dir, &["ics"]));
            let (ok, out, err) =
                common::run(common::ics_cli_on(&dir).args(["model", "build", "--domain", "ics"]));
            assert!(ok, "{out}\n{err}");
            let samples = hostile_samples();
            common::run_samples(&mut common::ics_cli_on(&dir), &samples);
            dir
        })
        .join()
        .unwrap()
    })
}

fn lake(name: &str) -> PathBuf {
    let dir = common::scratch(name);
    common::copy_dir(base_lake(), &dir);
    dir
}

/// The current mappings a target without filters receives: (item_id, technique_id, method).
fn expected(dir: &Path) -> BTreeSet<(String, String, String)> {
    common::sql(
        dir,
        "SELECT DISTINCT m.item_id, m.technique_id, m.method FROM mapped_threat_data m \
         JOIN threat_intelligence_data t ON t.item_id = m.item_id AND t.item_version = m.item_version",
    )
    .lines()
    .skip(1)
    .map(|l| {
        // item ids hold no commas; the CSV writer quotes nothing else here.
        let f: Vec<&str> = l.rsplitn(3, ',').collect();
        (f[2].to_string(), f[1].to_string(), f[0].to_string())
    })
    .collect()
}

/// Settings: the shipped defaults with these `integrations:`.
fn settings(dir: &Path, integrations: &str) -> PathBuf {
    let base =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/settings.yaml"))
            .unwrap();
    let text = base.replace(
        "integrations: []",
        &format!("integrations:\n{integrations}"),
    );
    assert_ne!(text, base);
    let p = dir.join("settings.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn push(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut c = common::ics_cli_on(dir);
    c.args([
        "--config",
        dir.join("settings.yaml").to_str().unwrap(),
        "push",
    ])
    .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    common::run(&mut c)
}

/// The push table's row of `target`: (queued, delivered, failed, dead, waiting).
fn counts(out: &str, target: &str) -> [usize; 5] {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(target))
        .unwrap_or_else(|| panic!("no row for {target} in:\n{out}"));
    let n: Vec<usize> = line
        .split_whitespace()
        .skip(2)
        .map(|x| x.parse().unwrap())
        .collect();
    [n[0], n[1], n[2], n[3], n[4]]
}

fn outbox(dir: &Path, target: &str) -> BTreeMap<String, usize> {
    let csv = common::sql(
        dir,
        &format!(
            "SELECT status, count(*) FROM integration_outbox WHERE target = '{target}' GROUP BY 1"
        ),
    );
    csv.lines()
        .skip(1)
        .map(|l| {
            let (s, n) = l.split_once(',').unwrap();
            (s.to_string(), n.parse().unwrap())
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// osmem-server on a loopback port; killed on drop.
struct Osmem {
    child: Child,
    url: String,
}

impl Osmem {
    fn start(port: u16) -> Osmem {
        let bin = Command::new("python3")
            .args([
                "-c",
                "import osmem_server; print(osmem_server.resolve_binary())",
            ])
            .output()
            .expect("python3");
        assert!(
            bin.status.success(),
            "osmem-server is not installed (pip install osmem-server): {}",
            String::from_utf8_lossy(&bin.stderr)
        );
        let bin = String::from_utf8(bin.stdout).unwrap().trim().to_string();
        let mut child = Command::new(bin)
            .args(["-addr", &format!("127.0.0.1:{port}"), "-no-stdin-watch"])
            .args(["-parent-pid", &std::process::id().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: Value = serde_json::from_str(&line).expect("osmem-server's start line");
        Osmem {
            child,
            url: info["url"].as_str().unwrap().to_string(),
        }
    }

    fn get(&self, path: &str) -> Value {
        http_json("GET", &format!("{}/{path}", self.url), None)
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_json(method: &str, url: &str, body: Option<&Value>) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut r = reqwest::Client::new().request(method.parse().unwrap(), url);
        if let Some(b) = body {
            r = r.json(b);
        }
        r.send().await.unwrap().json().await.unwrap()
    })
}

#[test]
fn elastic_documents_are_ecs_typed_by_the_template_and_a_second_push_adds_nothing() {
    let os = Osmem::start(0);
    let dir = lake("push-elastic");
    let want = expected(&dir);
    assert!(want.len() > 10, "{want:?}");
    settings(
        &dir,
        &format!("  - {{name: soc-elastic, kind: elastic, url: '{}', index: threatlake-ti, batch_size: 7}}\n", os.url),
    );
    let (ok, out, err) = push(&dir, &[], &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(
        counts(&out, "soc-elastic"),
        [want.len(), want.len(), 0, 0, 0]
    );
    assert_eq!(os.get("threatlake-ti/_count")["count"], want.len());

    // Typed per the installed template, not by guessing.
    let m = os.get("threatlake-ti/_mapping");
    let p = &m["threatlake-ti"]["mappings"]["properties"];
    assert_eq!(
        p["threat"]["properties"]["technique"]["properties"]["id"]["type"],
        "keyword"
    );
    assert_eq!(p["threatlake"]["properties"]["score"]["type"], "float");
    assert_eq!(
        p["threat"]["properties"]["indicator"]["properties"]["ip"]["type"],
        "ip"
    );
    assert_eq!(p["@timestamp"]["type"], "date");

    // Every mapping is there once, as ECS, with its idempotency key as _id.
    let hits = http_json(
        "POST",
        &format!("{}/threatlake-ti/_search", os.url),
        Some(&serde_json::json!({"size": 1000, "query": {"match_all": {}}})),
    );
    let docs: Vec<&Value> = hits["hits"]["hits"].as_array().unwrap().iter().collect();
    let got: BTreeSet<(String, String, String)> = docs
        .iter()
        .map(|h| {
            let s = &h["_source"];
            let t = &s["threat"]["technique"];
            let id = t["subtechnique"]["id"][0]
                .as_str()
                .or(t["id"][0].as_str())
                .unwrap();
            (
                s["threatlake"]["item_id"].as_str().unwrap().to_string(),
                id.to_string(),
                s["threatlake"]["method"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);
    for h in &docs {
        let s = &h["_source"];
        assert_eq!(s["event"]["kind"], "enrichment");
        assert_eq!(s["threat"]["framework"], "MITRE ATT&CK");
        assert_eq!(h["_id"], s["event"]["id"]);
        for id in s["threat"]["tactic"]["id"].as_array().unwrap() {
            assert!(id.as_str().unwrap().starts_with("TA0"), "{s}");
        }
    }
    // Techniques of the lake's release carry their tactics (source-stated ids of another domain
    // have none).
    let with_tactics = docs
        .iter()
        .filter(|h| h["_source"]["threat"]["tactic"]["id"][0].is_string())
        .count();
    assert!(
        with_tactics * 2 > docs.len(),
        "{with_tactics} of {}",
        docs.len()
    );
    // The hostile pulse arrives intact (JSON-escaped on the wire, equal after parsing), with its
    // observables as ECS indicator fields.
    let evil = docs
        .iter()
        .find(|h| h["_source"]["threatlake"]["title"] == HOSTILE_TITLE)
        .expect("the hostile item");
    let ind = &evil["_source"]["threat"]["indicator"];
    assert_eq!(ind["ip"][0], "198.51.100.7");
    assert_eq!(ind["domain"][0], "evil.example");
    assert_eq!(ind["url"]["full"][0], "http://evil.example/a?b=c|d'e");

    // A second push sends nothing; the receiver still holds each mapping once.
    let (ok, out, err) = push(&dir, &[], &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(counts(&out, "soc-elastic"), [0, 0, 0, 0, 0]);
    assert_eq!(os.get("threatlake-ti/_count")["count"], want.len());
    assert_eq!(
        outbox(&dir, "soc-elastic"),
        BTreeMap::from([("delivered".to_string(), want.len())])
    );
}

#[test]
fn a_target_down_keeps_its_rows_and_a_kill_mid_push_still_delivers_each_mapping_once() {
    let dir = lake("push-faults");
    let want = expected(&dir).len();
    let port = free_port();
    settings(
        &dir,
        &format!(
            "  - {{name: es, kind: elastic, url: 'http://127.0.0.1:{port}', index: ti-faults, batch_size: 5, retries: 2, backoff_secs: 0.1}}\n"
        ),
    );
    // Down: every row stays queued untouched (the first contact, the template, failed); the command
    // says so and fails.
    let (ok, out, err) = push(&dir, &[], &[]);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("es:") && err.contains("could not connect"),
        "{err}"
    );
    assert_eq!(counts(&out, "es"), [want, 0, 0, 0, want]);
    assert_eq!(
        outbox(&dir, "es"),
        BTreeMap::from([("pending".to_string(), want)])
    );

    // Which write records the outcomes: traced on a copy of the lake pushing to a second server.
    let os = Osmem::start(port);
    let scratch_server = Osmem::start(0);
    let copy = common::scratch("push-faults-trace");
    common::copy_dir(&dir, &copy);
    let text = std::fs::read_to_string(copy.join("settings.yaml"))
        .unwrap()
        .replace(&format!("http://127.0.0.1:{port}"), &scratch_server.url);
    std::fs::write(copy.join("settings.yaml"), text).unwrap();
    let (ok, _, trace) = push(&copy, &[("THREATLAKE_TEST_ABORT_AT_WRITE", "trace")], &[]);
    assert!(ok, "{trace}");
    let n: usize = trace
        .lines()
        .find(|l| l.starts_with("write ") && l.contains("integration_outbox_log"))
        .and_then(|l| l["write ".len()..].split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no outbox write in the trace:\n{trace}"));

    // Up, and killed (as kill -9) at that write: the receiver has the documents, the outbox does
    // not know it.
    let (ok, _, err) = push(
        &dir,
        &[("THREATLAKE_TEST_ABORT_AT_WRITE", &n.to_string())],
        &[],
    );
    assert!(!ok && err.contains("aborting at write"), "{err}");
    assert_eq!(
        os.get("ti-faults/_count")["count"],
        want,
        "delivered before the kill"
    );
    assert_eq!(
        outbox(&dir, "es"),
        BTreeMap::from([("pending".to_string(), want)])
    );
    // Again: everything is sent again, the receiver recognises every _id, nothing is doubled.
    let (ok, out, err) = push(&dir, &[], &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(counts(&out, "es")[1], want);
    assert_eq!(os.get("ti-faults/_count")["count"], want);
    assert_eq!(
        outbox(&dir, "es"),
        BTreeMap::from([("delivered".to_string(), want)])
    );
}

/// A loopback HTTP receiver: `handle(method, path, headers, body) -> (status, extra headers, body)`.
struct Loopback {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    url: String,
}

type Handler = dyn Fn(&str, &str, &BTreeMap<String, String>, &[u8]) -> (u16, Vec<(String, String)>, String)
    + Send
    + Sync;

impl Loopback {
    fn start(handle: Box<Handler>) -> Loopback {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let s = server.clone();
        let thread = std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = Vec::new();
                let _ = req.as_reader().read_to_end(&mut body);
                let headers: BTreeMap<String, String> = req
                    .headers()
                    .iter()
                    .map(|h| {
                        (
                            h.field.as_str().as_str().to_ascii_lowercase(),
                            h.value.to_string(),
                        )
                    })
                    .collect();
                let (status, extra, text) =
                    handle(req.method().as_str(), req.url(), &headers, &body);
                let mut resp = tiny_http::Response::from_string(text).with_status_code(status);
                resp.add_header(
                    tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap(),
                );
                for (k, v) in extra {
                    resp.add_header(tiny_http::Header::from_bytes(k, v).unwrap());
                }
                let _ = req.respond(resp);
            }
        });
        Loopback {
            server,
            thread: Some(thread),
            url,
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn splunk_hec_batches_with_indexer_acknowledgement_through_busy_answers() {
    let dir = lake("push-splunk");
    let want = expected(&dir);
    // HEC: 503 "server busy" once, then events with an ackId; acks are pending on the first poll.
    let held: Arc<Mutex<Vec<Value>>> = Arc::default();
    let calls: Arc<Mutex<(usize, usize)>> = Arc::default();
    let (h, c) = (held.clone(), calls.clone());
    let hec = Loopback::start(Box::new(move |_m, path, headers, body| {
        assert_eq!(
            headers.get("authorization").map(String::as_str),
            Some("Splunk hec-token-1")
        );
        assert!(
            headers.contains_key("x-splunk-request-channel"),
            "{headers:?}"
        );
        let mut c = c.lock().unwrap();
        if path == "/services/collector/event" {
            c.0 += 1;
            if c.0 == 1 {
                return (503, vec![], r#"{"text":"Server is busy","code":9}"#.into());
            }
            let text = String::from_utf8(body.to_vec()).unwrap();
            let events: Vec<Value> = serde_json::Deserializer::from_str(&text)
                .into_iter::<Value>()
                .map(Result::unwrap)
                .collect();
            h.lock().unwrap().extend(events);
            return (
                200,
                vec![],
                format!(r#"{{"text":"Success","code":0,"ackId":{}}}"#, c.0),
            );
        }
        assert_eq!(path, "/services/collector/ack");
        c.1 += 1;
        let v: Value = serde_json::from_slice(body).unwrap();
        let id = v["acks"][0].as_u64().unwrap();
        (
            200,
            vec![],
            format!(r#"{{"acks":{{"{id}":{}}}}}"#, c.1 % 2 == 0),
        )
    }));
    settings(
        &dir,
        &format!("  - {{name: hec, kind: splunk_hec, url: '{}', secret_env: THREATLAKE_TEST_HEC, ack: true, batch_size: 10, backoff_secs: 0.1}}\n", hec.url),
    );
    let (ok, out, err) = push(&dir, &[("THREATLAKE_TEST_HEC", "hec-token-1")], &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(counts(&out, "hec")[1], want.len());
    let events = held.lock().unwrap().clone();
    assert_eq!(events.len(), want.len());
    for e in &events {
        assert_eq!(e["sourcetype"], "threatlake:mapping");
        let ev = &e["event"];
        assert_eq!(ev["annotations"]["mitre_attack"][0], ev["technique_id"]);
        assert!(e["time"].as_f64().unwrap() > 1.7e9);
    }
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "an event was sent twice");
    // The token never reaches the output or the outbox.
    assert!(!out.contains("hec-token-1") && !err.contains("hec-token-1"));
    let lake_text = common::sql(&dir, "SELECT * FROM integration_outbox");
    assert!(!lake_text.contains("hec-token-1"));
}

#[test]
fn thehive_gets_one_alert_per_item_with_ttps_and_a_resend_is_refused_as_duplicate() {
    let dir = lake("push-thehive");
    let want = expected(&dir);
    let items: BTreeSet<&String> = want.iter().map(|w| &w.0).collect();
    let alerts: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let a = alerts.clone();
    let hive = Loopback::start(Box::new(move |m, path, headers, body| {
        assert_eq!((m, path), ("POST", "/api/v1/alert"));
        assert_eq!(
            headers.get("authorization").map(String::as_str),
            Some("Bearer hive-key")
        );
        let v: Value = serde_json::from_slice(body).unwrap();
        let key = v["sourceRef"].as_str().unwrap().to_string();
        let mut a = a.lock().unwrap();
        if a.contains_key(&key) {
            // TheHive's answer to a second alert with the same type, source and sourceRef.
            return (
                400,
                vec![],
                format!(
                    r#"{{"type":"CreateError","message":"Alert with sourceRef {key} already exists"}}"#
                ),
            );
        }
        a.insert(key, v);
        (201, vec![], r#"{"_id":"~1"}"#.into())
    }));
    settings(
        &dir,
        &format!("  - {{name: hive, kind: thehive, url: '{}', secret_env: THREATLAKE_TEST_HIVE, batch_size: 3}}\n", hive.url),
    );
    let env = [("THREATLAKE_TEST_HIVE", "hive-key")];
    let (ok, out, err) = push(&dir, &env, &[]);
    assert!(ok, "{out}\n{err}");
    let held = alerts.lock().unwrap().clone();
    assert_eq!(held.len(), items.len(), "one alert per item");
    let procedures: usize = held
        .values()
        .map(|a| a["procedures"].as_array().unwrap().len())
        .sum();
    assert_eq!(procedures, want.len(), "every mapping is a TTP");
    let evil = held
        .values()
        .find(|a| a["title"] == HOSTILE_TITLE)
        .expect("hostile alert");
    let d = evil["description"].as_str().unwrap();
    assert!(!d.contains("<script>") && d.contains("\\<script\\>"), "{d}");
    assert!(evil["observables"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["dataType"] == "ip" && o["data"] == "198.51.100.7"));
    assert!(evil["procedures"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["patternId"].as_str().unwrap().starts_with('T')));

    // Forget the deliveries (as after a lost outbox write): a resend makes no second alert.
    std::fs::remove_dir_all(dir.join("lake/integration_outbox_log")).unwrap();
    let (ok, out, err) = push(&dir, &env, &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(
        counts(&out, "hive")[1],
        want.len(),
        "duplicates count as delivered"
    );
    assert_eq!(alerts.lock().unwrap().len(), items.len());
}

#[test]
fn sentinel_uploads_stix_with_a_client_credentials_token_and_per_record_errors_dead_letter() {
    let dir = lake("push-sentinel");
    let want = expected(&dir);
    let objects: Arc<Mutex<Vec<Value>>> = Arc::default();
    let o = objects.clone();
    let ms = Loopback::start(Box::new(move |m, path, headers, body| {
        if path == "/tenant-1/oauth2/v2.0/token" {
            let form = String::from_utf8(body.to_vec()).unwrap();
            assert!(form.contains("grant_type=client_credentials"), "{form}");
            assert!(form.contains("client_secret=entra-secret"), "{form}");
            return (
                200,
                vec![],
                r#"{"token_type":"Bearer","expires_in":3599,"access_token":"tok-1"}"#.into(),
            );
        }
        assert_eq!(m, "POST");
        assert_eq!(
            path,
            "/workspaces/ws-1/threat-intelligence-stix-objects:upload?api-version=2024-02-01-preview"
        );
        assert_eq!(
            headers.get("authorization").map(String::as_str),
            Some("Bearer tok-1")
        );
        let v: Value = serde_json::from_slice(body).unwrap();
        let objs = v["stixobjects"].as_array().unwrap();
        assert!(objs.len() <= 100, "{} objects in one request", objs.len());
        assert_eq!(v["sourcesystem"], "threatlake");
        // The receiver refuses the hostile pulse's URL indicator (index reported), accepts the rest.
        let mut errors = vec![];
        for (i, ob) in objs.iter().enumerate() {
            if ob["type"] == "indicator"
                && ob["pattern"]
                    .as_str()
                    .unwrap()
                    .starts_with("[url:value = 'http://evil.example/a")
            {
                errors.push(serde_json::json!({"recordIndex": i, "errorMessages": ["URL indicators are not accepted"]}));
            } else {
                o.lock().unwrap().push(ob.clone());
            }
        }
        (
            200,
            vec![],
            serde_json::json!({"errors": errors}).to_string(),
        )
    }));
    settings(
        &dir,
        &format!(
            "  - {{name: sentinel, kind: sentinel, url: '{u}', token_url: '{u}/tenant-1/oauth2/v2.0/token', tenant_id: tenant-1, client_id: app-1, workspace_id: ws-1, secret_env: THREATLAKE_TEST_ENTRA, batch_size: 40}}\n",
            u = ms.url
        ),
    );
    let (ok, out, err) = push(&dir, &[("THREATLAKE_TEST_ENTRA", "entra-secret")], &[]);
    assert!(ok, "{out}\n{err}");
    let held = objects.lock().unwrap().clone();
    // The hostile pulse's mappings carry the URL indicator: those records are dead-lettered.
    let hostile: usize = want
        .iter()
        .filter(|w| w.0 == "otx:aaaaaaaaaaaaaaaaaaaaaaaa")
        .count();
    assert!(hostile > 0);
    assert_eq!(
        counts(&out, "sentinel"),
        [want.len(), want.len() - hostile, 0, hostile, 0]
    );
    let ob = outbox(&dir, "sentinel");
    assert_eq!(ob.get("dead"), Some(&hostile));
    let errors = common::sql(
        &dir,
        "SELECT DISTINCT last_error FROM integration_outbox WHERE status = 'dead'",
    );
    assert!(
        errors.contains("URL indicators are not accepted"),
        "{errors}"
    );
    // Patterns escape hostile values; ids are deterministic STIX ids; every object checks out.
    assert!(held
        .iter()
        .any(|o| o["pattern"] == "[ipv4-addr:value = '198.51.100.7']"));
    for o in &held {
        let id = o["id"].as_str().unwrap();
        assert!(
            id.starts_with(&format!("{}--", o["type"].as_str().unwrap())),
            "{o}"
        );
    }
    let unique: BTreeMap<String, Value> = held
        .iter()
        .map(|o| (o["id"].as_str().unwrap().to_string(), o.clone()))
        .collect();
    let dir_out = dir.join("sentinel.json");
    let bundle = serde_json::json!({
        "type": "bundle", "id": "bundle--8f7e6d5c-4b3a-4291-8e7f-6d5c4b3a2910",
        "objects": unique.values().collect::<Vec<_>>()
    });
    std::fs::write(&dir_out, serde_json::to_vec(&bundle).unwrap()).unwrap();
    common::assert_valid_stix(&dir_out);
}

#[test]
fn webhooks_are_signed_honour_retry_after_and_dead_letter_until_retried() {
    let dir = lake("push-webhook");
    let want = expected(&dir);
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mode: Arc<Mutex<&'static str>> = Arc::new(Mutex::new("throttle-once"));
    let (r, m) = (received.clone(), mode.clone());
    let hook = Loopback::start(Box::new(move |_m, _p, headers, body| {
        // The receiver's check: HMAC-SHA256 over "<timestamp>.<body>", timestamp fresh.
        use hmac::Mac;
        let ts = headers["x-threatlake-timestamp"].parse::<i64>().unwrap();
        assert!(
            (chrono::Utc::now().timestamp() - ts).abs() < 300,
            "stale timestamp"
        );
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-key").unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        let sig = headers["x-threatlake-signature"]
            .strip_prefix("sha256=")
            .unwrap()
            .to_string();
        let want_sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sig, want_sig, "bad signature");
        let mut m = m.lock().unwrap();
        match *m {
            "throttle-once" => {
                *m = "ok";
                (429, vec![("Retry-After".into(), "1".into())], "{}".into())
            }
            "refuse" => (
                422,
                vec![],
                r#"{"error":"playbook rejects this shape"}"#.into(),
            ),
            _ => {
                let v: Value = serde_json::from_slice(body).unwrap();
                r.lock()
                    .unwrap()
                    .extend(v["events"].as_array().unwrap().iter().cloned());
                (202, vec![], "{}".into())
            }
        }
    }));
    settings(
        &dir,
        &format!("  - {{name: soar, kind: webhook, url: '{}/hooks/tl', secret_env: THREATLAKE_TEST_HOOK, batch_size: 4, max_attempts: 2}}\n", hook.url),
    );
    let env = [("THREATLAKE_TEST_HOOK", "hook-key")];
    let t = Instant::now();
    let (ok, out, err) = push(&dir, &env, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(received.lock().unwrap().len(), want.len());
    let evil = received
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["title"] == HOSTILE_TITLE)
        .cloned()
        .expect("hostile event");
    assert_eq!(evil["observables"].as_array().unwrap().len(), 3);

    // A receiver that refuses: rows go to dead-letter at once; --retry-dead sends them again.
    *mode.lock().unwrap() = "refuse";
    std::fs::remove_dir_all(dir.join("lake/integration_outbox_log")).unwrap();
    received.lock().unwrap().clear();
    let (ok, out, err) = push(&dir, &env, &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(counts(&out, "soar"), [want.len(), 0, 0, want.len(), 0]);
    *mode.lock().unwrap() = "ok";
    let (ok, out, err) = push(&dir, &env, &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(
        counts(&out, "soar"),
        [0, 0, 0, 0, 0],
        "dead rows wait for --retry-dead"
    );
    let (ok, out, err) = push(&dir, &env, &["--retry-dead"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(counts(&out, "soar")[1], want.len());
    assert!(
        out.contains(&format!("{} dead-letter row(s) queued again", want.len())),
        "{out}"
    );
    assert_eq!(received.lock().unwrap().len(), want.len());
}

/// rsyslogd receiving on TCP (octet counting), UDP and TLS; writes each message body to a file.
struct Rsyslog {
    child: Child,
    dir: PathBuf,
    ports: [u16; 3],
}

impl Rsyslog {
    fn start(dir: &Path) -> Rsyslog {
        let d = dir.join("rsyslog");
        std::fs::create_dir_all(&d).unwrap();
        let (ca, _, _) = common::throwaway_tls(&d);
        assert!(ca.is_file());
        let ports = [free_port(), free_port(), free_port()];
        let p = d.display();
        let conf = format!(
            r#"global(workDirectory="{p}" maxMessageSize="64k" parser.escapeControlCharacterTab="off"
       DefaultNetstreamDriverCAFile="{p}/ca.pem" DefaultNetstreamDriverCertFile="{p}/cert.pem"
       DefaultNetstreamDriverKeyFile="{p}/key.pem")
module(load="imtcp")
module(load="imudp")
template(name="body" type="string" string="%msg%\n")
ruleset(name="tcp") {{ action(type="omfile" file="{p}/tcp.log" template="body") }}
ruleset(name="tls") {{ action(type="omfile" file="{p}/tls.log" template="body") }}
ruleset(name="udp") {{ action(type="omfile" file="{p}/udp.log" template="body") }}
input(type="imtcp" port="{}" ruleset="tcp")
input(type="imtcp" port="{}" ruleset="tls" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imudp" port="{}" ruleset="udp")
"#,
            ports[0], ports[1], ports[2]
        );
        std::fs::write(d.join("rsyslog.conf"), conf).unwrap();
        let child = Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(d.join("rsyslog.conf"))
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rsyslogd (apt-get install rsyslog rsyslog-gnutls)");
        wait_until("rsyslogd listening", 20, || {
            std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", ports[1])).is_ok()
        });
        Rsyslog {
            child,
            dir: d,
            ports,
        }
    }

    fn lines(&self, file: &str, n: usize) -> Vec<String> {
        let p = self.dir.join(file);
        wait_until(&format!("{n} lines in {file}"), 30, || {
            std::fs::read_to_string(&p).is_ok_and(|t| t.lines().count() >= n)
        });
        std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(|l| l.trim_start().to_string())
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The extension of a CEF line as key → unescaped value, parsed the way CEF consumers do.
fn cef_extension(line: &str) -> (Vec<String>, BTreeMap<String, String>) {
    // Header: seven unescaped '|' separate eight fields.
    let mut fields = vec![];
    let mut cur = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if fields.len() < 7 => cur.push(chars.next().unwrap()),
            '|' if fields.len() < 7 => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    let ext = cur;
    // Keys are the words before an '=' that is not escaped (an escaped one is "\\=").
    let key_re = regex::Regex::new(r"(?:^| )([A-Za-z0-9]+)=").unwrap();
    let starts: Vec<(usize, String, usize)> = key_re
        .captures_iter(&ext)
        .map(|m| {
            let g = m.get(1).unwrap();
            (g.start(), g.as_str().to_string(), g.end() + 1)
        })
        .collect();
    let mut map = BTreeMap::new();
    for (i, (_, k, vstart)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(ext.len(), |n| n.0 - 1);
        let mut v = String::new();
        let mut chars = ext[*vstart..end.max(*vstart)].chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                v.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => v.push('\n'),
                Some('r') => v.push('\r'),
                Some(x) => v.push(x),
                None => {}
            }
        }
        map.insert(k.clone(), v);
    }
    (fields, map)
}

#[test]
fn rsyslog_receives_cef_over_tcp_and_tls_and_leef_over_udp_with_hostile_text_escaped() {
    let dir = lake("push-syslog");
    let want = expected(&dir);
    let rs = Rsyslog::start(&dir);
    settings(
        &dir,
        &format!(
            "  - {{name: cef-tcp, kind: syslog, url: 'tcp://127.0.0.1:{}', format: cef, batch_size: 5}}\n\
             \x20 - {{name: cef-tls, kind: syslog, url: 'tls://localhost:{}', format: cef, ca_file: '{}'}}\n\
             \x20 - {{name: leef-udp, kind: syslog, url: 'udp://127.0.0.1:{}', format: leef}}\n",
            rs.ports[0],
            rs.ports[1],
            rs.dir.join("ca.pem").display(),
            rs.ports[2]
        ),
    );
    let (ok, out, err) = push(&dir, &[], &[]);
    assert!(ok, "{out}\n{err}");
    for t in ["cef-tcp", "cef-tls", "leef-udp"] {
        assert_eq!(counts(&out, t)[1], want.len(), "{t}: {out}");
    }
    for file in ["tcp.log", "tls.log"] {
        let lines = rs.lines(file, want.len());
        // One line per event: no hostile newline split an event.
        assert_eq!(lines.len(), want.len(), "{file}");
        let mut got = BTreeSet::new();
        for l in &lines {
            assert!(l.starts_with("CEF:0|threatlake|threatlake|"), "{l}");
            let (h, ext) = cef_extension(l);
            assert_eq!(h.len(), 7, "{l}");
            got.insert((ext["cs1"].clone(), h[4].clone(), ext["cs3"].clone()));
            if ext["cs1"] == "otx:aaaaaaaaaaaaaaaaaaaaaaaa" {
                // The hostile title survives as one value, unescaped back to the original.
                assert_eq!(ext["msg"], HOSTILE_TITLE.replace('\t', " "), "{l}");
                assert!(!ext.contains_key("act"), "a value forged a key: {l}");
                assert!(
                    ext["request"].starts_with("http://evil.example/a?b=c|d'e"),
                    "{l}"
                );
            }
        }
        assert_eq!(got, want, "{file}");
    }
    let lines = rs.lines("udp.log", want.len());
    assert_eq!(lines.len(), want.len());
    for l in &lines {
        assert!(l.starts_with("LEEF:2.0|threatlake|threatlake|"), "{l}");
        let attrs: BTreeMap<&str, &str> = l
            .splitn(7, '|')
            .nth(6)
            .unwrap()
            .split('\t')
            .map(|kv| kv.split_once('=').unwrap())
            .collect();
        assert!(
            attrs.contains_key("externalId") && attrs.contains_key("techniqueId"),
            "{l}"
        );
        if attrs["itemId"] == "otx:aaaaaaaaaaaaaaaaaaaaaaaa" {
            assert_eq!(
                attrs["msg"],
                HOSTILE_TITLE.replace(['\n', '\t'], " "),
                "{l}"
            );
        }
    }
}

#[test]
fn settings_errors_name_the_target_and_missing_secrets_never_leak() {
    let dir = lake("push-settings");
    settings(&dir, "  - {name: hec, kind: splunk_hec, url: 'http://127.0.0.1:9', secret_env: THREATLAKE_TEST_NOT_SET}\n");
    let (ok, out, err) = push(&dir, &[], &[]);
    assert!(!ok);
    assert!(
        err.contains("THREATLAKE_TEST_NOT_SET") && err.contains("is not set"),
        "{out}\n{err}"
    );
    let (ok, _, err) = push(&dir, &[], &["--target", "nope"]);
    assert!(
        !ok && err.contains("no integration named \"nope\"") && err.contains("hec"),
        "{err}"
    );
    settings(
        &dir,
        "  - {name: hec, kind: splunk_hec, url: 'http://127.0.0.1:9', token: abc}\n",
    );
    let (ok, _, err) = push(&dir, &[], &[]);
    assert!(!ok && err.contains("token"), "{err}");
    settings(
        &dir,
        "  - {name: es, kind: elastic, url: 'http://elastic:s3cret@127.0.0.1:9'}\n",
    );
    let (ok, _, err) = push(&dir, &[], &[]);
    assert!(
        !ok && err.contains("credentials do not belong in the URL"),
        "{err}"
    );
}

#[test]
fn misp_feed_loads_in_pymisp_with_attack_galaxy_tags_and_observable_attributes() {
    let dir = lake("push-misp");
    let want = expected(&dir);
    let out = dir.join("reports");
    let (ok, o, e) = common::run(common::ics_cli_on(&dir).args([
        "report",
        "--format",
        "misp-feed",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "{o}\n{e}");
    let feed = out.join("misp-feed");
    // MISP's own client reads every event the manifest lists; hashes.csv matches the attributes.
    let script = r#"
import hashlib, json, os, sys
from pymisp import MISPEvent
d = sys.argv[1]
manifest = json.load(open(os.path.join(d, "manifest.json")))
out = {}
for uuid in manifest:
    e = MISPEvent()
    e.load_file(os.path.join(d, uuid + ".json"))
    assert str(e.uuid) == uuid, (e.uuid, uuid)
    out[uuid] = {"info": e.info, "tags": [t.name for t in e.tags],
                 "attributes": [[a.type, a.value] for a in e.attributes]}
for line in open(os.path.join(d, "hashes.csv")):
    h, u = line.strip().split(",")
    assert any(hashlib.md5(v.encode()).hexdigest() == h for _, v in out[u]["attributes"]), (h, u)
print(json.dumps(out))
"#;
    let r = Command::new("python3")
        .args(["-c", script, feed.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let events: BTreeMap<String, Value> = serde_json::from_slice(&r.stdout).unwrap();
    let items: BTreeSet<&String> = want.iter().map(|w| &w.0).collect();
    assert_eq!(events.len(), items.len(), "one event per mapped item");
    let techniques: BTreeSet<&String> = want.iter().map(|w| &w.1).collect();
    let mut tagged = BTreeSet::new();
    for ev in events.values() {
        for t in ev["tags"].as_array().unwrap() {
            let t = t.as_str().unwrap();
            if let Some(v) = t.strip_prefix("misp-galaxy:mitre-attack-pattern=\"") {
                let id = v.trim_end_matches('"').rsplit(" - ").next().unwrap();
                assert!(techniques.contains(&id.to_string()), "{t}");
                tagged.insert(id.to_string());
            }
        }
    }
    assert_eq!(
        tagged.len(),
        techniques.len(),
        "every technique is a galaxy tag"
    );
    let evil = events
        .values()
        .find(|e| e["info"] == HOSTILE_TITLE)
        .expect("the hostile item as an event");
    let attrs = evil["attributes"].as_array().unwrap();
    assert!(
        attrs.contains(&serde_json::json!(["ip-dst", "198.51.100.7"])),
        "{attrs:?}"
    );
    assert!(
        attrs.contains(&serde_json::json!(["url", "http://evil.example/a?b=c|d'e"])),
        "{attrs:?}"
    );
}

#[test]
fn the_push_job_delivers_and_is_recorded_in_job_runs() {
    let dir = lake("push-job");
    let want = expected(&dir);
    let received: Arc<Mutex<usize>> = Arc::default();
    let r = received.clone();
    let hook = Loopback::start(Box::new(move |_m, _p, _h, body| {
        let v: Value = serde_json::from_slice(body).unwrap();
        *r.lock().unwrap() += v["events"].as_array().unwrap().len();
        (200, vec![], "{}".into())
    }));
    settings(
        &dir,
        &format!(
            "  - {{name: hook, kind: webhook, url: '{}', secret_env: THREATLAKE_TEST_JOB_HOOK}}\n",
            hook.url
        ),
    );
    let mut c = common::ics_cli_on(&dir);
    c.args(["--config", dir.join("settings.yaml").to_str().unwrap()])
        .args(["run", "--job", "push"])
        .env("THREATLAKE_TEST_JOB_HOOK", "k");
    let (ok, out, err) = common::run(&mut c);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "hook {} queued, {} delivered",
            want.len(),
            want.len()
        )),
        "{out}"
    );
    assert_eq!(*received.lock().unwrap(), want.len());
    let rows = common::sql(
        &dir,
        "SELECT job, status, stages[1]['stage'], stages[1]['counts'] FROM job_runs WHERE job = 'push'",
    );
    assert!(rows.contains("push,ok,push,"), "{rows}");
    assert!(
        rows.contains(&format!("\"\"delivered\"\":{}", want.len())),
        "{rows}"
    );
}
