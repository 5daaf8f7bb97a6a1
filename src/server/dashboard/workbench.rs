//! The mapping workbench (what analysts use CTID's TRAM for): a report is split into sentences,
//! each shown with the model's top techniques; analysts accept, reject or correct each suggestion
//! and the decisions land in the lake table `mapping_feedback`.

use std::sync::Arc;

use axum::extract::Multipart;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Form};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error_page, render, Frame, PageError};
use crate::feedback::{Decision, Verdict};
use crate::server::auth::Principal;
use crate::server::AppState;

/// Suggestions per sentence.
const TOP: usize = 3;
/// Sentences mapped per submission.
const MAX_SENTENCES: usize = 1000;

/// `GET /workbench`: the form.
pub async fn form(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Response {
    let frame = Frame::new(&state, &p, "workbench", "Mapping workbench".into(), None);
    render(
        "workbench.html",
        frame,
        minijinja::context! { text => "", max_mb => crate::extract::MAX_REPORT_BYTES >> 20 },
    )
}

/// The submitted report: pasted text, or an uploaded file whose text is extracted here.
struct Submit {
    csrf_token: String,
    text: String,
    file: Option<(String, Vec<u8>)>,
}

/// The multipart form's fields; a malformed body is a 400 naming the problem.
async fn read_form(mut m: Multipart) -> Result<Submit, PageError> {
    let bad = |e: axum::extract::multipart::MultipartError| PageError {
        status: e.status(),
        message: format!(
            "the form could not be read ({}); reports may have up to {} MB",
            e.body_text(),
            crate::extract::MAX_REPORT_BYTES >> 20
        ),
    };
    let mut f = Submit {
        csrf_token: String::new(),
        text: String::new(),
        file: None,
    };
    while let Some(field) = m.next_field().await.map_err(bad)? {
        match field.name().unwrap_or_default() {
            "csrf_token" => f.csrf_token = field.text().await.map_err(bad)?,
            "text" => f.text = field.text().await.map_err(bad)?,
            "file" => {
                let name = field.file_name().unwrap_or_default().to_string();
                let bytes = field.bytes().await.map_err(bad)?;
                if !bytes.is_empty() {
                    f.file = Some((name, bytes.to_vec()));
                }
            }
            _ => {}
        }
    }
    Ok(f)
}

/// `POST /workbench` (multipart: `csrf_token`, `text`, and optionally `file`, a .txt, .md, .html
/// or .pdf report that replaces the text): the report's sentences with their suggestions.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    form: Multipart,
) -> Response {
    let mut f = match read_form(form).await {
        Ok(f) => f,
        Err(e) => return error_page(&state, &p, e),
    };
    if let Err(e) = super::form_csrf(&state, &p, &f.csrf_token) {
        return error_page(&state, &p, e);
    }
    if let Some((name, bytes)) = f.file.take() {
        let shown: String = name.chars().take(80).collect();
        let name = if shown.is_empty() {
            "upload".into()
        } else {
            shown
        };
        match tokio::task::spawn_blocking(move || crate::extract::report_text(&name, &bytes)).await
        {
            Ok(Ok(text)) => f.text = text,
            Ok(Err(e)) => return error_page(&state, &p, PageError::bad(e.to_string())),
            Err(e) => {
                tracing::error!("workbench upload: {e}");
                return error_page(
                    &state,
                    &p,
                    PageError::bad("the file could not be read".into()),
                );
            }
        }
    }
    if f.text.trim().is_empty() {
        return error_page(
            &state,
            &p,
            PageError::bad(
                "paste a report's text or choose a .txt, .md, .html or .pdf file".into(),
            ),
        );
    }
    let engine = state.engine();
    let configured = state.settings.mapping.threshold;
    let text = f.text.clone();
    let mapped = tokio::task::spawn_blocking(move || {
        let m = engine.mapper.get().map_err(|e| e.to_string())?;
        let mut scratch = threatlake_udfs::mapper::Scratch::default();
        let sentences = threatlake_udfs::mapper::document::prose_sentences(&text);
        let total = sentences.len();
        let rows: Vec<Value> = sentences
            .into_iter()
            .take(MAX_SENTENCES)
            .map(|s| {
                let threshold = m.threshold_for_text(configured, &s);
                let suggestions: Vec<Value> = m
                    .top_k(&s, TOP, &mut scratch)
                    .iter()
                    .map(|r| {
                        let t = &m.model.techniques[r.technique];
                        json!({
                            "id": t.id, "name": t.name, "score": (r.score * 1000.0).round() / 1000.0,
                            "below": r.score < threshold,
                        })
                    })
                    .collect();
                json!({"text": s, "suggestions": suggestions})
            })
            .collect();
        let model = format!("{}-{}", m.model.domain, m.model.attack_version);
        Ok::<_, String>((rows, total, model))
    })
    .await;
    let (sentences, total, model) = match mapped {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return error_page(
                &state,
                &p,
                PageError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: format!("{e}; run `threatlake model build` (or the run job)"),
                },
            )
        }
        Err(e) => {
            tracing::error!("workbench mapping: {e}");
            return error_page(
                &state,
                &p,
                PageError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "mapping failed; see the server log".into(),
                },
            );
        }
    };
    let frame = Frame::new(&state, &p, "workbench", "Mapping workbench".into(), None);
    render(
        "workbench.html",
        frame,
        minijinja::context! {
            text => f.text, sentences, total, model, doc => crate::feedback::doc_id(&f.text),
            max_mb => crate::extract::MAX_REPORT_BYTES >> 20,
            cut => total > MAX_SENTENCES,
        },
    )
}

/// One decision.
#[derive(Deserialize)]
pub struct Decide {
    csrf_token: String,
    doc: String,
    sentence: String,
    suggested: String,
    score: Option<f64>,
    model: Option<String>,
    decision: String,
    #[serde(default)]
    correct: String,
}

/// `POST /workbench/feedback` (analyst and up): store one decision in `mapping_feedback`.
pub async fn decide(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Form(f): Form<Decide>,
) -> Response {
    if let Err(e) = super::form_csrf(&state, &p, &f.csrf_token) {
        return error_page(&state, &p, e);
    }
    let r = async {
        let verdict = Verdict::parse(&f.decision)
            .ok_or_else(|| PageError::bad("decision: use accept, reject or correct".into()))?;
        let is_id = crate::reports::navigator::is_technique_id;
        if !is_id(&f.suggested) {
            return Err(PageError::bad(format!(
                "suggested={}: not an ATT&CK technique id",
                f.suggested.chars().take(40).collect::<String>()
            )));
        }
        let correct = f.correct.trim().to_uppercase();
        let technique_id = match verdict {
            Verdict::Accept => Some(f.suggested.clone()),
            Verdict::Reject => None,
            Verdict::Correct if is_id(&correct) => Some(correct),
            Verdict::Correct => {
                return Err(PageError::bad(
                    "correct: type the right technique id (T1234 or T1234.567) next to Correct"
                        .into(),
                ))
            }
        };
        if f.sentence.trim().is_empty() || f.sentence.len() > 20_000 || f.doc.len() > 64 {
            return Err(PageError::bad(
                "the sentence or document id is missing or too long".into(),
            ));
        }
        let d = Decision {
            at: crate::feeds::fixed(chrono::Utc::now()),
            who: p.name.clone(),
            doc: f.doc.clone(),
            sentence: f.sentence.clone(),
            suggested: f.suggested.clone(),
            score: f.score.filter(|s| s.is_finite()),
            decision: verdict.as_str().into(),
            technique_id: technique_id.clone(),
            model: f.model.clone().filter(|m| m.len() <= 64),
        };
        crate::feedback::record(&state.engine().lake, &d)
            .await
            .map_err(|e| {
                tracing::error!("mapping_feedback: {e}");
                PageError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: "the decision could not be stored; see the server log".into(),
                }
            })?;
        let said = match (verdict, &technique_id) {
            (Verdict::Accept, _) => format!("Accepted {}", f.suggested),
            (Verdict::Reject, _) => format!("Rejected {}", f.suggested),
            (Verdict::Correct, t) => format!(
                "Corrected {} to {}",
                f.suggested,
                t.clone().unwrap_or_default()
            ),
        };
        let frame = Frame::new(&state, &p, "workbench", "Mapping workbench".into(), None);
        // htmx swaps the fragment in place of the decision form; a plain form post gets a page.
        let template = if headers.contains_key("hx-request") {
            "decided.html"
        } else {
            "workbench_decided.html"
        };
        Ok(render(template, frame, minijinja::context! { said }))
    };
    r.await.unwrap_or_else(|e| error_page(&state, &p, e))
}
