//! `threatlake serve` as users meet it: the real binary on a loopback port, a real HTTP client
//! (reqwest), tokens and users made with the real CLI, and Python's own parsers for the metrics
//! and the OpenAPI document.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common;

/// One lake with ICS ATT&CK, a model, the sample intel mapped and two threat-model snapshots; each
/// test works on its own copy.
fn base_lake() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        // Built on a plain thread: the fixture runs its own runtime, and callers are async tests.
        let dir = std::thread::spawn(|| common::mapped_ics_lake("serve-base"))
            .join()
            .unwrap();
        let (ok, out, err) =
            common::run(common::ics_cli_on(&dir).args(["run", "--job", "snapshot"]));
        assert!(ok, "{out}\n{err}");
        dir
    })
}

fn lake_copy(name: &str) -> PathBuf {
    let dir = common::scratch(name);
    common::copy_dir(base_lake(), &dir);
    dir
}

/// The CLI on `dir` with the server's settings.
pub(crate) fn cli(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = common::ics_cli_on(dir);
    c.env("THREATLAKE_SERVER_AUTH_FILE", dir.join("auth.yaml"))
        .env("THREATLAKE_SERVER_AUDIT_FLUSH_SECS", "1")
        .env("THREATLAKE_SCHEDULE_JITTER_SECS", "0")
        .env("THREATLAKE_REPORTS_OUT_DIR", dir.join("reports"))
        .env(
            "THREATLAKE_REPORTS_TEMPLATES",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/templates"),
        );
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
    dir: PathBuf,
}

impl Server {
    pub(crate) fn start(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        let mut child = cli(dir, env)
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let log = dir.join("serve.log");
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let _ = std::io::copy(&mut BufReader::new(stderr), &mut f);
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "the server did not start: {}",
                    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
                )
            });
        Server {
            child,
            base,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, then wait (bounded): the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > Duration::from_secs(90) {
                let _ = self.child.kill();
                panic!("the server did not stop within 90 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `auth token create`: the token from the last line of stdout.
pub(crate) fn token(dir: &Path, name: &str, role: &str, extra: &[&str]) -> String {
    let (ok, out, err) = common::run(
        cli(dir, &[])
            .args(["auth", "token", "create", "--name", name, "--role", role])
            .args(extra),
    );
    assert!(ok, "{out}\n{err}");
    let t = out.lines().last().unwrap().trim().to_string();
    assert!(t.starts_with("tl_") && !t.contains(' '), "{out}");
    t
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn send(
    c: &reqwest::Client,
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String) {
    let mut r = c.request(method.parse().unwrap(), url);
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    (status, resp.text().await.unwrap())
}

/// `SELECT …` as CSV through the CLI (the lake as another process sees it).
fn lake_sql(dir: &Path, q: &str) -> String {
    let (ok, out, err) =
        common::run(cli(dir, &[]).args(["sql", "--format", "csv", "--quiet", "-c", q]));
    assert!(ok, "{q}: {err}");
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_each_credential_as_its_role_allows() {
    let dir = lake_copy("serve-matrix");
    let reader = token(&dir, "reader", "reader", &[]);
    let analyst = token(&dir, "analyst", "analyst", &[]);
    let admin = token(&dir, "admin", "admin", &[]);
    let revoked = token(&dir, "gone", "admin", &[]);
    let (ok, _, err) = common::run(cli(&dir, &[]).args(["auth", "token", "revoke", "gone"]));
    assert!(ok, "{err}");
    let expired = token(&dir, "brief", "admin", &["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let server = Server::start(&dir, &[], &[]);
    let c = client();
    let item = lake_sql(
        &dir,
        "SELECT item_id FROM threat_intelligence_data ORDER BY item_id LIMIT 1",
    );
    let item = item.lines().nth(1).unwrap().to_string();
    let run = lake_sql(&dir, "SELECT run_id FROM job_runs LIMIT 1");
    let run = run.lines().nth(1).unwrap().to_string();
    let routes: Vec<(&str, String, Option<Value>, Option<&str>)> = vec![
        ("GET", "/healthz".into(), None, None),
        ("GET", "/readyz".into(), None, None),
        ("GET", "/metrics".into(), None, Some("reader")),
        ("GET", "/".into(), None, Some("reader")),
        ("GET", "/map".into(), None, Some("reader")),
        ("GET", "/matrix?sub=1".into(), None, Some("reader")),
        ("GET", "/matrix/layer.json".into(), None, Some("reader")),
        ("GET", "/matrix/matrix.svg".into(), None, Some("reader")),
        ("GET", "/techniques/T0855".into(), None, Some("reader")),
        ("GET", "/items?source=otx".into(), None, Some("reader")),
        (
            "GET",
            format!("/items/{}", urlencode(&item)),
            None,
            Some("reader"),
        ),
        (
            "GET",
            format!("/items/{}/raw", urlencode(&item)),
            None,
            Some("reader"),
        ),
        ("GET", "/threat-model".into(), None, Some("reader")),
        (
            "GET",
            "/sql?sql=SELECT%20count(*)%20FROM%20otx_data".into(),
            None,
            Some("reader"),
        ),
        (
            "GET",
            "/sql/result.csv?sql=SELECT%201".into(),
            None,
            Some("reader"),
        ),
        ("GET", "/jobs".into(), None, Some("reader")),
        ("GET", "/assets/app.js".into(), None, None),
        ("GET", "/favicon.ico".into(), None, None),
        ("GET", "/api/v1/openapi.json".into(), None, Some("reader")),
        ("GET", "/api/v1/session".into(), None, Some("reader")),
        (
            "POST",
            "/api/v1/sql".into(),
            Some(json!({"sql": "SELECT count(*) AS n FROM mitre_attack_techniques"})),
            Some("reader"),
        ),
        (
            "POST",
            "/api/v1/map".into(),
            Some(json!({"texts": ["The actor modified the PLC program over Modbus"]})),
            Some("reader"),
        ),
        (
            "POST",
            "/api/v1/map/report".into(),
            Some(
                json!({"texts": ["The actor modified the PLC program over Modbus. Then the actor suppressed alarms on the HMI."]}),
            ),
            Some("reader"),
        ),
        (
            "GET",
            "/api/v1/techniques/T0855".into(),
            None,
            Some("reader"),
        ),
        ("GET", "/api/v1/threat-model".into(), None, Some("reader")),
        (
            "GET",
            "/api/v1/threat-model/diff".into(),
            None,
            Some("reader"),
        ),
        ("GET", "/api/v1/items?limit=5".into(), None, Some("reader")),
        (
            "GET",
            format!("/api/v1/items/{}", urlencode(&item)),
            None,
            Some("reader"),
        ),
        (
            "GET",
            "/api/v1/reports/top_mapped_techniques.csv".into(),
            None,
            Some("reader"),
        ),
        ("GET", "/api/v1/runs".into(), None, Some("reader")),
        ("GET", format!("/api/v1/runs/{run}"), None, Some("reader")),
        (
            "POST",
            "/api/v1/runs".into(),
            Some(json!({"job": "snapshot"})),
            Some("analyst"),
        ),
        ("GET", "/api/v1/auth/tokens".into(), None, Some("admin")),
        ("GET", "/api/v1/auth/users".into(), None, Some("admin")),
    ];
    let rank = |r: &str| {
        ["reader", "analyst", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    let creds: Vec<(&str, Option<&str>)> = vec![
        ("none", None),
        ("reader", Some(&reader)),
        ("analyst", Some(&analyst)),
        ("admin", Some(&admin)),
        ("revoked", Some(&revoked)),
        ("expired", Some(&expired)),
    ];
    for (method, path, body, need) in &routes {
        for (who, tok) in &creds {
            let (status, text) = send(&c, method, &server.url(path), *tok, body.clone()).await;
            let expect_ok = match (need, *who) {
                (None, _) => true,
                (Some(_), "none" | "revoked" | "expired") => false,
                (Some(n), w) => rank(w) >= rank(n),
            };
            let what = format!("{method} {path} as {who}: {status} {text}");
            if expect_ok {
                // A second analyst start of the same job while the first runs is refused as busy (409).
                let fine = status.is_success()
                    || (path == "/api/v1/runs" && status == StatusCode::CONFLICT);
                assert!(fine, "{what}");
            } else if matches!(*who, "none" | "revoked" | "expired") {
                if *who == "none" && !path.starts_with("/api/") && path != "/metrics" {
                    assert_eq!(status, StatusCode::SEE_OTHER, "{what}");
                } else {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    let code = v["error"].as_str().unwrap();
                    let want = match *who {
                        "revoked" => "token_revoked",
                        "expired" => "token_expired",
                        _ => "unauthenticated",
                    };
                    assert_eq!(code, want, "{what}");
                }
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
            }
            assert!(
                !text.contains(dir.to_str().unwrap()),
                "a server path leaked: {what}"
            );
        }
    }
}

/// Dashboard pages answer from the page cache until the lake changes, then from the new snapshot:
/// a pulse ingested by the CLI shows up in the items total after the server re-reads the lake.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_pages_follow_the_lake_when_it_changes() {
    let dir = lake_copy("serve-page-cache");
    let reader = token(&dir, "r", "reader", &[]);
    let server = Server::start(&dir, &[("THREATLAKE_SERVER_REFRESH_SECS", "1")], &[]);
    let c = client();
    let total = || items_total(&c, &server, &reader);
    let count = |dir: &Path| {
        lake_sql(dir, "SELECT count(*) AS n FROM threat_intelligence_data")
            .lines()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = count(&dir);
    assert_eq!(total().await, before);
    assert_eq!(total().await, before, "a kept answer differs");
    // One more pulse (the hostile sample) lands through the CLI while the server runs.
    let samples = super::dashboard::hostile_samples(&dir);
    common::run_samples(&mut cli(&dir, &[]), &samples);
    assert_eq!(count(&dir), before + 1);
    let t = Instant::now();
    loop {
        let n = total().await;
        if n == before + 1 {
            break;
        }
        assert_eq!(n, before, "neither the old nor the new total");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the page still shows {n} items a minute after the lake changed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The items total the `/items` page shows.
async fn items_total(c: &reqwest::Client, server: &Server, token: &str) -> u64 {
    let (status, html) = send(c, "GET", &server.url("/items"), Some(token), None).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let n = html
        .split("<span id=\"items-total\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or_else(|| panic!("no items total: {html}"));
    n.parse().unwrap()
}

/// `POST /api/v1/map/report` answers what `map_report` finds in SQL for the same report: each
/// technique with its tactics, supporting sentences and best sentence; indicator lines are not
/// sentences; an empty or oversized request is a 400 naming the limit.
#[tokio::test(flavor = "multi_thread")]
async fn map_report_endpoint_maps_a_report_sentence_by_sentence() {
    let dir = lake_copy("serve-map-report");
    let reader = token(&dir, "r", "reader", &[]);
    let server = Server::start(&dir, &[], &[]);
    let c = client();
    let report = "# Water utility incident\n\n\
        The actor sent unauthorized command messages to the PLC over Modbus to change the setpoints of the pumps. \
        Later the actor sent more unauthorized command messages to the controller to stop the pumps.\n\n\
        To hide the intrusion, the malware suppressed alarms on the HMI so that operators noticed nothing.\n\n\
        - 198.51.100.7\n- evil.example.com\n";
    let (status, text) = send(
        &c,
        "POST",
        &server.url("/api/v1/map/report"),
        Some(&reader),
        Some(json!({"texts": [report, ""]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["model"].as_str().unwrap().starts_with("ics-"), "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["techniques"], json!([]));
    let found = results[0]["techniques"].as_array().unwrap();
    let ids: Vec<&str> = found
        .iter()
        .map(|t| t["technique_id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    // The same as the SQL function on the same text (the CLI, another process).
    let sql_ids = lake_sql(
        &dir,
        &format!(
            "SELECT x['technique_id'] AS id FROM (SELECT unnest(map_report('{}')) AS x) r ORDER BY 1",
            // The same text as a SQL literal (it holds no quote).
            report.replace('\n', "' || chr(10) || '")
        ),
    );
    assert_eq!(
        sql_ids.lines().skip(1).collect::<Vec<_>>(),
        sorted,
        "{text}"
    );
    let t0855 = found
        .iter()
        .find(|t| t["technique_id"] == "T0855")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(t0855["tactics"], json!(["impair-process-control"]));
    assert_eq!(t0855["sentences"], 2, "{text}");
    assert!(t0855["sentence"]
        .as_str()
        .unwrap()
        .contains("unauthorized command messages"));
    let scores: Vec<f64> = found.iter().map(|t| t["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]) && scores.iter().all(|s| (0.0..=1.0).contains(s)),
        "{text}"
    );
    assert!(
        found.iter().all(|t| {
            let s = t["sentence"].as_str().unwrap();
            !s.contains("198.51.100.7") && !s.contains("evil.example.com") && !s.starts_with('#')
        }),
        "{text}"
    );
    for body in [json!({"texts": []}), json!({"texts": vec!["x"; 101]})] {
        let (status, text) = send(
            &c,
            "POST",
            &server.url("/api/v1/map/report"),
            Some(&reader),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains("send 1 to 100 reports"), "{text}");
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_sign_in_sessions_csrf_and_the_failed_login_limit() {
    let dir = lake_copy("serve-login");
    let add = |name: &str, pw: &str| {
        let mut child = cli(&dir, &[])
            .args(["auth", "user", "add", name, "--role", "analyst"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{pw}").unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    add("alice", "correct horse battery staple");
    let auth_text = std::fs::read_to_string(dir.join("auth.yaml")).unwrap();
    assert!(
        !auth_text.contains("correct horse"),
        "a password is stored in clear"
    );
    assert!(auth_text.contains("$argon2id$"), "{auth_text}");
    let server = Server::start(
        &dir,
        &[(
            "THREATLAKE_SERVER_LOGIN",
            "{max_failures: 3, window_minutes: 15}",
        )],
        &[],
    );
    let c = client();
    let login = |user: &str, pw: &str| {
        c.post(server.url("/login"))
            .form(&[("username", user), ("password", pw)])
            .send()
    };
    // Unknown user and wrong password: the same status and body.
    let a = login("nobody", "whatever whatever").await.unwrap();
    let (sa, ba) = (a.status(), a.text().await.unwrap());
    let b = login("alice", "wrong wrong wrong").await.unwrap();
    let (sb, bb) = (b.status(), b.text().await.unwrap());
    assert_eq!(sa, StatusCode::UNAUTHORIZED);
    assert_eq!((sa, &ba), (sb, &bb));
    // Sign in twice: a fresh session id each time, hardened cookie flags.
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let r = login("alice", "correct horse battery staple")
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let set = r.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_string();
        for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
            assert!(set.contains(flag), "{flag} missing: {set}");
        }
        assert!(!set.contains("Secure"), "Secure needs TLS: {set}");
        cookies.push(set.split(';').next().unwrap().to_string());
    }
    assert_ne!(
        cookies[0], cookies[1],
        "the session id was not rotated at login"
    );
    let cookie = &cookies[1];
    let session: Value = c
        .get(server.url("/api/v1/session"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["user"], "alice");
    assert_eq!(session["role"], "analyst");
    let csrf = session["csrf_token"].as_str().unwrap().to_string();
    // A state-changing request from the session without the CSRF token is refused.
    let body = json!({"sql": "SELECT 1 AS one"});
    let r = c
        .post(server.url("/api/v1/sql"))
        .header("cookie", cookie)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "csrf");
    let r = c
        .post(server.url("/api/v1/runs"))
        .header("cookie", cookie)
        .header("x-csrf-token", "not-the-token")
        .json(&json!({"job": "snapshot"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .post(server.url("/api/v1/sql"))
        .header("cookie", cookie)
        .header("x-csrf-token", &csrf)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The home page escapes nothing unsafe and shows the user.
    let home = c
        .get(server.url("/"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(home.contains(">alice<"), "{home}");
    // Sign out: the session is gone.
    let r = c
        .post(server.url("/logout"))
        .header("cookie", cookie)
        .form(&[("csrf_token", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = c
        .get(server.url("/api/v1/session"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The limit: after 3 failures (2 above + 1), even the right password is refused for a while.
    let r = login("alice", "wrong again wrong").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = login("alice", "correct horse battery staple")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // Logins are audited (flushed within a second).
    wait_for("audit rows", Duration::from_secs(30), || {
        let out = lake_sql(&dir, "SELECT event, count(*) AS n FROM audit_log WHERE route = '/login' GROUP BY event ORDER BY event");
        out.contains("login,2") && out.contains("login_failed,") && out.contains("login_limited,1")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_is_read_only_bounded_and_audited() {
    let dir = lake_copy("serve-sql");
    let reader = token(&dir, "r", "reader", &[]);
    let server = Server::start(
        &dir,
        &[(
            "THREATLAKE_SERVER_SQL",
            "{max_rows: 100, timeout_secs: 3, memory_mb: 64}",
        )],
        &[],
    );
    let c = client();
    let refused = [
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "DROP VIEW otx_data",
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/threatlake-serve-copy.csv'",
        "INSERT INTO job_runs SELECT * FROM job_runs",
        "SET datafusion.execution.batch_size = 1",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM as_of('/etc/passwd', 1)",
        "SELECT 1; SELECT 2",
    ];
    for q in refused {
        let (status, text) = send(
            &c,
            "POST",
            &server.url("/api/v1/sql"),
            Some(&reader),
            Some(json!({"sql": q})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"].is_string() && v["detail"].is_string(),
            "{q}: {text}"
        );
        assert!(!text.contains("root:"), "{q} read /etc/passwd: {text}");
    }
    assert!(!Path::new("/tmp/threatlake-serve-copy.csv").exists());
    // Row limit: cut and said so.
    let (status, text) = send(
        &c,
        "POST",
        &server.url("/api/v1/sql"),
        Some(&reader),
        Some(json!({"sql": "SELECT value FROM range(1000)"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["row_count"], 100);
    assert_eq!(v["truncated"], true);
    // CSV neutralises formulas; Arrow is a stream.
    let r = c
        .post(server.url("/api/v1/sql?format=csv"))
        .bearer_auth(&reader)
        .json(&json!({"sql": "SELECT '=HYPERLINK(\"http://x\")' AS f"}))
        .send()
        .await
        .unwrap();
    let csv = r.text().await.unwrap();
    assert!(csv.contains("'=HYPERLINK"), "{csv}");
    let r = c
        .post(server.url("/api/v1/sql?format=arrow"))
        .bearer_auth(&reader)
        .json(&json!({"sql": "SELECT value FROM range(1000)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = r.bytes().await.unwrap();
    let rows: usize =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes.to_vec()), None)
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum();
    assert_eq!(rows, 100, "Arrow results are cut at max_rows too");
    // An over-limit query ends with a clear error while other requests are served.
    let heavy = {
        let c = c.clone();
        let url = server.url("/api/v1/sql");
        let t = reader.clone();
        tokio::spawn(async move {
            send(&c, "POST", &url, Some(&t), Some(json!({"sql": "SELECT count(DISTINCT value % 1000003) FROM range(100000000000)"}))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let (status, _) = send(&c, "GET", &server.url("/healthz"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = send(
        &c,
        "POST",
        &server.url("/api/v1/sql"),
        Some(&reader),
        Some(json!({"sql": "SELECT 1 AS one"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let during = t.elapsed();
    let (status, text) = heavy.await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(
        ["timeout", "resources_exhausted"].contains(&v["error"].as_str().unwrap()),
        "{text}"
    );
    assert!(
        during < Duration::from_secs(3),
        "other requests waited {during:?} for the heavy query"
    );
    // Everything is in the audit log, with the SQL text.
    wait_for("audit rows", Duration::from_secs(30), || {
        let out = lake_sql(&dir, "SELECT status, count(*) AS n FROM audit_log WHERE route = '/api/v1/sql' AND sql LIKE '%/etc/passwd%' GROUP BY status");
        out.contains("400,3")
    });
    let who = lake_sql(
        &dir,
        "SELECT who, role, status FROM audit_log WHERE sql = 'SELECT 1; SELECT 2'",
    );
    assert_eq!(who, "who,role,status\ntoken:r,reader,400\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_runs_jobs_skips_overlaps_stops_cleanly_and_catches_up() {
    let dir = lake_copy("serve-schedule");
    let reader = token(&dir, "r", "reader", &[]);
    let env = [(
        "THREATLAKE_SCHEDULE_JOBS",
        "{snapshot: \"*/2 * * * * *\", report: \"* * * * * *\"}",
    )];
    let mut server = Server::start(&dir, &env, &[]);
    let count = |q: &str| -> usize {
        lake_sql(&dir, q)
            .lines()
            .nth(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    };
    wait_for(
        "two scheduled snapshots and a skipped report",
        Duration::from_secs(240),
        || {
            count("SELECT count(*) FROM job_runs WHERE job = 'snapshot' AND trigger = 'schedule' AND status = 'ok'") >= 2
            && count("SELECT count(*) FROM job_runs WHERE job = 'report' AND status = 'skipped'") >= 1
        },
    );
    // SIGTERM while a report is running: exit 0, no lock left, every run recorded whole.
    let c = client();
    let t = Instant::now();
    loop {
        let (status, text) = send(
            &c,
            "GET",
            &server.url("/api/v1/runs?job=report&limit=1"),
            Some(&reader),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        if !v["running"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no report run seen running: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = server.stop();
    assert!(status.success(), "exit {status:?}: {}", server.log());
    let (ok, out, err) = common::run(cli(&dir, &[]).args(["lake", "locks"]));
    assert!(ok && out.contains("no writer holds a lock"), "{out}\n{err}");
    let bad = lake_sql(
        &dir,
        "SELECT count(*) FROM job_runs WHERE status NOT IN ('ok', 'skipped', 'stopped')",
    );
    assert_eq!(
        bad.lines().nth(1),
        Some("0"),
        "{bad}\n{}",
        lake_sql(&dir, "SELECT job, status, error FROM job_runs")
    );
    // The threat model is whole: every snapshot run has its techniques.
    let runs = lake_sql(&dir, "SELECT count(DISTINCT run_id) FROM threat_model");
    assert!(
        runs.lines().nth(1).unwrap().parse::<usize>().unwrap() >= 4,
        "{runs}"
    );
    // Down for longer than the interval: the restart catches up once.
    std::thread::sleep(Duration::from_secs(3));
    let env = [("THREATLAKE_SCHEDULE_JOBS", "{snapshot: \"*/2 * * * * *\"}")];
    let mut server = Server::start(&dir, &env, &[]);
    wait_for("a catch-up run", Duration::from_secs(60), || {
        count("SELECT count(*) FROM job_runs WHERE job = 'snapshot' AND trigger = 'catch_up' AND status = 'ok'") == 1
    });
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_openmetrics_and_openapi_validates_as_3_1() {
    let dir = lake_copy("serve-docs");
    let reader = token(&dir, "r", "reader", &[]);
    let server = Server::start(&dir, &[], &[]);
    let c = client();
    // Some traffic first, and one finished job.
    let (s, _) = send(
        &c,
        "POST",
        &server.url("/api/v1/sql"),
        Some(&reader),
        Some(json!({"sql": "SELECT 1 AS x"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let analyst = token(&dir, "an", "analyst", &[]);
    let (s, t) = send(
        &c,
        "POST",
        &server.url("/api/v1/runs"),
        Some(&analyst),
        Some(json!({"job": "snapshot"})),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let run_id = serde_json::from_str::<Value>(&t).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut done = Value::Null;
    for _ in 0..200 {
        let (_, t) = send(
            &c,
            "GET",
            &server.url(&format!("/api/v1/runs/{run_id}")),
            Some(&reader),
            None,
        )
        .await;
        done = serde_json::from_str(&t).unwrap();
        if done["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(done["status"], "ok", "{done}");
    let (s, metrics) = send(&c, "GET", &server.url("/metrics"), Some(&reader), None).await;
    assert_eq!(s, StatusCode::OK);
    let parsed = python(
        "import sys, json\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
         fams = {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in p(sys.stdin.read())}\n\
         print(json.dumps(fams))",
        &metrics,
    );
    let fams: Value = serde_json::from_str(&parsed).unwrap();
    let sql_count = fams["threatlake_http_requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s[0] == "threatlake_http_requests_total"
                && s[1]["route"] == "/api/v1/sql"
                && s[1]["status"] == "200"
        })
        .map(|s| s[2].as_f64().unwrap());
    assert_eq!(sql_count, Some(1.0), "{parsed}");
    assert!(
        fams["threatlake_job_last_success_timestamp_seconds"]
            .to_string()
            .contains("snapshot"),
        "{parsed}"
    );
    assert!(
        fams["threatlake_job_duration_seconds"]
            .to_string()
            .contains("snapshot"),
        "{parsed}"
    );
    assert!(
        fams["threatlake_http_request_duration_seconds"].is_array(),
        "{parsed}"
    );
    // The OpenAPI document: OpenAPI 3.1 by openapi-spec-validator.
    let (s, doc) = send(
        &c,
        "GET",
        &server.url("/api/v1/openapi.json"),
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&doc).unwrap();
    assert!(v["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let out = python(
        "import sys, json\nfrom openapi_spec_validator import validate\nfrom openapi_spec_validator.validation import OpenAPIV31SpecValidator\n\
         validate(json.load(sys.stdin), cls=OpenAPIV31SpecValidator)\nprint('valid')",
        &doc,
    );
    assert_eq!(out.trim(), "valid");
    // The CLI and the server record the same job_runs row for the same job (bar trigger, ids, times).
    let (ok, out, err) = common::run(cli(&dir, &[]).args(["run", "--job", "snapshot"]));
    assert!(ok, "{out}\n{err}");
    let rows = lake_sql(
        &dir,
        "SELECT trigger, job, status, error, array_length(stages) AS n, stages[1]['stage'] AS stage, stages[1]['status'] AS st \
         FROM job_runs WHERE job = 'snapshot' AND trigger IN ('api', 'cli') ORDER BY started DESC LIMIT 2",
    );
    let lines: Vec<&str> = rows.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "{rows}");
    let strip = |l: &str| l.split_once(',').unwrap().1.to_string();
    assert_eq!(strip(lines[0]), strip(lines[1]), "{rows}");
    assert_eq!(strip(lines[0]), "snapshot,ok,,1,snapshot,ok", "{rows}");
}

#[test]
fn serve_refuses_plain_http_beyond_loopback() {
    let dir = common::scratch("serve-bind");
    let (ok, out, err) = common::run(cli(&dir, &[]).args(["serve", "--bind", "0.0.0.0:0"]));
    assert!(!ok, "{out}");
    assert!(
        err.contains("refusing plain HTTP") && err.contains("--tls-cert"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_https_with_secure_host_cookies() {
    let dir = lake_copy("serve-tls");
    let (ca, cert, key) = common::throwaway_tls(&dir);
    let mut child = cli(&dir, &[])
        .args(["auth", "user", "add", "bob", "--role", "reader"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "a long enough passphrase").unwrap();
    }
    assert!(child.wait().unwrap().success());
    let server = Server::start(
        &dir,
        &[],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let c = reqwest::Client::builder()
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .post(server.url("/login"))
        .form(&[
            ("username", "bob"),
            ("password", "a long enough passphrase"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set = r.headers()[reqwest::header::SET_COOKIE].to_str().unwrap();
    assert!(set.starts_with("__Host-threatlake_session="), "{set}");
    assert!(
        set.contains("Secure") && set.contains("HttpOnly") && set.contains("Path=/"),
        "{set}"
    );
    let plain = reqwest::Client::new()
        .get(server.url("/healthz").replace("https://", "http://"))
        .send()
        .await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP answered on the TLS port"
    );
}

/// Run Python `code` with `input` on stdin: stdout.
fn python(code: &str, input: &str) -> String {
    let mut child = Command::new("python3")
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "python: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The systemd units of config/deploy pass `systemd-analyze verify` (pointing at this build's
/// binary, which must exist and be executable for the check).
#[test]
fn systemd_units_verify() {
    let dir = common::scratch("serve-systemd");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/deploy");
    let mut units = Vec::new();
    for name in [
        "threatlake.service",
        "threatlake-run.service",
        "threatlake-run.timer",
    ] {
        let text = std::fs::read_to_string(src.join(name)).unwrap().replace(
            "/usr/local/bin/threatlake",
            env!("CARGO_BIN_EXE_threatlake"),
        );
        std::fs::write(dir.join(name), text).unwrap();
        units.push(dir.join(name));
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && text.trim().is_empty(), "{text}");
}

/// Schemathesis (PyPI) against the OpenAPI document, as a reader and as an admin, bounded to a few
/// examples per route: no 5xx, no response outside its schema or content type.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_schema_break() {
    let dir = lake_copy("serve-schemathesis");
    let reader = token(&dir, "r", "reader", &[]);
    let admin = token(&dir, "a", "admin", &[]);
    let server = Server::start(&dir, &[], &[]);
    let (s, doc) = send(
        &client(),
        "GET",
        &server.url("/api/v1/openapi.json"),
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let spec = dir.join("openapi.json");
    std::fs::write(&spec, doc).unwrap();
    for tok in [&reader, &admin] {
        let o = Command::new("schemathesis")
            .arg("run")
            .arg(&spec)
            .args(["--url", &server.base])
            .args(["-H", &format!("Authorization: Bearer {tok}")])
            .args([
                "--checks",
                "not_a_server_error,response_schema_conformance,content_type_conformance",
            ])
            .args([
                "--phases",
                "examples,fuzzing",
                "-n",
                "8",
                "--generation-deterministic",
            ])
            .args(["--request-timeout", "60", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            // Its cache (.schemathesis/) goes to the scratch directory, not the checkout.
            .current_dir(&dir)
            .output()
            .expect("schemathesis (pip install schemathesis) is needed");
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{out}\n{}", server.log());
        assert!(out.contains("passed") || out.contains("PASSED"), "{out}");
    }
}

#[test]
fn taxii_server_pages_both_collections_for_taxii2_client_and_every_object_validates() {
    let dir = lake_copy("serve-taxii");
    let tok = token(&dir, "taxii-reader", "reader", &[]);
    let mut child = cli(&dir, &[])
        .args(["auth", "user", "add", "carol", "--role", "reader"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "taxii client passphrase").unwrap();
    }
    assert!(child.wait().unwrap().success());
    let mut server = Server::start(&dir, &[], &[]);
    // OASIS's TAXII 2.1 client: discovery → API root → collections → every page (by `next`),
    // the manifest, added_after and match[type]; once with a token, once with a user's password.
    let script = r#"
import json, sys
from taxii2client.v21 import Server, as_pages
base, user, password, out = sys.argv[1:5]
s = Server(base + "/taxii2/", user=user, password=password)
root = s.api_roots[0]
result = {"title": s.title, "collections": {}}
objects = []
for c in root.collections:
    got, pages = [], 0
    for env in as_pages(c.get_objects, per_request=5):
        pages += 1
        got.extend(env.get("objects", []))
    manifest = {m["id"]: m["date_added"] for m in c.get_manifest(limit=1000)["objects"]}
    dates = sorted(manifest.values())
    cut = dates[len(dates) // 2]
    after = c.get_objects(added_after=cut, limit=1000)["objects"]
    rels = c.get_objects(type="relationship", limit=1000).get("objects", [])
    result["collections"][c.title] = {
        "id": c.id, "objects": len(got), "distinct": len({o["id"] for o in got}), "pages": pages,
        "manifest": len(manifest), "after_ok": all(manifest[o["id"]] > cut for o in after),
        "after": len(after), "expected_after": sum(1 for d in dates if d > cut),
        "types": sorted({o["type"] for o in got}), "relationships": len(rels),
        "relationship_types": sorted({o["type"] for o in rels}),
    }
    objects.extend(got)
json.dump({"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d",
           "objects": list({o["id"]: o for o in objects}.values())}, open(out, "w"))
print(json.dumps(result))
"#;
    let bundle = dir.join("taxii-bundle.json");
    let run = |user: &str, password: &str| {
        let o = Command::new("python3")
            .args(["-c", script, &server.base, user, password])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            server.log()
        );
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let r = run("anyone", &tok);
    assert_eq!(r, run("carol", "taxii client passphrase"));
    let mapped = &r["collections"]["threatlake mapped intel"];
    let attack = &r["collections"]["ATT&CK attack-patterns"];
    let n = |q: &str| -> u64 {
        common::sql(&dir, q)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let mappings = n("SELECT count(*) FROM (SELECT DISTINCT m.item_id, m.item_version, m.technique_id, m.method \
                      FROM mapped_threat_data m JOIN threat_intelligence_data t \
                      ON t.item_id = m.item_id AND t.item_version = m.item_version)");
    assert_eq!(mapped["relationships"], mappings);
    assert_eq!(mapped["relationship_types"], json!(["relationship"]));
    assert_eq!(
        attack["objects"],
        n("SELECT count(DISTINCT technique_id) FROM attack_techniques_current")
    );
    for c in [mapped, attack] {
        assert_eq!(
            c["objects"], c["distinct"],
            "an object came twice across pages"
        );
        assert_eq!(c["objects"], c["manifest"]);
        assert!(c["pages"].as_u64().unwrap() > 2, "{c}");
        assert_eq!(c["after_ok"], true, "{c}");
        assert_eq!(c["after"], c["expected_after"], "{c}");
    }
    assert_eq!(
        mapped["types"],
        json!(["attack-pattern", "identity", "relationship", "report"])
    );
    common::assert_valid_stix(&bundle);
    // Without credentials, with a wrong password, or asking for something else than TAXII: refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = |auth: Option<(&str, &str)>, accept: &str| {
        rt.block_on(async {
            let mut r = client()
                .get(server.url("/taxii2/api/collections/"))
                .header("Accept", accept);
            if let Some((u, p)) = auth {
                r = r.basic_auth(u, Some(p));
            }
            r.send().await.unwrap().status().as_u16()
        })
    };
    let taxii = "application/taxii+json;version=2.1";
    assert_eq!(status(None, taxii), 401);
    assert_eq!(status(Some(("carol", "wrong")), taxii), 401);
    assert_eq!(status(Some(("x", &tok)), "text/html"), 406);
    assert_eq!(status(Some(("x", &tok)), taxii), 200);
    assert!(server.stop().success());
}
