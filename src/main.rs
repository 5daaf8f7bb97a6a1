//! The `threatlake` command line: a thin layer over the engine library.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use threatlake::config::{Loaded, Settings};
use threatlake::sql::output::OutputFormat;
use threatlake::sql::{EngineKind, QueryEngine};
use threatlake::{Domain, Lake, Location};

/// threatlake: threat intelligence lake mapped to MITRE ATT&CK.
#[derive(Debug, Parser)]
#[command(name = "threatlake", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: GlobalArgs,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Settings file (default: config/settings.yaml, else built-in defaults).
    #[arg(long, global = true, env = "THREATLAKE_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Lake root for this command (overrides lake.root), e.g. a throwaway directory.
    #[arg(long, global = true, value_name = "PATH_OR_URL")]
    lake: Option<String>,
    /// Raw store for this command (overrides lake.raw).
    #[arg(long, global = true, value_name = "PATH_OR_URL")]
    raw: Option<String>,
    /// More log output (-v info, -vv debug); THREATLAKE_LOG takes a tracing filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load threat intelligence into the lake.
    #[command(subcommand)]
    Ingest(IngestCommand),
    /// Run SQL: an interactive REPL, or -c / -f / stdin in batch.
    Sql(SqlArgs),
    /// Inspect settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the lake.
    #[command(subcommand)]
    Lake(LakeCommand),
    /// Build and evaluate ATT&CK mapping models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Name the ATT&CK techniques behind text (top-k with scores and evidence).
    Map(MapArgs),
    /// Print speed and memory figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run report datasets (sql/reports) in batch: HTML, PDF, CSV, JSON, SVG/PNG charts, ATT&CK
    /// Navigator layers, a STIX bundle, plus index.html and index.json.
    Report {
        /// Reports to run (default: all).
        names: Vec<String>,
        /// Run every report (the default when no name is given).
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Comma-separated formats: html, pdf, csv, json, navigator, stix (one bundle of all mapped
        /// intel), svg, png (the chart alone).
        #[arg(long, default_value = cli::report::ALL_FORMATS)]
        format: String,
        /// Output directory (default: reports.out_dir).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Only intel observed on or after this date (YYYY-MM-DD, UTC) or RFC 3339 time.
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
    },
    /// Draw one chart from any query: `chart "SELECT …" --kind bar --out file.svg`.
    Chart(cli::report::ChartArgs),
    /// Map threat items not mapped yet (model top-k and source-stated techniques) into mapped_threat_data.
    MapIntel,
    /// The service: jobs on the `schedule:` cron times, the HTTP API under /api/v1 (OpenAPI at
    /// /api/v1/openapi.json), sign-in, /healthz, /readyz, /metrics. Stops cleanly on SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Users and API tokens of `serve` (kept in server.auth_file, outside the lake).
    #[command(subcommand)]
    Auth(AuthCommand),
    /// The main job: ATT&CK (a newer release from MITRE's index, or the first), OTX and VirusTotal
    /// (when keyed), model (when missing or older than the ATT&CK release), map, threat-model
    /// snapshot; recorded in the `job_runs` table.
    Run(RunArgs),
    /// Deliver new mappings to the SIEM/SOAR targets under `integrations:` (Splunk HEC, Elastic,
    /// Sentinel, syslog CEF/LEEF, TheHive, webhooks) through the lake outbox, and print counts.
    Push(PushArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Listen address (default: server.bind, 127.0.0.1:8080); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// PEM certificate chain: serve HTTPS.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (behind a TLS-terminating proxy).
    #[arg(long)]
    insecure_http: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuthCommand {
    /// API tokens for scripts (`Authorization: Bearer …`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Users who sign in with a browser.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token; it is printed once, alone on the last line of stdout.
    Create {
        /// Unique name (who or what uses it).
        #[arg(long)]
        name: String,
        /// reader, analyst or admin.
        #[arg(long, default_value = "reader")]
        role: String,
        /// Lifetime, e.g. 90d (default: no expiry).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (names, roles, dates; never the tokens).
    List,
    /// Revoke a token.
    Revoke {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Add a user; the password is read from the terminal (twice) or the first line of stdin.
    Add {
        /// Login name.
        name: String,
        /// reader, analyst or admin.
        #[arg(long, default_value = "reader")]
        role: String,
    },
    /// List users.
    List,
    /// Remove a user.
    Remove {
        /// Login name.
        name: String,
    },
    /// Set a new password (terminal or stdin).
    Passwd {
        /// Login name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Another job instead of the whole run: ingest_attack, ingest_otx, ingest_vt, ingest_taxii, map, snapshot, report, push.
    #[arg(long, value_name = "JOB")]
    job: Option<String>,
    /// Also write the reports (into reports.out_dir) at the end.
    #[arg(long)]
    reports: bool,
    /// No network: use what the lake and raw store hold (ATT&CK must be ingested already).
    #[arg(long)]
    offline: bool,
    /// Also load the sample feed responses (OTX pages, VirusTotal reports) from --samples-dir.
    #[arg(long)]
    samples: bool,
    /// Where the samples are.
    #[arg(long, value_name = "DIR", default_value = "data/samples")]
    samples_dir: PathBuf,
}

#[derive(Debug, Args)]
struct PushArgs {
    /// Only this target (also one with enabled: false).
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
    /// Count what would be queued and sent; write and send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Only queue mappings made on or after this date (YYYY-MM-DD, UTC) or RFC 3339 time, e.g. to
    /// start a new target without the whole history.
    #[arg(long, value_name = "DATE")]
    since: Option<String>,
    /// Queue dead-letter rows again (after fixing what the receiver refused).
    #[arg(long)]
    retry_dead: bool,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Fit the mapper on the newest ATT&CK release of a domain and save it under lake.models.
    Build {
        /// Domain to learn.
        #[arg(long, value_enum, default_value_t = SingleDomain::Enterprise)]
        domain: SingleDomain,
        /// General-English vectors to mix in (overrides mapping.pretrained_vectors).
        #[arg(long, value_name = "PATH")]
        pretrained: Option<String>,
        /// Ignore mapping.pretrained_vectors.
        #[arg(long)]
        no_pretrained: bool,
        /// Leave out the sentences analysts labelled in the mapping workbench (`mapping_feedback`),
        /// which are otherwise learnt as procedure examples.
        #[arg(long)]
        no_feedback: bool,
    },
    /// Fit the text calibration of a model's scores on labelled text that is not ATT&CK's own
    /// (cross-validated; prints calibration error and precision/coverage per threshold) and save it
    /// beside the model.
    Calibrate {
        /// JSON lines {"text": …, "labels": ["T…"]} (labels [] marks a negative); repeatable.
        #[arg(long = "input", value_name = "FILE", required = true)]
        inputs: Vec<PathBuf>,
        /// Also write the calibration to this file (e.g. the shipped config/mapping_calibration.json).
        #[arg(long, value_name = "FILE")]
        write: Option<PathBuf>,
        /// Also write every text's candidates (their calibration features, the last six the
        /// candidate's evidence, and whether each is a label) as JSON lines, for analysis outside
        /// threatlake.
        #[arg(long, value_name = "FILE")]
        samples: Option<PathBuf>,
        /// Also write every (report, technique) the labelled reports support (its uncalibrated
        /// report score, supporting sentences, best sentence score, and whether it is a label) as
        /// JSON lines.
        #[arg(long, value_name = "FILE")]
        report_samples: Option<PathBuf>,
        /// Model directory (default: newest for the domain).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Domain.
        #[arg(long, value_enum, default_value_t = SingleDomain::Enterprise)]
        domain: SingleDomain,
    },
    /// Analysts' decisions from the dashboard's mapping workbench.
    #[command(subcommand)]
    Feedback(FeedbackCommand),
    /// Compare two threat-model snapshots (default: the last two runs): new, rising, fading, gone.
    Diff {
        /// Older run id.
        run_a: Option<String>,
        /// Newer run id.
        run_b: Option<String>,
        /// Also list steady techniques.
        #[arg(long)]
        all: bool,
    },
    /// Measure a model: on a labelled file, or on a hold-out of ATT&CK's own procedures.
    Eval {
        /// JSON lines {"text": …, "labels": ["T…"]}.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["holdout", "from_lake"])]
        input: Option<PathBuf>,
        /// Agreement with the techniques feeds state for their items (OTX attack_ids, VirusTotal sandboxes).
        #[arg(long, conflicts_with = "holdout")]
        from_lake: bool,
        /// Hold out the procedures of a random share of groups/software/campaigns, train on the rest,
        /// and compare variants and a TF-IDF + LR baseline side by side.
        #[arg(long)]
        holdout: bool,
        /// Share of sources held out.
        #[arg(long, default_value_t = 0.2)]
        fraction: f64,
        /// Seed of the hold-out split.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Pretrained vectors for the hold-out variant with them.
        #[arg(long, value_name = "PATH")]
        pretrained: Option<String>,
        /// Model directory (default: newest for the domain).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Domain.
        #[arg(long, value_enum, default_value_t = SingleDomain::Enterprise)]
        domain: SingleDomain,
    },
}

#[derive(Debug, Subcommand)]
enum FeedbackCommand {
    /// Write the `mapping_feedback` decisions as labelled JSON lines in the `model eval --input`
    /// format: {"text", "labels", "rejected", "source": "workbench", "doc"} (the newest decision
    /// per suggestion wins; labels [] when every suggestion was rejected).
    Export {
        /// Output file (default: stdout).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Record labelled sentences as analysts' decisions (e.g. earlier TRAM annotations or an
    /// export from another lake): JSON lines {"text", "labels", "rejected"?, "doc"?}; each label
    /// is an accepted technique, each rejected one a rejection. One commit.
    Import {
        /// The labelled file.
        #[arg(long, value_name = "FILE")]
        input: PathBuf,
        /// Who the decisions are recorded as (default: import:<file name>).
        #[arg(long)]
        who: Option<String>,
    },
}

#[derive(Debug, Args)]
struct MapArgs {
    /// Text to map.
    text: Option<String>,
    /// File of texts: .jsonl (a "text" field per line), .csv (a "text" column) or one text per line.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Techniques per text.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Output: text (with evidence) or jsonl ({"row": N, "techniques": [{"technique_id", "score"}…]}).
    #[arg(long, value_enum, default_value_t = MapFormat::Text)]
    format: MapFormat,
    /// Each text is a whole report (plain, markdown, HTML or PDF; --input .txt/.md/.html/.pdf is read
    /// whole): map it sentence by sentence and list every technique found with its score,
    /// supporting sentences and best sentence (jsonl adds "sentences" and "sentence").
    #[arg(long)]
    document: bool,
    /// Model directory (default: newest for the domain).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Domain.
    #[arg(long, value_enum, default_value_t = SingleDomain::Enterprise)]
    domain: SingleDomain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MapFormat {
    Text,
    Jsonl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SingleDomain {
    Enterprise,
    Mobile,
    Ics,
}

impl From<SingleDomain> for Domain {
    fn from(d: SingleDomain) -> Domain {
        match d {
            SingleDomain::Enterprise => Domain::Enterprise,
            SingleDomain::Mobile => Domain::Mobile,
            SingleDomain::Ics => Domain::Ics,
        }
    }
}

#[derive(Debug, Subcommand)]
enum IngestCommand {
    /// MITRE ATT&CK STIX bundles (default: MITRE's published bundles for the configured domains).
    Attack {
        /// Domain to ingest; with --from, checked against the bundle.
        #[arg(long, value_enum, default_value_t = DomainArg::All)]
        domain: DomainArg,
        /// A local .json/.json.gz bundle or an http(s) URL instead of the configured source.
        #[arg(long, value_name = "PATH_OR_URL")]
        from: Option<String>,
        /// ATT&CK release of a bundle that does not state it (no x-mitre-collection).
        #[arg(long, value_name = "VERSION")]
        attack_version: Option<String>,
        /// Replace the current release even with a bundle holding far fewer techniques.
        #[arg(long)]
        force: bool,
    },
    /// AlienVault OTX subscribed pulses modified since the last run (key: THREATLAKE_OTX_API_KEY).
    Otx,
    /// VirusTotal v3 lookups: these observables, --iocs, virustotal.observables and OTX enrichment
    /// (key: THREATLAKE_VIRUSTOTAL_API_KEY).
    Vt {
        /// Hashes, URLs, domains or IPs.
        observables: Vec<String>,
        /// File of IOCs: one per line, CSV (first column) or JSON lines ("observable"/"indicator").
        #[arg(long, value_name = "FILE")]
        iocs: Option<String>,
    },
    /// STIX objects of TAXII 2.1 collections added since the last pull (reports and indicators
    /// become threat items). Auth: taxii.username + THREATLAKE_TAXII_PASSWORD, or
    /// THREATLAKE_TAXII_TOKEN.
    Taxii {
        /// Collection URL (…/collections/{id}/); repeat for several. Default: taxii.collections.
        #[arg(long, value_name = "URL")]
        collection: Vec<String>,
        /// Pull what was added after this time (RFC 3339 or a date) instead of the stored watermark.
        #[arg(long, value_name = "TIME")]
        added_after: Option<String>,
        /// HTTP Basic user (overrides taxii.username).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DomainArg {
    Enterprise,
    Mobile,
    Ics,
    All,
}

impl DomainArg {
    fn domain(self) -> Option<Domain> {
        match self {
            DomainArg::Enterprise => Some(Domain::Enterprise),
            DomainArg::Mobile => Some(Domain::Mobile),
            DomainArg::Ics => Some(Domain::Ics),
            DomainArg::All => None,
        }
    }
}

#[derive(Debug, Args)]
struct SqlArgs {
    /// Run this SQL (or backslash command) and exit; repeatable.
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    commands: Vec<String>,
    /// Run the SQL in this file and exit; repeatable.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Output format (default: sql.format in settings).
    #[arg(long, value_parser = parse_format)]
    format: Option<OutputFormat>,
    /// Stop reading a result after N rows, in every format (0 = all). Without it the REPL's table
    /// format shows sql.max_rows rows, and batch runs print every row.
    #[arg(long)]
    maxrows: Option<usize>,
    /// Do not print "N rows in X s".
    #[arg(long)]
    quiet: bool,
    /// SQL engine: datafusion, or duckdb (embedded DuckDB over the same lake; needs a build with
    /// `--features duckdb`).
    #[arg(long, value_enum, default_value_t = SqlEngineKind::Datafusion)]
    engine: SqlEngineKind,
    /// With `--engine ballista`: a running scheduler (`df://host:port`) instead of an in-process one.
    #[arg(long, value_name = "URL", requires = "engine")]
    scheduler: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SqlEngineKind {
    Datafusion,
    Duckdb,
    /// DataFusion on a Ballista scheduler + executor started in this process (build with
    /// `--features ballista`); `--scheduler df://host:port` uses a running cluster instead.
    Ballista,
}

fn parse_format(s: &str) -> Result<OutputFormat, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective settings (file + secrets + environment), secrets redacted.
    Show,
}

#[derive(Debug, Subcommand)]
enum LakeCommand {
    /// List the tables in the lake with partition columns, file counts and sizes.
    Tables,
    /// Print the SQL that gives stock DuckDB this lake's tables and views (load the threatlake
    /// extension first: the views use its functions).
    DuckdbSql,
    /// Copy a lake between a directory and S3, either way: new and changed files, then the files
    /// the source's tables dropped (replaced or compacted), so both answer queries alike.
    Sync {
        /// Source (default: lake.root).
        #[arg(long, value_name = "PATH_OR_URL")]
        from: Option<String>,
        /// Destination, e.g. s3://bucket/lake or data/lake.
        #[arg(long, value_name = "PATH_OR_URL")]
        to: String,
        /// Only say what would be copied and deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compact each table's small files (feeds add one per batch) in one commit per table, so scans
    /// stay fast; readers are not disturbed and time travel still reaches the versions before.
    #[command(alias = "compact")]
    Optimize {
        /// Target file size in MB.
        #[arg(long, default_value_t = 128)]
        target_mb: u64,
    },
    /// Delete data files no version within the retention reads (replaced or compacted files, and
    /// files of writers that died before committing); time travel reaches back as far as kept.
    Vacuum {
        /// Keep what versions of this age read, e.g. 7d, 12h, 0s.
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
        retain: std::time::Duration,
        /// Only say how many files would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// List a table's commits, newest first: version, time, operation, what threatlake did, metrics.
    History {
        /// Table name.
        table: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Convert a lake of plain Parquet tables (written before Delta Lake) into Delta tables in
    /// place, without copying, losing or duplicating a row. Safe to re-run.
    Upgrade,
    /// Show the writer locks held on the lake.
    Locks,
    /// Remove a writer lock whose process died (see `lake locks`).
    Unlock {
        /// Lock name: attack, otx, virustotal or intel.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The service in-process on a loopback port: POST /map texts/s with concurrent clients vs
    /// in-process mapping, /sql p50/p99 of the report queries, peak RSS under 8 heavy queries.
    Serve {
        /// Concurrent clients of /map.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds of /map load (and of the in-process baseline).
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Runs of each report query through /sql.
        #[arg(long, default_value_t = 20)]
        sql_runs: usize,
    },
    /// The dashboard in-process on a loopback port: every page and partial rendered N times
    /// (p50/p95 server time), the JS + CSS a first load sends (gzip bytes).
    Dashboard {
        /// Renders of each page.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Also time each page's first load (empty cache, charts drawn) in this Chromium, driven
        /// by Playwright (pip install playwright), e.g. /usr/bin/chromium.
        #[arg(long, value_name = "CHROMIUM")]
        browser: Option<PathBuf>,
    },
    /// Push every mapping of a lake (e.g. one `bench report --keep DIR` built) to osmem-server via
    /// `_bulk` (docs/s, peak RSS) and to rsyslogd as CEF over TCP (lines/s); both are started here.
    /// The lake's outbox is reset first.
    Push {
        /// Directory holding `lake/` (as `bench report --keep DIR` leaves it).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// `SELECT map_technique(text)` over N sentence-length rows through DataFusion.
    Map {
        /// Rows.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Pull N synthetic OTX pulses from a loopback server into a throwaway lake (rows/s, peak RSS).
    Otx {
        /// Pulses.
        #[arg(long, default_value_t = 100_000)]
        pulses: usize,
        /// Indicators per pulse.
        #[arg(long, default_value_t = 10)]
        indicators: usize,
        /// Pulses per page.
        #[arg(long, default_value_t = 50)]
        page_size: usize,
        /// Keep the lake in DIR/lake (e.g. for `bench sql`) instead of a temporary directory.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
    },
    /// A query streamed through the `sql` output path (CSV into a sink): time to the first row,
    /// rows/s, peak RSS; with --maxrows, how soon reading stops.
    Sql {
        /// The lake (a directory, e.g. `bench otx --keep DIR` made DIR/lake).
        #[arg(long, value_name = "DIR")]
        lake: String,
        /// The query.
        #[arg(short = 'c', long, default_value = "SELECT * FROM otx_indicator_log")]
        command: String,
        /// Stop after N rows (0 = all), as `sql --maxrows`.
        #[arg(long, default_value_t = 0)]
        maxrows: usize,
    },
    /// Every report in every format over a generated lake of mapped OTX pulses: seconds, peak RSS.
    Report {
        /// Threat items (pulses) to generate.
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        /// ATT&CK Enterprise bundle (procedure texts and the matrix).
        #[arg(
            long,
            default_value = "../shared/data/attack/enterprise-attack.json.gz"
        )]
        from: String,
        /// Keep the lake and reports in this directory instead of a temporary one.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
    },
    /// Write a 1,000-partition OTX pulse log to a local lake and to S3 (throughput of each), then
    /// count the S3 requests of a one-day query (needs an S3 endpoint: AWS_ENDPOINT_URL etc.).
    S3 {
        /// S3 location to write under (a fresh `bench-<id>` prefix is used inside it).
        #[arg(long, value_name = "URL")]
        to: String,
        /// Daily partitions.
        #[arg(long, default_value_t = 1000)]
        partitions: usize,
        /// Pulses per partition.
        #[arg(long, default_value_t = 20)]
        per_partition: usize,
    },
    /// Hostile input: cleaning hostile citation markup, refusing deep SQL, refusing a gzip bomb.
    Hostile {
        /// Megabytes of hostile text to clean.
        #[arg(long, default_value_t = 1)]
        mb: usize,
    },
    /// Ingest a bundle into a throwaway lake and time a representative query.
    Ingest {
        /// Bundle to ingest.
        #[arg(
            long,
            default_value = "../shared/data/attack/enterprise-attack.json.gz"
        )]
        from: String,
        /// Ingest runs.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Query runs.
        #[arg(long, default_value_t = 20)]
        query_runs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::repl::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    // topojson warns about the world map's (valid) string ids; nothing a user can act on.
    let default = match verbose {
        0 => "warn,topojson=error",
        1 => "info,topojson=error",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("THREATLAKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn main_inner(cli: Cli) -> Result<()> {
    let Loaded { mut settings, .. } = Settings::load(cli.global.config.as_deref())?;
    if let Some(l) = &cli.global.lake {
        settings.lake.root = l.clone();
    }
    if let Some(r) = &cli.global.raw {
        settings.lake.raw = r.clone();
    }
    if threatlake::models::is_remote(&settings.lake.models) {
        // Models beside an S3 lake: work from the local cache, fetched first by commands that map.
        let remote = std::mem::replace(
            &mut settings.lake.models,
            settings.lake.models_cache.clone(),
        );
        let maps = matches!(
            cli.command,
            Command::Sql(_)
                | Command::Serve(_)
                | Command::Map(_)
                | Command::MapIntel
                | Command::Run(_)
                | Command::Report { .. }
                | Command::Chart(_)
                | Command::Model(_)
                | Command::Bench(_)
        );
        if maps {
            let (_, n) = threatlake::models::fetch(&settings.lake, &remote)
                .await
                .with_context(|| {
                    format!("fetching the mapping models from {remote} (lake.models)")
                })?;
            if n > 0 {
                tracing::info!(files = n, from = %remote, "fetched model files");
            }
        }
        settings.lake.models_remote = Some(remote);
    }
    match cli.command {
        Command::Config(ConfigCommand::Show) => {
            print!("{}", settings.to_redacted_yaml());
            Ok(())
        }
        Command::Ingest(IngestCommand::Attack {
            domain,
            from,
            attack_version,
            force,
        }) => ingest_attack(&settings, domain, from, attack_version, force).await,
        Command::Ingest(IngestCommand::Otx) => cli::feeds::ingest_otx(&settings).await.map(drop),
        Command::Ingest(IngestCommand::Vt { observables, iocs }) => {
            cli::feeds::ingest_vt(&settings, observables, iocs)
                .await
                .map(drop)
        }
        Command::Ingest(IngestCommand::Taxii {
            collection,
            added_after,
            user,
        }) => cli::feeds::ingest_taxii(&settings, collection, added_after, user)
            .await
            .map(drop),
        Command::Report {
            names,
            all: _,
            format,
            out,
            since,
        } => cli::report::report(&settings, names, &format, out, since).await,
        Command::Chart(args) => cli::report::chart(&settings, args).await,
        Command::MapIntel => cli::feeds::map_intel(&settings).await.map(drop),
        Command::Push(a) => {
            let since = a
                .since
                .as_deref()
                .map(threatlake::reports::batch::parse_since)
                .transpose()?;
            let options = threatlake::integrations::PushOptions {
                target: a.target,
                dry_run: a.dry_run,
                since,
                retry_dead: a.retry_dead,
            };
            cli::push::push(&settings, options).await
        }
        Command::Run(a) => {
            let job = match &a.job {
                None => threatlake::pipeline::Job::Run,
                Some(name) => threatlake::pipeline::Job::parse(name).with_context(|| {
                    format!(
                        "no job {name:?}; jobs: {}",
                        threatlake::pipeline::Job::names()
                    )
                })?,
            };
            let options = threatlake::pipeline::RunOptions {
                offline: a.offline,
                samples: a.samples.then_some(a.samples_dir),
                reports: a.reports,
                ..Default::default()
            };
            cli::feeds::run(&settings, job, options).await
        }
        Command::Model(ModelCommand::Feedback(FeedbackCommand::Export { output })) => {
            cli::model::feedback_export(&settings, output.as_deref()).await
        }
        Command::Model(ModelCommand::Feedback(FeedbackCommand::Import { input, who })) => {
            cli::model::feedback_import(&settings, &input, who.as_deref()).await
        }
        Command::Model(ModelCommand::Diff { run_a, run_b, all }) => {
            cli::feeds::diff(&settings, run_a, run_b, all).await
        }
        Command::Sql(args) => sql(&settings, args).await,
        Command::Serve(a) => {
            let options = threatlake::server::ServeOptions {
                bind: a.bind.unwrap_or_else(|| settings.server.bind.clone()),
                tls: a.tls_cert.zip(a.tls_key),
                insecure_http: a.insecure_http,
            };
            Ok(threatlake::server::serve(settings, options).await?)
        }
        Command::Auth(c) => cli::auth::run(&settings, c),
        Command::Lake(LakeCommand::DuckdbSql) => {
            let lake = Lake::from_settings(&settings.lake)?;
            if lake.location.local_path().is_none() {
                println!(
                    "-- {} is on S3: DuckDB reads it with the httpfs extension (INSTALL httpfs; LOAD httpfs;\n\
                     -- CREATE SECRET (TYPE s3, PROVIDER credential_chain, URL_STYLE 'path', ENDPOINT '…');)\n\
                     -- or, in Python, with an fsspec filesystem: con.register_filesystem(s3fs.S3FileSystem(...)).\n",
                    lake.location
                );
            }
            for stmt in threatlake::sql::duckdb_sql::setup(&lake).await? {
                println!("{}\n", stmt.trim_end());
            }
            Ok(())
        }
        Command::Lake(LakeCommand::Sync { from, to, dry_run }) => {
            let from = from.unwrap_or_else(|| settings.lake.root.clone());
            anyhow::ensure!(from != to, "--from and --to are the same place ({to})");
            let src = Location::open_with(&from, &settings.lake.store)?;
            let dst = Location::open_with(&to, &settings.lake.store)?;
            let t = std::time::Instant::now();
            let ttl = threatlake::lake::lock_ttl(&settings.lake);
            let r = threatlake::lake::maintain::sync(&src, &dst, dry_run, ttl)
                .await
                .with_context(|| format!("lake sync {src} → {dst} stopped; what was copied is complete, re-run to finish"))?;
            println!(
                "{}{src} → {dst}: {} object(s) copied ({:.1} MB), {} unchanged, {} stale file(s) deleted{} in {:.1} s",
                if dry_run { "dry run: " } else { "" },
                r.copied,
                r.bytes as f64 / 1e6,
                r.unchanged,
                r.deleted,
                if r.vanished > 0 { format!(", {} replaced at the source while copying (re-run to pick up)", r.vanished) } else { String::new() },
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Lake(LakeCommand::Optimize { target_mb }) => {
            let lake = Lake::from_settings(&settings.lake)?;
            let t = std::time::Instant::now();
            let r = threatlake::lake::maintain::optimize(&lake, target_mb).await?;
            println!(
                "{}: {} table(s) compacted, {} file(s) → {} in {:.1} s",
                lake.location,
                r.tables,
                r.files_removed,
                r.files_added,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Lake(LakeCommand::Vacuum { retain, dry_run }) => {
            let lake = Lake::from_settings(&settings.lake)?;
            let r = threatlake::lake::maintain::vacuum(&lake, retain, dry_run).await?;
            println!(
                "{}{}: {} file(s) {} in {} table(s) (kept what the last {} of versions read)",
                if dry_run { "dry run: " } else { "" },
                lake.location,
                r.files,
                if dry_run {
                    "would be deleted"
                } else {
                    "deleted"
                },
                r.tables,
                humantime::format_duration(retain)
            );
            Ok(())
        }
        Command::Lake(LakeCommand::History { table, limit }) => {
            let lake = Lake::from_settings(&settings.lake)?;
            for c in lake.history(&table, Some(limit)).await? {
                println!(
                    "{:>6}  {}  {:<14} {:<40} {}",
                    c.version,
                    c.timestamp
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "-".into()),
                    c.operation,
                    c.purpose.unwrap_or_default(),
                    c.metrics
                );
            }
            Ok(())
        }
        Command::Lake(LakeCommand::Upgrade) => {
            let lake = Lake::from_settings(&settings.lake)?;
            let r = threatlake::lake::maintain::upgrade(&lake).await?;
            if r.recovered > 0 {
                println!(
                    "finished {} interrupted compaction(s) of the old release",
                    r.recovered
                );
            }
            for (name, files) in &r.converted {
                println!("{name}: {files} Parquet file(s) → Delta table (version 0)");
            }
            if r.converted.is_empty() {
                println!("{}: every table is already a Delta table", lake.location);
            }
            Ok(())
        }
        Command::Lake(LakeCommand::Locks) => {
            let lake = Lake::from_settings(&settings.lake)?;
            let locks = lake.location.locks().await?;
            if locks.is_empty() {
                println!("{}: no writer holds a lock", lake.location);
            }
            for h in locks {
                println!(
                    "{:<11} {h} (abandoned after {})",
                    h.name,
                    h.expires.format("%Y-%m-%d %H:%M:%SZ")
                );
            }
            Ok(())
        }
        Command::Lake(LakeCommand::Unlock { name }) => {
            let lake = Lake::from_settings(&settings.lake)?;
            match lake.location.unlock(&name).await? {
                Some(h) => println!("removed lock {name}, held by {h}"),
                None => println!("no lock {name} on {}", lake.location),
            }
            Ok(())
        }
        Command::Lake(LakeCommand::Tables) => {
            let lake = Lake::from_settings(&settings.lake)?;
            let tables = lake.tables().await?;
            if tables.is_empty() {
                println!(
                    "{}: no tables yet; run `threatlake ingest attack`",
                    lake.location
                );
            }
            for (name, t) in tables {
                println!(
                    "{name:<32} v{:<4} {:>5} files {:>10.1} KB  partitioned by {}",
                    t.version,
                    t.files,
                    t.bytes as f64 / 1024.0,
                    if t.partition_cols.is_empty() {
                        "-".to_string()
                    } else {
                        t.partition_cols.join(", ")
                    }
                );
            }
            Ok(())
        }
        Command::Model(ModelCommand::Build {
            domain,
            pretrained,
            no_pretrained,
            no_feedback,
        }) => {
            let options = threatlake::pipeline::BuildOptions {
                pretrained,
                no_pretrained,
                no_feedback,
            };
            cli::model::build(&settings, domain.into(), options).await
        }
        Command::Model(ModelCommand::Calibrate {
            inputs,
            write,
            samples,
            report_samples,
            model,
            domain,
        }) => cli::model::calibrate(
            &settings,
            model.as_deref(),
            domain.into(),
            &inputs,
            cli::model::CalibrateOutputs {
                write: write.as_deref(),
                samples: samples.as_deref(),
                report_samples: report_samples.as_deref(),
            },
        ),
        Command::Model(ModelCommand::Eval {
            from_lake: true,
            model,
            domain,
            ..
        }) => cli::model::eval_from_lake(&settings, model.as_deref(), domain.into()).await,
        Command::Model(ModelCommand::Eval {
            input,
            holdout,
            fraction,
            seed,
            pretrained,
            model,
            domain,
            from_lake: false,
        }) => match (input, holdout) {
            (Some(i), false) => {
                cli::model::eval_file(&settings, model.as_deref(), domain.into(), &i)
            }
            (None, true) => {
                cli::model::eval_holdout(&settings, domain.into(), fraction, seed, pretrained).await
            }
            _ => bail!("give --input FILE (labelled JSON lines) or --holdout"),
        },
        Command::Map(a) => cli::model::map(
            &settings,
            a.model.as_deref(),
            a.domain.into(),
            a.text,
            a.input,
            cli::model::MapOutput {
                top: a.top,
                jsonl: a.format == MapFormat::Jsonl,
                document: a.document,
            },
        ),
        Command::Bench(BenchCommand::Otx {
            pulses,
            indicators,
            page_size,
            keep,
        }) => cli::bench::otx(pulses, indicators, page_size, keep).await,
        Command::Bench(BenchCommand::Sql {
            lake,
            command,
            maxrows,
        }) => cli::bench::sql(&settings, &lake, &command, maxrows).await,
        Command::Bench(BenchCommand::S3 {
            to,
            partitions,
            per_partition,
        }) => cli::bench::s3(&settings, &to, partitions, per_partition).await,
        Command::Bench(BenchCommand::Report { items, from, keep }) => {
            cli::bench::report(&settings, cli.global.config.as_deref(), items, &from, keep).await
        }
        Command::Bench(BenchCommand::Push { dir }) => cli::bench::push(&settings, &dir).await,
        Command::Bench(BenchCommand::Map { rows, runs }) => {
            cli::bench::map(&settings, rows, runs).await
        }
        Command::Bench(BenchCommand::Ingest {
            from,
            runs,
            query_runs,
        }) => cli::bench::ingest(&from, runs, query_runs).await,
        Command::Bench(BenchCommand::Hostile { mb }) => cli::bench::hostile(mb).await,
        Command::Bench(BenchCommand::Dashboard { runs, browser }) => {
            cli::bench::dashboard(&settings, runs, browser.as_deref()).await
        }
        Command::Bench(BenchCommand::Serve {
            clients,
            secs,
            sql_runs,
        }) => cli::bench::serve(&settings, clients, secs, sql_runs).await,
    }
}

async fn ingest_attack(
    settings: &Settings,
    domain: DomainArg,
    from: Option<String>,
    attack_version: Option<String>,
    force: bool,
) -> Result<()> {
    let mut options = threatlake::pipeline::attack_options(settings);
    options.version_override = attack_version;
    options.force = force;
    let jobs: Vec<(Option<Domain>, String)> = match (&from, domain.domain()) {
        (Some(src), d) => vec![(d, src.clone())],
        (None, Some(d)) => vec![(Some(d), source_for(settings, d)?)],
        (None, None) => settings
            .attack
            .domains
            .iter()
            .map(|d| Ok((Some(*d), source_for(settings, *d)?)))
            .collect::<Result<_>>()?,
    };
    if options.version_override.is_some() && jobs.len() > 1 {
        bail!("--attack-version applies to one bundle; give --domain or --from as well");
    }
    let observer = cli::progress::CliObserver::plain();
    let cx = threatlake::pipeline::Context::open(settings, &observer)?;
    threatlake::pipeline::Observer::started(&observer, threatlake::pipeline::Stage::Attack);
    let r = threatlake::pipeline::ingest_attack(&cx, &jobs, &options).await;
    observer.clear();
    r?;
    println!("lake: {}", cx.lake.location);
    Ok(())
}

fn source_for(settings: &Settings, d: Domain) -> Result<String> {
    settings.attack.sources.get(&d).cloned().with_context(|| {
        format!("no attack.sources.{d} in settings; add the bundle URL or pass --from")
    })
}

async fn sql(settings: &Settings, args: SqlArgs) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let options = threatlake::sql::EngineOptions::from_settings(settings)
        .with_memory_mb(settings.sql.memory_mb)?;
    let kind = match args.engine {
        SqlEngineKind::Datafusion => EngineKind::DataFusion,
        SqlEngineKind::Duckdb => EngineKind::DuckDb,
        SqlEngineKind::Ballista => EngineKind::Ballista,
    };
    let engine = QueryEngine::open(kind, &lake, &options, args.scheduler.as_deref()).await?;
    let format = match args.format {
        Some(f) => f,
        None => settings
            .sql
            .format
            .parse()
            .map_err(|e: String| anyhow::anyhow!("sql.format in settings: {e}"))?,
    };
    let mut scripts: Vec<(String, String)> = args
        .commands
        .into_iter()
        .map(|c| ("-c".to_string(), c))
        .collect();
    for f in &args.files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read SQL file {}", f.display()))?;
        scripts.push((f.display().to_string(), text));
    }
    let interactive = scripts.is_empty() && cli::repl::stdin_is_terminal();
    if scripts.is_empty() && !interactive {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading SQL from stdin")?;
        scripts.push(("stdin".to_string(), text));
    }
    let session = cli::repl::Session {
        engine,
        format,
        max_rows: args.maxrows.unwrap_or(if interactive {
            settings.sql.max_rows
        } else {
            0
        }),
        limit: args.maxrows.unwrap_or(0),
        timing: !args.quiet,
        interactive,
    };
    if interactive {
        let history = (!settings.sql.history_file.is_empty())
            .then(|| PathBuf::from(&settings.sql.history_file));
        cli::repl::repl(session, history).await
    } else {
        cli::repl::batch(session, scripts).await
    }
}
