//! Job progress on the terminal: a spinner per stage on stderr (hidden when stderr is not a
//! terminal), stage summaries and notes on stdout.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use threatlake::pipeline::{Observer, Stage, StageOutcome, StageStatus};

/// Draws a job's stages; `numbered` prefixes each with `[i/n]` (the `run` layout).
pub struct CliObserver {
    bar: Mutex<Option<ProgressBar>>,
    numbered: Option<Mutex<(usize, usize)>>,
}

impl CliObserver {
    /// Spinners and summaries only.
    pub fn plain() -> Self {
        Self {
            bar: Mutex::new(None),
            numbered: None,
        }
    }

    /// With `[i/n]` headers for `stages` stages.
    pub fn numbered(stages: usize) -> Self {
        Self {
            bar: Mutex::new(None),
            numbered: Some(Mutex::new((0, stages))),
        }
    }

    /// Clear the spinner (a command that prints its own summary).
    pub fn clear(&self) {
        if let Some(bar) = self.bar.lock().ok().and_then(|mut b| b.take()) {
            bar.finish_and_clear();
        }
    }

    fn indent(&self) -> &'static str {
        if self.numbered.is_some() {
            "  "
        } else {
            ""
        }
    }

    fn print(&self, line: &str) {
        let text: Vec<String> = line
            .lines()
            .map(|l| format!("{}{l}", self.indent()))
            .collect();
        let text = text.join("\n");
        match self.bar.lock().ok().and_then(|b| b.clone()) {
            Some(bar) => bar.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }
}

/// The stage's name for people.
pub fn label(stage: Stage) -> &'static str {
    match stage {
        Stage::Attack => "ATT&CK",
        Stage::Samples => "samples",
        Stage::Otx => "OTX",
        Stage::Virustotal => "VirusTotal",
        Stage::Taxii => "TAXII",
        Stage::Model => "model",
        Stage::Map => "map",
        Stage::Snapshot => "threat model",
        Stage::Push => "push",
        Stage::Reports => "reports",
    }
}

impl Observer for CliObserver {
    fn started(&self, stage: Stage) {
        if let Some(n) = &self.numbered {
            if let Ok(mut n) = n.lock() {
                n.0 += 1;
                println!("[{}/{}] {}", n.0, n.1, label(stage));
            }
        }
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {prefix}: {msg} {elapsed}")
                .expect("static template"),
        );
        bar.set_prefix(label(stage));
        bar.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn progress(&self, _stage: Stage, message: &str) {
        if let Some(bar) = self.bar.lock().ok().and_then(|b| b.clone()) {
            bar.set_message(message.to_string());
        }
    }

    fn note(&self, _stage: Stage, line: &str) {
        self.print(line);
    }

    fn finished(&self, outcome: &StageOutcome) {
        self.clear();
        if outcome.status == StageStatus::Failed {
            self.print(&format!(
                "{} failed: {}",
                label(outcome.stage),
                outcome.error.as_deref().unwrap_or("")
            ));
        } else {
            self.print(&outcome.summary);
        }
    }
}
