//! `threatlake push`: deliver new mappings to the SIEM/SOAR targets now and print per-target counts.

use anyhow::Result;
use threatlake::integrations::{self, PushOptions};
use threatlake::lake::Lake;
use threatlake::pipeline::{Observer, Stage};
use threatlake::Settings;

use super::progress::CliObserver;

/// Push and print the table; fails when a target stopped on an error (after printing every target).
pub async fn push(settings: &Settings, options: PushOptions) -> Result<()> {
    let lake = Lake::from_settings(&settings.lake)?;
    let observer = CliObserver::plain();
    observer.started(Stage::Push);
    let report = integrations::push(settings, &lake, &options, &|m: &str| {
        observer.progress(Stage::Push, m)
    })
    .await;
    observer.clear();
    let report = report?;
    let header = [
        "target",
        "kind",
        "queued",
        "delivered",
        "failed",
        "dead",
        "waiting",
    ];
    let rows: Vec<[String; 7]> = report
        .targets
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.kind.clone(),
                t.queued.to_string(),
                t.delivered.to_string(),
                t.failed.to_string(),
                t.dead.to_string(),
                t.waiting.to_string(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < 2 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    if report.dry_run {
        println!("dry run: nothing was queued or sent (queued = would be queued, waiting = would be sent)");
    }
    println!("{}", line(header.to_vec()));
    for r in &rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
    let mut failed = 0;
    for t in &report.targets {
        if t.revived > 0 {
            println!("{}: {} dead-letter row(s) queued again", t.name, t.revived);
        }
        if t.superseded > 0 {
            println!(
                "{}: {} row(s) dropped: their item changed (the new version is queued)",
                t.name, t.superseded
            );
        }
        if let Some(e) = &t.error {
            failed += 1;
            eprintln!("error: {}: {e}", t.name);
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} target(s) stopped on an error; their rows stay in the outbox (SELECT * FROM integration_outbox WHERE status <> 'delivered'), the next push retries",
            report.targets.len()
        );
    }
    Ok(())
}
