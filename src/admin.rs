//! The admin API, on its own listener (loopback unless configured otherwise) and
//! behind its own key (`Authorization: Bearer <key>` or `x-admin-key`). Without a
//! configured key every admin call is refused. The status page's files
//! (`/admin/`, `admin/ui.rs`) are the exception: they carry no data.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::{HeaderValue, StatusCode};
use serde_json::{json, Value};

use crate::backend::ProviderState;
use crate::config::Problem;
use crate::health::FaultKind;
use crate::reload::Reloader;
use crate::snapshot::Plan;

mod ui;

#[derive(Clone)]
struct AdminState {
    reloader: Arc<Reloader>,
    /// The SHA-256 digest of the admin key.
    key: Option<[u8; 32]>,
}

fn json_response(status: StatusCode, v: Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Answers about the gateway's state are never stored by a browser or proxy.
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(
        status,
        json!({"error": {"message": message, "type": "admin_error", "code": code, "param": null}}),
    )
}

/// The SHA-256 digest of a key: what is kept and compared, so the comparison
/// always runs over 32 bytes whatever the lengths of the keys.
fn digest(key: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key).into()
}

/// Compares two digests in constant time (`subtle`), so neither the timing nor
/// the work done reveals the key or its length.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
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
        Some(g) if same(&digest(g.as_bytes()), key) => next.run(req).await,
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
    let gw = st.reloader.gateway();
    let snap = gw.snapshot();
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
    let faults = gw.book().active_faults();
    let providers: Vec<Value> = snap
        .providers
        .iter()
        .map(|(id, state)| {
            let kind = snap.config.providers.get(id).map(|p| p.kind.name);
            let mut v = match state {
                ProviderState::Ready(_) => json!({"id": id, "kind": kind, "state": "ready"}),
                ProviderState::Unavailable(r) => {
                    json!({"id": id, "kind": kind, "state": "unavailable", "reason": r})
                }
            };
            // Taken out of rotation (`drain`/`disable`), or under a drill fault.
            let fault = faults.iter().find(|(p, _)| p == id).map(|(_, f)| &f.kind);
            v["draining"] = json!(fault == Some(&FaultKind::Disabled));
            v["fault"] = json!(fault
                .filter(|k| **k != FaultKind::Disabled)
                .map(FaultKind::describe));
            v
        })
        .collect();
    let mut keys_status =
        crate::governance::keys::status_json(&snap.access, crate::governance::keys::now());
    // Each key's limits and budget with its current use, as in /admin/keys.
    keys_status["list"] = Value::Array(keys_json(gw, &snap));
    let body = json!({
        "now": unix(SystemTime::now()),
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
        "routes": routes_json(&snap),
        "faults": faults_json(&st),
        "cache": cache_json(&st).await,
        "providers": providers,
        "prompts": prompts,
        "keys": keys_status,
        "ready": gw.readiness.report().1,
    });
    json_response(StatusCode::OK, body)
}

/// `GET /admin/keys`: every configured key (never its hash) with its current
/// use of its limits and budget.
async fn keys(State(st): State<AdminState>) -> Response {
    let gw = st.reloader.gateway();
    let snap = gw.snapshot();
    let data = keys_json(gw, &snap);
    json_response(
        StatusCode::OK,
        json!({"mode": crate::governance::keys::mode_name(snap.access.mode), "keys": data}),
    )
}

/// Every configured key (never its hash), sorted by id, with its current use
/// of its limits and budget.
fn keys_json(gw: &crate::Gateway, snap: &crate::snapshot::Snapshot) -> Vec<Value> {
    let now = crate::governance::keys::now();
    let mut callers: Vec<&crate::governance::Caller> = snap.access.callers().collect();
    callers.sort_by(|a, b| a.id.cmp(&b.id));
    callers
        .into_iter()
        .map(|c| {
            let usage = json!({
                "limits": gw.governor.limits.usage(&c.id),
                "spend": gw.governor.spend.usage(&c.id),
            });
            crate::governance::keys::admin_json(c, now, usage)
        })
        .collect()
}

fn routes_json(snap: &crate::snapshot::Snapshot) -> Value {
    let target = |t: &crate::snapshot::Target| {
        let (state, rate, calls) = t.health.summary(&snap.breaker);
        json!({
            "target": &*t.id,
            "provider": &*t.provider_id,
            "model": t.model,
            "self_hosted": t.self_hosted,
            "breaker": state.as_str(),
            "recent_error_rate": rate,
            "recent_calls": calls,
        })
    };
    let mut routes: Vec<&std::sync::Arc<crate::snapshot::Route>> = snap.routes().collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    Value::Array(
        routes
            .into_iter()
            .map(|r| match &r.plan {
                Plan::Chain(c) => json!({
                    "name": &*r.name, "strategy": "fallback", "private": r.private,
                    "targets": c.iter().map(|t| target(t)).collect::<Vec<_>>(),
                }),
                Plan::Split { arms, .. } => json!({
                    "name": &*r.name, "strategy": "split", "private": r.private,
                    "arms": arms.iter().map(|a| json!({
                        "arm": &*a.name,
                        "targets": a.chain.iter().map(|t| target(t)).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }),
            })
            .collect(),
    )
}

fn faults_json(st: &AdminState) -> Value {
    let now = SystemTime::now();
    Value::Array(
        st.reloader
            .gateway()
            .book()
            .active_faults()
            .into_iter()
            .map(|(p, f)| {
                json!({
                    "provider": p,
                    "fault": f.kind.describe(),
                    "expires_at": unix(f.until_wall),
                    "expires_in_ms": f.until_wall.duration_since(now).map(|d| d.as_millis() as u64).unwrap_or(0),
                })
            })
            .collect(),
    )
}

async fn cache_json(st: &AdminState) -> Value {
    let gw = st.reloader.gateway();
    let (entries, bytes) = gw.cache.figures().await;
    let snap = gw.snapshot();
    let m = &gw.metrics;
    let mut per_route = serde_json::Map::new();
    for r in snap.routes() {
        let count = |k: &str| m.cache_count(&r.name, k);
        if r.cache.mode != crate::config::CacheMode::Off {
            per_route.insert(
                r.name.to_string(),
                json!({"mode": format!("{:?}", r.cache.mode).to_lowercase(), "hits": count("hit"), "misses": count("miss"),
                       "bypasses": count("bypass"), "refreshes": count("refresh")}),
            );
        }
    }
    json!({
        "entries": entries,
        "bytes": bytes,
        "max_bytes": snap.config.cache.max_bytes,
        "evictions": m.cache_evictions.get(),
        "redis": snap.config.cache.redis.as_ref().map(|r| json!({"url_configured": !r.url.is_empty(), "errors": {
            "connect": m.redis_errors("connect"),
            "get": m.redis_errors("get"),
            "set": m.redis_errors("set"),
            "decode": m.redis_errors("decode"),
        }})),
        "routes": per_route,
    })
}

#[derive(serde::Deserialize)]
struct PurgeQuery {
    route: Option<String>,
    prompt: Option<String>,
}

/// `DELETE /admin/cache[?route=R][&prompt=P]`
async fn purge_cache(
    State(st): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<PurgeQuery>,
) -> Response {
    match st
        .reloader
        .gateway()
        .cache
        .purge(q.route.as_deref(), q.prompt.as_deref())
        .await
    {
        Ok(n) => json_response(
            StatusCode::OK,
            json!({"removed": n, "route": q.route, "prompt": q.prompt}),
        ),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "cache_error",
            &format!("the in-memory tier was purged; the shared tier failed: {e}"),
        ),
    }
}

async fn experiments(State(st): State<AdminState>) -> Response {
    let snap = st.reloader.gateway().snapshot();
    let mut out = Vec::new();
    let mut routes: Vec<_> = snap.routes().collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    for r in routes {
        let Plan::Split { subject, arms } = &r.plan else {
            continue;
        };
        let mut lower = 0.0;
        let arms_json: Vec<Value> = arms
            .iter()
            .map(|a| {
                let (requests, errors, p50, p95, mean_tokens) = a.stats.summary();
                let (tokens, cost) = a.stats.totals();
                let share = a.upper - lower;
                lower = a.upper;
                json!({
                    "arm": &*a.name,
                    "weight": share,
                    "prompt": a.prompt.as_ref().map(|s| s.to_string()),
                    "requests": requests,
                    "errors": errors,
                    "error_rate": if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
                    "latency_p50_ms": p50 * 1000.0,
                    "latency_p95_ms": p95 * 1000.0,
                    "mean_tokens": mean_tokens,
                    "tokens": tokens,
                    "cost": cost,
                })
            })
            .collect();
        out.push(json!({
            "route": &*r.name,
            "subject": match subject {
                crate::config::Subject::User => "user".to_string(),
                crate::config::Subject::Key => "key".to_string(),
                crate::config::Subject::Header(h) => format!("header:{h}"),
            },
            "arms": arms_json,
        }));
    }
    let shadows: Vec<Value> = st
        .reloader
        .gateway()
        .shadows
        .figures()
        .into_iter()
        .map(|((route, arm, candidate), f)| {
            let mut v = json!({"route": route, "arm": arm, "candidate": candidate});
            if let (Value::Object(o), Ok(Value::Object(f))) = (&mut v, serde_json::to_value(&f)) {
                o.extend(f);
            }
            v
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"experiments": out, "shadows": shadows, "currency": snap.config.spend.currency}),
    )
}

/// The longest fault `duration` or `latency`, given as a number or as text.
const MAX_FAULT_DURATION: Duration = Duration::from_secs(3600);

/// A number of seconds given as JSON: finite, not negative, at most an hour
/// (`try_from_secs_f64` refuses NaN, infinities and negatives).
fn seconds(n: Option<f64>) -> Option<Duration> {
    Duration::try_from_secs_f64(n?)
        .ok()
        .filter(|d| *d <= MAX_FAULT_DURATION)
}

/// A duration given as text (`"30s"`, `"1h"`): at most an hour, like numbers.
fn text_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| *d <= MAX_FAULT_DURATION)
}

fn parse_fault(body: &Value) -> Result<(FaultKind, Duration), String> {
    let dur = |k: &str| -> Result<Option<Duration>, String> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => text_duration(s).map(Some).ok_or_else(|| {
                format!("`{k}` must be a duration like \"30s\", at most 1h (got {s:?})")
            }),
            Some(Value::Number(n)) => seconds(n.as_f64())
                .map(Some)
                .ok_or_else(|| format!("`{k}` must be a number of seconds from 0 to 3600")),
            Some(_) => Err(format!("`{k}` must be a duration like \"30s\"")),
        }
    };
    let duration =
        dur("duration")?.ok_or("`duration` is required (faults expire by themselves)")?;
    let kind = match body.get("fault").and_then(Value::as_str) {
        Some("down") => FaultKind::Down,
        Some("error") => {
            let s = body.get("status").and_then(Value::as_u64).unwrap_or(503);
            if !(400..=599).contains(&s) {
                return Err("`status` must be 400-599".into());
            }
            FaultKind::Error(s as u16)
        }
        Some("slow") => FaultKind::Slow(dur("latency")?.ok_or("`slow` needs `latency`")?),
        Some("stall") => FaultKind::Stall,
        Some("rate_limited") => FaultKind::RateLimited,
        Some("stream_cut") => FaultKind::StreamCut(
            body.get("after_chunks").and_then(Value::as_u64).unwrap_or(0) as usize,
        ),
        Some("error_in_200") => FaultKind::ErrorIn200,
        other => {
            return Err(format!(
                "`fault` must be one of down, error, slow, stall, rate_limited, stream_cut, error_in_200 (got {other:?})"
            ))
        }
    };
    Ok((kind, duration))
}

async fn inject_fault(State(st): State<AdminState>, body: axum::body::Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("body is not JSON: {e}"),
            )
        }
    };
    let Some(provider) = body.get("provider").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`provider` is required",
        );
    };
    let snap = st.reloader.gateway().snapshot();
    if !snap.providers.contains_key(provider) {
        let known: Vec<&str> = snap.providers.keys().map(String::as_str).collect();
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no provider `{provider}` (providers: {})", known.join(", ")),
        );
    }
    match parse_fault(&body) {
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_request", &e),
        Ok((kind, duration)) => {
            tracing::warn!(provider, fault = %kind.describe(), duration = %humantime::format_duration(duration), "drill fault injected");
            let describe = kind.describe();
            st.reloader
                .gateway()
                .book()
                .set_fault(provider, kind, duration);
            json_response(
                StatusCode::CREATED,
                json!({"provider": provider, "fault": describe, "duration_ms": duration.as_millis() as u64}),
            )
        }
    }
}

async fn clear_fault(State(st): State<AdminState>, Path(provider): Path<String>) -> Response {
    let had = st.reloader.gateway().book().clear_fault(&provider);
    tracing::warn!(provider = %provider, "drill fault cleared");
    json_response(
        StatusCode::OK,
        json!({"provider": provider, "cleared": had}),
    )
}

/// `POST /admin/providers/{id}/{disable|drain|enable}`: disable and drain stop new
/// traffic to the provider (requests in flight finish) for `duration` (default 10m).
async fn provider_action(
    State(st): State<AdminState>,
    Path((provider, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let snap = st.reloader.gateway().snapshot();
    if !snap.providers.contains_key(&provider) {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no provider `{provider}`"),
        );
    }
    let book = st.reloader.gateway().book();
    match action.as_str() {
        "enable" => {
            book.clear_fault(&provider);
            // An operator putting a provider back means "try it now": its open
            // breakers would otherwise keep skipping it for the rest of a cooldown.
            let reset = book.reset_provider(&provider);
            let metrics = &st.reloader.gateway().metrics;
            for id in &reset {
                metrics.breaker(id, crate::health::BreakerState::Closed);
            }
            json_response(
                StatusCode::OK,
                json!({"provider": provider, "state": "enabled",
                       "breakers_reset": reset.iter().map(|t| t.as_str()).collect::<Vec<_>>()}),
            )
        }
        "disable" | "drain" => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let duration = v
                .get("duration")
                .and_then(Value::as_str)
                .and_then(|d| humantime::parse_duration(d).ok())
                .unwrap_or(Duration::from_secs(600))
                .min(Duration::from_secs(24 * 3600));
            book.set_fault(&provider, FaultKind::Disabled, duration);
            tracing::warn!(provider = %provider, action = %action, "provider taken out of rotation");
            json_response(
                StatusCode::OK,
                json!({"provider": provider, "state": action, "duration_ms": duration.as_millis() as u64}),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "action must be enable, disable or drain",
        ),
    }
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
        key: key.filter(|k| !k.is_empty()).map(|k| digest(k.as_bytes())),
    };
    let app = Router::new()
        .route("/admin/status", get(status))
        .route("/admin/keys", get(keys))
        .route("/admin/reload", post(reload))
        .route("/admin/experiments", get(experiments))
        .route("/admin/cache", axum::routing::delete(purge_cache))
        .route("/admin/faults", post(inject_fault))
        .route(
            "/admin/faults/{provider}",
            axum::routing::delete(clear_fault),
        )
        .route(
            "/admin/providers/{provider}/{action}",
            post(provider_action),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(st.clone(), authorize))
        .with_state(st);
    // The status page's files carry no data: served without the key.
    catch_panics(ui::router().merge(app))
}

/// A panic in an admin handler answers 500 instead of dropping the connection.
fn catch_panics(app: Router) -> Router {
    app.layer(tower_http::catch_panic::CatchPanicLayer::custom(
        |_: Box<dyn std::any::Any + Send>| {
            tracing::error!("an admin handler panicked");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the admin API hit an internal error",
            )
        },
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn keys_compare_by_digest() {
        let key = digest(b"secret-key");
        assert!(same(&digest(b"secret-key"), &key));
        assert!(!same(&digest(b"secret-kez"), &key));
        assert!(!same(&digest(b"secret"), &key), "a prefix is not the key");
        assert!(!same(&digest(b""), &key));
    }

    #[test]
    fn numeric_durations_are_validated() {
        for bad in [-1.0, 1e300, f64::NAN, f64::INFINITY, 3601.0] {
            assert_eq!(seconds(Some(bad)), None, "{bad}");
        }
        assert_eq!(seconds(Some(1.5)), Some(Duration::from_millis(1500)));
        let r = parse_fault(&json!({"fault": "slow", "duration": 10, "latency": -1}));
        assert!(r.is_err_and(|e| e.contains("latency")));
        let r = parse_fault(&json!({"fault": "down", "duration": 1e300}));
        assert!(r.is_err_and(|e| e.contains("duration")));
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500() {
        let app = catch_panics(Router::new().route(
            "/boom",
            get(|| async {
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                "unreachable"
            }),
        ));
        let r = app
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "internal_error");
    }
}
