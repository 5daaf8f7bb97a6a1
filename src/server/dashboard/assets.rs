//! The dashboard's static files, compiled into the binary (works offline, no CDN): our own CSS and
//! script, and the vendored Apache ECharts and htmx builds with their licence files. Served gzipped
//! to clients that accept it, cached by the browser for a day.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// (name, media type, bytes).
const FILES: [(&str, &str, &[u8]); 7] = [
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/app.js"),
    ),
    (
        "echarts.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vendor/echarts.common.min.js"),
    ),
    (
        "htmx.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/vendor/htmx.min.js"),
    ),
    (
        "LICENSE-echarts.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/vendor/LICENSE-echarts"),
    ),
    (
        "NOTICE-echarts.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/vendor/NOTICE-echarts"),
    ),
    (
        "LICENSE-htmx.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/vendor/LICENSE-htmx"),
    ),
];

/// Each file gzipped once, on first use.
static GZIPPED: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    use std::io::Write;
    FILES
        .iter()
        .map(|(_, _, bytes)| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            // Writing to a Vec cannot fail.
            let _ = e.write_all(bytes);
            e.finish().unwrap_or_default()
        })
        .collect()
});

/// `GET /assets/{file}`.
pub async fn serve(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|(n, _, _)| *n == file) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let (_, media, bytes) = FILES[i];
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut r = if gzip && !GZIPPED[i].is_empty() {
        let mut r = GZIPPED[i].clone().into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        bytes.into_response()
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `GET /favicon.ico`: no icon (pages declare an empty one; browsers still ask for it beside
/// non-HTML responses such as a raw feed response), without a 404 in the console.
pub async fn no_icon() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    r
}
