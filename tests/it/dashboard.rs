//! The dashboard of `threatlake serve` in a real browser: Debian's chromium driven by Playwright
//! (`dashboard_browser.py`) over a lake of the sample feeds plus a pulse whose every field is an
//! injection payload. Screenshots of every page at 1280×800 and 390×844 land in the test's folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::serve::{cli, token, Server};
use crate::common;

const PASSWORD: &str = "dashboard test password 42";
const HOSTILE_ID: &str = "bbbbbbbbbbbbbbbbbbbbbbbb";

/// The sample feeds plus a pulse with script, attribute-breaking and `javascript:` payloads in
/// its name, description, tags, country, family and adversary.
pub(crate) fn hostile_samples(dir: &Path) -> PathBuf {
    let samples = dir.join("samples");
    common::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples"),
        &samples,
    );
    let x = r#"<script>alert(1)</script> "><img src=x onerror=alert(2)> javascript:alert(3)"#;
    let pulse = serde_json::json!({
        "count": 1, "next": null, "previous": null,
        "results": [{
            "id": HOSTILE_ID, "name": x,
            "description": format!("The implant modifies the control logic of the PLC. {x}"),
            "author_name": x, "created": "2026-10-06T08:00:00.000000", "modified": "2026-10-06T09:00:00.000000",
            "revision": 1, "tlp": "white", "public": 1, "adversary": x, "tags": [x, "javascript:alert(3)"],
            "references": ["javascript:alert(3)"], "targeted_countries": [x], "industries": [x],
            "malware_families": [x], "attack_ids": ["T0853"],
            "indicators": [
                {"id": 4300000001_u64, "indicator": "hostile.example", "type": "domain", "created": "2026-10-06T08:00:00",
                 "title": x, "description": x, "expiration": null, "is_active": 1, "role": null}
            ]
        }]
    });
    std::fs::write(
        samples.join("otx/zz_hostile.json"),
        serde_json::to_vec(&pulse).unwrap(),
    )
    .unwrap();
    samples
}

fn add_user(dir: &Path, name: &str, role: &str) {
    let mut child = cli(dir, &[])
        .args(["auth", "user", "add", name, "--role", role])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn dashboard_pages_in_chromium_escape_intel_and_agree_with_sql() {
    let dir = common::scratch("dashboard");
    std::thread::spawn({
        let dir = dir.clone();
        move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(common::ingest(&dir, &["ics"]));
        }
    })
    .join()
    .unwrap();
    let (ok, out, err) =
        common::run(common::ics_cli_on(&dir).args(["model", "build", "--domain", "ics"]));
    assert!(ok, "{out}\n{err}");
    let samples = hostile_samples(&dir);
    common::run_samples(&mut common::ics_cli_on(&dir), &samples);
    // A second snapshot, so the overview and the threat-model page have a change to show.
    let (ok, out, err) = common::run(common::ics_cli_on(&dir).args(["run", "--job", "snapshot"]));
    assert!(ok, "{out}\n{err}");
    add_user(&dir, "ana", "analyst");
    add_user(&dir, "rita", "reader");
    let reader = token(&dir, "dashboard-reader", "reader", &[]);
    let server = Server::start(&dir, &[], &[]);
    let shots = dir.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let hostile = format!("otx:{HOSTILE_ID}");
    let summary = browse(
        "dashboard_browser.py",
        &[
            ("ANALYST", "ana"),
            ("READER", "rita"),
            ("TOKEN", reader.as_str()),
            ("HOSTILE", hostile.as_str()),
            ("OUT", shots.to_str().unwrap()),
        ],
        &server,
    );
    let checked: Vec<&str> = summary["checked"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for want in [
        "redirects",
        "pages",
        "hostile text",
        "overview counts",
        "matrix counts",
        "navigator layer",
        "map counts",
        "sql console",
        "jobs",
        "reader",
    ] {
        assert!(checked.contains(&want), "{want} not checked: {summary}");
    }
    // Every page at both sizes, each a real PNG.
    for prefix in ["desktop", "phone"] {
        let n = std::fs::read_dir(&shots)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .filter(|e| {
                std::fs::read(e.path()).is_ok_and(|b| b.starts_with(b"\x89PNG") && b.len() > 5000)
            })
            .count();
        assert!(n >= 11, "{prefix}: {n} screenshots in {}", shots.display());
    }
    eprintln!("dashboard screenshots: {}", shots.display());
}

/// Run a browser script bounded in time: its last stdout line as JSON.
fn browse(script: &str, env: &[(&str, &str)], server: &Server) -> serde_json::Value {
    let t = Instant::now();
    let mut child = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/it")
                .join(script),
        )
        .envs(env.iter().copied())
        .env("BASE", &server.base)
        .env("PASSWORD", PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a hung browser fails the test instead of holding CI.
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            panic!("{script} did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{script} failed:\n{}\n{stdout}\nserver log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        server.log()
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn workbench_maps_a_report_and_analyst_decisions_reach_the_export() {
    let dir = common::scratch("dashboard-workbench");
    std::thread::spawn({
        let dir = dir.clone();
        move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(common::ingest(&dir, &["enterprise"]));
        }
    })
    .join()
    .unwrap();
    let enterprise = [("THREATLAKE_MAPPING_DOMAIN", "enterprise")];
    let (ok, out, err) = common::run(cli(&dir, &enterprise).args(["model", "build"]));
    assert!(ok, "{out}\n{err}");
    add_user(&dir, "ana", "analyst");
    add_user(&dir, "rita", "reader");
    let server = Server::start(&dir, &enterprise, &[]);
    let shots = dir.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let seen = browse(
        "dashboard_workbench.py",
        &[
            ("ANALYST", "ana"),
            ("READER", "rita"),
            ("OUT", shots.to_str().unwrap()),
        ],
        &server,
    );
    // The decisions are in the lake and come out of the export as labelled examples.
    let (ok, out, err) = common::run(cli(&dir, &enterprise).args(["model", "feedback", "export"]));
    assert!(ok, "{out}\n{err}");
    let examples: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cradle = seen["cradle"].as_str().unwrap();
    let ex = examples
        .iter()
        .find(|e| e["text"] == cradle)
        .unwrap_or_else(|| panic!("the cradle sentence is not exported: {out}"));
    let accepted = seen["accepted"].as_str().unwrap();
    assert!(["T1059.001", "T1059"].contains(&accepted), "{seen}");
    assert_eq!(ex["labels"], serde_json::json!([accepted]), "{ex}");
    assert_eq!(ex["source"], "workbench");
    let rejected = seen["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d[0] == "reject")
        .count();
    assert_eq!(ex["rejected"].as_array().unwrap().len(), rejected, "{ex}");
    let first = examples
        .iter()
        .find(|e| e["text"] == seen["first"])
        .unwrap_or_else(|| panic!("the corrected sentence is not exported: {out}"));
    assert_eq!(first["labels"], serde_json::json!(["T1566.001"]), "{first}");
    // The reader's refused attempt stored nothing: only the analyst's decisions are in the table.
    let who = common::sql(
        &dir,
        "SELECT DISTINCT who FROM mapping_feedback ORDER BY who",
    );
    assert_eq!(who.trim(), "who\nana", "{who}");
    for shot in ["workbench-desktop.png", "workbench-phone.png"] {
        assert!(shots.join(shot).is_file(), "{shot} missing");
    }
}
