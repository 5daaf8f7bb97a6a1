use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::common::{self, copy_dir, run};

/// Row counts of every ATT&CK table, one `table,count` line each (CSV).
fn counts(dir: &Path) -> String {
    sql(dir, &common::attack_counts_sql())
}

fn sql(dir: &Path, q: &str) -> String {
    let (ok, out, err) =
        run(common::cli_on(dir).args(["sql", "--format", "csv", "--quiet", "-c", q]));
    assert!(ok, "{q}: {err}");
    out
}

fn ingest(dir: &Path, bundle: &Path) -> Command {
    let mut c = common::cli_on(dir);
    c.args(["ingest", "attack", "--domain", "ics", "--force", "--from"])
        .arg(bundle);
    c
}

/// The ICS bundle cut to its first 20 techniques (and the relationships among what is left).
pub(super) fn subset_bundle(dir: &Path) -> PathBuf {
    let gz = std::fs::read(common::bundle("ics")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let mut bundle: serde_json::Value = serde_json::from_str(&text).unwrap();
    let objects = bundle["objects"].as_array().unwrap().clone();
    let mut kept_techniques = 0;
    let mut dropped = std::collections::HashSet::new();
    let mut kept: Vec<serde_json::Value> = Vec::new();
    for o in objects.iter() {
        if o["type"] == "attack-pattern" {
            if kept_techniques == 20 {
                dropped.insert(o["id"].as_str().unwrap().to_string());
                continue;
            }
            kept_techniques += 1;
        }
        kept.push(o.clone());
    }
    kept.retain(|o| {
        o["type"] != "relationship"
            || !(dropped.contains(o["source_ref"].as_str().unwrap_or(""))
                || dropped.contains(o["target_ref"].as_str().unwrap_or("")))
    });
    bundle["objects"] = serde_json::Value::Array(kept);
    let path = dir.join("ics-subset.json");
    std::fs::write(&path, serde_json::to_vec(&bundle).unwrap()).unwrap();
    path
}

/// Every table's row count is the one before or the one after (after an abort at write `n`).
pub(super) fn assert_each_before_or_after(
    now: &std::collections::BTreeMap<String, String>,
    before: &std::collections::BTreeMap<String, String>,
    after: &std::collections::BTreeMap<String, String>,
    n: u64,
) {
    for (t, v) in now {
        assert!(
            v == &before[t] || v == &after[t],
            "abort at write {n}: {t} has {v} rows, neither {} nor {}",
            before[t],
            after[t]
        );
    }
}

/// `table,count` lines as a map.
pub(super) fn per_table(csv: &str) -> std::collections::BTreeMap<String, String> {
    csv.lines()
        .skip(1)
        .filter_map(|l| {
            l.split_once(',')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

/// The process is aborted at every write and delete of a re-ingest (as `kill -9` would stop it):
/// every table is then as before or as after (one Delta commit per table), no read fails, and the
/// next run completes without a manual step (the dead writer's lock is taken over on local disk).
#[test]
fn abort_at_every_write_of_an_attack_ingest_leaves_each_table_before_or_after() {
    let base = common::scratch("crash-base");
    let (ok, _, err) = run(&mut ingest(&base, &common::bundle("ics")));
    assert!(ok, "{err}");
    let subset = subset_bundle(&base);
    let before = per_table(&counts(&base));
    let reference = common::scratch("crash-after");
    copy_dir(&base.join("lake"), &reference.join("lake"));
    let (ok, _, err) = run(&mut ingest(&reference, &subset));
    assert!(ok, "{err}");
    let after = per_table(&counts(&reference));
    assert_ne!(before, after);
    assert_eq!(after["mitre_attack_techniques"], "20");

    let work = common::scratch("crash-work");
    let mut aborted = 0;
    for n in 1..200 {
        copy_dir(&base.join("lake"), &work.join("lake"));
        let mut c = ingest(&work, &subset);
        c.env(threatlake::lake::fault::ABORT_AT_ENV, n.to_string());
        let (ok, _, err) = run(&mut c);
        if ok {
            break; // fewer than n writes: every step has been tried
        }
        assert!(err.contains("aborting at write"), "write {n}: {err}");
        aborted += 1;
        assert_each_before_or_after(&per_table(&counts(&work)), &before, &after, n);
        let (ok, _, err) = run(&mut ingest(&work, &subset));
        assert!(
            ok,
            "re-run after abort at write {n} needs no manual step: {err}"
        );
        assert_eq!(
            per_table(&counts(&work)),
            after,
            "abort at write {n}, then re-run"
        );
    }
    assert!(
        aborted >= 10,
        "an ingest writes at least the raw bundle and each table: {aborted}"
    );
}

/// Readers query in a loop while another process re-ingests full and 20-technique releases in turn:
/// every query succeeds and sees exactly one of them.
#[test]
fn readers_see_one_release_while_another_process_reingests() {
    let dir = common::scratch("delta-readers");
    let (ok, _, err) = run(&mut ingest(&dir, &common::bundle("ics")));
    assert!(ok, "{err}");
    let subset = subset_bundle(&dir);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, done) = (dir.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..6 {
                let b = if i % 2 == 0 {
                    subset.clone()
                } else {
                    common::bundle("ics")
                };
                let (ok, _, err) = run(&mut ingest(&dir, &b));
                assert!(ok, "{err}");
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let (mut queries, mut seen) = (0, std::collections::BTreeSet::new());
    while !done.load(Ordering::SeqCst) || queries == 0 {
        let (ok, out, err) = run(common::cli_on(&dir).args([
            "sql",
            "--format",
            "csv",
            "--quiet",
            "-c",
            "SELECT count(*) AS n, count(DISTINCT technique_id) AS d FROM mitre_attack_techniques",
        ]));
        assert!(ok, "query {queries} failed during a re-ingest: {err}");
        assert!(
            out == "n,d\n95,95\n" || out == "n,d\n20,20\n",
            "query {queries} saw a mix: {out}"
        );
        seen.insert(out);
        queries += 1;
    }
    writer.join().unwrap();
    assert!(queries >= 3, "{queries}");
    eprintln!(
        "{queries} queries during 6 re-ingests, releases seen: {}",
        seen.len()
    );
}

/// Time travel: after a re-ingest the earlier release is still readable by version and by time, and
/// `lake history` lists the commits.
#[test]
fn time_travel_reads_the_release_before_a_reingest() {
    let dir = common::scratch("delta-travel");
    let (ok, _, err) = run(&mut ingest(&dir, &common::bundle("ics")));
    assert!(ok, "{err}");
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (ok, _, err) = run(&mut ingest(&dir, &subset_bundle(&dir)));
    assert!(ok, "{err}");
    let q = |at: &str| {
        sql(
            &dir,
            &format!("SELECT count(*) AS n FROM as_of('mitre_attack_techniques', {at})"),
        )
    };
    assert_eq!(q("0"), "n\n0\n", "version 0 created the table");
    assert_eq!(q("1"), "n\n95\n");
    assert_eq!(q("2"), "n\n20\n");
    assert_eq!(q(&format!("'{between}'")), "n\n95\n");
    assert_eq!(
        sql(&dir, "SELECT count(*) AS n FROM mitre_attack_techniques"),
        "n\n20\n"
    );
    let (ok, _, err) = run(common::cli_on(&dir).args([
        "sql",
        "-c",
        "SELECT count(*) FROM as_of('mitre_attack_techniques', 7)",
    ]));
    assert!(
        !ok && err.contains("lake history mitre_attack_techniques"),
        "{err}"
    );
    let (ok, out, err) =
        run(common::cli_on(&dir).args(["lake", "history", "mitre_attack_techniques"]));
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[2].contains("CREATE TABLE"), "{out}");
    assert!(
        lines[0].trim_start().starts_with('2') && lines[0].contains("ingest attack ics 18.1"),
        "{out}"
    );
}

/// Rewrite the Delta lake `lake` in the layout of releases before Delta: each table's current files
/// as `table/<k=v>/part-N.parquet`, no `_delta_log`.
fn to_plain_parquet(lake: &Path) {
    let old = lake.with_extension("old");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let l = threatlake::Lake::open(lake.to_str().unwrap()).unwrap();
    for table in std::fs::read_dir(lake).unwrap() {
        let table = table.unwrap().path();
        let name = table.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('_') {
            continue;
        }
        let snap = rt
            .block_on(l.snapshot(&name, &threatlake::lake::delta::AsOf::Latest))
            .unwrap()
            .unwrap();
        for (i, (f, _)) in snap.files.iter().enumerate() {
            let rel = Path::new(f);
            let target = old
                .join(&name)
                .join(rel.parent().unwrap())
                .join(format!("part-{i}.parquet"));
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(table.join(rel), target).unwrap();
        }
    }
    std::fs::remove_dir_all(lake).unwrap();
    std::fs::rename(old, lake).unwrap();
}

/// Run `args` on a copy of `base` aborted at write 1, 2, … until it completes; after each abort
/// `check` sees the lake, then the command is re-run to completion and `check` sees it again.
/// Returns how many aborts there were.
fn abort_at_each_write(base: &Path, work: &Path, args: &[&str], check: &dyn Fn(&Path, u64)) -> u64 {
    for n in 1..500 {
        copy_dir(&base.join("lake"), &work.join("lake"));
        let mut c = common::cli_on(work);
        c.args(args)
            .env(threatlake::lake::fault::ABORT_AT_ENV, n.to_string());
        let (ok, _, err) = run(&mut c);
        if ok {
            return n - 1;
        }
        assert!(
            err.contains("aborting at write"),
            "{args:?} write {n}: {err}"
        );
        check(work, n);
        let (ok, out, err) = run(common::cli_on(work).args(args));
        assert!(ok, "{args:?} re-run after abort at write {n}: {out}{err}");
        check(work, n);
    }
    panic!("{args:?} never completed");
}

/// `lake optimize` and `lake upgrade` aborted at every write: the answers never change, and a re-run
/// finishes the job.
#[test]
fn abort_at_every_write_of_optimize_and_upgrade_keeps_every_answer() {
    let base = common::scratch("crash-maint-base");
    let (ok, _, err) = run(&mut ingest(&base, &common::bundle("ics")));
    assert!(ok, "{err}");
    {
        let lake = threatlake::Lake::open(base.join("lake").to_str().unwrap()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("x", arrow::datatypes::DataType::Int64, false),
        ]));
        for i in 0..4 {
            let b = arrow::array::RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(arrow::array::Int64Array::from(vec![i, 10 * i]))],
            )
            .unwrap();
            rt.block_on(lake.append(
                "feed_log",
                &[("d", "2026-11-01")],
                schema.clone(),
                &[b],
                "b",
            ))
            .unwrap();
        }
    }
    let q = "SELECT (SELECT count(*) FROM feed_log) AS n, (SELECT sum(x) FROM feed_log) AS s, \
             (SELECT count(*) FROM attack_techniques_current) AS t";
    let want = sql(&base, q);
    assert_eq!(want, "n,s,t\n8,66,83\n");
    let work = common::scratch("crash-maint-work");
    let same = |dir: &Path, n: u64| assert_eq!(sql(dir, q), want, "after abort at write {n}");
    let aborts = abort_at_each_write(&base, &work, &["lake", "optimize"], &same);
    assert!(aborts >= 2, "optimize writes a file and a commit: {aborts}");

    to_plain_parquet(&base.join("lake"));
    let upgraded = |dir: &Path, n: u64| {
        // Mid-upgrade the lake is refused as a whole (some tables converted, some not)...
        let (ok, out, err) =
            run(common::cli_on(dir).args(["sql", "--format", "csv", "--quiet", "-c", q]));
        assert!(
            ok && out == want || !ok && err.contains("lake upgrade"),
            "after abort at write {n}: {out}{err}"
        );
    };
    let aborts = abort_at_each_write(&base, &work, &["lake", "upgrade"], &upgraded);
    assert!(aborts >= 10, "upgrade commits every table: {aborts}");
    // ... and after the re-run it answers as before the conversion.
    assert_eq!(sql(&work, q), want);
}

/// Two writers appending to one table at once, on local disk: both commits land, nothing is lost
/// or duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_appends_both_land() {
    let dir = common::scratch("delta-appends");
    let lake = threatlake::Lake::open(dir.join("lake").to_str().unwrap()).unwrap();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("x", arrow::datatypes::DataType::Int64, false),
    ]));
    let writes = (0..6).map(|i| {
        let (lake, schema) = (lake.clone(), schema.clone());
        tokio::spawn(async move {
            let b = arrow::array::RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(arrow::array::Int64Array::from(vec![i]))],
            )
            .unwrap();
            lake.append("log", &[("d", "1")], schema, &[b], "w").await
        })
    });
    let mut versions: Vec<u64> = Vec::new();
    for w in writes {
        versions.push(w.await.unwrap().unwrap());
    }
    versions.sort();
    assert_eq!(
        versions,
        (1..=6).collect::<Vec<u64>>(),
        "version 0 created the table"
    );
    let engine = threatlake::sql::Engine::open(&lake).await.unwrap();
    let r = engine
        .run("SELECT count(*) AS n, count(DISTINCT x) AS d, sum(x) AS s FROM log")
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&r[0].batches)
        .unwrap()
        .to_string();
    assert!(text.contains("| 6 | 6 | 15 |"), "{text}");
}

/// A lake in the layout of releases before Delta (hive-partitioned Parquet, no commit log) is refused
/// with the fix, and `lake upgrade` converts it in place with identical query answers.
#[test]
fn upgrade_of_a_plain_parquet_lake_gives_identical_answers() {
    let dir = common::scratch("delta-upgrade");
    let (ok, _, err) = run(&mut ingest(&dir, &common::bundle("ics")));
    assert!(ok, "{err}");
    let q =
        "SELECT technique_id, name, domain FROM attack_techniques_current ORDER BY technique_id";
    let want = (counts(&dir), sql(&dir, q));
    to_plain_parquet(&dir.join("lake"));

    let (ok, _, err) = run(common::cli_on(&dir).args(["sql", "-c", "SELECT 1"]));
    assert!(
        !ok && err.contains("run `threatlake lake upgrade`"),
        "{err}"
    );
    let (ok, _, err) = run(&mut ingest(&dir, &common::bundle("ics")));
    assert!(
        !ok && err.contains("lake upgrade"),
        "writes are refused too: {err}"
    );
    let (ok, out, err) = run(common::cli_on(&dir).args(["lake", "upgrade"]));
    assert!(
        ok && out.contains("mitre_attack_techniques: 1 Parquet file(s) → Delta table"),
        "{out}{err}"
    );
    assert_eq!((counts(&dir), sql(&dir, q)), want);
    let (ok, out, _) = run(common::cli_on(&dir).args(["lake", "upgrade"]));
    assert!(ok && out.contains("already a Delta table"), "{out}");
}

/// `run` aborted at every write of its map and threat-model stages: evidence is never counted twice,
/// and the next run completes the job with the same evidence as an uninterrupted run.
#[test]
fn abort_during_mapping_never_counts_evidence_twice() {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let job = |dir: &Path, abort: Option<&str>| {
        let mut c = common::ics_cli_on(dir);
        c.env("THREATLAKE_OTX_API_KEY", "unused")
            .env("THREATLAKE_OTX_BASE_URL", "http://127.0.0.1:9")
            .args(["run", "--offline", "--samples", "--samples-dir"])
            .arg(&samples);
        if let Some(a) = abort {
            c.env(threatlake::lake::fault::ABORT_AT_ENV, a);
        }
        run(&mut c)
    };
    let evidence = |dir: &Path| {
        sql(
            dir,
            "SELECT count(*) AS n, count(DISTINCT item_id || '|' || item_version || '|' || technique_id || '|' || method) AS d \
             FROM mapped_threat_data",
        )
    };
    let model = |dir: &Path| {
        sql(
            dir,
            "SELECT sum(evidence_count) AS e FROM threat_model WHERE run_id = (SELECT max(run_id) FROM threat_model)",
        )
    };
    // The lake before `run`: ICS and a model.
    let prep = common::scratch("crash-run-prep");
    let (ok, _, err) = run(&mut ingest(&prep, &common::bundle("ics")));
    assert!(ok, "{err}");
    let (ok, _, err) = run(common::ics_cli_on(&prep).args([
        "model",
        "build",
        "--domain",
        "ics",
        "--no-pretrained",
    ]));
    assert!(ok, "{err}");
    // One traced run: which writes belong to mapping and the snapshot, and what they leave.
    let reference = common::scratch("crash-run-ref");
    copy_dir(&prep.join("lake"), &reference.join("lake"));
    copy_dir(&prep.join("models"), &reference.join("models"));
    let (ok, out, err) = job(&reference, Some("trace"));
    assert!(ok, "{out}{err}");
    let steps: Vec<u64> = err
        .lines()
        .filter_map(|l| l.strip_prefix("write "))
        .filter(|l| {
            [
                "mapped_threat_data",
                "mapped_items",
                "threat_model",
                "_locks/intel",
            ]
            .iter()
            .any(|t| l.contains(&format!("/{t}")))
        })
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert!(
        steps.len() >= 6,
        "map and snapshot write data and log for 3 tables: {err}"
    );
    let (want_evidence, want_model) = (evidence(&reference), model(&reference));
    assert!(!want_evidence.ends_with("\n0,0\n"), "{want_evidence}");

    let work = common::scratch("crash-run-work");
    for n in steps {
        copy_dir(&prep.join("lake"), &work.join("lake"));
        copy_dir(&prep.join("models"), &work.join("models"));
        let (ok, _, err) = job(&work, Some(&n.to_string()));
        assert!(!ok && err.contains("aborting at write"), "write {n}: {err}");
        let e = evidence(&work);
        let (n_rows, distinct) = e.lines().nth(1).unwrap().split_once(',').unwrap();
        assert_eq!(
            n_rows, distinct,
            "abort at write {n} left duplicate evidence: {e}"
        );
        let (ok, out, err) = job(&work, None);
        assert!(ok, "re-run after abort at write {n}: {out}{err}");
        assert_eq!(
            evidence(&work),
            want_evidence,
            "abort at write {n}, then re-run"
        );
        assert_eq!(model(&work), want_model, "abort at write {n}, then re-run");
    }
}
