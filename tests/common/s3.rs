//! A real S3-compatible server for the tests: moto (PyPI `moto[server]`) on 127.0.0.1, started by
//! `tests/s3/moto_lake.py`, which enforces request signing and can drop off the network on command.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The bucket every test uses (each under its own prefix).
pub const BUCKET: &str = "threatlake-test";

/// One moto server process; stops when dropped, or by itself when the test process exits.
pub struct S3Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Access key id of the server's test user.
    pub key: String,
    /// Its secret.
    pub secret: String,
}

impl S3Server {
    /// Start a server with `buckets` created.
    pub fn start(buckets: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/moto_lake.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .args(buckets.iter().flat_map(|b| ["--bucket", b]))
            .args(["--max-seconds", "1200"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!(
                "{} did not start an S3 server (got {line:?}); install it with `pip install 'moto[server]' boto3`",
                script.display()
            )
        });
        let s = |k: &str| info[k].as_str().unwrap().to_string();
        Self {
            child,
            stdin,
            stdout,
            endpoint: s("endpoint"),
            key: s("access_key_id"),
            secret: s("secret_access_key"),
        }
    }

    /// The shared server of this test binary (bucket [`BUCKET`]).
    pub fn shared() -> std::sync::MutexGuard<'static, S3Server> {
        static S: OnceLock<Mutex<S3Server>> = OnceLock::new();
        S.get_or_init(|| Mutex::new(S3Server::start(&[BUCKET])))
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Send a control command (see the script) and return its answer.
    pub fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        out.trim().to_string()
    }

    /// The AWS environment a client needs (and nothing from the developer's own AWS setup).
    pub fn env(&self) -> BTreeMap<String, String> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", self.key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// `threatlake` against `s3://BUCKET/<prefix>/lake` (raw in `…/raw`), with short retries so a
    /// dead server fails the command in seconds.
    pub fn cli(&self, prefix: &str) -> Command {
        let mut c = self.cli_env();
        c.args([
            "--lake",
            &lake_url(prefix),
            "--raw",
            &format!("s3://{BUCKET}/{prefix}/raw"),
        ]);
        c
    }

    /// `threatlake` with this server's environment and no lake arguments.
    pub fn cli_env(&self) -> Command {
        let mut c = super::cli();
        for k in [
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT",
        ] {
            c.env_remove(k);
        }
        c.envs(self.env())
            .env(
                "THREATLAKE_LAKE_STORE",
                "{max_retries: 2, retry_timeout_secs: 5, connect_timeout_secs: 2, request_timeout_secs: 30}",
            );
        c
    }

    /// A library handle on the same lake.
    pub fn location(&self, url: &str) -> threatlake::Location {
        threatlake::Location::open_with_env(url, &Default::default(), &self.env()).unwrap()
    }
}

/// `s3://BUCKET/<prefix>/lake`.
pub fn lake_url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}/lake")
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
