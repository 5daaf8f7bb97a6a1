//! Integration tests: one binary, one module per area.

mod common;

mod it {
    /// Distributed mode on Ballista: same answers as in-process DataFusion.
    #[cfg(feature = "ballista")]
    mod ballista;
    /// `threatlake` CLI output, snapshot-tested (insta-cmd) per output format and for `\d`.
    mod cli;
    /// The dashboard in Debian's chromium (Playwright): every page after sign-in, no console error
    /// or CSP violation, hostile intel shown as text, numbers equal to SQL, Navigator layer.
    mod dashboard;
    /// The lake's Delta tables: aborts at every write, readers during re-ingests, concurrent
    /// appends, time travel, upgrade of a plain-Parquet lake.
    mod delta;
    /// DuckDB: embedded engine and the loadable extension in stock DuckDB agree with DataFusion.
    #[cfg(feature = "duckdb")]
    mod duckdb;
    /// OTX and VirusTotal against loopback servers: paging, incremental runs, quotas, faults, keys.
    mod feeds;
    /// Ingest behaviour: idempotence, versions, HTTP sources, bad input leaving the lake untouched.
    mod ingest;
    /// `push` to SIEM/SOAR receivers: osmem-server (OpenSearch API), rsyslogd (CEF/LEEF over TCP,
    /// UDP, TLS), loopback Splunk HEC, TheHive, Sentinel and webhook servers; faults and kill -9.
    mod push;
    /// Reports and charts over a fixed fixture lake: golden outputs, escaping, PDF text, chart marks.
    mod reports;
    /// The lake on S3 (a real moto server on loopback): every command, faults, locks, concurrent commits, optimize and vacuum.
    mod s3;
    /// `threatlake serve`: auth matrix, sessions and CSRF, read-only SQL with limits, the schedule,
    /// shutdown, metrics and the OpenAPI document, TLS.
    mod serve;
    /// `ingest taxii` against medallion (OASIS's TAXII 2.1 server) on loopback: paging by `next`,
    /// resuming from `X-TAXII-Date-Added-Last`, revisions, auth errors.
    mod taxii;
}
