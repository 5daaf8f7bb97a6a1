//! Browser pages: the login form, sign-in (argon2id check, failed-login limit, fresh session id,
//! hardened cookie) and sign-out; the signed-in pages are the dashboard's. Rendered with minijinja
//! (auto-escaped).

use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use cookie::{Cookie, SameSite};
use serde::Deserialize;

use super::auth::Principal;
use super::{cookie_name, AppState, AuditNote};

const LOGIN: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>threatlake — sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/assets/app.css">
</head><body class="login"><main><h1>threatlake</h1>
{% if message %}<p class="err" role="alert">{{ message }}</p>{% endif %}
<form method="post" action="/login">
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button></form></main></body></html>
"#;

fn render(name: &str, source: &'static str, ctx: minijinja::Value) -> Response {
    let mut env = minijinja::Environment::new();
    // Names ending in .html are auto-escaped.
    let out = env
        .add_template(name, source)
        .and_then(|_| env.get_template(name))
        .and_then(|t| t.render(ctx));
    match out {
        Ok(html) => {
            let mut r = Html(html).into_response();
            super::dashboard::harden(&mut r);
            r
        }
        Err(e) => {
            tracing::error!("rendering {name}: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn login_page(status: StatusCode, message: &str) -> Response {
    let mut r = render(
        "login.html",
        LOGIN,
        minijinja::context! { message => message },
    );
    *r.status_mut() = status;
    r
}

/// `GET /login`.
pub async fn login_form() -> Response {
    login_page(StatusCode::OK, "")
}

/// The login form's fields.
#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
}

/// `POST /login`: the same answer for an unknown user and a wrong password.
pub async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    let ip = addr.ip();
    let user: String = f.username.chars().take(64).collect();
    let note = |event: &str| AuditNote {
        sql: None,
        event: Some(event.to_string()),
        who: Some(user.clone()),
    };
    if state.limiter.blocked(&user, ip) {
        let mut r = login_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed sign-ins. Wait a few minutes and try again.",
        );
        r.extensions_mut().insert(note("login_limited"));
        return r;
    }
    let st = state.clone();
    let (u, p) = (user.clone(), f.password);
    let role = tokio::task::spawn_blocking(move || st.verifier.password(&u, &p))
        .await
        .ok()
        .flatten();
    let Some(role) = role else {
        state.limiter.fail(&user, ip);
        let mut r = login_page(StatusCode::UNAUTHORIZED, "Wrong user name or password.");
        r.extensions_mut().insert(note("login_failed"));
        return r;
    };
    state.limiter.succeed(&user);
    let (id, _) = state.sessions.create(&user, role);
    let max = time_secs(state.settings.server.session.max_hours.max(1) * 3600);
    redirect_setting_cookie(&state, "/", id, max, note("login"))
}

/// A redirect to `to` that sets the session cookie (HttpOnly, SameSite=Strict, Path=/, `Secure`
/// and the `__Host-` name under TLS) to `value` for `max_age`, with its audit note.
fn redirect_setting_cookie(
    state: &AppState,
    to: &str,
    value: String,
    max_age: cookie::time::Duration,
    note: AuditNote,
) -> Response {
    let c = Cookie::build((cookie_name(state.tls), value))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(state.tls)
        .path("/")
        .max_age(max_age)
        .build();
    let mut r = Redirect::to(to).into_response();
    if let Ok(v) = c.to_string().parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.extensions_mut().insert(note);
    r
}

fn time_secs(s: u64) -> cookie::time::Duration {
    cookie::time::Duration::seconds(s.min(i64::MAX as u64) as i64)
}

/// The logout form's field.
#[derive(Deserialize)]
pub struct LogoutForm {
    csrf_token: String,
}

/// `POST /logout` (needs the session's CSRF token in the form).
pub async fn logout(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Form(f): Form<LogoutForm>,
) -> Response {
    let Some(id) = &p.session else {
        return super::api::error(
            StatusCode::BAD_REQUEST,
            "not_a_session",
            "API tokens have no session; revoke the token instead",
        )
        .into_response();
    };
    if !state.sessions.csrf_matches(id, f.csrf_token.as_bytes()) {
        return super::api::error(
            StatusCode::FORBIDDEN,
            "csrf",
            "the form's CSRF token does not match the session",
        )
        .into_response();
    }
    state.sessions.remove(id);
    let note = AuditNote {
        sql: None,
        event: Some("logout".into()),
        who: None,
    };
    redirect_setting_cookie(&state, "/login", String::new(), time_secs(0), note)
}
