//! `threatlake bench`: figures for ingest and query speed and peak memory (release builds only mean anything).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use threatlake::{Engine, Lake, Location};

/// Representative query: techniques per tactic joined to their procedure examples.
pub const QUERY: &str = "SELECT tt.tactic_name, count(DISTINCT tt.technique_id) AS techniques, count(p.relationship_id) AS procedures \
FROM attack_technique_tactics tt LEFT JOIN attack_procedures_current p \
  ON p.domain = tt.domain AND p.technique_id = tt.technique_id \
WHERE tt.domain = 'enterprise' GROUP BY tt.tactic_name, tt.matrix_order ORDER BY tt.matrix_order";

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Ingest `from` `runs` times into a throwaway lake, then time [`QUERY`].
pub async fn ingest(from: &str, runs: usize, query_runs: usize) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary lake")?;
    let lake = Lake::open(dir.path().join("lake").to_str().expect("utf-8 temp path"))?;
    let raw = Location::open(dir.path().join("raw").to_str().expect("utf-8 temp path"))?;
    let size = std::fs::metadata(from).map(|m| m.len()).unwrap_or(0);
    println!(
        "bench ingest: {from} ({:.1} MB on disk), {runs} run(s), build: {}",
        size as f64 / 1e6,
        build_kind()
    );
    let mut walls = Vec::new();
    for i in 0..runs.max(1) {
        let t = Instant::now();
        let report =
            threatlake::attack::ingest(&lake, &raw, from, None, None, Duration::from_secs(600))
                .await?;
        let wall = t.elapsed();
        walls.push(wall);
        let stages: Vec<String> = report
            .timings
            .iter()
            .map(|(n, d)| format!("{n} {:.0} ms", d.as_secs_f64() * 1e3))
            .collect();
        println!(
            "  run {}: {:.3} s wall ({}) — {} techniques, {} procedures",
            i + 1,
            wall.as_secs_f64(),
            stages.join(", "),
            report.rows["mitre_attack_techniques"],
            report.rows["mitre_attack_procedures"]
        );
    }
    println!("ingest median wall: {:.3} s", median(walls).as_secs_f64());
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS after ingest: {rss:.0} MiB");
    }
    let engine = Engine::open(&lake).await?;
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..query_runs.max(1) {
        let t = Instant::now();
        let r = engine.run(QUERY).await?;
        times.push(t.elapsed());
        rows = r[0].num_rows();
    }
    println!(
        "query (techniques per tactic ⋈ procedures, {rows} rows): median {:.1} ms over {} runs, min {:.1} ms",
        median(times.clone()).as_secs_f64() * 1e3,
        times.len(),
        times.iter().min().expect("at least one run").as_secs_f64() * 1e3
    );
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS overall: {rss:.0} MiB");
    }
    Ok(())
}

fn build_kind() -> &'static str {
    if cfg!(debug_assertions) {
        "debug (figures are not representative; use --release)"
    } else {
        "release"
    }
}
