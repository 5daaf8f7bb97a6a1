use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use insta_cmd::assert_cmd_snapshot;
use serde_json::json;

use crate::common;

/// An ICS-only lake, ingested once through the CLI.
fn lake() -> &'static PathBuf {
    static LAKE: OnceLock<PathBuf> = OnceLock::new();
    LAKE.get_or_init(|| {
        let dir = common::scratch("cli-lake");
        let status = common::cli_on(&dir)
            .args([
                "ingest",
                "attack",
                "--from",
                common::bundle("ics").to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        dir.join("lake")
    })
}

fn sql(args: &[&str]) -> Command {
    let mut c = common::cli();
    c.args(["--lake", lake().to_str().unwrap(), "sql"])
        .args(args);
    c
}

const QUERY: &str =
    "SELECT technique_id, name, tactics, is_subtechnique FROM attack_techniques_current \
                     WHERE domain = 'ics' ORDER BY technique_id LIMIT 3";

macro_rules! snapshot {
    ($cmd:expr) => {
        insta::with_settings!({filters => vec![(r"\d+\.\d{3} s", "[ELAPSED] s")]}, {
            assert_cmd_snapshot!($cmd);
        })
    };
}

#[test]
fn sql_table() {
    snapshot!(sql(&["--format", "table", "-c", QUERY]));
}

#[test]
fn sql_csv() {
    snapshot!(sql(&["--format", "csv", "-c", QUERY]));
}

#[test]
fn sql_tsv() {
    snapshot!(sql(&["--format", "tsv", "-c", QUERY]));
}

#[test]
fn sql_json() {
    snapshot!(sql(&["--format", "json", "-c", QUERY]));
}

#[test]
fn sql_ndjson() {
    snapshot!(sql(&["--format", "ndjson", "-c", QUERY]));
}

#[test]
fn sql_markdown() {
    snapshot!(sql(&["--format", "markdown", "-c", QUERY]));
}

#[test]
fn sql_list_tables() {
    snapshot!(sql(&["-c", "\\d"]));
}

#[test]
fn sql_describe_table() {
    snapshot!(sql(&["-c", "\\d mitre_attack_tactics"]));
}

#[test]
fn sql_error_names_the_problem_and_fails() {
    snapshot!(sql(&["-c", "SELECT nope FROM mitre_attack_techniques"]));
}

#[test]
fn sql_file_and_format_command() {
    let dir = common::scratch("cli-sql-file");
    let f = dir.join("q.sql");
    std::fs::write(
        &f,
        "\\format csv\nSELECT domain,\n  count(*) AS n\nFROM attack_tactics_current\nGROUP BY 1;\n",
    )
    .unwrap();
    let out = sql(&["-f", f.to_str().unwrap()]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "domain,n\nics,12\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 row in"));
}

/// Hostile SQL nested thousands deep ends with a clear error instead of overflowing the stack (it
/// aborted the process), while a deep but reasonable statement still runs.
#[test]
fn deep_sql_is_refused_not_a_crash() {
    let dir = common::scratch("cli-deep-sql");
    let terms = |n: usize, sep: &str, term: &str| vec![term; n].join(sep);
    let cases = [
        format!("SELECT {}", terms(5_000, "+", "1")),
        format!("SELECT 1 WHERE {}", terms(20_000, " OR ", "1 = 2")),
        terms(2_000, " UNION ALL ", "SELECT 1"),
        format!("SELECT {}1{}", "(".repeat(3_000), ")".repeat(3_000)),
    ];
    for (i, q) in cases.iter().enumerate() {
        let f = dir.join(format!("deep{i}.sql"));
        std::fs::write(&f, q).unwrap();
        let out = sql(&["--format", "csv", "-f", f.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i}: {err}");
        assert!(
            err.contains("deeper than 1000 levels") || err.contains("deeper than 50 levels"),
            "case {i}: {err}"
        );
    }
    let ok = format!("SELECT {} AS n", terms(900, "+", "1"));
    let out = sql(&["--format", "csv", "-c", &ok]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "n\n900\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `CREATE EXTERNAL TABLE` / `CREATE VIEW` in a data format print nothing, so one batch run can
/// create a table and query it.
#[test]
fn ddl_then_query_in_one_batch_run() {
    let dir = common::scratch("cli-ddl");
    let csv = dir.join("iocs.csv");
    std::fs::write(&csv, "ioc,kind\nevil.example,domain\n1.2.3.4,ip\n").unwrap();
    for format in ["csv", "tsv", "json", "ndjson", "markdown"] {
        let script = format!(
            "CREATE EXTERNAL TABLE iocs STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true'); \
             CREATE VIEW ips AS SELECT ioc FROM iocs WHERE kind = 'ip'; SELECT ioc FROM ips",
            csv.display()
        );
        let out = sql(&["--format", format, "-c", &script]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("1.2.3.4") && !text.contains("evil"),
            "{format}: {text}"
        );
    }
}

#[test]
fn closed_pipe_is_not_an_error() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = sql(&[
        "--format",
        "csv",
        "-c",
        "SELECT * FROM mitre_attack_relationships",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn config_show_redacts_secrets() {
    let out = common::cli()
        .env("THREATLAKE_OTX_API_KEY", "super-secret-otx-key")
        .env("THREATLAKE_LAKE_ROOT", "/srv/lake")
        .args(["config", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("root: /srv/lake"), "{text}");
    assert!(
        !text.contains("super-secret-otx-key") && text.contains("<redacted>"),
        "{text}"
    );
}

/// Give the REPL a moment to switch the terminal back to raw mode (which discards type-ahead).
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(150));
}

/// The interactive REPL in a real pseudo-terminal: multi-line statements, timing line, an error that
/// keeps the session alive, tab completion, backslash commands, history written on exit.
#[test]
fn repl_in_a_pty() {
    let dir = common::scratch("cli-repl");
    let history = dir.join("history.txt");
    let mut cmd = sql(&[]);
    cmd.env("THREATLAKE_SQL_HISTORY_FILE", history.to_str().unwrap())
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(20_000)).unwrap();
    p.exp_string("threatlake>").unwrap();
    p.send_line("SELECT count(*) AS n").unwrap();
    p.send_line("FROM attack_techniques_current;").unwrap();
    p.exp_string("83").unwrap();
    p.exp_string("1 row in").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("SELECT no_such_column FROM mitre_attack_tactics;")
        .unwrap();
    p.exp_string("No field named no_such_column").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    // Tab completes a table name.
    p.send("SELECT count(*) FROM attack_tactics_cur\t").unwrap();
    p.send_line(";").unwrap();
    p.exp_string("12").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("\\format csv").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    // rustyline flushes type-ahead when it re-enters raw mode, so wait for the command's own output
    // and the fresh prompt after it before typing on.
    p.send_line("\\format").unwrap();
    p.exp_string("format: csv").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("SELECT tactic_id FROM attack_tactics_current WHERE matrix_order = 1;")
        .unwrap();
    p.exp_string("tactic_id\r\nTA0108").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    // Hostile SQL nested too deep ends that statement with an error, and the session goes on.
    p.send_line(&format!("SELECT {};", vec!["1"; 1_500].join("+")))
        .unwrap();
    p.exp_string("deeper than 1000 levels").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("SELECT 40 + 2 AS answer;").unwrap();
    p.exp_string("42").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();
    let h = std::fs::read_to_string(&history).unwrap();
    assert!(h.contains("FROM attack_techniques_current;"), "{h}");
}

/// Ctrl-C during a query that would run for hours cancels it and returns to the prompt; the
/// session goes on.
#[test]
fn repl_ctrl_c_cancels_a_running_query() {
    let dir = common::scratch("cli-repl-cancel");
    let mut cmd = sql(&[]);
    cmd.env(
        "THREATLAKE_SQL_HISTORY_FILE",
        dir.join("h.txt").to_str().unwrap(),
    )
    .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(30_000)).unwrap();
    p.exp_string("threatlake>").unwrap();
    // About 10^12 rows: minutes to hours of work, so only a cancellation ends it within the timeout.
    p.send_line("SELECT count(*) FROM generate_series(1, 1000000000000) a;")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    p.send_control('c').unwrap();
    p.exp_string("query cancelled").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("SELECT 40 + 2 AS answer;").unwrap();
    p.exp_string("42").unwrap();
    p.exp_string("1 row in").unwrap();
    p.exp_string("threatlake>").unwrap();
    settle();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();
}

/// `--maxrows N` stops reading after N rows in every format: a query of 10^12 rows returns its
/// first rows and ends (a run that read on would be killed by the timeout, failing the test).
#[test]
fn maxrows_stops_the_scan_early() {
    use std::time::{Duration, Instant};
    for (format, lines) in [("csv", 11), ("ndjson", 10), ("table", 15)] {
        let mut child = sql(&[
            "--format",
            format,
            "--maxrows",
            "10",
            "-c",
            "SELECT value FROM generate_series(1, 1000000000000)",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{format}: --maxrows 10 did not stop the query");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let o = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{format}: {err}");
        assert_eq!(out.lines().count(), lines, "{format}: {out}");
        assert!(out.contains("10") && !out.contains("11"), "{format}: {out}");
        assert!(
            err.contains("10 rows in") && err.contains("stopped reading"),
            "{format}: {err}"
        );
    }
}

/// A query's memory is bounded by sql.memory_mb: a sort spills and finishes, a hash join that
/// cannot spill stops with an error naming the setting.
#[test]
fn sql_memory_pool_spills_or_names_the_setting() {
    // 3M rows sorted by a scrambled key: more than the 20 MB pool holds, so the sort spills.
    let sort = "SELECT value FROM generate_series(1, 3000000) ORDER BY (value * 7919) % 1000003";
    let (ok, out, err) = common::run(
        sql(&["--format", "csv", "--quiet", "-c", sort]).env("THREATLAKE_SQL_MEMORY_MB", "20"),
    );
    assert!(ok, "a sort over the pool spills: {err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("value"));
    // Key 0 belongs to the multiples of 1000003 only.
    assert!(
        matches!(lines.next(), Some("1000003" | "2000006")),
        "{}",
        &out[..40]
    );
    assert_eq!(out.lines().count(), 3_000_001);
    let join = "SELECT count(*) FROM generate_series(1, 3000000) a JOIN generate_series(1, 3000000) b ON a.value = b.value";
    let (ok, _, err) =
        common::run(sql(&["--format", "csv", "-c", join]).env("THREATLAKE_SQL_MEMORY_MB", "20"));
    assert!(!ok, "the join fits in 20 MB?");
    assert!(
        err.contains("sql.memory_mb") && err.contains("Resources exhausted"),
        "{err}"
    );
}

/// An ICS model built through the CLI on the ICS lake (small, so quick in debug builds).
fn ics_models() -> &'static PathBuf {
    static MODELS: OnceLock<PathBuf> = OnceLock::new();
    MODELS.get_or_init(|| {
        let models = common::scratch("cli-models");
        let out = common::cli()
            .env("THREATLAKE_LAKE_MODELS", &models)
            .args([
                "--lake",
                lake().to_str().unwrap(),
                "model",
                "build",
                "--domain",
                "ics",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("model ics ATT&CK 18.1: 83 techniques"),
            "{text}"
        );
        assert!(models.join("ics-18.1/manifest.json").is_file());
        models
    })
}

fn mapper_cmd(args: &[&str]) -> Command {
    let mut c = common::cli();
    c.env("THREATLAKE_LAKE_MODELS", ics_models())
        .args(["--lake", lake().to_str().unwrap()])
        .args(args);
    c
}

#[test]
fn map_jsonl_lines_have_the_documented_shape() {
    let dir = common::scratch("cli-map-jsonl");
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"The malware modified the PLC ladder logic program to change the process\"}\n\
         {\"text\": \"\"}\n\
         {\"text\": \"Operators lost view of the HMI screens during the attack\"}\n",
    )
    .unwrap();
    let out = mapper_cmd(&[
        "map",
        "--domain",
        "ics",
        "--input",
        input.to_str().unwrap(),
        "--top",
        "3",
        "--format",
        "jsonl",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let shape = regex::Regex::new(
        r#"^\{"row": (\d+), "techniques": \[\{"technique_id": "T\d{4}(\.\d{3})?", "score": [0-9.e-]+\}(, \{"technique_id": "T\d{4}(\.\d{3})?", "score": [0-9.e-]+\}){2}\]\}$"#,
    )
    .unwrap();
    for (i, l) in lines.iter().enumerate() {
        let c = shape
            .captures(l)
            .unwrap_or_else(|| panic!("line {i} has the wrong shape: {l}"));
        assert_eq!(c[1].parse::<usize>().unwrap(), i);
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let scores: Vec<f64> = v["techniques"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["score"].as_f64().unwrap())
            .collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {l}");
    }
    assert!(
        lines[0].contains("\"technique_id\": \"T0889\"")
            || lines[0].contains("\"technique_id\": \"T0821\""),
        "{}",
        lines[0]
    );
}

#[test]
fn model_eval_reports_metrics() {
    let dir = common::scratch("cli-model-eval");
    let input = dir.join("labelled.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"The attackers modified the controller program to alter the physical process\", \"labels\": [\"T0889\"]}\n\
         {\"text\": \"brute forced the default credentials of the engineering workstation\", \"labels\": [\"T0812\", \"T0859\"]}\n\
         {\"text\": \"The quarterly results were presented to the shareholders in Vienna\", \"labels\": []}\n",
    )
    .unwrap();
    let out = mapper_cmd(&[
        "model",
        "eval",
        "--domain",
        "ics",
        "--input",
        input.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key} missing in {text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // The negative is counted apart; calibration and the operating points are printed.
    assert_eq!(value("n"), 2.0, "{text}");
    assert_eq!(value("negatives"), 1.0, "{text}");
    let ece: f64 = text
        .split("ECE ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no ECE in {text}"));
    assert!((0.0..=1.0).contains(&ece), "{text}");
    let marked = text
        .lines()
        .find(|l| l.ends_with("← mapping.threshold"))
        .unwrap_or_else(|| panic!("no threshold row in {text}"));
    let cells: Vec<&str> = marked.split_whitespace().collect();
    assert_eq!(cells[0], "0.03", "{marked}");
    let negatives_mapped: f64 = cells[3].parse().unwrap();
    assert!([0.0, 1.0].contains(&negatives_mapped), "{marked}");
    let (top1, parent, recall, mrr) = (
        value("top1"),
        value("top1_parent"),
        value("recall@5"),
        value("mrr@10"),
    );
    // Metrics of 2 texts are multiples of 1/2 (MRR aside) and ordered as their definitions imply.
    for m in [top1, parent, recall, mrr] {
        assert!((0.0..=1.0).contains(&m), "{text}");
    }
    assert!(top1 <= parent && top1 <= recall && top1 <= mrr, "{text}");
    assert!(
        [0.0, 0.5, 1.0].contains(&top1) && [0.0, 0.5, 1.0].contains(&recall),
        "{text}"
    );
    // The controller-program sentence is ranked T0889 (or near it): something is found in the top 5.
    assert!(recall > 0.0, "{text}");
}

/// A copy of the ICS model (without its calibration) in `models`; returns its directory.
fn ics_model_copy(models: &Path) -> PathBuf {
    let dir = models.join("ics-18.1");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.bin", "embeddings.fifu", "manifest.json"] {
        std::fs::copy(ics_models().join("ics-18.1").join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn a_calibration_from_an_older_build_is_refused_with_the_fix() {
    // A copy of the ICS model with the calibration file an older threatlake wrote (7 features, no
    // format): the scores it would give mean nothing, so the model is not used and the error says
    // what to run.
    let models = common::scratch("cli-old-calibration");
    let dir = ics_model_copy(&models);
    let logistic = r#"{"weights": [0.1, 0.0, 0.1, 0.0, 1.5, 2.5, 0.1], "bias": -7.0}"#;
    std::fs::write(
        dir.join("calibration.json"),
        format!(
            r#"{{"best": {logistic}, "others": {logistic}, "fitted_on": [], "threshold": 0.21, "domain": "ics", "attack_version": "18.1"}}"#
        ),
    )
    .unwrap();
    let (ok, out, err) = common::run(
        common::cli()
            .env("THREATLAKE_LAKE_MODELS", &models)
            .args(["--lake", lake().to_str().unwrap()])
            .args(["map", "--domain", "ics", "modified the controller program"]),
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("calibration.json")
            && err.contains("older threatlake")
            && err.contains("threatlake model calibrate")
            && err.contains("threatlake model build"),
        "{err}"
    );
}

#[test]
fn map_without_a_model_says_how_to_build_one() {
    let empty = common::scratch("cli-no-models");
    let out = common::cli()
        .env("THREATLAKE_LAKE_MODELS", &empty)
        .args(["--lake", lake().to_str().unwrap(), "map", "dumped lsass"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("threatlake model build"));
    let out = common::cli()
        .env("THREATLAKE_LAKE_MODELS", &empty)
        .args([
            "--lake",
            lake().to_str().unwrap(),
            "sql",
            "-c",
            "SELECT map_technique('dumped lsass')",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("run `threatlake model build --domain enterprise`"));
}

/// The techniques `map --format jsonl` ranks for `text` on the ICS lake in `dir`, best first.
fn ranked_ics(dir: &Path, text: &str) -> Vec<String> {
    let (ok, out, err) = common::run(common::ics_cli_on(dir).args([
        "map", "--domain", "ics", "--format", "jsonl", "--top", "30", text,
    ]));
    assert!(ok, "{out}\n{err}");
    jsonl_techniques(&out).into_iter().map(|(t, _)| t).collect()
}

/// The techniques of one `map --format jsonl` line: id and score, in order.
fn jsonl_techniques(out: &str) -> Vec<(String, f64)> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["techniques"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["technique_id"].as_str().unwrap().to_string(),
                t["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn model_build_learns_the_sentences_analysts_labelled() {
    let dir = common::scratch("cli-feedback-learn");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(common::ingest(&dir, &["ics"]));
    let build = |extra: &[&str]| {
        let (ok, out, err) = common::run(
            common::ics_cli_on(&dir)
                .args(["model", "build", "--domain", "ics"])
                .args(extra),
        );
        assert!(ok, "{out}\n{err}");
        out
    };
    let out = build(&[]);
    assert!(!out.contains("learnt"), "{out}");
    let sentence = "During the maintenance window the intruders pushed a tampered firmware image \
                    to the plant's safety controllers over the engineering network.";
    let before = ranked_ics(&dir, sentence);
    // A technique the model ranks low for the sentence, labelled right by an analyst.
    let label = before[19].clone();

    // A bad file is refused, naming the line, and stores nothing.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n\n{}\n",
            json!({"text": "a", "labels": [label]}),
            json!({"text": "b", "labels": ["not-an-id"]})
        ),
    )
    .unwrap();
    let import = |file: &Path, extra: &[&str]| {
        common::run(
            common::ics_cli_on(&dir)
                .args(["model", "feedback", "import", "--input"])
                .arg(file)
                .args(extra),
        )
    };
    let (ok, out, err) = import(&bad, &[]);
    assert!(!ok, "{out}");
    assert!(err.contains("line 3") && err.contains("not-an-id"), "{err}");
    assert_eq!(
        common::sql(&dir, "SELECT count(*) AS n FROM mapping_feedback").trim(),
        "n\n0"
    );

    let good = dir.join("labelled.jsonl");
    std::fs::write(
        &good,
        format!(
            "{}\n{}\n",
            json!({"text": sentence, "labels": [label], "rejected": [before[0]], "doc": "report-7"}),
            json!({"text": "Nothing to learn here.", "labels": []}),
        ),
    )
    .unwrap();
    let (ok, out, err) = import(&good, &["--who", "tram"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("2 decisions on 1 of 2 sentences"), "{out}");
    assert_eq!(
        common::sql(&dir, "SELECT DISTINCT who FROM mapping_feedback").trim(),
        "who\ntram"
    );
    let (ok, out, err) =
        common::run(common::ics_cli_on(&dir).args(["model", "feedback", "export"]));
    assert!(ok, "{err}");
    let exported: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(exported["labels"], json!([label]), "{out}");
    assert_eq!(exported["rejected"], json!([before[0]]), "{out}");
    assert_eq!(exported["doc"], "report-7", "{out}");

    let out = build(&[]);
    assert!(
        out.contains("learnt 1 sentence(s) analysts labelled in the mapping workbench"),
        "{out}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("models/ics-18.1/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["feedback"], 1, "{manifest}");
    let after = ranked_ics(&dir, sentence);
    let rank = |r: &[String]| r.iter().position(|t| *t == label).unwrap_or(r.len());
    assert!(
        rank(&after) < 3,
        "{label} was 20th before learning the sentence and is {} after: {after:?}",
        rank(&after) + 1
    );

    // --no-feedback builds from ATT&CK alone again.
    let out = build(&["--no-feedback"]);
    assert!(!out.contains("learnt"), "{out}");
    assert_eq!(rank(&ranked_ics(&dir, sentence)), rank(&before));
}

#[test]
fn feedback_holdout_keeps_whole_reports_out_of_the_model_for_model_eval() {
    let dir = common::scratch("cli-feedback-holdout");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(common::ingest(&dir, &["ics"]));
    // 12 workbench reports of two labelled sentences each.
    let reports = 12;
    let mut lines = String::new();
    for i in 0..reports {
        for (text, label) in [
            (
                format!("At plant {i} the intruders downloaded a modified program to the PLC."),
                "T0843",
            ),
            (
                format!("They then changed setpoint {i} of the safety controller."),
                "T0836",
            ),
        ] {
            let row = json!({"text": text, "labels": [label], "doc": format!("incident-{i}")});
            lines.push_str(&format!("{row}\n"));
        }
    }
    let labelled = dir.join("labelled.jsonl");
    std::fs::write(&labelled, lines).unwrap();
    let (ok, out, err) = common::run(
        common::ics_cli_on(&dir)
            .args(["model", "feedback", "import", "--input"])
            .arg(&labelled),
    );
    assert!(ok, "{out}\n{err}");
    let build = |holdout: &str| {
        common::run(
            common::ics_cli_on(&dir)
                .env("THREATLAKE_MAPPING_FEEDBACK_HOLDOUT", holdout)
                .args(["model", "build", "--domain", "ics"]),
        )
    };
    let (ok, out, err) = build("0.5");
    assert!(ok, "{out}\n{err}");
    // "learnt A sentence(s) …" and "held out B labelled sentence(s) of R workbench report(s) …"
    let number_after = |prefix: &str| -> usize {
        let rest = &out[out
            .find(prefix)
            .unwrap_or_else(|| panic!("{prefix}: {out}"))
            + prefix.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let learnt = number_after("learnt ");
    let held = number_after("held out ");
    let held_reports = number_after("labelled sentence(s) of ");
    assert!(learnt > 0 && held > 0, "{out}");
    assert_eq!(learnt + held, 2 * reports, "{out}");
    assert_eq!(held, 2 * held_reports, "whole reports are held out: {out}");
    let manifest = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("models/ics-18.1/manifest.json")).unwrap())
            .unwrap()
    };
    assert_eq!(manifest()["feedback"], learnt);
    assert_eq!(manifest()["feedback_held_out"], held);

    // The export holds every decision; `model eval` leaves out the reports the model learnt and
    // measures it on the held-out ones.
    let (ok, exported, err) =
        common::run(common::ics_cli_on(&dir).args(["model", "feedback", "export"]));
    assert!(ok, "{err}");
    let export = dir.join("export.jsonl");
    std::fs::write(&export, exported).unwrap();
    let (ok, out, err) = common::run(
        common::ics_cli_on(&dir)
            .args(["model", "eval", "--domain", "ics", "--input"])
            .arg(&export),
    );
    assert!(ok, "{out}\n{err}");
    let left_out = format!(
        "left out {learnt} of {} rows, those of {} report(s) the model learnt sentences of",
        2 * reports,
        reports - held_reports
    );
    assert!(out.contains(&left_out), "{left_out}\n{out}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["n", &held.to_string()]),
        "evaluated on the {held} held-out sentences: {out}"
    );

    // A share that is not one is refused, naming the setting, and the model stays as it was.
    let (ok, out, err) = build("1.5");
    assert!(!ok, "{out}");
    assert!(
        err.contains("mapping.feedback_holdout") && err.contains("0.9"),
        "{err}"
    );
    assert_eq!(manifest()["feedback_held_out"], held);

    // Every report learnt leaves nothing to measure: eval and calibrate say how to hold some out.
    let (ok, out, err) = build("0");
    assert!(ok, "{out}\n{err}");
    assert_eq!(manifest()["feedback"], 2 * reports);
    for command in ["eval", "calibrate"] {
        let (ok, out, err) = common::run(
            common::ics_cli_on(&dir)
                .args(["model", command, "--domain", "ics", "--input"])
                .arg(&export),
        );
        assert!(
            !ok && err.contains("learnt every report") && err.contains("mapping.feedback_holdout"),
            "{command}: {out}\n{err}"
        );
    }
}

#[test]
fn model_calibrate_fits_the_report_scores_and_map_document_applies_them() {
    // A copy of the ICS model, calibrated on a handful of labelled ICS reports (rows name their
    // report in `doc`): calibration.json gains a report calibration, and `map --document` scores a
    // report's techniques through it — σ(slope·logit(s) + bias) of the score without it, same order.
    let models = common::scratch("cli-report-calibration");
    let dir = ics_model_copy(&models);
    let reports = [
        (
            "r1",
            "The attackers modified the controller program and downloaded new logic to the PLC.",
            "T0889",
        ),
        (
            "r1",
            "They changed the setpoint parameters of the safety controller.",
            "T0836",
        ),
        (
            "r1",
            "The quarterly maintenance window was moved to Friday.",
            "",
        ),
        (
            "r2",
            "Unauthorized command messages were sent to the field devices over Modbus.",
            "T0855",
        ),
        (
            "r2",
            "The operators lost view of the process when the HMI screens froze.",
            "T0815",
        ),
        (
            "r3",
            "The malware restarted the devices and shut down the engineering workstation.",
            "T0816",
        ),
        (
            "r3",
            "The plant reported fair weather and normal staffing levels that week.",
            "",
        ),
        (
            "r4",
            "A new project file was uploaded to the controller with modified ladder logic.",
            "T0889",
        ),
        (
            "r4",
            "The attackers brute forced the default credentials of the engineering workstation.",
            "T0812",
        ),
        (
            "r5",
            "Firmware of the remote terminal units was replaced with a malicious image.",
            "T0839",
        ),
        (
            "r5",
            "The group collected the program of the PLC through a program upload.",
            "T0845",
        ),
        (
            "r6",
            "They spoofed reporting messages so operators saw normal values.",
            "T0856",
        ),
        (
            "r6",
            "Alarm settings were suppressed so no alarm was raised.",
            "T0878",
        ),
    ];
    // Two files (reports r1–r3, r4–r6), so each is also scored by calibrations fitted on the other.
    let (labelled, other) = (models.join("reports.jsonl"), models.join("more.jsonl"));
    for (path, docs) in [
        (&labelled, ["r1", "r2", "r3"]),
        (&other, ["r4", "r5", "r6"]),
    ] {
        let lines: Vec<String> = reports
            .iter()
            .filter(|(doc, _, _)| docs.contains(doc))
            .map(|(doc, text, label)| {
                let labels: Vec<&str> = [*label].into_iter().filter(|l| !l.is_empty()).collect();
                json!({"doc": doc, "text": text, "labels": labels}).to_string()
            })
            .collect();
        std::fs::write(path, lines.join("\n")).unwrap();
    }
    let cli = || {
        let mut c = common::cli();
        c.env("THREATLAKE_LAKE_MODELS", &models)
            .args(["--lake", lake().to_str().unwrap()]);
        c
    };
    let (samples, report_samples) = (models.join("samples.jsonl"), models.join("reports.out"));
    let (ok, out, err) = common::run(cli().args([
        "model",
        "calibrate",
        "--model",
        dir.to_str().unwrap(),
        "--input",
        labelled.to_str().unwrap(),
        "--input",
        other.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
        "--report-samples",
        report_samples.to_str().unwrap(),
    ]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("map_report scores"), "{out}");
    assert!(
        out.contains("precision of each file's best-scored 60% of labelled texts"),
        "{out}"
    );
    // Each file's line of figures with the calibrations fitted on the other file alone.
    let held_out = out
        .split("fitted on the other files only")
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"));
    for file in ["reports.jsonl", "more.jsonl"] {
        let line = held_out
            .lines()
            .find(|l| l.starts_with(file))
            .unwrap_or_else(|| panic!("{out}"));
        let figures: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(
            figures.len() == 5 && figures.iter().all(|x| (0.0..=1.0).contains(x)),
            "{line}"
        );
    }
    // One sample per labelled row, its candidates named; a candidate is right exactly when its
    // id is one of the row's labels.
    let json_lines = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = json_lines(&samples);
    assert_eq!(rows.len(), reports.len());
    for (row, (_, text, label)) in rows.iter().zip(&reports) {
        let (ids, candidates) = (
            row["ids"].as_array().unwrap(),
            row["candidates"].as_array().unwrap(),
        );
        assert_eq!(ids.len(), candidates.len(), "{text}");
        for (id, c) in ids.iter().zip(candidates) {
            assert_eq!(c[1].as_bool(), Some(id.as_str() == Some(*label)), "{text}");
        }
    }
    // Report samples: the techniques a report supports, each right exactly when a row of that
    // report is labelled with it.
    let supported = json_lines(&report_samples);
    assert!(!supported.is_empty());
    for s in &supported {
        let id = s["id"].as_str().unwrap();
        let group = s["group"].as_u64().unwrap();
        let labelled = reports.iter().any(|(doc, _, l)| {
            threatlake_udfs::mapper::calibrate::group_of(doc) == group && *l == id
        });
        assert_eq!(s["right"].as_bool(), Some(labelled), "{s}");
        assert!(s["sentences"].as_u64().unwrap() >= 1 && s["units"].as_u64().unwrap() >= 1);
        let (best, any) = (s["best"].as_f64().unwrap(), s["any"].as_f64().unwrap());
        assert!(0.0 < best && best <= any + 1e-12 && any <= 1.0, "{s}");
    }
    assert!(supported.iter().any(|s| s["right"].as_bool().unwrap()));
    // The report scores' spread over draws of the folds, as for the sentences.
    assert!(
        out.contains("report-score ECE (CV) over 5 partitions into folds"),
        "{out}"
    );
    let cal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("calibration.json")).unwrap()).unwrap();
    let report = &cal["report"];
    assert!(
        report["slope"].as_f64().unwrap() > 0.0
            && report["bias"].as_f64().unwrap().is_finite()
            && (0.0..1.0).contains(&report["threshold"].as_f64().unwrap()),
        "{report}"
    );
    // Thirteen rows fit the text calibration to near-certain scores; a report calibration that
    // halves the log-odds shows whether map --document applies it.
    let (slope, bias) = (0.5, -1.0);
    let mut cal = cal.clone();
    cal["report"] = json!({"slope": slope, "bias": bias, "threshold": 0.2});
    std::fs::write(dir.join("calibration.json"), cal.to_string()).unwrap();
    let document =
        "The attackers modified the controller program and downloaded new logic to the PLC. \
        They also uploaded a modified project file to the controller.\n\n\
        Later they sent unauthorized command messages to the field devices.";
    let scores = |cli: &mut Command| -> Vec<(String, f64)> {
        let (ok, out, err) = common::run(cli.args([
            "map",
            "--domain",
            "ics",
            "--document",
            "--format",
            "jsonl",
            document,
        ]));
        assert!(ok, "{err}");
        jsonl_techniques(&out)
    };
    // Threshold 0 keeps every supported technique, with and without the report calibration.
    let config = models.join("settings.yaml");
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/settings.yaml"))
            .unwrap();
    assert!(shipped.contains("\n  threshold: null"));
    std::fs::write(
        &config,
        shipped.replace("\n  threshold: null", "\n  threshold: 0.0"),
    )
    .unwrap();
    let calibrated = scores(cli().args(["--config", config.to_str().unwrap()]));
    let mut without = cal.clone();
    without.as_object_mut().unwrap().remove("report");
    std::fs::write(dir.join("calibration.json"), without.to_string()).unwrap();
    let raw = scores(cli().args(["--config", config.to_str().unwrap()]));
    assert!(!raw.is_empty(), "{raw:?}");
    assert_eq!(
        calibrated.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        raw.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    // The calibration moves the scores (else the check below would hold for any slope near 1).
    assert!(
        calibrated
            .iter()
            .zip(&raw)
            .any(|((_, c), (_, r))| (c - r).abs() > 0.01),
        "{calibrated:?} {raw:?}"
    );
    let platt = |r: f64| {
        let r = r.clamp(1e-6, 1.0 - 1e-6);
        1.0 / (1.0 + (-(bias + slope * (r / (1.0 - r)).ln())).exp())
    };
    for ((_, c), (_, r)) in calibrated.iter().zip(&raw) {
        // Scores are printed to 4 decimals: the raw score lies within 0.00005 of what is shown.
        let (lo, hi) = (platt(r - 5e-5), platt(r + 5e-5));
        assert!(
            (lo - 1e-4..=hi + 1e-4).contains(c),
            "{c} vs σ(…{r}) in [{lo}, {hi}]"
        );
    }
}

#[test]
fn model_eval_leaves_out_the_reports_the_model_learnt() {
    // An ICS model built with labelled examples from report "seen": evaluated on a file holding that
    // report and another, only the other is measured, and the output says what was left out.
    let models = common::scratch("cli-learnt-examples");
    let examples = models.join("examples.jsonl");
    std::fs::create_dir_all(&models).unwrap();
    let seen = [
        (
            "The intruders uploaded modified ladder logic to the controller.",
            "T0889",
        ),
        (
            "They changed the setpoints of the safety instrumented system.",
            "T0836",
        ),
    ];
    let lines: Vec<String> = seen
        .iter()
        .map(|(t, l)| json!({"doc": "seen", "text": t, "labels": [l]}).to_string())
        .collect();
    std::fs::write(&examples, lines.join("\n")).unwrap();
    let mut eval_lines = lines.clone();
    eval_lines.push(
        json!({"doc": "new", "text": "Unauthorized command messages were sent to the field devices.", "labels": ["T0855"]})
            .to_string(),
    );
    eval_lines.push(
        json!({"doc": "new", "text": "The weather at the plant was calm that week.", "labels": []})
            .to_string(),
    );
    let input = models.join("eval.jsonl");
    std::fs::write(&input, eval_lines.join("\n")).unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/settings.yaml"))
            .unwrap();
    assert!(shipped.contains("\n  examples: builtin"));
    let config = models.join("settings.yaml");
    std::fs::write(
        &config,
        shipped.replace(
            "\n  examples: builtin",
            &format!("\n  examples: {}", examples.display()),
        ),
    )
    .unwrap();
    let cli = || {
        let mut c = common::cli();
        c.env("THREATLAKE_LAKE_MODELS", &models).args([
            "--lake",
            lake().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        c
    };
    let (ok, out, err) = common::run(cli().args(["model", "build", "--domain", "ics"]));
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("learnt 2 labelled report sentence(s) of mapping.examples"),
        "{out}"
    );
    let (ok, out, err) = common::run(cli().args([
        "model",
        "eval",
        "--domain",
        "ics",
        "--input",
        input.to_str().unwrap(),
    ]));
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("left out 2 of 4 rows, those of 1 report(s)"),
        "{out}"
    );
    assert!(out.contains("\nn          1\n"), "{out}");
    assert!(out.contains("negatives  1 "), "{out}");
    // A file that is all learnt text is refused with the reason.
    let (ok, _, err) = common::run(cli().args([
        "model",
        "eval",
        "--domain",
        "ics",
        "--input",
        examples.to_str().unwrap(),
    ]));
    assert!(!ok && err.contains("learnt every report"), "{err}");
}
