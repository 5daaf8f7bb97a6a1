use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use insta_cmd::assert_cmd_snapshot;

use crate::common;

/// An ICS-only lake, ingested once through the CLI.
fn lake() -> &'static PathBuf {
    static LAKE: OnceLock<PathBuf> = OnceLock::new();
    LAKE.get_or_init(|| {
        let dir = common::scratch("cli-lake");
        let status = Command::new(env!("CARGO_BIN_EXE_threatlake"))
            .args([
                "--lake",
                dir.join("lake").to_str().unwrap(),
                "--raw",
                dir.join("raw").to_str().unwrap(),
            ])
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
    let mut c = Command::new(env!("CARGO_BIN_EXE_threatlake"));
    c.env_remove("THREATLAKE_CONFIG")
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .args(["--lake", lake().to_str().unwrap(), "sql"])
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
    let out = Command::new(env!("CARGO_BIN_EXE_threatlake"))
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
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
    p.send_line("SELECT no_such_column FROM mitre_attack_tactics;")
        .unwrap();
    p.exp_string("No field named no_such_column").unwrap();
    p.exp_string("threatlake>").unwrap();
    // Tab completes a table name.
    p.send("SELECT count(*) FROM attack_tactics_cur\t").unwrap();
    p.send_line(";").unwrap();
    p.exp_string("12").unwrap();
    p.exp_string("threatlake>").unwrap();
    p.send_line("\\format csv").unwrap();
    p.exp_string("threatlake>").unwrap();
    p.send_line("SELECT tactic_id FROM attack_tactics_current WHERE matrix_order = 1;")
        .unwrap();
    p.exp_string("tactic_id\r\nTA0108").unwrap();
    p.exp_string("threatlake>").unwrap();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();
    let h = std::fs::read_to_string(&history).unwrap();
    assert!(h.contains("FROM attack_techniques_current;"), "{h}");
}
