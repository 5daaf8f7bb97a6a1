//! `threatlake bench`: figures for ingest and query speed and peak memory (release builds only mean anything).

use std::path::Path;
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

/// Run `cmd` to its end, reading its peak RSS (VmHWM, Linux) every 10 ms while it runs: the
/// high-water mark only grows, so the last reading misses at most its final 10 ms.
fn run_watching_rss(
    cmd: &mut std::process::Command,
) -> Result<(std::process::ExitStatus, Option<f64>)> {
    let mut child = cmd.spawn()?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, peak));
        }
        let hwm = std::fs::read_to_string(&status_file).ok().and_then(|st| {
            let line = st.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        });
        if let Some(kb) = hwm {
            peak = Some(kb / 1024.0);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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
        let report = threatlake::attack::ingest(&lake, &raw, from, &bench_ingest(600)).await?;
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

/// Map `rows` sentence-length texts (ATT&CK procedure sentences, cycled) with
/// `SELECT map_technique(text) FROM t` through DataFusion; report rows/s and memory.
pub async fn map(settings: &threatlake::Settings, rows: usize, runs: usize) -> Result<()> {
    use std::sync::Arc;

    use arrow::array::{RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;

    let lake = Lake::from_settings(&settings.lake)?;
    let engine = Engine::open_with(
        &lake,
        &threatlake::sql::EngineOptions::from_settings(settings),
    )
    .await?;
    let r = engine
        .run("SELECT description FROM attack_procedures_current WHERE domain = 'enterprise' ORDER BY relationship_id")
        .await?;
    let mut source: Vec<String> = Vec::new();
    for b in &r[0].batches {
        let a = arrow::array::AsArray::as_string::<i32>(b.column(0));
        source.extend(a.iter().flatten().map(str::to_string));
    }
    anyhow::ensure!(
        !source.is_empty(),
        "no procedures in the lake; run `threatlake ingest attack` first"
    );
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, true)]));
    let parts = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); parts];
    let mut bytes = 0usize;
    for (p, start) in (0..rows).step_by(8192).enumerate() {
        let texts: Vec<&str> = (start..(start + 8192).min(rows))
            .map(|i| source[i % source.len()].as_str())
            .collect();
        bytes += texts.iter().map(|t| t.len()).sum::<usize>();
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(texts))])?;
        partitions[p % parts].push(b);
    }
    engine.ctx.register_table(
        "bench_texts",
        Arc::new(MemTable::try_new(schema, partitions)?),
    )?;
    println!(
        "bench map: {rows} rows ({:.0} chars/row avg), {parts} partitions, build: {}",
        bytes as f64 / rows as f64,
        build_kind()
    );
    let t = Instant::now();
    engine
        .run("SELECT map_technique('warm-up: load the model')")
        .await?;
    println!(
        "model load (first call): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let r = engine
            .run("SELECT map_technique(text) AS t FROM bench_texts")
            .await?;
        let el = t.elapsed();
        anyhow::ensure!(
            r[0].num_rows() == rows,
            "expected {rows} rows, got {}",
            r[0].num_rows()
        );
        times.push(el);
        println!(
            "  run: {:.3} s, {:.0} rows/s",
            el.as_secs_f64(),
            rows as f64 / el.as_secs_f64()
        );
    }
    let med = median(times);
    println!(
        "map_technique median: {:.0} rows/s",
        rows as f64 / med.as_secs_f64()
    );
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}

/// One synthetic pulse in the current OTX format, `n` indicators.
fn synthetic_pulse(i: usize, n: usize) -> serde_json::Value {
    let indicators: Vec<serde_json::Value> = (0..n)
        .map(|j| {
            serde_json::json!({
                "id": (i * n + j) as u64, "indicator": format!("{:064x}", (i * n + j) as u128 * 0x9E37_79B9_7F4A_7C15),
                "type": "FileHash-SHA256", "created": "2026-11-01T10:00:00", "title": "", "description": "",
                "expiration": null, "is_active": 1, "role": null
            })
        })
        .collect();
    serde_json::json!({
        "id": format!("{i:024x}"), "name": format!("Synthetic campaign {i}: loader drops a beacon via PowerShell"),
        "description": "The loader runs an encoded PowerShell command, injects into rundll32 and creates a scheduled task for persistence.",
        "author_name": "bench", "created": "2026-11-01T10:00:00.000000",
        "modified": format!("2026-11-01T10:{:02}:{:02}.{:06}", (i / 60) % 60, i % 60, i % 1_000_000),
        "revision": 1, "tlp": "white", "public": 1, "adversary": "", "tags": ["bench", "loader"],
        "references": [], "targeted_countries": ["Germany"], "industries": [], "malware_families": ["Loader"],
        "attack_ids": ["T1059.001", "T1055"], "indicators": indicators
    })
}

/// `bench otx`: a loopback OTX server generating `pulses` pulses page by page; the real client pulls
/// them into a throwaway lake.
pub async fn otx(
    pulses: usize,
    indicators: usize,
    page_size: usize,
    keep: Option<std::path::PathBuf>,
) -> Result<()> {
    let server = tiny_http::Server::http("127.0.0.1:0")
        .map_err(|e| anyhow::anyhow!("starting the loopback server: {e}"))?;
    let base = format!(
        "http://{}",
        server.server_addr().to_ip().expect("ip listener")
    );
    let served_base = base.clone();
    let pages = pulses.div_ceil(page_size.max(1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            let url = url::Url::parse(&format!("http://x{}", req.url())).expect("request URL");
            let page: usize = url
                .query_pairs()
                .find(|(k, _)| k == "page")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(1);
            let start = (page - 1) * page_size;
            let results: Vec<serde_json::Value> = (start..(start + page_size).min(pulses))
                .map(|i| synthetic_pulse(i, indicators))
                .collect();
            let next = (page < pages).then(|| {
                format!(
                    "{served_base}/api/v1/pulses/subscribed?limit={page_size}&page={}",
                    page + 1
                )
            });
            let body = serde_json::to_vec(
                &serde_json::json!({"count": pulses, "results": results, "next": next}),
            )
            .expect("serialisable");
            let _ = req.respond(tiny_http::Response::from_data(body));
        }
    });
    let tmp = tempfile::tempdir().context("creating a temporary lake")?;
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    let lake = Lake::open(dir.join("lake").to_str().context("utf-8 lake path")?)?;
    let raw = Location::open(dir.join("raw").to_str().context("utf-8 raw path")?)?;
    let client = threatlake::feeds::http::FeedClient::new(
        "OTX",
        &base,
        "X-OTX-API-KEY",
        "bench",
        threatlake::feeds::otx::KEY_ENV,
        threatlake::config::HttpSettings::default().policy(),
        None,
    )?;
    println!(
        "bench otx: {pulses} pulses × {indicators} indicators, {pages} pages of {page_size}, build: {}",
        build_kind()
    );
    let t = Instant::now();
    let r = threatlake::feeds::otx::ingest(&lake, &raw, &client, page_size as u32, &|_| ()).await;
    let el = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = thread.join();
    let r = r?;
    let rows = r.pulses + r.indicators;
    println!(
        "  {} pulses + {} indicators in {el:.2} s: {:.0} pulses/s, {:.0} rows/s (server generating pages in-process)",
        r.pulses,
        r.indicators,
        r.pulses as f64 / el,
        rows as f64 / el
    );
    let size: u64 = lake.tables().await?.values().map(|t| t.bytes).sum();
    println!("  lake size {:.1} MB", size as f64 / 1e6);
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}

/// `bench sql`: `query` over `lake` through the same streaming path as `threatlake sql` (CSV
/// printer, into a sink instead of a terminal): time to the first row, total, rows/s, peak RSS.
pub async fn sql(
    settings: &threatlake::Settings,
    lake: &str,
    query: &str,
    maxrows: usize,
) -> Result<()> {
    use threatlake::sql::output::{OutputFormat, Printer};
    use threatlake::sql::{QueryEngine, ResultSink};
    struct Sink {
        printer: Printer<std::io::Sink>,
        start: Instant,
        first: Option<f64>,
        rows: usize,
        more: bool,
    }
    impl ResultSink for Sink {
        type Error = anyhow::Error;
        fn begin(&mut self, schema: &arrow::datatypes::SchemaRef) -> Result<()> {
            Ok(self.printer.begin(schema)?)
        }
        fn batch(&mut self, b: &arrow::array::RecordBatch) -> Result<bool> {
            let go_on = self.printer.batch(b)?;
            if self.first.is_none() && b.num_rows() > 0 {
                self.first = Some(self.start.elapsed().as_secs_f64());
            }
            Ok(go_on)
        }
        fn end(&mut self, _secs: f64) -> Result<()> {
            let p = self.printer.finish()?;
            self.rows = p.rows;
            self.more = p.more;
            Ok(())
        }
    }
    let lake = Lake::open(lake)?;
    let options = threatlake::sql::EngineOptions::from_settings(settings)
        .with_memory_mb(settings.sql.memory_mb)?;
    let engine = QueryEngine::open(
        threatlake::sql::EngineKind::DataFusion,
        &lake,
        &options,
        None,
    )
    .await?;
    println!(
        "bench sql: {query} (CSV, --maxrows {maxrows}, sql.memory_mb {}), build: {}",
        settings.sql.memory_mb,
        build_kind()
    );
    let mut sink = Sink {
        printer: Printer::new(std::io::sink(), OutputFormat::Csv, 0, maxrows),
        start: Instant::now(),
        first: None,
        rows: 0,
        more: false,
    };
    engine.stream_each(query, &mut sink).await?;
    let total = sink.start.elapsed().as_secs_f64();
    println!(
        "  first row after {:.3} s; {} rows in {total:.2} s ({:.0} rows/s){}",
        sink.first.unwrap_or(f64::NAN),
        sink.rows,
        sink.rows as f64 / total,
        if sink.more {
            "; stopped reading at --maxrows"
        } else {
            ""
        }
    );
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}

const COUNTRIES: &[&str] = &[
    "United States of America",
    "Germany",
    "United Kingdom",
    "France",
    "Japan",
    "India",
    "Brazil",
    "Ukraine",
    "South Korea",
    "Australia",
    "Canada",
    "Israel",
    "Saudi Arabia",
    "Taiwan",
    "Netherlands",
    "Italy",
    "Spain",
    "Mexico",
    "Singapore",
    "Poland",
];
const FAMILIES: &[&str] = &[
    "Emotet",
    "QakBot",
    "Cobalt Strike",
    "IcedID",
    "AgentTesla",
    "LockBit",
    "BlackCat",
    "Sliver",
    "Remcos",
    "AsyncRAT",
];

/// `bench report`: a lake of `items` OTX pulses whose texts are ATT&CK procedure examples (varied
/// techniques, countries, families, dates over a year), mapped by the configured model and
/// snapshotted twice; then every report in every format as `threatlake report` in a process of its
/// own, timed, with that process's peak RSS.
pub async fn report(
    settings: &threatlake::Settings,
    config: Option<&std::path::Path>,
    items: usize,
    from: &str,
    keep: Option<std::path::PathBuf>,
) -> Result<()> {
    let tmp = tempfile::tempdir().context("creating a temporary lake")?;
    let root = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    let lake_dir = root.join("lake");
    let lake = Lake::open(lake_dir.to_str().context("utf-8 lake path")?)?;
    let raw = Location::open(root.join("raw").to_str().context("utf-8 raw path")?)?;
    let t = Instant::now();
    threatlake::attack::ingest(&lake, &raw, from, &bench_ingest(300))
        .await
        .with_context(|| format!("ingesting {from}"))?;
    let engine = Engine::open(&lake).await?;
    let texts = first_column(
        &engine,
        "SELECT description FROM attack_procedures_current WHERE domain = 'enterprise' AND length(description) > 40 ORDER BY relationship_id",
    )
    .await?;
    anyhow::ensure!(
        !texts.is_empty(),
        "{from} has no Enterprise procedure examples"
    );
    println!(
        "ATT&CK ingested and {} procedure texts read in {:.1} s",
        texts.len(),
        t.elapsed().as_secs_f64()
    );
    let mut s = settings.clone();
    s.lake.root = lake_dir.to_string_lossy().to_string();
    let half = items / 2;
    let t = Instant::now();
    for (part, range) in [(0, 0..half), (1, half..items)] {
        let batch = format!("bench-{part}");
        let prov = threatlake::feeds::otx::Provenance {
            batch_id: batch.clone(),
            raw_ref: "bench".into(),
            ingested_at: threatlake::feeds::fixed(chrono::Utc::now()),
        };
        let mut w = threatlake::feeds::otx::OtxWriter::new(&lake, &batch, Default::default());
        let mut chunk = Vec::with_capacity(1000);
        for i in range {
            let text = &texts[(i * 7919) % texts.len()];
            let day = i * 331 % 330;
            chunk.push(serde_json::json!({
                "id": format!("{i:024x}"),
                "name": format!("Campaign {i}: {}", threatlake::charts::clip(text, 60)),
                "description": text,
                "author_name": "bench",
                "created": format!("2026-01-01T00:00:00"),
                "modified": (chrono::NaiveDate::from_ymd_opt(2026, 1, 1).expect("date") + chrono::Days::new(day as u64)).format("%Y-%m-%dT12:00:00").to_string(),
                "revision": 1, "tlp": "white", "adversary": "",
                "tags": ["bench"], "references": [],
                "targeted_countries": [COUNTRIES[i % COUNTRIES.len()], COUNTRIES[(i / 3 + 5) % COUNTRIES.len()]],
                "industries": [], "malware_families": [FAMILIES[i % FAMILIES.len()]],
                "attack_ids": [], "indicators": []
            }));
            if chunk.len() == 1000 {
                w.add(&chunk, &prov).await?;
                chunk.clear();
            }
        }
        w.add(&chunk, &prov).await?;
        w.flush().await?;
        crate::cli::feeds::map_intel(&s).await?;
        let cx = threatlake::pipeline::Context::open(&s, &threatlake::pipeline::Silent)?;
        threatlake::pipeline::snapshot(&cx).await?;
    }
    println!(
        "{items} pulses written, mapped and snapshotted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The report stage as a user runs it: `threatlake report` in a process of its own, with this
    // command's settings file and the bench lake (so its peak RSS is the report's, not this
    // process's lake build and model).
    let out = root.join("reports");
    let t = Instant::now();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let (status, peak) = run_watching_rss(
        cmd.arg("--lake")
            .arg(&lake_dir)
            .arg("report")
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null()),
    )
    .context("running threatlake report")?;
    anyhow::ensure!(status.success(), "threatlake report failed ({status})");
    let secs = t.elapsed().as_secs_f64();
    let bytes: u64 = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "report --all ({}) over {items} items: {secs:.1} s, peak RSS {:.0} MiB, {:.1} MB written to {}",
        crate::cli::report::ALL_FORMATS,
        peak.unwrap_or(f64::NAN),
        bytes as f64 / 1e6,
        out.display()
    );
    Ok(())
}

/// `bench s3`: the same 1,000-partition OTX pulse log written to a local lake and to an S3 lake
/// (write throughput of each), then a one-day query on the S3 lake with every request counted.
pub async fn s3(
    settings: &threatlake::Settings,
    to: &str,
    partitions: usize,
    per_partition: usize,
) -> Result<()> {
    let id = threatlake::feeds::new_batch_id(chrono::Utc::now());
    let s3_spec = format!("{}/bench-{id}", to.trim_end_matches('/'));
    let s3_lake = Lake {
        location: Location::open_with(&s3_spec, &settings.lake.store)?,
    };
    let tmp = tempfile::tempdir().context("creating a temporary lake")?;
    let local = Lake::open(
        tmp.path()
            .join("lake")
            .to_str()
            .context("utf-8 temp path")?,
    )?;
    println!(
        "bench s3: {partitions} daily partitions × {per_partition} pulses into {} and {s3_spec}, build: {}",
        tmp.path().display(),
        build_kind()
    );
    let day0 = chrono::NaiveDate::from_ymd_opt(2023, 1, 1).expect("date");
    let days: Vec<String> = (0..partitions)
        .map(|d| {
            (day0 + chrono::Days::new(d as u64))
                .format("%Y-%m-%d")
                .to_string()
        })
        .collect();
    let mut bytes = 0u64;
    for (label, lake) in [("local", &local), ("S3", &s3_lake)] {
        let (counted, counts) = lake.counted();
        let t = Instant::now();
        for (d, day) in days.iter().enumerate() {
            let batch = format!("bench-{d}");
            let prov = threatlake::feeds::otx::Provenance {
                batch_id: batch.clone(),
                raw_ref: "bench".into(),
                ingested_at: threatlake::feeds::fixed(chrono::Utc::now()),
            };
            let mut w =
                threatlake::feeds::otx::OtxWriter::new(&counted, &batch, Default::default())
                    .with_date(day);
            let pulses: Vec<serde_json::Value> = (0..per_partition)
                .map(|i| synthetic_pulse(d * per_partition + i, 0))
                .collect();
            w.add(&pulses, &prov).await?;
            w.flush().await?;
        }
        let el = t.elapsed().as_secs_f64();
        bytes = lake.tables().await?.values().map(|t| t.bytes).sum();
        println!(
            "  write {label:<5}: {partitions} partitions in {el:.2} s = {:.0} partitions/s, {:.0} pulses/s, {:.2} MB/s ({})",
            partitions as f64 / el,
            (partitions * per_partition) as f64 / el,
            bytes as f64 / 1e6 / el,
            counts.summary()
        );
    }
    let (counted, counts) = s3_lake.counted();
    let t = Instant::now();
    let engine = Engine::open(&counted).await?;
    println!(
        "  open engine on S3: {:.2} s, {}",
        t.elapsed().as_secs_f64(),
        counts.summary()
    );
    let objects = s3_lake.location.list("").await?.len();
    let day = &days[partitions / 2];
    for (what, sql) in [
        (
            "one day",
            format!("SELECT count(*), min(name) FROM otx_pulse_log WHERE ingest_date = '{day}'"),
        ),
        (
            "every day (no pruning)",
            "SELECT count(*) FROM otx_pulse_log".to_string(),
        ),
    ] {
        counts.reset();
        let t = Instant::now();
        let r = engine.run(&sql).await?;
        let rows = r[0]
            .batches
            .iter()
            .map(|b| arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64))
            .next()
            .transpose()?
            .map(|c| {
                arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&c).value(0)
            })
            .unwrap_or(0);
        let read = counts.distinct_read();
        println!(
            "  query {what}: {rows} rows in {:.3} s; objects read {read} of {objects} ({:.2}%); {}",
            t.elapsed().as_secs_f64(),
            100.0 * read as f64 / objects.max(1) as f64,
            counts.summary()
        );
    }
    println!(
        "  lake size {:.1} MB; S3 copy left at {s3_spec}",
        bytes as f64 / 1e6
    );
    Ok(())
}

/// Ingest options of the benchmarks: default caps, a generous timeout, never blocked by a
/// release already in the lake.
fn bench_ingest(timeout_secs: u64) -> threatlake::attack::IngestOptions {
    threatlake::attack::IngestOptions {
        timeout: Duration::from_secs(timeout_secs),
        force: true,
        ..Default::default()
    }
}

/// Hostile input: how long cleaning hostile citation markup takes, how long deep SQL takes to be
/// refused (and an accepted deep statement to plan and run), and the peak memory of refusing a
/// gzip bomb. Each figure is what a hardening fix bounds; none may grow faster than its input.
pub async fn hostile(mb: usize) -> Result<()> {
    println!("bench hostile ({})", build_kind());
    let n = mb.max(1) << 20;
    let unbalanced = "(Citation: ".repeat(n / 11);
    let balanced: String = (0..)
        .map(|i| format!("text (Citation: Ref {}) ", i % 500))
        .take_while({
            let mut len = 0;
            move |s: &String| {
                len += s.len();
                len <= n
            }
        })
        .collect();
    for (name, text) in [
        ("unbalanced (Citation: markers", &unbalanced),
        ("balanced citations", &balanced),
    ] {
        let t = Instant::now();
        let (out, cites) = threatlake::attack::normalize::clean_text(text);
        let s = t.elapsed().as_secs_f64();
        println!(
            "clean_text {:.1} MB of {name}: {:.3} s ({:.1} MB/s; {} citations, {} bytes out)",
            text.len() as f64 / 1e6,
            s,
            text.len() as f64 / 1e6 / s.max(1e-9),
            cites.len(),
            out.len()
        );
    }
    let chain = |n: usize, sep: &str, term: &str| vec![term; n].join(sep);
    let dir = tempfile::tempdir().context("creating a temporary lake")?;
    let lake = Lake::open(dir.path().join("lake").to_str().expect("utf-8 temp path"))?;
    let engine = Engine::open(&lake).await?;
    for (name, sql) in [
        (
            "SELECT 1+1+… (5,000 terms)",
            format!("SELECT {}", chain(5_000, "+", "1")),
        ),
        (
            "WHERE … OR … (20,000 terms)",
            format!("SELECT 1 WHERE {}", chain(20_000, " OR ", "1 = 2")),
        ),
        ("2,000 UNION ALL", chain(2_000, " UNION ALL ", "SELECT 1")),
        (
            "SELECT 1+1+… (900 terms, accepted)",
            format!("SELECT {}", chain(900, "+", "1")),
        ),
        (
            "WHERE … OR … (900 terms, accepted)",
            format!("SELECT 1 WHERE {}", chain(900, " OR ", "1 = 2")),
        ),
    ] {
        let t = Instant::now();
        let outcome = match engine.run(&sql).await {
            Ok(r) => format!(
                "ran, {} row(s)",
                r.iter().map(|q| q.num_rows()).sum::<usize>()
            ),
            Err(e) => format!(
                "refused: {}",
                e.to_string().chars().take(60).collect::<String>()
            ),
        };
        println!("sql {name}: {:.3} s, {outcome}", t.elapsed().as_secs_f64());
    }
    let before = peak_rss_mib().unwrap_or(0.0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, br#"{"type": "bundle", "objects": [], "x": ""#)?;
    let zeros = vec![b' '; 64 << 20];
    for _ in 0..16 {
        std::io::Write::write_all(&mut gz, &zeros)?;
    }
    drop(zeros);
    let bomb = gz.finish()?;
    let t = Instant::now();
    let refused = threatlake::attack::prepare(
        "bomb.json.gz",
        bytes::Bytes::from(bomb.clone()),
        None,
        None,
        &threatlake::attack::BundleLimits::default(),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_else(|| "accepted?!".into());
    println!(
        "gzip bomb {:.1} MB → 1 GB: {:.3} s, peak RSS {:.0} MiB (before {:.0} MiB): {}",
        bomb.len() as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        peak_rss_mib().unwrap_or(0.0),
        before,
        refused.chars().take(90).collect::<String>()
    );
    Ok(())
}

/// The non-null text values of the first column of `sql`'s result.
async fn first_column(engine: &Engine, sql: &str) -> Result<Vec<String>> {
    let r = engine.run(sql).await?;
    Ok(r[0]
        .batches
        .iter()
        .flat_map(|b| threatlake::feeds::column_strings(b, 0))
        .flatten()
        .collect())
}

/// Percentile `p` (0-100) of sorted durations, in ms.
fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// `bench serve`: the service in this process on a loopback port, over the configured lake (with
/// a model; e.g. one made by `bench report --keep DIR`, then `--lake DIR/lake`): `POST /map`
/// texts/s with `clients` concurrent clients against in-process mapping, `/sql` p50/p99 of every
/// report query, and peak RSS while 8 heavy queries run at once against the memory pool.
pub async fn serve(
    settings: &threatlake::Settings,
    clients: usize,
    secs: u64,
    sql_runs: usize,
) -> Result<()> {
    use threatlake::server::auth::{AuthFile, Role};

    let tmp = tempfile::tempdir().context("creating a temporary auth file")?;
    let mut s = settings.clone();
    s.server.auth_file = tmp.path().join("auth.yaml").display().to_string();
    s.schedule.jobs.clear();
    let (token, _) =
        AuthFile::new(&s.server.auth_file).create_token("bench", Role::Reader, None)?;
    // Texts: ATT&CK procedure examples.
    let lake = Lake::from_settings(&s.lake)?;
    let engine =
        Engine::open_with(&lake, &threatlake::sql::EngineOptions::from_settings(&s)).await?;
    let texts = first_column(
        &engine,
        "SELECT description FROM attack_procedures_current WHERE length(description) > 40 ORDER BY relationship_id LIMIT 4096",
    )
    .await?;
    anyhow::ensure!(
        !texts.is_empty(),
        "no procedures in the lake; run `threatlake ingest attack` first"
    );
    let mapper = engine
        .mapper
        .get()
        .map_err(|e| anyhow::anyhow!("{e}; run `threatlake model build` first"))?;
    let batch = 32usize;
    // In-process baseline: the same batches through the kernel, same parallelism as the server.
    let t = Instant::now();
    let mut n = 0usize;
    while t.elapsed() < Duration::from_secs(secs) {
        for chunk in texts.chunks(batch) {
            let _ = threatlake_udfs::mapping_kernels::par_top_k(&mapper, chunk, 5);
            n += chunk.len();
        }
    }
    let in_process = n as f64 / t.elapsed().as_secs_f64();
    drop(engine);

    let server = InProcess::start(&s).await?;
    let base = server.base.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    println!(
        "bench serve on {base} over {} ({} build), {clients} clients, batches of {batch} texts",
        lake.location,
        build_kind()
    );

    // POST /map with `clients` concurrent clients for `secs` seconds.
    let texts = std::sync::Arc::new(texts);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, base, token, texts) =
            (client.clone(), base.clone(), token.clone(), texts.clone());
        tasks.spawn(async move {
            let mut done = 0usize;
            let mut i = c * batch;
            while t.elapsed() < Duration::from_secs(secs) {
                let chunk: Vec<&String> =
                    (0..batch).map(|k| &texts[(i + k) % texts.len()]).collect();
                i += batch * 8;
                let r = client
                    .post(format!("{base}/api/v1/map"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"texts": chunk, "top_k": 5}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "POST /map: {}", r.status());
                let _ = r.bytes().await?;
                done += batch;
            }
            Ok::<usize, anyhow::Error>(done)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    let http = total as f64 / t.elapsed().as_secs_f64();
    println!(
        "POST /api/v1/map: {http:.0} texts/s with {clients} clients; in-process par_top_k: {in_process:.0} texts/s ({:.0}%)",
        100.0 * http / in_process
    );

    // /sql: every report query, `sql_runs` times each.
    let defs = threatlake::reports::select(&[])?;
    let mut all = Vec::new();
    for d in &defs {
        let mut times = Vec::new();
        for _ in 0..sql_runs {
            let t = Instant::now();
            let r = client
                .post(format!("{base}/api/v1/sql"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"sql": d.sql}))
                .send()
                .await?;
            let status = r.status();
            let _ = r.bytes().await?;
            anyhow::ensure!(
                status.is_success(),
                "report {}: /sql answered {status}",
                d.name
            );
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "  /sql {:<24} p50 {:>8.1} ms  p99 {:>8.1} ms",
            d.name,
            pct_ms(&times, 50.0),
            pct_ms(&times, 99.0)
        );
        all.extend(times);
    }
    all.sort();
    println!(
        "POST /api/v1/sql, {} report queries × {sql_runs}: p50 {:.1} ms, p99 {:.1} ms",
        defs.len(),
        pct_ms(&all, 50.0),
        pct_ms(&all, 99.0)
    );

    // Peak RSS while 8 heavy queries run at once (each alone could take more than the pool).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = peak_rss_mib().unwrap_or(f64::NAN);
    let heavy = "SELECT a.item_id, count(*) AS n, max(length(b.text)) AS m FROM threat_intelligence_data a \
                 JOIN threat_intelligence_data b ON a.country = b.country GROUP BY a.item_id ORDER BY n DESC LIMIT 10";
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, base, token) = (client.clone(), base.clone(), token.clone());
        tasks.spawn(async move {
            let r = client
                .post(format!("{base}/api/v1/sql"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"sql": heavy}))
                .send()
                .await?;
            Ok::<u16, anyhow::Error>(r.status().as_u16())
        });
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        *statuses.entry(r??).or_insert(0) += 1;
    }
    println!(
        "8 concurrent heavy queries: statuses {statuses:?}; peak RSS {:.0} MiB (before {before:.0} MiB); pool {} MiB + 300 MiB = {} MiB goal",
        peak_rss_mib().unwrap_or(f64::NAN),
        s.server.sql.memory_mb,
        s.server.sql.memory_mb + 300
    );
    server.stop().await
}

/// `bench dashboard`: each page rendered `runs` times through the in-process server with a reader
/// token (server time: request to last byte on loopback), and the bytes of JS + CSS a first load
/// fetches gzipped; with `browser`, each page's first load in Chromium.
pub async fn dashboard(
    settings: &threatlake::Settings,
    runs: usize,
    browser: Option<&Path>,
) -> Result<()> {
    use threatlake::server::auth::{AuthFile, Role};

    let tmp = tempfile::tempdir().context("creating a temporary auth file")?;
    let mut s = settings.clone();
    s.server.auth_file = tmp.path().join("auth.yaml").display().to_string();
    s.schedule.jobs.clear();
    let (token, _) =
        AuthFile::new(&s.server.auth_file).create_token("bench", Role::Reader, None)?;
    // The Chromium first loads sign in as a reader.
    let password = match browser {
        Some(_) => {
            let pw = threatlake::server::auth::random_token(24);
            AuthFile::new(&s.server.auth_file).set_user("bench", Some(Role::Reader), &pw, false)?;
            Some(pw)
        }
        None => None,
    };
    let lake = Lake::from_settings(&s.lake)?;
    let engine =
        Engine::open_with(&lake, &threatlake::sql::EngineOptions::from_settings(&s)).await?;
    let pick = |sql: &'static str| {
        let engine = &engine;
        async move { Ok::<_, anyhow::Error>(first_column(engine, sql).await?.into_iter().next()) }
    };
    let technique = pick(
        "SELECT technique_id FROM mapped_threat_data GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1",
    )
    .await?
    .unwrap_or_else(|| "T1059".into());
    let item = pick("SELECT item_id FROM threat_intelligence_data ORDER BY item_id LIMIT 1")
        .await?
        .context("no threat items in the lake; run `threatlake run --samples` or `bench report --keep DIR` first")?;
    let family = pick("SELECT family FROM threat_intelligence_data WHERE family IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
        .await?
        .unwrap_or_default();
    drop(engine);
    let enc = |v: &str| -> String { url::form_urlencoded::byte_serialize(v.as_bytes()).collect() };
    let pages: Vec<String> = vec![
        "/".into(),
        format!("/?family={}", enc(&family)),
        "/map".into(),
        "/matrix".into(),
        "/matrix?sub=1".into(),
        "/matrix/layer.json".into(),
        format!("/techniques/{technique}"),
        "/items".into(),
        format!("/items?technique={technique}&offset=50"),
        format!("/items/{}", enc(&item)),
        "/threat-model".into(),
        format!(
            "/sql?sql={}",
            enc("SELECT source, count(*) AS n FROM threat_intelligence_data GROUP BY source")
        ),
        "/jobs".into(),
    ];

    let server = InProcess::start(&s).await?;
    let base = server.base.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    println!(
        "bench dashboard on {base} over {} ({} build), {runs} renders per page",
        lake.location,
        build_kind()
    );
    let mut all = Vec::new();
    let mut firsts = Vec::new();
    for page in &pages {
        let mut times = Vec::new();
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            let r = client
                .get(format!("{base}{page}"))
                .bearer_auth(&token)
                .send()
                .await?;
            let status = r.status();
            let _ = r.bytes().await?;
            anyhow::ensure!(status.is_success(), "GET {page}: {status}");
            times.push(t.elapsed());
        }
        // The first render reads the lake; later ones of the same page find its queries'
        // answers kept (server.page_cache_mb) until the lake changes.
        let first = times[0];
        firsts.push(first);
        times.sort();
        println!(
            "  {:<44} first {:>8.1} ms  p50 {:>8.1} ms  p95 {:>8.1} ms",
            page.chars().take(44).collect::<String>(),
            first.as_secs_f64() * 1e3,
            pct_ms(&times, 50.0),
            pct_ms(&times, 95.0)
        );
        all.extend(times);
    }
    all.sort();
    firsts.sort();
    println!(
        "every page: p50 {:.1} ms, p95 {:.1} ms (goal p95 ≤ 200 ms); first renders after a lake change (nothing kept): p50 {:.1} ms, max {:.1} ms",
        pct_ms(&all, 50.0),
        pct_ms(&all, 95.0),
        pct_ms(&firsts, 50.0),
        firsts.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    // What a first load fetches: the stylesheet and the three scripts, gzipped as served (this
    // client does not unpack them).
    let raw = reqwest::Client::builder()
        .no_gzip()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut gz = 0usize;
    for asset in ["app.css", "app.js", "htmx.min.js", "echarts.min.js"] {
        let r = raw
            .get(format!("{base}/assets/{asset}"))
            .header("accept-encoding", "gzip")
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "GET /assets/{asset}: {}",
            r.status()
        );
        gz += r.bytes().await?.len();
    }
    println!(
        "JS + CSS of a first load: {:.0} KB gzipped (goal ≤ 600 KB)",
        gz as f64 / 1000.0
    );
    if let (Some(chromium), Some(password)) = (browser, password) {
        // The script blocks while the in-process server answers it on the runtime's threads.
        let (chromium, base) = (chromium.to_path_buf(), base.clone());
        tokio::task::spawn_blocking(move || {
            first_loads(&chromium, &base, &password, &pages, runs.clamp(1, 5))
        })
        .await??;
    }
    server.stop().await
}

/// Each page's first load in Chromium (`bench_first_load.py` through Playwright): printed per
/// page (median of `runs`) and the slowest.
fn first_loads(
    chromium: &Path,
    base: &str,
    password: &str,
    pages: &[String],
    runs: usize,
) -> Result<()> {
    let html: Vec<&String> = pages.iter().filter(|p| !p.ends_with(".json")).collect();
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("bench_first_load.py");
    std::fs::write(&script, include_str!("bench_first_load.py"))?;
    let out = std::process::Command::new("python3")
        .arg(&script)
        .env("BASE", base)
        .env("USER", "bench")
        .env("PASSWORD", password)
        .env("PAGES", serde_json::to_string(&html)?)
        .env("CHROMIUM", chromium)
        .env("RUNS", runs.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .context("running python3 (Playwright drives Chromium: pip install playwright)")?;
    anyhow::ensure!(
        out.status.success(),
        "the Chromium first-load script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "first load in {} (empty cache, charts drawn), median of {runs}:",
        chromium.display()
    );
    let mut worst = 0f64;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let ms: Vec<f64> = v["ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        let median = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
        worst = worst.max(ms.last().copied().unwrap_or(0.0));
        println!(
            "  {:<44} {:>8.0} ms",
            v["page"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(44)
                .collect::<String>(),
            median
        );
    }
    println!("slowest first load: {worst:.0} ms (goal ≤ 1 s)");
    Ok(())
}

/// `threatlake serve` on a loopback port inside this process (the bench's own settings).
struct InProcess {
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), threatlake::server::ServerError>>,
}

impl InProcess {
    async fn start(s: &threatlake::Settings) -> Result<Self> {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let options = threatlake::server::ServeOptions {
            bind: "127.0.0.1:0".into(),
            tls: None,
            insecure_http: false,
        };
        let task = tokio::spawn(threatlake::server::serve_until(
            s.clone(),
            options,
            async move {
                let _ = stop_rx.await;
            },
            move |a| {
                let _ = addr_tx.send(a);
            },
        ));
        let addr = addr_rx.await.context("the server did not start")?;
        Ok(InProcess {
            base: format!("http://{addr}"),
            stop,
            task,
        })
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// A receiver process for `bench push`, killed on drop.
struct Receiver(std::process::Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `bench push`: every mapping of the lake at `dir` to osmem-server (`_bulk`) and to rsyslogd (CEF
/// over TCP), each timed with the peak RSS of the push alone.
pub async fn push(settings: &threatlake::Settings, dir: &std::path::Path) -> Result<()> {
    use std::process::{Command, Stdio};
    use threatlake::integrations::{self, PushOptions, TargetSettings};
    let lake_dir = dir.join("lake");
    anyhow::ensure!(
        lake_dir.is_dir(),
        "{} has no lake/: build one with `threatlake bench report --items 50000 --keep {}`",
        dir.display(),
        dir.display()
    );
    let work = tempfile::tempdir()?;
    // osmem-server (pip install osmem-server) on a free port.
    let bin = Command::new("python3")
        .args([
            "-c",
            "import osmem_server; print(osmem_server.resolve_binary())",
        ])
        .output()
        .context("running python3 to find osmem-server")?;
    anyhow::ensure!(
        bin.status.success(),
        "osmem-server is not installed: pip install osmem-server"
    );
    let es_port = free_port()?;
    let _es = Receiver(
        Command::new(String::from_utf8(bin.stdout)?.trim())
            .args(["-addr", &format!("127.0.0.1:{es_port}"), "-no-stdin-watch"])
            .args(["-parent-pid", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting osmem-server")?,
    );
    // rsyslogd writing each CEF message to a file.
    let syslog_port = free_port()?;
    let log = work.path().join("cef.log");
    let conf = work.path().join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{w}\" maxMessageSize=\"64k\")\nmodule(load=\"imtcp\")\n\
             template(name=\"body\" type=\"string\" string=\"%msg%\\n\")\n\
             ruleset(name=\"cef\") {{ action(type=\"omfile\" file=\"{l}\" template=\"body\") }}\n\
             input(type=\"imtcp\" port=\"{syslog_port}\" ruleset=\"cef\")\n",
            w = work.path().display(),
            l = log.display()
        ),
    )?;
    let _rs = Receiver(
        Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(work.path().join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rsyslogd (apt-get install rsyslog)")?,
    );
    for port in [es_port, syslog_port] {
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(20),
                "receiver on port {port} did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let target = |yaml: String| -> Result<TargetSettings> { Ok(serde_yaml_ng::from_str(&yaml)?) };
    let mut s = settings.clone();
    s.lake.root = lake_dir.to_string_lossy().to_string();
    s.integrations = vec![
        target(format!(
            "{{name: bench-elastic, kind: elastic, url: 'http://127.0.0.1:{es_port}', index: bench-ti}}"
        ))?,
        target(format!(
            "{{name: bench-cef, kind: syslog, url: 'tcp://127.0.0.1:{syslog_port}', format: cef}}"
        ))?,
    ];
    let lake = Lake::from_settings(&s.lake)?;
    let _ = std::fs::remove_dir_all(lake_dir.join(integrations::outbox::OUTBOX_LOG));
    for name in ["bench-elastic", "bench-cef"] {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let t = Instant::now();
        let r = integrations::push(
            &s,
            &lake,
            &PushOptions {
                target: Some(name.into()),
                ..Default::default()
            },
            &|_: &str| {},
        )
        .await?;
        let secs = t.elapsed().as_secs_f64();
        let rss = peak_rss_mib().unwrap_or(f64::NAN);
        let rep = &r.targets[0];
        if let Some(e) = &rep.error {
            anyhow::bail!("{name}: {e}");
        }
        let n = rep.delivered;
        if name == "bench-elastic" {
            let count: serde_json::Value =
                reqwest::get(format!("http://127.0.0.1:{es_port}/bench-ti/_count"))
                    .await?
                    .json()
                    .await?;
            println!(
                "elastic _bulk → osmem-server: {n} documents in {secs:.1} s = {:.0} docs/s (queue + deliver + outbox), peak RSS {rss:.0} MiB; the index holds {}",
                n as f64 / secs,
                count["count"]
            );
        } else {
            // Until rsyslogd has written every line.
            let lines = || {
                std::fs::read(&log)
                    .map(|b| b.iter().filter(|c| **c == b'\n').count())
                    .unwrap_or(0)
            };
            let wait = Instant::now();
            while lines() < n && wait.elapsed() < Duration::from_secs(120) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let all = t.elapsed().as_secs_f64();
            println!(
                "syslog CEF over TCP → rsyslogd: {n} events in {secs:.1} s = {:.0} lines/s (push), {} lines written by rsyslogd after {all:.1} s; peak RSS {rss:.0} MiB",
                n as f64 / secs,
                lines()
            );
        }
    }
    Ok(())
}
