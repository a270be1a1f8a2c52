//! The admin API, on its own listener (loopback unless configured otherwise) and
//! behind its own key (`Authorization: Bearer <key>` or `x-admin-key`). Without a
//! configured key every admin call is refused.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::{HeaderValue, StatusCode};
use serde_json::{json, Value};

use crate::config::Problem;
use crate::provider::registry::ProviderState;
use crate::reload::Reloader;

#[derive(Clone)]
struct AdminState {
    reloader: Arc<Reloader>,
    key: Option<Arc<str>>,
}

fn json_response(status: StatusCode, v: Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(
        status,
        json!({"error": {"message": message, "type": "admin_error", "code": code, "param": null}}),
    )
}

/// Compares without an early exit, so timing does not reveal the key.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(key) = &st.key else {
        return error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is disabled: set the admin key variable (admin.key_env, default PROMPTGATE_ADMIN_KEY)",
        );
    };
    let h = req.headers();
    let given = h
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-admin-key").and_then(|v| v.to_str().ok()));
    match given {
        Some(g) if same(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin key is required",
        ),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn problems_json(ps: &[Problem]) -> Value {
    Value::Array(
        ps.iter()
            .map(|p| {
                json!({"file": p.file, "line": p.line, "field": p.field, "message": p.message, "text": p.to_string()})
            })
            .collect(),
    )
}

async fn status(State(st): State<AdminState>) -> Response {
    let snap = st.reloader.gateway().snapshot();
    let rs = st.reloader.status();
    let prompts: Vec<Value> = snap
        .prompts
        .prompts()
        .map(|p| {
            json!({
                "id": p.id,
                "file": p.file.display().to_string(),
                "labels": p.labels,
                "versions": p.versions.values().map(|v| json!({"version": v.number, "hash": v.hash, "route": v.route})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let providers: Vec<Value> = snap
        .providers
        .iter()
        .map(|(id, state)| {
            let kind = snap.config.providers.get(id).map(|p| p.kind.as_str());
            match state {
                ProviderState::Ready(_) => json!({"id": id, "kind": kind, "state": "ready"}),
                ProviderState::Unavailable(r) => {
                    json!({"id": id, "kind": kind, "state": "unavailable", "reason": r})
                }
            }
        })
        .collect();
    let body = json!({
        "config": {
            "file": snap.config.file.display().to_string(),
            "loaded_at": unix(snap.loaded_at),
            "last_good_reload": unix(rs.last_success),
            "reloads": {"succeeded": rs.succeeded, "failed": rs.failed},
            "last_error": rs.last_failure.as_ref().map(|f| json!({
                "at": unix(f.at),
                "trigger": f.trigger,
                "problems": problems_json(&f.problems),
            })),
        },
        "routes": snap.config.routes.values().map(|r| json!({"name": r.name, "provider": r.provider, "model": r.model})).collect::<Vec<_>>(),
        "providers": providers,
        "prompts": prompts,
    });
    json_response(StatusCode::OK, body)
}

async fn reload(State(st): State<AdminState>) -> Response {
    match st.reloader.reload("admin API").await {
        Ok(()) => {
            let snap = st.reloader.gateway().snapshot();
            json_response(
                StatusCode::OK,
                json!({"status": "reloaded", "loaded_at": unix(snap.loaded_at)}),
            )
        }
        Err(problems) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "status": "rejected",
                "message": "the configuration is invalid; the previous configuration keeps serving",
                "problems": problems_json(&problems),
            }),
        ),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
}

/// The admin application. `key` is the admin key (None: admin disabled).
pub fn router(reloader: Arc<Reloader>, key: Option<String>) -> Router {
    let st = AdminState {
        reloader,
        key: key.filter(|k| !k.is_empty()).map(Into::into),
    };
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/reload", post(reload))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(st.clone(), authorize))
        .with_state(st)
}
