//! Reports and charts over a fixed fixture lake: ICS ATT&CK v18.1, five hand-written OTX pulses
//! (two carrying hostile strings), fixed mappings and two threat-model runs. Golden CSV/JSON/Navigator
//! outputs, HTML escaping, PDF text, chart marks per kind, `--since`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use threatlake::feeds::{self, intel, otx};

use crate::common::{self, run, sql};

/// A pulse: (id, name, description, modified, countries, families).
type Pulse = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);
/// A threat-model run: (run id, [(technique, evidence, score)]).
type Run = (&'static str, &'static [(&'static str, i64, f64)]);

const PULSES: &[Pulse] = &[
    (
        "f00000000000000000000001",
        "Water utility intrusion",
        "Unauthorized command messages changed PLC setpoints.",
        "2026-03-02T10:00:00Z",
        &["United States of America"],
        &["Industroyer"],
    ),
    (
        "f00000000000000000000002",
        "=HYPERLINK(\"http://evil.example\") operators phished",
        "<script>alert(1)</script> Spearphishing attachments sent to operators.",
        "2026-06-15T08:30:00Z",
        &["DE", "<img src=x onerror=alert(2)>"],
        &["<script>alert(3)</script>"],
    ),
    (
        "f00000000000000000000003",
        "Alarm suppression at a refinery",
        "The actor modified alarm settings and suppressed alarms.",
        "2026-09-10T12:00:00Z",
        &["Germany"],
        &["Triton"],
    ),
    (
        "f00000000000000000000004",
        "Remote services abused",
        "Remote services were used to reach the control network.",
        "2026-11-01T09:00:00Z",
        &["Japan", "Atlantis"],
        &[],
    ),
    (
        "f00000000000000000000005",
        "Old campaign",
        "Manipulation of control observed last year.",
        "2025-12-01T00:00:00Z",
        &[],
        &["Industroyer"],
    ),
];

/// Mappings: (pulse index, technique, score, method).
const MAPPED: &[(usize, &str, f64, &str)] = &[
    (0, "T0855", 0.91, "model"),
    (0, "T0836", 0.42, "model"),
    (1, "T0865", 1.0, "source"),
    (1, "T0855", 0.35, "model"),
    (2, "T0838", 0.88, "model"),
    (2, "T0878", 0.64, "model"),
    (3, "T0886", 0.77, "model"),
    (4, "T0831", 0.5, "model"),
];

const RUNS: &[Run] = &[
    (
        "20261101T000000000Z-aaaaaaaa",
        &[("T0855", 2, 1.0), ("T0836", 1, 0.5), ("T0831", 1, 0.4)],
    ),
    (
        "20261120T000000000Z-bbbbbbbb",
        &[
            ("T0855", 2, 0.7),
            ("T0865", 1, 1.0),
            ("T0838", 1, 0.9),
            ("T0836", 1, 0.5),
        ],
    ),
];

/// Build the fixture lake under a fresh `<target tmp>/<name>`.
async fn fixture(name: &str) -> PathBuf {
    let dir = common::scratch(name);
    let lake = common::ingest(&dir, &["ics"]).await;
    let at = "2026-11-20T00:00:00.000000Z";
    let pulses: Vec<Value> = PULSES
        .iter()
        .map(|(id, name, desc, modified, countries, families)| {
            json!({
                "pulse_id": id, "name": name, "description": desc, "author": "fixture",
                "created": modified, "modified": modified, "revision": 1, "tlp": "white",
                "tags": ["ics"], "reference_urls": [], "targeted_countries": countries,
                "industries": [], "malware_families": families, "adversary": null,
                "attack_ids": [], "indicator_count": 0, "batch_id": "fixture",
                "raw_ref": "fixture", "ingested_at": at
            })
        })
        .collect();
    feeds::append(
        &lake,
        otx::PULSE_LOG,
        &otx::pulse_schema(),
        &[("ingest_date", "2026-11-20")],
        "fixture",
        &pulses,
    )
    .await
    .unwrap();
    // Item versions and technique names exactly as the views and the ATT&CK lake give them.
    let engine = threatlake::Engine::open(&lake).await.unwrap();
    let strings = |q: &str| {
        let engine = &engine;
        let q = q.to_string();
        async move {
            let r = engine.run(&q).await.unwrap().remove(0);
            let mut rows: Vec<Vec<String>> = Vec::new();
            for b in &r.batches {
                let cols: Vec<Vec<Option<String>>> = (0..b.num_columns())
                    .map(|c| feeds::column_strings(b, c))
                    .collect();
                for i in 0..b.num_rows() {
                    rows.push(
                        cols.iter()
                            .map(|c| c[i].clone().unwrap_or_default())
                            .collect(),
                    );
                }
            }
            rows
        }
    };
    let versions = strings("SELECT item_id, item_version FROM threat_intelligence_data").await;
    let version = |i: usize| {
        let id = format!("otx:{}", PULSES[i].0);
        versions.iter().find(|r| r[0] == id).unwrap()[1].clone()
    };
    let names = strings(
        "SELECT technique_id, name, array_element(tactics, 1) FROM attack_techniques_current WHERE domain = 'ics'",
    )
    .await;
    let named = |t: &str| names.iter().find(|r| r[0] == t).unwrap().clone();
    let mapped: Vec<Value> = MAPPED
        .iter()
        .map(|(i, t, score, method)| {
            let n = named(t);
            json!({
                "item_id": format!("otx:{}", PULSES[*i].0), "item_version": version(*i),
                "source": "otx", "technique_id": t, "technique_name": n[1], "tactic": n[2],
                "tactics": [n[2]], "score": score, "method": method,
                "model_version": if *method == "model" { Some("ics-18.1") } else { None },
                "mapped_at": at, "batch_id": "fixture"
            })
        })
        .collect();
    feeds::append(
        &lake,
        intel::MAPPED,
        &intel::mapped_schema(),
        &[("mapped_date", "2026-11-20")],
        "fixture",
        &mapped,
    )
    .await
    .unwrap();
    for (run_id, rows) in RUNS {
        let rows: Vec<Value> = rows
            .iter()
            .map(|(t, evidence, score)| {
                let n = named(t);
                json!({
                    "technique_id": t, "technique_name": n[1], "tactic": n[2],
                    "evidence_count": evidence, "distinct_sources": 1,
                    "first_seen": "2026-03-02T10:00:00Z", "last_seen": "2026-11-01T09:00:00Z",
                    "weight": score, "score": score, "created_at": at
                })
            })
            .collect();
        feeds::append(
            &lake,
            intel::THREAT_MODEL,
            &intel::threat_model_schema(),
            &[("run_id", run_id)],
            "0",
            &rows,
        )
        .await
        .unwrap();
    }
    dir
}

/// The CLI on the fixture, mapping domain ICS, no model.
fn cmd(dir: &Path) -> std::process::Command {
    let mut c = common::cli_on(dir);
    c.env("THREATLAKE_MAPPING_DOMAIN", "ics")
        .env("THREATLAKE_LAKE_MODELS", dir.join("no-models"));
    c
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_csv_json_and_navigator_outputs() {
    let dir = fixture("reports-golden").await;
    let out = dir.join("out");
    let (ok, stdout, err) = run(cmd(&dir).args([
        "report",
        "--format",
        "csv,json,navigator",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "{stdout}\n{err}");
    assert!(stdout.contains("9 report(s) written"), "{stdout}");
    for name in [
        "technique_frequency.csv",
        "tactic_coverage.csv",
        "threats_over_time.csv",
        "threat_families.csv",
        "threats_by_country.csv",
        "top_mapped_techniques.csv",
        "threat_model_diff.csv",
        "attack_matrix.csv",
        "threat_families.json",
        "attack_matrix.layer.json",
    ] {
        insta::assert_snapshot!(name.replace('.', "_"), read(out.join(name)));
    }
    // Formula injection is neutralised in every CSV; the hostile family stays data.
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "csv") {
            let text = read(&p);
            assert!(
                !text
                    .lines()
                    .flat_map(|l| l.split(','))
                    .any(|c| c.trim_start_matches('"').starts_with(['=', '+', '-', '@'])),
                "{}: {text}",
                p.display()
            );
        }
    }
    let layer: Value = serde_json::from_str(&read(out.join("attack_matrix.layer.json"))).unwrap();
    for key in [
        "name",
        "versions",
        "domain",
        "techniques",
        "gradient",
        "legendItems",
    ] {
        assert!(layer.get(key).is_some(), "layer lacks {key}");
    }
    assert_eq!(layer["versions"]["layer"], "4.5");
    assert_eq!(layer["domain"], "ics-attack");
    // MITRE's own client (PyPI mitreattack-python) loads every layer, with a platform filter that
    // hides nothing.
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let p = e.path();
        if !p.to_string_lossy().ends_with(".layer.json") {
            continue;
        }
        let o = std::process::Command::new("python3")
            .args(["-c", MITRE_LOAD_LAYER, p.to_str().unwrap()])
            .output()
            .expect("python3 with mitreattack-python (pip install mitreattack-python)");
        let v: Value = serde_json::from_str(&read(&p)).unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            v["techniques"].as_array().unwrap().len().to_string()
        );
    }
    let ids = common::sql(
        &dir,
        "SELECT technique_id FROM attack_techniques_current WHERE domain = 'ics'",
    );
    for t in layer["techniques"].as_array().unwrap() {
        let id = t["techniqueID"].as_str().unwrap();
        assert!(ids.lines().any(|l| l == id), "{id} is not an ICS technique");
        // No tactic column: each entry applies to every tactic of its technique.
        assert!(t.get("tactic").is_none() && t["score"].as_f64().unwrap() > 0.0);
    }
    // Index lists every report with its row count and files.
    let index: Value = serde_json::from_str(&read(out.join("index.json"))).unwrap();
    let freq = index["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "technique_frequency")
        .unwrap();
    assert_eq!(freq["rows"], 7);
}

/// Loads a Navigator layer with mitreattack-python; prints its technique count. `from_file` reports
/// problems by printing and leaving a string in place of the layer, so that is checked too.
const MITRE_LOAD_LAYER: &str = r#"
import sys
from mitreattack.navlayers import Layer
layer = Layer()
layer.from_file(sys.argv[1])
obj = layer.layer
if isinstance(obj, str):
    sys.exit("not loaded: " + obj)
platforms = obj.filters.platforms if obj.filters else None
if not platforms:
    sys.exit("empty platform filter hides every technique")
print(len(obj.techniques or []))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn html_pdf_and_images_escape_and_render() {
    let dir = fixture("reports-html").await;
    let out = dir.join("out");
    let (ok, stdout, err) = run(cmd(&dir).args([
        "report",
        "--format",
        "html,pdf,svg,png",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "{stdout}\n{err}");
    // No model in this lake: the projected scatter says so, the other reports still render.
    assert!(
        err.contains("threat_clusters: no chart") && err.contains("model build"),
        "{err}"
    );
    let index = read(out.join("index.html"));
    for name in ["technique_frequency", "attack_matrix", "threats_by_country"] {
        assert!(index.contains(&format!("href=\"{name}.html\"")), "{index}");
    }
    // Attacker-controlled text is escaped everywhere; the only script is the pinned sorter.
    let families = read(out.join("threat_families.html"));
    assert!(
        families.contains("&lt;script&gt;alert(3)&lt;&#x2f;script&gt;"),
        "{families}"
    );
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or_default();
        if ext == "html" || ext == "svg" {
            let text = read(&p);
            for needle in ["<script>alert", "<img src=x", "onerror=alert(2)>"] {
                assert!(!text.contains(needle), "{}: raw {needle}", p.display());
            }
            if ext == "html" {
                assert_eq!(text.matches("<script>").count(), 1, "{}", p.display());
                assert!(text.contains("Content-Security-Policy"));
            }
        }
    }
    // The hostile family is drawn as text in the SVG bar chart (escaped by the SVG writer).
    let svg = read(out.join("threat_families.svg"));
    assert!(svg.contains("&lt;script&gt;alert(3)"), "{svg}");
    // The PDF opens and its text is extractable.
    let pdf = out.join("technique_frequency.pdf");
    let o = std::process::Command::new("pdftotext")
        .args([pdf.to_str().unwrap(), "-"])
        .output()
        .expect("pdftotext (poppler-utils) is installed; .ci/run installs it");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "Technique frequency",
        "Unauthorized Command Message",
        "T0855",
        "page 1 of 1",
    ] {
        assert!(text.contains(needle), "{needle} not in: {text}");
    }
    // PNG charts decode to the size drawn.
    let png = png::Decoder::new(std::io::Cursor::new(
        std::fs::read(out.join("attack_matrix.png")).unwrap(),
    ))
    .read_info()
    .unwrap();
    assert!(png.info().width > 1500 && png.info().height > 500);
}

/// `threatlake chart` on the fixture: (output line, SVG text).
/// The STIX bundle, now written object by object, holds exactly the objects the whole-bundle builder
/// made (golden recorded before streaming; only the random bundle id and the order are free), and
/// stix2-validator accepts it. Read in many passes over shares of the item ids (as a large lake
/// is), it holds the same objects again.
#[tokio::test(flavor = "multi_thread")]
async fn stix_bundle_streams_the_same_objects() {
    let dir = fixture("reports-stix").await;
    let bundle = |rows_per_pass: &str| {
        let out = dir.join(format!("out-{rows_per_pass}"));
        let (ok, stdout, err) = run(cmd(&dir)
            .env("THREATLAKE_REPORTS_ROWS_PER_PASS", rows_per_pass)
            .args([
                "report",
                "technique_frequency",
                "--format",
                "stix",
                "--out",
                out.to_str().unwrap(),
            ]));
        assert!(ok, "{stdout}\n{err}");
        let path = out.join("mapped_intel.stix.json");
        common::assert_valid_stix(&path);
        let mut bundle: Value = serde_json::from_str(&read(&path)).unwrap();
        assert!(bundle["id"].as_str().unwrap().starts_with("bundle--"));
        bundle["id"] = json!("bundle--(random)");
        bundle["objects"]
            .as_array_mut()
            .unwrap()
            .sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        serde_json::to_string_pretty(&bundle).unwrap()
    };
    let whole = bundle("250000");
    insta::assert_snapshot!("mapped_intel_stix_objects", whole);
    // One mapping row per pass: as many passes as rows (rounded up to a power of two; 8 on the
    // fixture), so items land in different passes and some passes hold none.
    let rows: usize = sql(&dir, "SELECT count(*) AS n FROM mapped_threat_data")
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(rows > 4, "{rows} mapping rows");
    assert_eq!(bundle("1"), whole, "the bundle read in passes differs");
    assert_eq!(bundle("3"), whole, "the bundle read in passes differs");
}

fn chart(dir: &Path, sql: &str, args: &[&str], file: &str) -> (String, String) {
    let path = dir.join(file);
    let (ok, out, err) = run(cmd(dir)
        .args(["chart", sql, "--out", path.to_str().unwrap()])
        .args(args));
    assert!(ok, "{sql}: {out}\n{err}");
    let text = if file.ends_with(".svg") {
        read(&path)
    } else {
        String::new()
    };
    (out, text)
}

fn marks(out: &str) -> usize {
    let (_, rest) = out.split_once(" row(s), ").unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn charts_draw_one_mark_per_datum() {
    let dir = fixture("reports-charts").await;
    // Bars: one rectangle of the bar colour per row.
    let q = "SELECT * FROM (VALUES ('alpha', 3), ('beta', 5), ('gamma', 1)) AS t(label, n)";
    let (out, svg) = chart(&dir, q, &["--kind", "bar", "--title", "Bars"], "bar.svg");
    assert_eq!(marks(&out), 3, "{out}");
    assert_eq!(svg.matches("fill=\"#4E79A7\"").count(), 3);
    assert!(
        svg.contains("alpha") && svg.contains("gamma"),
        "labels drawn"
    );
    let (out, svg) = chart(&dir, q, &["--kind", "hbar", "--limit", "2"], "hbar.svg");
    assert_eq!(marks(&out), 2, "{out}");
    assert!(svg.contains("first 2 of 3 rows"), "the cut is said");
    // PNG of the same: the bar colour is there.
    let (out, _) = chart(&dir, q, &["--kind", "bar"], "bar.png");
    assert_eq!(marks(&out), 3);
    let mut dec = png::Decoder::new(std::io::Cursor::new(
        std::fs::read(dir.join("bar.png")).unwrap(),
    ))
    .read_info()
    .unwrap();
    let mut buf = vec![0; dec.output_buffer_size().unwrap()];
    dec.next_frame(&mut buf).unwrap();
    assert!(buf.chunks(3).filter(|p| p == &[0x4E, 0x79, 0xA7]).count() > 1000);
    // Lines: a point per (series, x).
    let q = "SELECT * FROM (VALUES (DATE '2026-01-05', 'otx', 2), (DATE '2026-01-12', 'otx', 4), (DATE '2026-01-05', 'vt', 1), (DATE '2026-01-19', 'vt', 3), (DATE '2026-01-26', 'vt', 2)) AS t(week, source, items)";
    let (out, svg) = chart(&dir, q, &["--kind", "line"], "line.svg");
    assert_eq!(marks(&out), 5, "{out}");
    assert!(svg.contains("2026-01-"), "date axis labels");
    // Heatmap: a coloured cell per (technique, tactic) placement, counted independently in SQL.
    let q = "SELECT technique_id, count(*) AS n FROM mapped_threat_data GROUP BY technique_id";
    let (out, _) = chart(&dir, q, &["--kind", "heatmap"], "matrix.svg");
    let placements = sql(
        &dir,
        "SELECT count(*) AS n FROM attack_technique_tactics WHERE domain = 'ics' AND technique_id IN (SELECT technique_id FROM mapped_threat_data)",
    );
    let expected: usize = placements.lines().nth(1).unwrap().parse().unwrap();
    assert!(expected >= 7);
    assert_eq!(marks(&out), expected, "{out}");
    // Map: known countries coloured, the unknown one listed.
    let q = "SELECT * FROM (VALUES ('US', 3), ('DEU', 2), ('Japan', 1), ('Atlantis', 4)) AS t(country, n)";
    let (out, svg) = chart(&dir, q, &["--kind", "map"], "map.svg");
    assert_eq!(marks(&out), 3, "{out}");
    assert!(
        svg.contains("Not on the map: Atlantis"),
        "unplaced countries are named"
    );
    // Scatter of numeric columns coloured by series.
    let q = "SELECT * FROM (VALUES (1.0, 2.0, 'a'), (2.0, 1.0, 'a'), (3.0, 3.0, 'b'), (0.5, 0.1, 'b')) AS t(x, y, s)";
    let (out, svg) = chart(&dir, q, &["--kind", "scatter"], "scatter.svg");
    assert_eq!(marks(&out), 4, "{out}");
    assert!(
        svg.contains("a (2)") && svg.contains("b (2)"),
        "legend with counts"
    );
    // Errors name the problem and the fix.
    let (ok, _, err) = run(cmd(&dir).args([
        "chart",
        "SELECT 'x' AS a",
        "--kind",
        "bar",
        "--out",
        dir.join("e.svg").to_str().unwrap(),
    ]));
    assert!(
        !ok && err.contains("no numeric column") && err.contains("y=COLUMN"),
        "{err}"
    );
    let (ok, _, err) = run(cmd(&dir).args(["chart", "SELECT 1", "--out", "x.gif"]));
    assert!(!ok && err.contains(".svg or .png"), "{err}");
    let (ok, _, err) =
        run(cmd(&dir).args(["chart", "SELECT 1", "--kind", "pie", "--out", "x.svg"]));
    assert!(!ok && err.contains("unknown chart kind"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn since_limits_the_intel_counted() {
    let dir = fixture("reports-since").await;
    let rows = |since: Option<&str>| {
        let out = dir.join(format!("out-{}", since.unwrap_or("all")));
        let mut c = cmd(&dir);
        c.args([
            "report",
            "threats_over_time",
            "technique_frequency",
            "--format",
            "csv",
        ])
        .args(["--out", out.to_str().unwrap()]);
        if let Some(s) = since {
            c.args(["--since", s]);
        }
        let (ok, o, err) = run(&mut c);
        assert!(ok, "{o}\n{err}");
        (
            read(out.join("threats_over_time.csv")),
            read(out.join("technique_frequency.csv")),
        )
    };
    let (all_time, all_freq) = rows(None);
    assert_eq!(all_time.lines().count(), 1 + 5, "{all_time}");
    let (time, freq) = rows(Some("2026-06-01"));
    // Pulses of 2026-06-15, 2026-09-10 and 2026-11-01 remain.
    assert_eq!(time.lines().count(), 1 + 3, "{time}");
    assert!(
        !time.contains("2026-03-") && !time.contains("2025-"),
        "{time}"
    );
    assert!(
        all_freq.contains("T0831") && !freq.contains("T0831"),
        "{freq}"
    );
    assert!(freq.contains("T0886"), "{freq}");
    let (ok, _, err) = run(cmd(&dir).args(["report", "--since", "last tuesday"]));
    assert!(!ok && err.contains("2026-01-31"), "{err}");
}
