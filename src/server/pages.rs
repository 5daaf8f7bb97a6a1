//! Browser pages: the login form, sign-in (argon2id check, failed-login limit, fresh session id,
//! hardened cookie), sign-out, and the signed-in home page. Rendered with minijinja (auto-escaped).

use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::auth::Principal;
use super::{cookie_name, AppState, AuditNote};

const LOGIN: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>threatlake — sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto}label,input,button{display:block;width:100%;margin:.3rem 0}p.err{color:#a00}</style>
</head><body><h1>threatlake</h1>
{% if message %}<p class="err" role="alert">{{ message }}</p>{% endif %}
<form method="post" action="/login">
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button></form></body></html>
"#;

const HOME: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>threatlake</title>
<meta name="csrf-token" content="{{ csrf }}">
<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto}</style>
</head><body><h1>threatlake</h1>
<p>Signed in as <strong id="user">{{ user }}</strong> ({{ role }}).</p>
<ul><li><a href="/api/v1/openapi.json">API description (OpenAPI 3.1)</a></li>
<li><a href="/api/v1/threat-model">Current threat model (JSON)</a></li>
<li><a href="/api/v1/runs">Job runs (JSON)</a></li></ul>
<form method="post" action="/logout"><input type="hidden" name="csrf_token" value="{{ csrf }}"><button type="submit">Sign out</button></form>
</body></html>
"#;

fn render(name: &str, source: &'static str, ctx: minijinja::Value) -> Response {
    let mut env = minijinja::Environment::new();
    // Names ending in .html are auto-escaped.
    let out = env
        .add_template(name, source)
        .and_then(|_| env.get_template(name))
        .and_then(|t| t.render(ctx));
    match out {
        Ok(html) => Html(html).into_response(),
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
    let ok = state
        .sessions
        .get(id)
        .is_some_and(|s| bool::from(s.csrf.as_bytes().ct_eq(f.csrf_token.as_bytes())));
    if !ok {
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

/// `GET /`: who is signed in, links, the sign-out form.
pub async fn home(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    _headers: HeaderMap,
) -> Response {
    let csrf = p
        .session
        .as_deref()
        .and_then(|id| state.sessions.get(id))
        .map(|s| s.csrf)
        .unwrap_or_default();
    render(
        "home.html",
        HOME,
        minijinja::context! { user => p.name, role => p.role.as_str(), csrf => csrf },
    )
}
