use std::io::Write;
use std::path::Path;
use std::time::Duration;

use threatlake::{Engine, Lake, Location};

use crate::common;

async fn count(engine: &Engine, sql: &str) -> i64 {
    let r = engine.run(sql).await.unwrap();
    let b = &r[0].batches[0];
    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0)).value(0)
}

async fn all_counts(lake: &Lake) -> Vec<String> {
    let e = Engine::open(lake).await.unwrap();
    let r = e.run(&common::attack_counts_sql()).await.unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&r[0].batches)
        .unwrap()
        .to_string();
    text.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_runs_exactly_one_statement_read_only() {
    let dir = common::scratch("stream-one");
    let lake = common::ingest(&dir, &["ics"]).await;
    let e = Engine::open(&lake).await.unwrap();
    let (schema, stream) = e
        .stream("SELECT technique_id FROM mitre_attack_techniques WHERE domain = 'ics'")
        .await
        .unwrap();
    assert_eq!(schema.field(0).name(), "technique_id");
    let batches: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let n = count(
        &e,
        "SELECT count(*) FROM mitre_attack_techniques WHERE domain = 'ics'",
    )
    .await;
    assert!(n > 0);
    assert_eq!(rows as i64, n);
    for (sql, says) in [
        ("", "0 statements"),
        ("SELECT 1; SELECT 2", "2 statements"),
        ("COPY mitre_attack_techniques TO 'x.csv'", "read-only"),
    ] {
        let err = e.stream(sql).await.err().expect(sql).to_string();
        assert!(err.contains(says), "{sql:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reingest_is_idempotent() {
    let dir = common::scratch("reingest");
    let lake = common::ingest(&dir, &["ics"]).await;
    let before = all_counts(&lake).await;
    let tables_before = lake.tables().await.unwrap();
    common::ingest(&dir, &["ics"]).await;
    assert_eq!(before, all_counts(&lake).await);
    // One commit per table replaced the partition: still one file each, one version on.
    let tables_after = lake.tables().await.unwrap();
    assert_eq!(tables_before.len(), tables_after.len());
    for (name, t) in &tables_after {
        assert_eq!(t.files, 1, "{name}: re-ingest must replace files, not add");
        assert_eq!(t.version, tables_before[name].version + 1, "{name}");
    }
    // The replaced files stay for time travel until vacuumed.
    let parquet = || {
        common::listing(&dir.join("lake"))
            .into_iter()
            .filter(|(p, _, _)| p.ends_with(".parquet"))
            .count()
    };
    assert_eq!(parquet(), 2 * tables_after.len());
    threatlake::lake::maintain::vacuum(&lake, std::time::Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(parquet(), tables_after.len());
    assert_eq!(before, all_counts(&lake).await);
    assert!(
        before
            .iter()
            .any(|l| l.contains("mitre_attack_techniques") && l.contains("95")),
        "{before:?}"
    );
    assert!(dir.join("raw/attack/ics/18.1.json.gz").is_file());
}

/// Write the ICS bundle re-labelled as another ATT&CK release, with one technique renamed.
fn relabelled_ics(path: &Path, version: &str, rename_to: &str) {
    let mut v = ics_json();
    for o in v["objects"].as_array_mut().unwrap() {
        if o["type"] == "x-mitre-collection" {
            o["x_mitre_version"] = version.into();
        }
        let is_t0800 =
            o["type"] == "attack-pattern" && o["external_references"][0]["external_id"] == "T0800";
        if is_t0800 {
            o["name"] = rename_to.into();
        }
    }
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn second_version_lands_beside_and_current_views_pick_the_newest() {
    let dir = common::scratch("versions");
    let lake = common::ingest(&dir, &["ics"]).await;
    let raw = Location::open(dir.join("raw").to_str().unwrap()).unwrap();
    let v19 = dir.join("ics-19.0.json");
    relabelled_ics(&v19, "19.0", "Renamed In 19");
    let v9 = dir.join("ics-9.0.json");
    relabelled_ics(&v9, "9.0", "Renamed In 9");
    for p in [&v19, &v9] {
        let options = threatlake::attack::IngestOptions {
            timeout: Duration::from_secs(30),
            ..Default::default()
        };
        threatlake::attack::ingest(&lake, &raw, p.to_str().unwrap(), &options)
            .await
            .unwrap();
    }
    let e = Engine::open(&lake).await.unwrap();
    assert_eq!(
        count(
            &e,
            "SELECT count(*) FROM mitre_attack_versions WHERE domain = 'ics'"
        )
        .await,
        3
    );
    assert_eq!(
        count(
            &e,
            "SELECT count(*) FROM mitre_attack_techniques WHERE domain = 'ics'"
        )
        .await,
        3 * 95
    );
    assert_eq!(
        count(
            &e,
            "SELECT count(*) FROM attack_techniques_current WHERE domain = 'ics'"
        )
        .await,
        83
    );
    // 19.0 is newest: string order would pick 9.0.
    assert_eq!(
        count(&e, "SELECT count(*) FROM attack_versions_current WHERE domain = 'ics' AND attack_version = '19.0'").await,
        1
    );
    assert_eq!(
        count(
            &e,
            "SELECT count(*) FROM attack_versions_current WHERE domain = 'ics'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&e, "SELECT count(*) FROM attack_techniques_current WHERE technique_id = 'T0800' AND name = 'Renamed In 19'").await,
        1
    );
    assert!(
        dir.join("raw/attack/ics/19.0.json.gz").is_file()
            && dir.join("raw/attack/ics/18.1.json.gz").is_file()
    );
}

/// A loopback HTTP server that serves `routes` (path -> (status, body)) until `requests` have been
/// answered or 20 s pass, whichever comes first.
fn serve(
    routes: Vec<(&'static str, u16, Vec<u8>)>,
    requests: usize,
) -> (String, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", server.server_addr().to_ip().unwrap());
    let handle = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < requests && std::time::Instant::now() < deadline {
            let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let (status, body) = routes
                .iter()
                .find(|(p, _, _)| *p == req.url())
                .map(|(_, s, b)| (*s, b.clone()))
                .unwrap_or((404, b"not found".to_vec()));
            let _ = req.respond(tiny_http::Response::from_data(body).with_status_code(status));
            served += 1;
        }
    });
    (addr, handle)
}

#[test]
fn ingest_from_loopback_http_and_http_errors_are_clear() {
    let dir = common::scratch("http");
    let gz = std::fs::read(common::bundle("ics")).unwrap();
    let (base, server) = serve(
        vec![
            ("/ics-attack.json", 200, gz),
            ("/gone.json", 500, b"boom".to_vec()),
        ],
        3,
    );
    let lake = dir.join("lake");
    let out = common::cli_on(&dir)
        .args([
            "ingest",
            "attack",
            "--domain",
            "ics",
            "--from",
            &format!("{base}/ics-attack.json"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ics ATT&CK 18.1: 95 techniques"));
    // The default path (no --from): the configured per-domain source URLs, here pointed at loopback.
    let out = common::cli_on(&dir)
        .env("THREATLAKE_ATTACK_DOMAINS", "[ics]")
        .env(
            "THREATLAKE_ATTACK_SOURCES",
            format!("{{ics: '{base}/ics-attack.json'}}"),
        )
        .args(["ingest", "attack"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ics ATT&CK 18.1: 95 techniques"));
    let before = common::listing(&lake);
    let out = common::cli_on(&dir)
        .args([
            "ingest",
            "attack",
            "--domain",
            "ics",
            "--from",
            &format!("{base}/gone.json"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/gone.json") && err.contains("500"), "{err}");
    assert_eq!(before, common::listing(&lake));
    server.join().unwrap();
}

#[test]
fn domain_mismatch_is_refused() {
    let dir = common::scratch("mismatch");
    let out = common::cli_on(&dir)
        .args([
            "ingest",
            "attack",
            "--domain",
            "mobile",
            "--from",
            common::bundle("ics").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ics bundle") && err.contains("--domain mobile"),
        "{err}"
    );
    assert!(common::listing(&dir.join("lake")).is_empty());
}

/// Bad inputs: each must fail with one clear message naming the file and the problem, and leave the
/// lake and raw store exactly as they were.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_fails_clearly_and_leaves_the_lake_untouched() {
    let dir = common::scratch("bad-input");
    common::ingest(&dir, &["ics"]).await;
    let before = common::listing(&dir);
    let bad = common::scratch("bad-input-files");

    let gz = std::fs::read(common::bundle("ics")).unwrap();
    let truncated = bad.join("truncated.json.gz");
    std::fs::write(&truncated, &gz[..gz.len() / 2]).unwrap();

    let not_bundle = bad.join("not-a-bundle.json");
    std::fs::write(&not_bundle, br#"{"type": "report", "name": "hello"}"#).unwrap();

    let array = bad.join("array.json");
    std::fs::write(&array, b"[1, 2, 3]").unwrap();

    let spec = bad.join("future-spec.json");
    std::fs::write(
        &spec,
        br#"{"type":"bundle","id":"bundle--1","objects":[{"type":"attack-pattern","spec_version":"3.0","id":"attack-pattern--1","name":"x"}]}"#,
    )
    .unwrap();

    let not_utf8 = bad.join("latin1.json");
    let mut f = std::fs::File::create(&not_utf8).unwrap();
    f.write_all(
        b"{\"type\":\"bundle\",\"objects\":[{\"type\":\"attack-pattern\",\"name\":\"caf\xe9\"}]}",
    )
    .unwrap();

    let truncated_json = bad.join("truncated.json");
    std::fs::write(
        &truncated_json,
        br#"{"type":"bundle","objects":[{"type":"attack-pattern","#,
    )
    .unwrap();

    let missing = bad.join("does-not-exist.json");

    let flipped = bad.join("bit-flipped.json.gz");
    let mut f = gz.clone();
    let mid = f.len() / 2;
    f[mid] ^= 0x5a;
    std::fs::write(&flipped, f).unwrap();

    let nested = bad.join("nested.json");
    std::fs::write(
        &nested,
        format!(
            "{{\"type\":\"bundle\",\"x_pad\":{}{},\"objects\":[]}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
    )
    .unwrap();

    let cases: Vec<(&Path, &[&str])> = vec![
        (&truncated, &["gzip", "truncated"]),
        (&not_bundle, &["not a STIX ATT&CK bundle", "\"report\""]),
        (&array, &["not a STIX ATT&CK bundle"]),
        (&spec, &["unsupported", "3.0"]),
        (&not_utf8, &["not UTF-8", "offset"]),
        (&truncated_json, &["truncated"]),
        (&missing, &["cannot read", "No such file"]),
        (&flipped, &["gzip"]),
        // Unknown fields are skipped without recursion, however deep; the bundle is then empty.
        (&nested, &["holds no attack-pattern"]),
    ];
    for (path, needles) in cases {
        let out = common::cli_on(&dir)
            .args(["ingest", "attack", "--from", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} should fail", path.display());
        assert!(
            err.contains(path.to_str().unwrap()),
            "message must name the file: {err}"
        );
        for n in needles {
            assert!(
                err.contains(n),
                "{}: expected {n:?} in: {err}",
                path.display()
            );
        }
        assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            before,
            common::listing(&dir),
            "lake changed after {}",
            path.display()
        );
    }

    // Bundles that would be accepted silently before: caps (a gzip bomb under a 1 MB cap, an object
    // flood), duplicate ids, no ATT&CK ids, a subset replacing the release, a signed version.
    let ics = ics_json();
    let bomb = bad.join("bomb.json.gz");
    {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(br#"{"type": "bundle", "objects": [], "pad": ""#)
            .unwrap();
        gz.write_all(&vec![b' '; 4 << 20]).unwrap();
        gz.write_all(br#""}"#).unwrap();
        std::fs::write(&bomb, gz.finish().unwrap()).unwrap();
    }
    let dup = bad.join("duplicate-ids.json");
    let mut v = ics.clone();
    let first = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "attack-pattern")
        .unwrap()
        .clone();
    v["objects"].as_array_mut().unwrap().push(first);
    std::fs::write(&dup, serde_json::to_vec(&v).unwrap()).unwrap();
    let no_ids = bad.join("no-attack-ids.json");
    let mut v = ics.clone();
    for o in v["objects"].as_array_mut().unwrap() {
        o["external_references"] = serde_json::json!([]);
    }
    std::fs::write(&no_ids, serde_json::to_vec(&v).unwrap()).unwrap();
    let subset = bad.join("subset.json");
    let mut v = ics.clone();
    let mut kept = 0;
    v["objects"].as_array_mut().unwrap().retain(|o| {
        kept += usize::from(o["type"] == "attack-pattern");
        o["type"] != "attack-pattern" || kept <= 10
    });
    std::fs::write(&subset, serde_json::to_vec(&v).unwrap()).unwrap();
    let ics_path = common::bundle("ics");
    /// Input, environment, extra arguments, expected message parts.
    type Case<'a> = (
        &'a Path,
        Vec<(&'a str, &'a str)>,
        Vec<&'a str>,
        Vec<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            &bomb,
            vec![("THREATLAKE_ATTACK_MAX_BUNDLE_MB", "1")],
            vec![],
            vec!["decompressed, it is more than 1 MB", "attack.max_bundle_mb"],
        ),
        (
            &ics_path,
            vec![("THREATLAKE_ATTACK_MAX_OBJECTS", "100")],
            vec![],
            vec!["more than 100 STIX objects", "attack.max_objects"],
        ),
        (&dup, vec![], vec![], vec!["occurs more than once"]),
        (&no_ids, vec![], vec![], vec!["no attack-pattern has"]),
        (
            &subset,
            vec![],
            vec![],
            vec!["has 10 techniques", "--force"],
        ),
        (
            &ics_path,
            vec![],
            vec!["--attack-version", "+18.1"],
            vec!["\"+18.1\" is not of the form"],
        ),
    ];
    for (path, env, args, needles) in cases {
        let out = common::cli_on(&dir)
            .envs(env)
            .args(["ingest", "attack", "--from", path.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} should fail", path.display());
        for n in needles {
            assert!(
                err.contains(n),
                "{}: expected {n:?} in: {err}",
                path.display()
            );
        }
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
        assert_eq!(
            before,
            common::listing(&dir),
            "lake changed after {}",
            path.display()
        );
    }
    // --force takes the subset when it is what the user means.
    let (ok, _, err) = common::run(common::cli_on(&dir).args([
        "ingest",
        "attack",
        "--force",
        "--from",
        subset.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
}

/// The ICS bundle as JSON.
fn ics_json() -> serde_json::Value {
    let gz = std::fs::read(common::bundle("ics")).unwrap();
    let mut json = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut json).unwrap();
    serde_json::from_str(&json).unwrap()
}

/// Spellings of one release (`v19.0`, `19.00`, ` 19.0`) land in one partition, `19.0`, and
/// `attack_versions_current` has one row per domain.
#[test]
fn version_spellings_are_normalised() {
    let dir = common::scratch("version-spellings");
    let ics = common::bundle("ics");
    for v in ["v19.0", "19.00", " 19.0", "19"] {
        let (ok, _, err) = common::run(common::cli_on(&dir).args([
            "ingest",
            "attack",
            "--from",
            ics.to_str().unwrap(),
            "--attack-version",
            v,
        ]));
        assert!(ok, "{v}: {err}");
    }
    assert_eq!(
        common::sql(
            &dir,
            "SELECT DISTINCT attack_version FROM mitre_attack_versions"
        ),
        "attack_version\n19.0\n"
    );
    assert_eq!(
        common::sql(
            &dir,
            "SELECT domain, attack_version FROM attack_versions_current"
        ),
        "domain,attack_version\nics,19.0\n"
    );
}

/// `run` (here its `ingest_attack` job) asks MITRE's release index (a loopback server speaking the
/// index format) and ingests a newer release than the lake holds, once; an unreachable index
/// leaves the lake as it is.
#[tokio::test(flavor = "multi_thread")]
async fn run_ingests_a_newer_release_listed_in_the_index() {
    let dir = common::scratch("release-index");
    common::ingest(&dir, &["ics"]).await;
    let newer = dir.join("ics-18.2.json");
    relabelled_ics(&newer, "18.2", "Autorun Image (renamed)");
    let index = serde_json::json!({
        "id": "x", "name": "MITRE ATT&CK", "description": "test index",
        "collections": [
            {"id": "c1", "name": "Enterprise ATT&CK", "versions": [{"version": "18.1", "url": "/never-fetched"}]},
            {"id": "c2", "name": "ICS ATT&CK", "versions": [
                {"version": "18.1", "url": common::bundle("ics").to_str().unwrap()},
                {"version": "18.2", "url": newer.to_str().unwrap()},
                {"version": "9.0", "url": "/never-fetched"}
            ]}
        ]
    });
    let (base, server) = serve(
        vec![("/index.json", 200, serde_json::to_vec(&index).unwrap())],
        2,
    );
    let job = |index: &str| {
        common::run(
            common::cli_on(&dir)
                .env("THREATLAKE_ATTACK_INDEX", index)
                .env("THREATLAKE_ATTACK_DOMAINS", "[ics]")
                .args(["run", "--job", "ingest_attack"]),
        )
    };
    let url = format!("{base}/index.json");
    let (ok, out, err) = job(&url);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("ics ATT&CK 18.2:"), "{out}");
    let current = common::sql(
        &dir,
        "SELECT domain, attack_version FROM attack_versions_current",
    );
    assert_eq!(current, "domain,attack_version\nics,18.2\n");
    // Again: nothing newer, nothing ingested.
    let (ok, out, err) = job(&url);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("up to date: ics 18.2"), "{out}");
    server.join().unwrap();
    // The index is gone: a warning, the lake kept, the job still succeeds.
    let (ok, out, err) = job(&url);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("release index unreachable; kept ics 18.2"),
        "{out}"
    );
    let runs = common::sql(
        &dir,
        "SELECT job, trigger, status, stages[1]['status'] AS attack FROM job_runs ORDER BY started",
    );
    assert_eq!(
        runs,
        "job,trigger,status,attack\ningest_attack,cli,ok,ok\ningest_attack,cli,ok,skipped\ningest_attack,cli,ok,skipped\n"
    );
}
