//! The operators' status page at `/admin/`: three static files (HTML, JS, CSS)
//! compiled into the binary. They carry no data, so they are served without the
//! admin key; the page asks the operator for the key and sends it with every
//! fetch of the JSON endpoints (`/admin/status`, `/admin/experiments`), which
//! stay behind the key. Every answer here forbids caching, framing, referrers
//! and any script or style that is not one of these files.

use axum::body::Body;
use axum::response::{Redirect, Response};
use axum::routing::get;
use axum::Router;
use http::{header, HeaderValue};

const INDEX: &str = include_str!("../../assets/status/index.html");
const APP_JS: &str = include_str!("../../assets/status/app.js");
const APP_CSS: &str = include_str!("../../assets/status/app.css");
const ICON: &str = include_str!("../../assets/status/icon.svg");

/// Only the page's own files: no inline script or style, no other origin, no
/// framing; data is fetched from this origin only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The page's routes; merged beside the key-protected API (they do not pass
/// through its key check).
pub fn router() -> Router {
    Router::new()
        .route("/admin", get(|| async { Redirect::permanent("/admin/") }))
        .route(
            "/admin/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/admin/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/admin/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/admin/icon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::extract::Request;
    use tower::ServiceExt;

    async fn get(path: &str) -> Response {
        router()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_page_is_served_with_its_security_headers() {
        for (path, kind) in [
            ("/admin/", "text/html"),
            ("/admin/app.js", "text/javascript"),
            ("/admin/app.css", "text/css"),
            ("/admin/icon.svg", "image/svg+xml"),
        ] {
            let r = get(path).await;
            assert_eq!(r.status(), 200, "{path}");
            let h = r.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind));
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-store");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        let r = get("/admin").await;
        assert!(r.status().is_redirection());
        assert_eq!(r.headers()[header::LOCATION], "/admin/");
    }

    /// The policy forbids inline script and style, so the page must have none:
    /// every script and sheet is a file of this origin, and no element carries
    /// a `style` attribute or an event handler.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = INDEX.to_ascii_lowercase();
        for tag in html.split("<script").skip(1) {
            let open = &tag[..tag.find('>').unwrap()];
            assert!(
                open.contains("src=\"/admin/app.js\""),
                "inline script: {open}"
            );
            assert!(tag[open.len() + 1..].trim_start().starts_with("</script>"));
        }
        assert!(!html.contains("<style"), "inline style element");
        assert!(!html.contains(" style="), "style attribute");
        assert!(
            !html.contains(" onclick=")
                && !html.contains(" onload=")
                && !html.contains(" onsubmit=")
        );
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no other origin"
        );
        assert!(html.contains("name=\"viewport\""));
        // Data reaches the DOM as text only.
        assert!(!APP_JS.contains("innerHTML") && !APP_JS.contains("outerHTML"));
        assert!(!APP_JS.contains("insertAdjacentHTML") && !APP_JS.contains("document.write"));
        assert!(
            !APP_JS.contains("localStorage"),
            "the key is kept for the session only"
        );
    }
}
