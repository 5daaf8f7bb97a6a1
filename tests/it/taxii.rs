//! `ingest taxii` against medallion (OASIS's TAXII 2.1 server, memory backend) on loopback: objects
//! added with OASIS's `taxii2-client`, paged by `next`, resumed from `X-TAXII-Date-Added-Last`,
//! revisions, auth failures, and what lands in `threat_intelligence_data`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, run, sql};

const COLLECTION: &str = "91a7b528-80eb-42ed-a74d-c6fbd5a26116";
const USER: &str = "analyst";
const PASSWORD: &str = "medallion-pw-7c1e44";

/// medallion on a loopback port with one writable collection; killed on drop.
struct Medallion {
    child: Child,
    log: PathBuf,
    root: String,
}

impl Medallion {
    fn start(dir: &Path) -> Medallion {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = format!("http://127.0.0.1:{port}/api1/");
        let data = json!({
            "/discovery": {"title": "test", "description": "", "contact": "", "default": root, "api_roots": [root]},
            "api1": {
                "information": {"title": "api1", "description": "", "versions": ["application/taxii+json;version=2.1"], "max_content_length": 9765625},
                "status": [],
                "collections": [{"id": COLLECTION, "title": "intel", "description": "", "can_read": true, "can_write": true,
                                 "media_types": ["application/stix+json;version=2.1"], "objects": [], "manifest": [], "responses": []}]
            }
        });
        std::fs::create_dir_all(dir).unwrap();
        let data_path = dir.join("medallion-data.json");
        std::fs::write(&data_path, data.to_string()).unwrap();
        let conf = json!({
            "backend": {"module": "medallion.backends.memory_backend", "module_class": "MemoryBackend",
                        "filename": data_path, "session_timeout": 600},
            "users": {USER: PASSWORD},
            "taxii": {"max_page_size": 100}
        });
        let conf_path = dir.join("medallion.json");
        std::fs::write(&conf_path, conf.to_string()).unwrap();
        let log = dir.join("medallion.log");
        let child = Command::new("python3")
            .args([
                "-c",
                "import sys; from medallion.scripts.run import main; sys.argv[0] = 'medallion'; main()",
                "--port",
                &port.to_string(),
                "--log-level",
                "INFO",
            ])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 with medallion (pip install medallion)");
        let m = Medallion { child, log, root };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "medallion did not start: {}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    fn collection(&self) -> String {
        format!("{}collections/{COLLECTION}/", self.root)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Add a bundle's objects with OASIS's client (medallion stamps their `date_added`).
    fn add(&self, objects: &[Value]) {
        let script = r#"
import json, sys
from taxii2client.v21 import Collection
url, user, password, bundle = sys.argv[1:5]
c = Collection(url, user=user, password=password)
s = c.add_objects(open(bundle).read())
assert s.status == "complete" and s.failure_count == 0, s
"#;
        let bundle = self.log.with_extension("bundle.json");
        std::fs::write(
            &bundle,
            json!({"type": "bundle", "id": "bundle--0c0b8a0e-8d1a-4b9e-9f2e-5f7d3b0c1a11", "objects": objects}).to_string(),
        )
        .unwrap();
        let o = Command::new("python3")
            .args(["-c", script, &self.collection(), USER, PASSWORD])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "taxii2-client add_objects: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        // date_added has microseconds; the next batch must be stamped later.
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Medallion {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uuid(n: u32) -> String {
    format!("4a7c2e10-0000-4000-8000-{n:012}")
}

fn indicator(n: u32) -> Value {
    json!({
        "type": "indicator", "spec_version": "2.1", "id": format!("indicator--{}", uuid(n)),
        "created": "2026-11-01T10:00:00.000Z", "modified": "2026-11-01T10:00:00.000Z",
        "name": format!("C2 address {n}"), "description": "Beacon destination of the loader.",
        "indicator_types": ["malicious-activity"], "pattern_type": "stix",
        "pattern": format!("[ipv4-addr:value = '198.51.100.{n}']"), "valid_from": "2026-11-01T10:00:00Z"
    })
}

fn attack_pattern() -> Value {
    json!({
        "type": "attack-pattern", "spec_version": "2.1", "id": "attack-pattern--970a3432-3237-47ad-bcca-7d8cbb217736",
        "created": "2020-03-09T13:48:55.078Z", "modified": "2025-10-24T17:49:24.000Z", "name": "PowerShell",
        "external_references": [{"source_name": "mitre-attack", "external_id": "T1059.001", "url": "https://attack.mitre.org/techniques/T1059/001"}]
    })
}

fn report(modified: &str, description: &str) -> Value {
    json!({
        "type": "report", "spec_version": "2.1", "id": format!("report--{}", uuid(900)),
        "created": "2026-11-01T10:00:00.000Z", "modified": modified,
        "name": "<script>alert('taxii')</script> loader campaign", "description": description,
        "report_types": ["threat-report"], "published": "2026-11-01T10:00:00Z", "labels": ["loader"],
        "object_refs": ["attack-pattern--970a3432-3237-47ad-bcca-7d8cbb217736", format!("indicator--{}", uuid(1))]
    })
}

fn relationship() -> Value {
    json!({
        "type": "relationship", "spec_version": "2.1", "id": format!("relationship--{}", uuid(800)),
        "created": "2026-11-01T10:00:00.000Z", "modified": "2026-11-01T10:00:00.000Z",
        "relationship_type": "indicates", "source_ref": format!("indicator--{}", uuid(2)),
        "target_ref": "attack-pattern--970a3432-3237-47ad-bcca-7d8cbb217736"
    })
}

fn taxii_cmd(dir: &Path, password: &str) -> Command {
    let mut c = common::cli_on(dir);
    c.env("THREATLAKE_TAXII_PASSWORD", password)
        .env("THREATLAKE_TAXII_PAGE_SIZE", "4")
        .env(
            "THREATLAKE_TAXII_HTTP",
            "{timeout_secs: 10, attempts: 2, backoff_secs: 0.05, max_wait_secs: 1}",
        );
    c
}

fn pages_of(out: &str) -> usize {
    let i = out.find(" page(s)").expect(out);
    out[..i].rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn taxii_collection_pages_resumes_and_lands_reports_and_indicators() {
    let dir = common::scratch("taxii-client");
    let m = Medallion::start(&dir.join("medallion"));
    let url = m.collection();
    let pull = |extra: &[&str]| {
        run(taxii_cmd(&dir, PASSWORD)
            .args(["ingest", "taxii", "--collection", &url, "--user", USER])
            .args(extra))
    };
    let hostile =
        "Operators ran powershell.exe -enc to download the payload'); DROP TABLE otx_pulse_log; --";
    let mut first: Vec<Value> = (1..=10).map(indicator).collect();
    first.extend([
        attack_pattern(),
        report("2026-11-01T10:00:00.000Z", hostile),
        relationship(),
        json!({"type": "ipv4-addr", "spec_version": "2.1", "id": "ipv4-addr--6e5c6b54-1d1b-5c6e-9a8f-4d3b2a1c0e9f", "value": "198.51.100.1"}),
    ]);
    m.add(&first);

    // First pull: every object, 4 per page, followed by `next`.
    let (ok, out, err) = pull(&[]);
    assert!(ok, "{err}\n{}", m.log());
    assert!(
        out.contains("14 new or revised object(s) (11 report(s)/indicator(s))"),
        "{out}"
    );
    assert_eq!(pages_of(&out), 4, "{out}");
    assert!(m.log().contains("next="), "paged by next: {}", m.log());
    assert_eq!(
        sql(
            &dir,
            "SELECT count(*) AS n, count(DISTINCT object_id) AS d FROM taxii_object_log"
        ),
        "n,d\n14,14\n"
    );
    assert_eq!(
        sql(&dir, "SELECT kind, count(*) AS n FROM threat_intelligence_data WHERE source = 'taxii' GROUP BY kind ORDER BY kind"),
        "kind,n\nindicator,10\nreport,1\n"
    );
    // Attacker text is data: stored verbatim, the log table intact.
    let text = sql(
        &dir,
        &format!(
            "SELECT title, text FROM threat_intelligence_data WHERE item_id = 'taxii:report--{}'",
            uuid(900)
        ),
    );
    assert!(
        text.contains("<script>alert('taxii')</script> loader campaign"),
        "{text}"
    );
    assert!(text.contains("DROP TABLE otx_pulse_log"), "{text}");
    // Techniques the source states: the report refers to the attack-pattern, an indicator indicates it.
    assert_eq!(
        sql(
            &dir,
            "SELECT object_id, technique_id FROM taxii_techniques ORDER BY object_id"
        ),
        format!(
            "object_id,technique_id\nindicator--{},T1059.001\nreport--{},T1059.001\n",
            uuid(2),
            uuid(900)
        )
    );
    // Every page was kept raw.
    let raw = dir.join("raw/taxii");
    let kept = common::listing(&raw).len();
    assert_eq!(kept, 4, "raw pages under {}", raw.display());

    // Second pull: resumes after the newest date_added → nothing new, one page, the watermark sent.
    let (ok, out, err) = pull(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("0 new or revised object(s)"), "{out}");
    assert_eq!(pages_of(&out), 1, "{out}");
    assert!(m.log().contains("added_after="), "{}", m.log());
    assert!(!out.contains("(first run)"), "{out}");

    // New objects and a revised report: only they come, the report's new version replaces the old.
    m.add(&[
        indicator(11),
        indicator(12),
        report(
            "2026-11-20T08:00:00.000Z",
            "Revised: the loader also used scheduled tasks.",
        ),
    ]);
    let (ok, out, err) = pull(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("3 new or revised object(s)"), "{out}");
    assert_eq!(
        sql(
            &dir,
            "SELECT count(*) AS n FROM threat_intelligence_data WHERE source = 'taxii'"
        ),
        "n\n13\n"
    );
    let v = sql(
        &dir,
        &format!("SELECT item_version, text FROM threat_intelligence_data WHERE item_id = 'taxii:report--{}'", uuid(900)),
    );
    assert!(
        v.contains("2026-11-20T08:00:00Z") && v.contains("Revised"),
        "{v}"
    );

    // The same pull as a job (what `run` and the schedule do), from taxii.collections.
    let (ok, out, err) = run(taxii_cmd(&dir, PASSWORD)
        .env("THREATLAKE_TAXII_COLLECTIONS", format!("[{url}]"))
        .env("THREATLAKE_TAXII_USERNAME", USER)
        .args(["run", "--job", "ingest_taxii"]));
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("[1/1] TAXII") && out.contains("0 new or revised object(s)"),
        "{out}"
    );
    assert_eq!(
        sql(&dir, "SELECT job, status FROM job_runs"),
        "job,status\ningest_taxii,ok\n"
    );

    // --added-after before everything: every object's current version comes again (a TAXII server
    // sends the newest version by default), none is stored twice.
    let (ok, out, err) = pull(&["--added-after", "2020-01-01"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("0 new or revised object(s)") && out.contains("16 unchanged"),
        "{out}"
    );
    assert_eq!(
        sql(&dir, "SELECT count(*) AS n FROM taxii_object_log"),
        "n\n17\n"
    );

    // The password never reaches the lake, the raw pages or the output.
    for d in ["lake", "raw"] {
        super::feeds::assert_absent(&dir.join(d), PASSWORD);
    }
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));
}

#[test]
fn taxii_errors_name_the_fix_and_store_nothing() {
    let dir = common::scratch("taxii-errors");
    let m = Medallion::start(&dir.join("medallion"));
    m.add(&[indicator(1)]);
    let before = common::listing(&dir.join("lake"));

    // A wrong password: the variable is named, the password not shown, nothing stored.
    let wrong = "not-the-password-3e9";
    let (ok, out, err) = run(taxii_cmd(&dir, wrong).args([
        "ingest",
        "taxii",
        "--collection",
        &m.collection(),
        "--user",
        USER,
    ]));
    assert!(!ok, "{out}");
    assert!(
        err.contains("THREATLAKE_TAXII_PASSWORD") && err.contains("401"),
        "{err}"
    );
    assert!(!err.contains(wrong) && !out.contains(wrong), "{err}");

    // The API root instead of a collection; a collection that does not exist.
    let (ok, _, err) = run(taxii_cmd(&dir, PASSWORD).args([
        "ingest",
        "taxii",
        "--collection",
        &format!(
            "{}collections/00000000-0000-4000-8000-000000000000/",
            m.root
        ),
        "--user",
        USER,
    ]));
    assert!(!ok);
    assert!(
        err.contains("404") && err.contains("collection URL"),
        "{err}"
    );

    // Bad arguments are refused before any request.
    let (ok, _, err) = run(taxii_cmd(&dir, PASSWORD).args([
        "ingest",
        "taxii",
        "--collection",
        &m.collection(),
        "--added-after",
        "last tuesday",
    ]));
    assert!(
        !ok && err.contains("--added-after") && err.contains("RFC 3339"),
        "{err}"
    );
    let (ok, _, err) = run(taxii_cmd(&dir, PASSWORD).args([
        "ingest",
        "taxii",
        "--collection",
        "http://analyst:pw@127.0.0.1:1/api1/collections/x/",
    ]));
    assert!(
        !ok && err.contains("credentials in the URL") && !err.contains(":pw@"),
        "{err}"
    );
    let (ok, _, err) = run(taxii_cmd(&dir, PASSWORD).args(["ingest", "taxii"]));
    assert!(
        !ok && err.contains("--collection") && err.contains("taxii.collections"),
        "{err}"
    );

    let data_files = |l: Vec<(String, u64, u64)>| -> Vec<String> {
        l.into_iter()
            .map(|(p, _, _)| p)
            .filter(|p| p.starts_with("taxii_object_log/") && p.ends_with(".parquet"))
            .collect()
    };
    assert_eq!(
        data_files(common::listing(&dir.join("lake"))),
        data_files(before),
        "failed pulls stored no object"
    );
}
