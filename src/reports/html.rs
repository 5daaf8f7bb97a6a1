//! HTML reports: minijinja templates (`report.html.j2`, `index.html.j2`; the shipped copies are
//! built in, a file of the same name in `reports.templates` overrides them) with autoescaping always
//! on, the chart inlined as SVG, sortable tables, and a Content-Security-Policy that only lets the
//! page's own sorting script run — intel text is attacker-controlled.

use std::path::Path;

use base64::Engine as _;
use minijinja::{AutoEscape, Environment};
use sha2::Digest;

use super::ReportError;

/// The shipped templates.
pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "report.html.j2",
        include_str!("../../config/templates/report.html.j2"),
    ),
    (
        "index.html.j2",
        include_str!("../../config/templates/index.html.j2"),
    ),
];

/// Click a column header to sort by it (numbers numerically); uses textContent only.
pub const SORT_JS: &str = r#"
document.querySelectorAll("table.sortable th").forEach(function (th, i) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.dir !== "asc";
    th.parentNode.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = asc ? "asc" : "desc";
    var num = th.classList.contains("num");
    rows.sort(function (a, b) {
      var x = a.cells[i].textContent, y = b.cells[i].textContent;
      var c = num ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"#;

/// The page's Content-Security-Policy: nothing loads from anywhere; inline styles and exactly the
/// sorting script (by hash) run.
pub fn csp() -> String {
    let hash = sha2::Sha256::digest(SORT_JS.as_bytes());
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(hash)
    )
}

/// Templates, with user overrides from `dir`.
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// The shipped templates, each replaced by `dir/<name>` when that file exists.
    pub fn load(dir: &Path) -> Result<Self, ReportError> {
        let mut env = Environment::new();
        // Escape everything, whatever the template's file name.
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, shipped) in TEMPLATES {
            let path = dir.join(name);
            let text = if path.is_file() {
                std::fs::read_to_string(&path).map_err(|e| ReportError::Template {
                    name: path.display().to_string(),
                    message: e.to_string(),
                })?
            } else {
                shipped.to_string()
            };
            env.add_template_owned(name.to_string(), text)
                .map_err(|e| ReportError::Template {
                    name: path.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        Ok(Self { env })
    }

    /// Render template `name` with `ctx` (a serialisable value).
    pub fn render(&self, name: &str, ctx: impl serde::Serialize) -> Result<String, ReportError> {
        let err = |e: minijinja::Error| ReportError::Template {
            name: name.to_string(),
            message: format!("{e:#}"),
        };
        self.env
            .get_template(name)
            .map_err(err)?
            .render(ctx)
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_intel_text_and_pins_the_script() {
        let t = Templates::load(Path::new("/nonexistent")).unwrap();
        let html = t
            .render(
                "report.html.j2",
                serde_json::json!({
                    "report": {"name": "x", "title": "<b>T</b>", "description": "d", "chart": "bar"},
                    "generated_at": "now", "domain": "enterprise", "attack_version": "18.1",
                    "since": null, "rows": 1, "shown": 1,
                    "columns": [{"name": "title", "numeric": false}],
                    "table": [["<script>alert(1)</script>"]],
                    "chart_svg": "<svg></svg>", "chart_error": null, "files": ["x.csv"],
                    "sort_js": SORT_JS, "csp": csp(),
                }),
            )
            .unwrap();
        assert!(!html.contains("<script>alert(1)"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;T&lt;&#x2f;b&gt;"));
        assert!(html.contains("<svg></svg>"), "chart SVG is inlined");
        assert_eq!(
            html.matches("<script>").count(),
            1,
            "only the sorting script"
        );
        // The policy is an attribute: escaped quotes decode back to 'sha256-…'.
        assert!(html.contains("script-src &#x27;sha256-"), "{html}");
    }

    #[test]
    fn user_templates_override_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("index.html.j2"),
            "custom {{ generated_at }}",
        )
        .unwrap();
        let t = Templates::load(dir.path()).unwrap();
        assert_eq!(
            t.render("index.html.j2", serde_json::json!({"generated_at": "<x>"}))
                .unwrap(),
            "custom &lt;x&gt;"
        );
        std::fs::write(dir.path().join("report.html.j2"), "{% if %}").unwrap();
        let e = Templates::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("report.html.j2"), "{e}");
    }
}
