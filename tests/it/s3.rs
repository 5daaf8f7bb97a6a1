use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::s3::{lake_url, S3Server, BUCKET};
use crate::common::{self, run};

/// Row counts of every ATT&CK table, one `table,count` line each (CSV), from a `threatlake` command.
fn counts(mut c: Command) -> String {
    let q = common::attack_counts_sql();
    let (ok, out, err) = run(c.args(["sql", "--format", "csv", "--quiet", "-c", &q]));
    assert!(ok, "{err}");
    out
}

fn sql(mut c: Command, q: &str) -> String {
    let (ok, out, err) = run(c.args(["sql", "--format", "csv", "--quiet", "-c", q]));
    assert!(ok, "{q}: {err}");
    out
}

/// `c` set up to ingest the ICS bundle.
fn ingest_ics_cmd(mut c: Command) -> Command {
    c.args(["ingest", "attack", "--domain", "ics", "--from"])
        .arg(common::bundle("ics"));
    c
}

fn ingest_ics(c: Command) -> (bool, String, String) {
    run(&mut ingest_ics_cmd(c))
}

/// The ICS tables as a local ingest writes them: what every S3 lake here must equal.
fn reference() -> &'static str {
    static R: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let dir = common::scratch("s3-reference");
        let (ok, _, err) = ingest_ics(common::cli_on(&dir));
        assert!(ok, "{err}");
        let c = counts(common::cli_on(&dir));
        assert!(c.contains("mitre_attack_techniques,95"), "{c}");
        c
    })
}

fn with_env(mut c: Command, pairs: &[(&str, &str)]) -> Command {
    for (k, v) in pairs {
        c.env(k, v);
    }
    c
}

#[test]
fn s3_lake_ingest_run_report_sync_and_other_readers() {
    let s3 = S3Server::shared();
    let dir = common::scratch("s3-e2e");
    let models = format!("s3://{BUCKET}/e2e/models");
    let mapping = |c: Command| {
        with_env(
            c,
            &[
                ("THREATLAKE_MAPPING_DOMAIN", "ics"),
                ("THREATLAKE_LAKE_MODELS", &models),
                (
                    "THREATLAKE_LAKE_MODELS_CACHE",
                    dir.join("models-cache").to_str().unwrap(),
                ),
            ],
        )
    };
    let (ok, out, err) = ingest_ics(s3.cli("e2e"));
    assert!(ok, "{err}");
    assert!(out.contains("lake: s3://threatlake-test/e2e/lake"), "{out}");
    assert_eq!(counts(s3.cli("e2e")), reference());

    // The main job on the S3 lake, models kept beside it.
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let mut c = mapping(s3.cli("e2e"));
    let (ok, out, err) = run(c
        .args(["run", "--offline", "--samples", "--samples-dir"])
        .arg(&samples));
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(&format!("published 3 file(s) to {models}")),
        "{out}"
    );
    // A fresh machine (empty cache) fetches the model from S3 and maps with it.
    std::fs::remove_dir_all(dir.join("models-cache")).unwrap();
    let mapped = sql(
        mapping(s3.cli("e2e")),
        "SELECT map_technique('the adversary sent unauthorized command messages to the PLC to change its setpoints') AS t",
    );
    assert!(
        mapped.lines().nth(1).is_some_and(|t| t.starts_with('T')),
        "{mapped}"
    );
    assert!(dir.join("models-cache/ics-18.1/manifest.json").is_file());

    // The same lake copied down answers the same (DataFusion reads both).
    let mut c = s3.cli("e2e");
    let (ok, out, err) = run(c.args(["lake", "sync", "--to"]).arg(dir.join("copy")));
    assert!(ok, "{err}");
    assert!(out.contains("0 unchanged"), "{out}");
    let q = "SELECT count(*) AS n, count(DISTINCT technique_id) AS t FROM mapped_threat_data";
    let on_s3 = sql(s3.cli("e2e"), q);
    let mut local = common::cli();
    local.args(["--lake"]).arg(dir.join("copy"));
    assert_eq!(on_s3, sql(local, q));
    assert!(!on_s3.contains("\n0,"), "mapped rows expected: {on_s3}");
    let (ok, again, _) = run(s3
        .cli("e2e")
        .args(["lake", "sync", "--to"])
        .arg(dir.join("copy")));
    assert!(ok && again.contains("0 object(s) copied"), "{again}");

    // Reports from the S3 lake equal those from the copy.
    for (name, mut c) in [
        ("s3", mapping(s3.cli("e2e"))),
        ("local", mapping(s3.cli_env())),
    ] {
        if name == "local" {
            c.args(["--lake"]).arg(dir.join("copy"));
        }
        let (ok, out, err) = run(c
            .args([
                "report",
                "technique_frequency",
                "tactic_coverage",
                "--format",
                "csv,navigator",
                "--out",
            ])
            .arg(dir.join(format!("reports-{name}"))));
        assert!(ok, "{out}{err}");
    }
    for f in ["technique_frequency.csv", "tactic_coverage.csv"] {
        let a = std::fs::read_to_string(dir.join("reports-s3").join(f)).unwrap();
        let b = std::fs::read_to_string(dir.join("reports-local").join(f)).unwrap();
        assert!(a.lines().count() > 1, "{f} is empty");
        assert_eq!(a, b, "{f}");
    }

    // Other engines read the lake on S3 directly: stock DuckDB (through an fsspec S3 filesystem,
    // since its httpfs extension is a download), hive partitions and all.
    let glob = format!("{}/mitre_attack_techniques/**/*.parquet", lake_url("e2e"));
    let py = format!(
        "import duckdb, s3fs\n\
         fs = s3fs.S3FileSystem(key={key:?}, secret={secret:?}, endpoint_url={ep:?})\n\
         con = duckdb.connect()\n\
         con.register_filesystem(fs)\n\
         print(con.sql(\"SELECT count(*), count(DISTINCT domain) FROM read_parquet('{glob}', hive_partitioning = true) WHERE domain = 'ics'\").fetchall()[0])\n",
        key = s3.key,
        secret = s3.secret,
        ep = s3.endpoint
    );
    let (ok, out, err) = run(Command::new("python3").args(["-c", &py]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "(95, 1)");
    // … and `lake duckdb-sql` points stock DuckDB at the same objects.
    let (ok, out, err) = run(s3.cli("e2e").args(["lake", "duckdb-sql"]));
    assert!(ok, "{err}");
    let snapshot_file = format!(
        "'{}/mitre_attack_techniques/domain=ics/attack_version=18.1/part-",
        lake_url("e2e")
    );
    assert!(out.contains(&snapshot_file), "{out}");
}

#[test]
fn s3_errors_name_the_cause_and_the_fix() {
    let s3 = S3Server::shared();
    // Wrong secret: refused, said so, nothing written.
    let (ok, _, err) = ingest_ics(with_env(
        s3.cli("badkey"),
        &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
    ));
    assert!(!ok);
    assert!(
        err.contains("SignatureDoesNotMatch")
            && err.contains("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert!(
        err.lines().count() <= 3,
        "one clear message, not a chain: {err}"
    );
    let (ok, _, err) = run(
        with_env(s3.cli("badkey"), &[("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")])
            .args(["lake", "tables"]),
    );
    assert!(!ok && err.contains("InvalidAccessKeyId"), "{err}");
    let (ok, out, err) = run(s3.cli("badkey").args(["lake", "tables"]));
    assert!(ok && out.contains("no tables yet"), "{out}{err}");

    // Missing bucket.
    let (ok, _, err) =
        run(s3
            .cli_env()
            .args(["--lake", "s3://no-such-bucket/lake", "lake", "tables"]));
    assert!(
        !ok && err.contains("NoSuchBucket") && err.contains("create it"),
        "{err}"
    );

    // Nobody listening: bounded by the retry settings, and says what to check.
    let t = std::time::Instant::now();
    let (ok, _, err) = run(
        with_env(s3.cli("x"), &[("AWS_ENDPOINT_URL", "http://127.0.0.1:9")])
            .args(["lake", "tables"]),
    );
    assert!(
        !ok && err.contains("did not answer") && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60));

    // Malformed URLs.
    let (ok, _, err) = run(s3
        .cli_env()
        .args(["--lake", "s3:///lake", "lake", "tables"]));
    assert!(!ok && err.contains("no bucket"), "{err}");
}

#[test]
fn s3_server_dying_mid_ingest_loses_nothing_and_a_rerun_completes() {
    let mut s3 = S3Server::start(&[BUCKET]);
    // Two PUTs (the lock and the raw bundle) go through, then the server goes away mid-tables.
    assert_eq!(s3.command("die-after-puts 4"), "ok");
    let t = std::time::Instant::now();
    let (ok, out, err) = ingest_ics(s3.cli("dies"));
    assert!(!ok, "{out}");
    assert!(
        err.contains("did not answer") && err.contains("re-run"),
        "{err}"
    );
    assert!(err.contains("current ATT&CK is unchanged"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "bounded by the retry settings"
    );
    assert_eq!(s3.command("revive"), "ok");

    // What landed is whole: every object that is there reads as Parquet and the SQL layer opens it.
    let loc = s3.location(&lake_url("dies"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let objects = rt.block_on(loc.list("")).unwrap();
    let parquet: Vec<_> = objects
        .iter()
        .filter(|o| o.location.as_ref().ends_with(".parquet"))
        .collect();
    assert!(
        parquet.len() < 10,
        "the server died before most tables: {}",
        parquet.len()
    );
    for o in &parquet {
        let rel = loc.relative_parts(&o.location).join("/");
        let bytes = rt.block_on(loc.get(&rel)).unwrap();
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap_or_else(|e| panic!("{rel} is not whole Parquet: {e}"));
    }
    let partial = counts(s3.cli("dies"));
    assert_ne!(partial, reference());
    // … and none of it is current: the release's version row, written last, never landed.
    assert_eq!(
        sql(
            s3.cli("dies"),
            "SELECT count(*) AS n FROM attack_techniques_current"
        ),
        "n\n0\n"
    );
    // The dead ingest could not release its lock; its process is gone, so the re-run takes it over.
    let locks = rt.block_on(loc.locks()).unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert!(locks[0].is_dead());
    let (ok, _, err) = ingest_ics(s3.cli("dies"));
    assert!(ok, "{err}");
    assert_eq!(counts(s3.cli("dies")), reference());
    assert!(rt.block_on(loc.locks()).unwrap().is_empty());
}

#[test]
fn s3_concurrent_writers_serialise_or_fail_cleanly() {
    let s3 = S3Server::shared();
    let loc = s3.location(&lake_url("conc"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A writer holds the ATT&CK lock: a second ingest fails at once, names it, writes nothing.
    let held = rt
        .block_on(loc.lock("attack", "test holder", Duration::from_secs(600)))
        .unwrap();
    let (ok, _, err) = ingest_ics(s3.cli("conc"));
    assert!(!ok);
    assert!(
        err.contains("is being written by test holder (pid"),
        "{err}"
    );
    assert!(err.contains("threatlake lake unlock attack"), "{err}");
    let (ok, out, _) = run(s3.cli("conc").args(["lake", "locks"]));
    assert!(ok && out.contains("test holder"), "{out}");
    assert_eq!(
        rt.block_on(loc.list("")).unwrap().len(),
        1,
        "only the lock object exists"
    );
    rt.block_on(held.release()).unwrap();

    // Two ingests of the same source at once: each finishes or fails with the lock message, and
    // the lake ends up exactly as one ingest leaves it.
    let spawn = || {
        let mut c = ingest_ics_cmd(s3.cli("conc"));
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut succeeded = 0;
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            succeeded += 1;
        } else {
            assert!(err.contains("is being written by ingest attack"), "{err}");
        }
    }
    assert!(succeeded >= 1);
    assert_eq!(counts(s3.cli("conc")), reference());
    let dup = sql(
        s3.cli("conc"),
        "SELECT count(*) - count(DISTINCT technique_id) AS dup FROM mitre_attack_techniques",
    );
    assert_eq!(dup.trim(), "dup\n0");
}

#[test]
fn s3_delta_commits_concurrent_appends_optimize_vacuum_and_time_travel() {
    let s3 = S3Server::shared();
    let url = lake_url("delta");
    let lake = threatlake::Lake {
        location: s3.location(&url),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("x", arrow::datatypes::DataType::Int64, false),
    ]));
    let batch = |v: i64| {
        arrow::array::RecordBatch::try_new(
            schema.clone(),
            vec![std::sync::Arc::new(arrow::array::Int64Array::from(vec![v]))],
        )
        .unwrap()
    };
    rt.block_on(async {
        lake.append(
            "feed_log",
            &[("ingest_date", "2026-11-01")],
            schema.clone(),
            &[batch(0)],
            "b0",
        )
        .await
        .unwrap();
        // Four writers at once: S3's conditional PUT lets exactly one create each commit; the
        // others re-read the log and retry (appends do not conflict), so every batch lands once.
        let writes = (1..5).map(|i| {
            let lake = lake.clone();
            let (schema, b) = (schema.clone(), batch(i));
            async move {
                lake.append(
                    "feed_log",
                    &[("ingest_date", "2026-11-01")],
                    schema,
                    &[b],
                    "w",
                )
                .await
            }
        });
        let versions: Vec<u64> = futures::future::join_all(writes)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let mut sorted = versions.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![2, 3, 4, 5],
            "one commit per writer: {versions:?}"
        );
    });
    let q = "SELECT count(*) AS n, sum(x) AS s FROM feed_log";
    let before = sql(s3.cli("delta"), q);
    assert_eq!(before, "n,s\n5,10\n");
    let (ok, out, err) = run(s3.cli("delta").args(["lake", "optimize"]));
    assert!(ok, "{err}");
    assert!(out.contains("1 table(s) compacted, 5 file(s) → 1"), "{out}");
    assert_eq!(sql(s3.cli("delta"), q), before);
    // Time travel to version 3 (created, then three appends), before the compaction.
    assert_eq!(
        sql(
            s3.cli("delta"),
            "SELECT count(*) AS n FROM as_of('feed_log', 3)"
        ),
        "n\n3\n"
    );
    let (ok, out, err) = run(s3.cli("delta").args(["lake", "history", "feed_log"]));
    assert!(
        ok && out.lines().next().unwrap_or("").contains("OPTIMIZE"),
        "{out}{err}"
    );
    let parquet = |lake: &threatlake::Lake| {
        rt.block_on(lake.location.list("feed_log"))
            .unwrap()
            .iter()
            .filter(|o| o.location.extension() == Some("parquet"))
            .count()
    };
    assert_eq!(parquet(&lake), 6);
    let (ok, out, err) = run(s3.cli("delta").args(["lake", "vacuum", "--retain", "0s"]));
    assert!(ok && out.contains("5 file(s) deleted"), "{out}{err}");
    assert_eq!(parquet(&lake), 1);
    assert_eq!(sql(s3.cli("delta"), q), before);
}

/// On S3 as on disk: the process aborted at every write of a re-ingest leaves every table as before or
/// as after, and the re-run completes (the dead writer's lock taken over with a conditional update).
#[test]
fn s3_abort_at_every_write_of_an_attack_ingest_leaves_each_table_before_or_after() {
    use super::delta::{assert_each_before_or_after, per_table, subset_bundle};
    let s3 = S3Server::shared();
    let base = common::scratch("s3-crash-base");
    let (ok, _, err) = ingest_ics(common::cli_on(&base));
    assert!(ok, "{err}");
    let subset = subset_bundle(&base);
    let before = per_table(&counts(common::cli_on(&base)));
    let ingest_subset = |mut c: Command| {
        c.args(["ingest", "attack", "--domain", "ics", "--force", "--from"])
            .arg(&subset);
        c
    };
    let mut after = None;
    let mut aborted = 0;
    for n in 1..200 {
        let prefix = format!("crash-{n}");
        let (ok, _, err) = run(s3
            .cli_env()
            .args(["lake", "sync", "--to", &lake_url(&prefix), "--from"])
            .arg(base.join("lake")));
        assert!(ok, "{err}");
        assert_eq!(per_table(&counts(s3.cli(&prefix))), before);
        let mut c = ingest_subset(s3.cli(&prefix));
        c.env(threatlake::lake::fault::ABORT_AT_ENV, n.to_string());
        let (ok, _, err) = run(&mut c);
        if ok {
            break;
        }
        assert!(err.contains("aborting at write"), "write {n}: {err}");
        aborted += 1;
        let now = per_table(&counts(s3.cli(&prefix)));
        let (ok, _, err) = run(&mut ingest_subset(s3.cli(&prefix)));
        assert!(
            ok,
            "re-run after abort at write {n} needs no manual step: {err}"
        );
        let done = per_table(&counts(s3.cli(&prefix)));
        assert_eq!(done["mitre_attack_techniques"], "20");
        let after = after.get_or_insert(done.clone());
        assert_eq!(&done, after, "abort at write {n}, then re-run");
        assert_each_before_or_after(&now, &before, after, n);
    }
    assert!(aborted >= 10, "{aborted}");
}
