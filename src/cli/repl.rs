//! The `threatlake sql` front end: REPL (rustyline) and batch runner over DataFusion ([`Engine`]) or,
//! with the `duckdb` feature, the embedded DuckDB engine — same commands, same output formats.

use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Result;
use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper, Highlighter, Hinter};
use threatlake::sql::output::{self, OutputError, OutputFormat};
use threatlake::sql::QueryResult;
use threatlake::sql::{QueryEngine, QueryEngineError, ResultSink};

/// Backslash commands. `INFO` is the single source of truth for parsing and for `\?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `\q`
    Quit,
    /// `\?`
    Help,
    /// `\d`
    ListTables,
    /// `\d NAME`
    DescribeTable(String),
    /// `\format [NAME]`
    Format(Option<OutputFormat>),
    /// `\timing [on|off]`
    Timing(Option<bool>),
}

/// (command, argument, description) for every command, in help order.
pub const INFO: &[(&str, &str, &str)] = &[
    ("\\q", "", "quit"),
    ("\\?", "", "list commands"),
    ("\\d", "", "list tables and views"),
    ("\\d", "NAME", "describe a table or view"),
    (
        "\\format",
        "[table|csv|tsv|json|ndjson|markdown]",
        "show or set the output format",
    ),
    (
        "\\timing",
        "[on|off]",
        "show or set the 'N rows in X s' line",
    ),
];

impl FromStr for Command {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_end_matches(';').trim();
        let (cmd, arg) = s
            .split_once(char::is_whitespace)
            .map_or((s, ""), |(c, a)| (c, a.trim()));
        match (cmd, arg) {
            ("\\q" | "\\quit", "") => Ok(Command::Quit),
            ("\\?" | "\\h" | "\\help", "") => Ok(Command::Help),
            ("\\d", "") => Ok(Command::ListTables),
            ("\\d", name) => Ok(Command::DescribeTable(name.to_string())),
            ("\\format", "") => Ok(Command::Format(None)),
            ("\\format", f) => f.parse().map(|f| Command::Format(Some(f))),
            ("\\timing", "") => Ok(Command::Timing(None)),
            ("\\timing", "on") => Ok(Command::Timing(Some(true))),
            ("\\timing", "off") => Ok(Command::Timing(Some(false))),
            _ => Err(format!("unknown command '{s}'; \\? lists commands")),
        }
    }
}

/// State shared by the REPL and batch modes.
pub struct Session {
    pub engine: QueryEngine,
    pub format: OutputFormat,
    /// Rows the table format shows (0 = all).
    pub max_rows: usize,
    /// Rows any format prints before reading stops (`--maxrows`; 0 = all).
    pub limit: usize,
    pub timing: bool,
    /// Interactive sessions print timing to stdout; batch mode to stderr so stdout stays data.
    pub interactive: bool,
}

/// What to do after a unit of input.
pub enum Flow {
    Continue,
    Quit,
}

impl Session {
    /// Run one input: a backslash command or one or more SQL statements. SQL errors are returned,
    /// output errors (closed pipe) too.
    pub async fn run_input(&mut self, input: &str) -> Result<Flow> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Ok(Flow::Continue);
        }
        if trimmed.starts_with('\\') {
            let cmd: Command = trimmed.parse().map_err(anyhow::Error::msg)?;
            return self.run_command(cmd).await;
        }
        if self.interactive && matches!(trimmed, "quit" | "exit") {
            return Ok(Flow::Quit);
        }
        let mut screen = Screen {
            printer: output::Printer::new(
                std::io::stdout(),
                self.format,
                self.max_rows,
                self.limit,
            ),
            timing: self.timing,
            interactive: self.interactive,
        };
        let r = self.stream(trimmed, &mut screen).await;
        r.map_err(memory_hint)?;
        Ok(Flow::Continue)
    }

    async fn stream(&self, trimmed: &str, screen: &mut Screen) -> Result<()> {
        if self.interactive {
            // Ctrl-C stops the running query (dropping its stream cancels it) and keeps the session.
            tokio::select! {
                r = self.engine.stream_each(trimmed, screen) => r?,
                _ = tokio::signal::ctrl_c() => {
                    println!();
                    eprintln!("query cancelled (Ctrl-C)");
                }
            }
        } else {
            self.engine.stream_each(trimmed, screen).await?;
        }
        Ok(())
    }

    fn print(&self, r: &QueryResult) -> Result<(), OutputError> {
        print(self.format, self.max_rows, r)
    }

    async fn run_command(&mut self, cmd: Command) -> Result<Flow> {
        match cmd {
            Command::Quit => return Ok(Flow::Quit),
            Command::Help => {
                let rows: Vec<String> = INFO
                    .iter()
                    .map(|(c, a, _)| format!("{c} {a}").trim().to_string())
                    .collect();
                let descr: Vec<&str> = INFO.iter().map(|(_, _, d)| *d).collect();
                self.print(&string_table(
                    &["command", "description"],
                    vec![rows, descr.iter().map(|s| s.to_string()).collect()],
                ))?;
            }
            Command::ListTables => {
                let tables = self.engine.table_names().await;
                let (names, kinds): (Vec<String>, Vec<String>) =
                    tables.into_iter().map(|(n, k)| (n, k.to_string())).unzip();
                self.print(&string_table(&["name", "type"], vec![names, kinds]))?;
            }
            Command::DescribeTable(name) => {
                let Some(schema) = self.engine.table_schema(&name).await else {
                    anyhow::bail!("no table or view named '{name}'; \\d lists them");
                };
                let mut cols = vec![vec![], vec![], vec![]];
                for f in schema.fields() {
                    cols[0].push(f.name().clone());
                    cols[1].push(f.data_type().to_string());
                    cols[2].push(if f.is_nullable() { "YES" } else { "NO" }.to_string());
                }
                self.print(&string_table(
                    &["column_name", "data_type", "is_nullable"],
                    cols,
                ))?;
            }
            Command::Format(None) => println!("format: {}", self.format.name()),
            Command::Format(Some(f)) => self.format = f,
            Command::Timing(None) => println!("timing: {}", if self.timing { "on" } else { "off" }),
            Command::Timing(Some(on)) => self.timing = on,
        }
        Ok(Flow::Continue)
    }
}

/// A query stopped by the memory pool says which setting raises it.
fn memory_hint(e: anyhow::Error) -> anyhow::Error {
    let out_of_memory = e
        .downcast_ref::<QueryEngineError>()
        .is_some_and(|q| matches!(q, QueryEngineError::Sql(s) if s.is_out_of_memory()));
    if out_of_memory {
        e.context("the query needs more memory than sql.memory_mb allows (and could not spill): aggregate, filter or add a LIMIT, or raise sql.memory_mb (THREATLAKE_SQL_MEMORY_MB)")
    } else {
        e
    }
}

/// Prints each result as it streams, then the timing line.
struct Screen {
    printer: output::Printer<std::io::Stdout>,
    timing: bool,
    interactive: bool,
}

impl ResultSink for Screen {
    type Error = anyhow::Error;

    fn begin(&mut self, schema: &SchemaRef) -> Result<()> {
        Ok(self.printer.begin(schema)?)
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<bool> {
        let more = self.printer.batch(batch)?;
        self.printer.flush()?;
        Ok(more)
    }

    fn end(&mut self, secs: f64) -> Result<()> {
        let p = self.printer.finish()?;
        if self.timing {
            let n = p.rows;
            let line = if p.more {
                format!("{n} rows in {secs:.3} s (stopped reading: the result has more)")
            } else {
                format!("{n} row{} in {secs:.3} s", if n == 1 { "" } else { "s" })
            };
            if self.interactive {
                println!("{line}");
            } else {
                eprintln!("{line}");
            }
        }
        Ok(())
    }
}

fn print(format: OutputFormat, max_rows: usize, r: &QueryResult) -> Result<(), OutputError> {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    output::write(&mut lock, format, &r.schema, &r.batches, max_rows)?;
    lock.flush()?;
    Ok(())
}

fn string_table(names: &[&str], cols: Vec<Vec<String>>) -> QueryResult {
    let schema = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, false))
            .collect::<Vec<_>>(),
    ));
    let arrays = cols
        .into_iter()
        .map(|c| Arc::new(StringArray::from(c)) as _)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays).expect("columns match schema");
    QueryResult {
        schema,
        batches: vec![batch],
    }
}

/// True if the error chain is a closed stdout, which ends output quietly.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<OutputError>()
            .is_some_and(OutputError::is_broken_pipe)
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

const KEYWORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "ORDER",
    "LIMIT",
    "JOIN",
    "LEFT",
    "RIGHT",
    "INNER",
    "OUTER",
    "ON",
    "USING",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "IS",
    "NULL",
    "LIKE",
    "ILIKE",
    "DISTINCT",
    "COUNT",
    "HAVING",
    "UNION",
    "ALL",
    "WITH",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "DESC",
    "ASC",
    "CREATE",
    "VIEW",
    "EXPLAIN",
    "DESCRIBE",
    "SHOW",
    "TABLES",
    "UNNEST",
    "ARRAY_TO_STRING",
    "CARDINALITY",
];

/// rustyline helper: completion of tables, columns, keywords and commands; statements end at `;`.
#[derive(Helper, Hinter, Highlighter)]
pub struct ReplHelper {
    words: Vec<String>,
}

impl ReplHelper {
    pub async fn new(engine: &QueryEngine) -> Self {
        let mut words: Vec<String> = KEYWORDS.iter().map(|k| k.to_string()).collect();
        words.extend(INFO.iter().map(|(c, _, _)| c.to_string()));
        for (t, _) in engine.table_names().await {
            if let Some(s) = engine.table_schema(&t).await {
                words.extend(s.fields().iter().map(|f| f.name().clone()));
            }
            words.push(t);
        }
        words.sort();
        words.dedup();
        Self { words }
    }
}

impl Completer for ReplHelper {
    type Candidate = String;
    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let start = line[..pos]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '\\'))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let prefix = &line[start..pos];
        if prefix.is_empty() {
            return Ok((pos, vec![]));
        }
        let lower = prefix.to_lowercase();
        let hits = self
            .words
            .iter()
            .filter(|w| w.to_lowercase().starts_with(&lower))
            .cloned()
            .collect();
        Ok((start, hits))
    }
}

impl Validator for ReplHelper {
    fn validate(&self, ctx: &mut ValidationContext<'_>) -> rustyline::Result<ValidationResult> {
        let input = ctx.input().trim();
        let complete = input.is_empty()
            || input.starts_with('\\')
            || input.ends_with(';')
            || matches!(input, "quit" | "exit");
        Ok(if complete {
            ValidationResult::Valid(None)
        } else {
            ValidationResult::Incomplete
        })
    }
}

/// Interactive loop.
pub async fn repl(mut session: Session, history: Option<std::path::PathBuf>) -> Result<()> {
    let helper = ReplHelper::new(&session.engine).await;
    let mut rl: Editor<ReplHelper, rustyline::history::DefaultHistory> = Editor::new()?;
    rl.set_helper(Some(helper));
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    println!(
        "threatlake SQL on {} — statements end with ';', \\? for help, \\q to quit",
        session.engine.describe()
    );
    loop {
        match rl.readline("threatlake> ") {
            Ok(line) => {
                let _ = rl.add_history_entry(line.as_str());
                match session.run_input(&line).await {
                    Ok(Flow::Quit) => break,
                    Ok(Flow::Continue) => {}
                    Err(e) if is_broken_pipe(&e) => break,
                    Err(e) => eprintln!("Error: {e:#}"),
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = rl.save_history(h) {
            tracing::warn!("cannot save history to {}: {e}", h.display());
        }
    }
    Ok(())
}

/// Batch mode: run each script in order; stop at the first error.
pub async fn batch(mut session: Session, scripts: Vec<(String, String)>) -> Result<()> {
    for (label, sql) in scripts {
        // Commands are line-based; SQL between them runs as one script.
        let mut pending = String::new();
        for line in sql.lines().chain(std::iter::once("")) {
            if line.trim_start().starts_with('\\') {
                run_batch_unit(&mut session, &label, &std::mem::take(&mut pending)).await?;
                run_batch_unit(&mut session, &label, line).await?;
            } else {
                pending.push_str(line);
                pending.push('\n');
            }
        }
        run_batch_unit(&mut session, &label, &pending).await?;
    }
    Ok(())
}

async fn run_batch_unit(session: &mut Session, label: &str, input: &str) -> Result<()> {
    match session.run_input(input).await {
        Ok(_) => Ok(()),
        Err(e) if is_broken_pipe(&e) => Err(e),
        Err(e) => Err(e.context(format!("in {label}"))),
    }
}

/// Whether stdin is a terminal (else `threatlake sql` reads SQL from it).
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_every_help_entry_parses() {
        assert_eq!("\\d".parse::<Command>().unwrap(), Command::ListTables);
        assert_eq!(
            "\\d  mitre_attack_techniques ".parse::<Command>().unwrap(),
            Command::DescribeTable("mitre_attack_techniques".into())
        );
        assert_eq!(
            "\\format csv".parse::<Command>().unwrap(),
            Command::Format(Some(OutputFormat::Csv))
        );
        assert!("\\format xml".parse::<Command>().is_err());
        assert!("\\nope".parse::<Command>().is_err());
        for (c, a, _) in INFO {
            let example = match *a {
                "" => c.to_string(),
                "NAME" => format!("{c} t"),
                "[on|off]" => format!("{c} on"),
                _ => format!("{c} csv"),
            };
            assert!(example.parse::<Command>().is_ok(), "{example}");
        }
    }
}
