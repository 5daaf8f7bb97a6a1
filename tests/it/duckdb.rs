//! DuckDB parity: the embedded engine (`sql --engine duckdb`) and the loadable extension in stock
//! DuckDB (PyPI `duckdb`, pinned by .ci/run) give DataFusion's answers on the same lake and model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::common::{self, copy_dir, run};

/// The lake every test here shares: ICS ATT&CK, an ICS model and mapped sample intel, built once.
fn lake() -> &'static PathBuf {
    static LAKE: OnceLock<PathBuf> = OnceLock::new();
    LAKE.get_or_init(|| common::mapped_ics_lake("duckdb"))
}

fn cmd(dir: &Path) -> std::process::Command {
    common::ics_cli_on(dir)
}

fn model_dir(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").is_file())
        .expect("a built model")
}

/// `threatlake sql --format json` on either engine.
fn sql_json(dir: &Path, engine: &str, q: &str) -> Vec<Value> {
    // `--command=` so a query starting with a `--` comment is not taken for an option.
    let (ok, out, err) = run(cmd(dir)
        .args(["sql", "--engine", engine, "--format", "json", "--quiet"])
        .arg(format!("--command={q}")));
    assert!(ok, "{engine}: {q}\n{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{engine} output is not JSON ({e}): {out}"))
}

/// The extension, built by `udfs/duckdb-ext/build.py` (a no-op when up to date).
fn extension() -> PathBuf {
    static EXT: OnceLock<PathBuf> = OnceLock::new();
    EXT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("duckdb-extension");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("udfs/duckdb-ext/build.py");
        let o = std::process::Command::new("python3")
            .arg(&script)
            .args(["--out", out.to_str().unwrap()])
            .output()
            .expect("python3 runs udfs/duckdb-ext/build.py");
        assert!(
            o.status.success(),
            "building the extension failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let path = out.join("threatlake.duckdb_extension");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            &bytes[bytes.len() - 534..][..20],
            b"\x00\x93\x04\x10duckdb_signature"
        );
        path
    })
    .clone()
}

const PROCEDURES: &str = "SELECT relationship_id AS id, map_technique(description) AS technique, \
    technique_score(description, 'T0855') AS score, map_techniques(description, 3) AS top3 \
    FROM mitre_attack_procedures WHERE domain = 'ics' ORDER BY relationship_id";

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6,
        _ => a.is_null() && b.is_null(),
    }
}

/// Same ids, scores within 1e-6, same top-3 ids in order.
fn assert_same(what: &str, df: &[Value], other: &HashMap<String, Value>) {
    assert_eq!(df.len(), other.len(), "{what}: row counts");
    for r in df {
        let id = r["id"].as_str().unwrap();
        let o = &other[id];
        assert_eq!(
            r.get("technique").unwrap_or(&Value::Null),
            &o["technique"],
            "{what} {id}"
        );
        assert!(
            close(&r["score"], &o["score"]),
            "{what} {id}: {} vs {}",
            r["score"],
            o["score"]
        );
        let ids = |v: &Value| -> Vec<(String, f64)> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| {
                            (
                                t["technique_id"].as_str().unwrap().to_string(),
                                t["score"].as_f64().unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let (x, y) = (ids(&r["top3"]), ids(&o["top3"]));
        assert_eq!(x.len(), y.len(), "{what} {id}");
        for ((a, s), (b, t)) in x.iter().zip(&y) {
            assert!(
                a == b && (s - t).abs() <= 1e-6,
                "{what} {id}: {x:?} vs {y:?}"
            );
        }
    }
}

#[test]
fn embedded_duckdb_matches_datafusion() {
    let dir = lake();
    let df = sql_json(dir, "datafusion", PROCEDURES);
    assert!(df.len() >= 200, "{} ICS procedure texts", df.len());
    assert!(
        df.iter()
            .filter(|r| r.get("technique").is_some_and(|t| !t.is_null()))
            .count()
            > 100
    );
    let duck: HashMap<String, Value> = sql_json(dir, "duckdb", PROCEDURES)
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect();
    assert_same("embedded DuckDB", &df, &duck);
    // The shipped views and every report query run unchanged on both engines, with as many rows.
    for def in threatlake::reports::shipped() {
        let a = sql_json(dir, "datafusion", &def.sql);
        let b = sql_json(dir, "duckdb", &def.sql);
        assert_eq!(a.len(), b.len(), "report {} row counts", def.name);
        if def.name == "technique_frequency" {
            assert!(!a.is_empty(), "the sample intel maps to techniques");
        }
    }
    let q = "SELECT item_id, item_version FROM threat_intelligence_data ORDER BY item_id";
    assert_eq!(
        sql_json(dir, "datafusion", q),
        sql_json(dir, "duckdb", q),
        "item versions"
    );
    let q = "SELECT domain, attack_version, count(*) AS techniques FROM attack_techniques_current GROUP BY 1, 2 ORDER BY 1";
    assert_eq!(sql_json(dir, "datafusion", q), sql_json(dir, "duckdb", q));
    // NULL and empty text, and errors that name the problem.
    let q = "SELECT map_technique(NULL) AS a, map_technique('') AS b, technique_score(NULL, 'T0855') AS c";
    assert_eq!(sql_json(dir, "duckdb", q), sql_json(dir, "datafusion", q));
    let (ok, _, err) = run(cmd(dir).args([
        "sql",
        "--engine",
        "duckdb",
        "-c",
        "SELECT technique_score('x', 'T9999')",
    ]));
    assert!(!ok && err.contains("T9999"), "{err}");
}

#[test]
fn stock_duckdb_loads_the_extension_and_agrees() {
    let dir = lake();
    let ext = extension();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/duckdb/parity.py");
    let o = std::process::Command::new("python3")
        .arg(&script)
        .arg(&ext)
        .arg(model_dir(dir))
        .arg(dir.join("lake"))
        .arg("ics")
        .output()
        .expect("python3 with the duckdb package (.ci/run installs it)");
    assert!(
        o.status.success(),
        "parity.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let no_model = r["no_model_error"].as_str().unwrap();
    assert!(
        no_model.contains("no-such-model") && no_model.contains("THREATLAKE_MODEL"),
        "{no_model}"
    );
    assert!(
        r["use_model"].as_str().unwrap().contains("ics-"),
        "{}",
        r["use_model"]
    );
    let stock: HashMap<String, Value> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["id"].as_str().unwrap().to_string(), x.clone()))
        .collect();
    let df = sql_json(dir, "datafusion", PROCEDURES);
    assert!(stock.len() >= 200);
    assert_same("stock DuckDB + extension", &df, &stock);
    assert_eq!(
        r["nulls"],
        serde_json::json!([null, null, null, null, null])
    );
    assert!(
        r["unknown_technique_error"]
            .as_str()
            .unwrap()
            .contains("T9999"),
        "{r}"
    );
    assert!(r["bad_k_error"].as_str().unwrap().contains("-1"), "{r}");
    assert!(!r["bad_model_error"].as_str().unwrap().is_empty(), "{r}");
    assert!(r["explain"].is_string(), "{r}");
    // map_report: the same techniques, sentence counts and best sentences as DataFusion.
    let df = sql_json(
        dir,
        "datafusion",
        "SELECT map_report('The actor sent unauthorized command messages to the PLC to open the breakers.' \
         || chr(10) || chr(10) || 'Later they modified the controller program and uploaded new logic to the PLC.') AS r",
    );
    let key = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["technique_id"].clone(),
                    t["sentences"].clone(),
                    t["sentence"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let from_df = key(&df[0]["r"]);
    assert!(!from_df.is_empty(), "{df:?}");
    assert_eq!(key(&r["report"][0]), from_df, "{r}");
    assert!(r["report"][1].is_null(), "{r}");
}

#[test]
fn notebook_runs_headless_and_is_stripped() {
    let dir = lake();
    let nb = Path::new(env!("CARGO_MANIFEST_DIR")).join("notebooks/threat_analyst.ipynb");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&nb).unwrap()).unwrap();
    for c in doc["cells"].as_array().unwrap() {
        if c["cell_type"] == "code" {
            assert!(
                c["outputs"].as_array().unwrap().is_empty() && c["execution_count"].is_null(),
                "commit notebooks with outputs stripped"
            );
        }
    }
    // A copy of the shared lake (the other tests read it meanwhile) with some intel and two
    // threat-model runs, so every cell has something to show.
    let copy = common::scratch("duckdb-notebook");
    copy_dir(dir, &copy);
    let dir = &copy;
    for args in [
        &["run", "--offline", "--samples"][..],
        &["run", "--offline"][..],
    ] {
        let (ok, out, err) = run(cmd(dir).args(args).current_dir(env!("CARGO_MANIFEST_DIR")));
        assert!(ok, "{out}\n{err}");
    }
    let code = format!(
        "import nbformat, nbclient\n\
         nb = nbformat.read({nb:?}, as_version=4)\n\
         nbclient.NotebookClient(nb, timeout=300, kernel_name='python3').execute()\n\
         print(sum(len(c.get('outputs', [])) for c in nb.cells if c.cell_type == 'code'))\n",
        nb = nb.to_str().unwrap()
    );
    let o = std::process::Command::new("python3")
        .args(["-c", &code])
        .env("THREATLAKE_LAKE_ROOT", dir.join("lake"))
        .env("THREATLAKE_DUCKDB_EXTENSION", extension())
        .env("THREATLAKE_MODEL", model_dir(dir))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "notebook failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let outputs: usize = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    assert!(outputs >= 4, "{outputs} outputs");
}
