//! Fixtures shared by the test binaries: where the ATT&CK bundles are and a lake built from them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use threatlake::{Lake, Location};

pub mod s3;

/// The v18.1 bundles: `$ATTACK_BUNDLES_DIR`, else `../shared/data/attack` beside the checkout.
pub fn attack_dir() -> PathBuf {
    let dir = std::env::var_os("ATTACK_BUNDLES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/attack"));
    assert!(
        dir.join("enterprise-attack.json.gz").is_file(),
        "ATT&CK bundles not found in {}; set ATTACK_BUNDLES_DIR to the folder holding enterprise-attack.json.gz",
        dir.display()
    );
    dir
}

/// Path of one domain's bundle.
pub fn bundle(domain: &str) -> PathBuf {
    attack_dir().join(format!("{domain}-attack.json.gz"))
}

/// A fresh directory under cargo's per-target temp dir (kept for inspection after a failure).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Ingest the given domains into `<dir>/lake` (raw in `<dir>/raw`) through the library.
pub async fn ingest(dir: &Path, domains: &[&str]) -> Lake {
    let lake = Lake::open(dir.join("lake").to_str().unwrap()).unwrap();
    let raw = Location::open(dir.join("raw").to_str().unwrap()).unwrap();
    for d in domains {
        let src = bundle(d);
        let options = threatlake::attack::IngestOptions {
            timeout: Duration::from_secs(60),
            ..Default::default()
        };
        threatlake::attack::ingest(&lake, &raw, src.to_str().unwrap(), &options)
            .await
            .unwrap_or_else(|e| panic!("ingest {d}: {e}"));
    }
    lake
}

/// SQL giving the row count of every ATT&CK table, one `table,count` row each, by table.
pub fn attack_counts_sql() -> String {
    threatlake::attack::table_schemas()
        .iter()
        .map(|(t, _)| format!("SELECT '{t}' AS t, count(*) AS n FROM {t}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
        + " ORDER BY t"
}

/// The `threatlake` binary with built-in default settings, run from cargo's temp dir.
pub fn cli() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_threatlake"));
    // No release check against MITRE's index (tests have no internet; the check has its own tests).
    c.env_remove("THREATLAKE_CONFIG")
        .env("THREATLAKE_ATTACK_INDEX", "")
        .current_dir(env!("CARGO_TARGET_TMPDIR"));
    c
}

/// [`cli`] working on the lake `<dir>/lake` with raw store `<dir>/raw`.
pub fn cli_on(dir: &Path) -> std::process::Command {
    let mut c = cli();
    c.args([
        "--lake",
        dir.join("lake").to_str().unwrap(),
        "--raw",
        dir.join("raw").to_str().unwrap(),
    ]);
    c
}

/// [`cli_on`] with the ICS model of `<dir>/models` as the mapping model.
pub fn ics_cli_on(dir: &Path) -> std::process::Command {
    let mut c = cli_on(dir);
    c.env("THREATLAKE_LAKE_MODELS", dir.join("models"))
        .env("THREATLAKE_MAPPING_DOMAIN", "ics");
    c
}

/// A lake in `scratch(name)`: ICS ATT&CK, an ICS model, and the sample intel mapped by it (what
/// engine-parity tests compare on).
pub fn mapped_ics_lake(name: &str) -> PathBuf {
    let dir = scratch(name);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(ingest(&dir, &["ics"]));
    let (ok, out, err) = run(ics_cli_on(&dir).args(["model", "build", "--domain", "ics"]));
    assert!(ok, "model build: {out}\n{err}");
    let (ok, out, err) = run(ics_cli_on(&dir)
        .args(["run", "--offline", "--samples"])
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    assert!(ok, "run: {out}\n{err}");
    dir
}

/// Copy a directory tree over `to` (replaced): a fixture lake each test may change.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// `run --offline --samples --samples-dir DIR` with `c`, which must succeed.
pub fn run_samples(c: &mut std::process::Command, samples: &Path) {
    let (ok, out, err) = run(c
        .args(["run", "--offline", "--samples", "--samples-dir"])
        .arg(samples));
    assert!(ok, "run --samples-dir {}: {out}\n{err}", samples.display());
}

/// Run a command: (success, stdout, stderr).
pub fn run(c: &mut std::process::Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// `threatlake sql` on `dir`'s lake, as CSV.
pub fn sql(dir: &Path, q: &str) -> String {
    let (ok, out, err) = run(cli_on(dir).args(["sql", "--format", "csv", "--quiet", "-c", q]));
    assert!(ok, "{q}: {err}");
    out
}

/// Every file under `dir` with its size and content hash, sorted: compares "the lake as it was".
pub fn listing(dir: &Path) -> Vec<(String, u64, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    bytes.len() as u64,
                    h.finish(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// A throw-away CA and a server certificate for 127.0.0.1 and localhost signed by it, in `dir`:
/// (CA certificate, server certificate, server key).
pub fn throwaway_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("cert.csr"),
    );
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let steps: Vec<Vec<String>> = vec![
        vec![
            "req".into(),
            "-x509".into(),
            "-newkey".into(),
            "rsa:2048".into(),
            "-nodes".into(),
            "-days".into(),
            "1".into(),
            "-subj".into(),
            "/CN=threatlake test CA".into(),
            "-keyout".into(),
            p(&ca_key),
            "-out".into(),
            p(&ca),
        ],
        vec![
            "req".into(),
            "-newkey".into(),
            "rsa:2048".into(),
            "-nodes".into(),
            "-subj".into(),
            "/CN=127.0.0.1".into(),
            "-keyout".into(),
            p(&key),
            "-out".into(),
            p(&csr),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            p(&csr),
            "-CA".into(),
            p(&ca),
            "-CAkey".into(),
            p(&ca_key),
            "-CAcreateserial".into(),
            "-days".into(),
            "1".into(),
            "-extfile".into(),
            p(&ext),
            "-out".into(),
            p(&cert),
        ],
    ];
    for args in steps {
        let o = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    (ca, cert, key)
}

/// OASIS's `stix2-validator` on a bundle file: panics with its report when the bundle is invalid.
pub fn assert_valid_stix(path: &Path) {
    let v = std::process::Command::new("python3")
        .args(["-c", "import sys, stix2validator as v; r = v.validate_file(sys.argv[1], v.ValidationOptions(strict=False)); v.print_results(r); sys.exit(0 if r.is_valid else 1)"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}
