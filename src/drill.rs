//! `promptgate drill`: a provider switchover rehearsal against a running gateway.
//! It sends bounded synthetic load (half streaming, half not) through one route,
//! injects a fault on one provider through the admin API, restores it, and
//! reports what clients saw: success rate and latency per second, which target
//! served, how long until traffic had left the faulty provider, and how long until
//! it came back. It talks only to the gateway and admin URLs it is given (after
//! checking that the gateway is a promptgate), and stops on its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

pub struct DrillPlan {
    pub gateway: String,
    pub admin: String,
    pub admin_key: String,
    pub route: String,
    pub provider: String,
    /// The fault as the admin API takes it (`fault`, `status`, `latency`, `after_chunks`).
    pub fault: Value,
    pub warmup: Duration,
    pub duration: Duration,
    pub recovery: Duration,
    pub rps: u32,
}

#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the drill started, when the request was sent.
    at: f64,
    phase: &'static str,
    stream: bool,
    ok: bool,
    latency_ms: f64,
    target: String,
    error: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    route: &str,
    stream: bool,
) -> (bool, String, Option<String>) {
    let body = json!({
        "model": route,
        "stream": stream,
        "messages": [{"role": "user", "content": "drill: say hello"}],
        "max_tokens": 16,
    });
    let resp = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => return (false, String::new(), Some(format!("request failed: {e}"))),
    };
    let status = resp.status();
    let target = resp
        .headers()
        .get("x-promptgate-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return (false, target, Some(format!("body failed: {e}"))),
    };
    if !status.is_success() {
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return (false, target, Some(format!("HTTP {status} {msg}")));
    }
    if stream {
        let clean = text.trim_end().ends_with("data: [DONE]");
        let errored = text.contains("data: {\"error\"");
        if !clean || errored {
            return (
                false,
                target,
                Some("stream ended with an error event".into()),
            );
        }
    }
    (true, target, None)
}

async fn admin_call(
    client: &reqwest::Client,
    plan: &DrillPlan,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(), String> {
    let mut rb = client
        .request(method, format!("{}{path}", plan.admin))
        .bearer_auth(&plan.admin_key);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb
        .send()
        .await
        .map_err(|e| format!("admin API unreachable: {e}"))?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "admin API answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ))
    }
}

/// Runs the drill; returns the report as JSON.
pub async fn run(plan: DrillPlan) -> Result<Value, String> {
    if plan.rps == 0 || plan.rps > 2000 {
        return Err("--rps must be between 1 and 2000".into());
    }
    let total = plan.warmup + plan.duration + plan.recovery;
    if total > Duration::from_secs(3600) {
        return Err("a drill lasts at most one hour".into());
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;
    // Only a promptgate gateway gets load.
    let health = client
        .get(format!("{}/healthz", plan.gateway))
        .send()
        .await
        .map_err(|e| format!("cannot reach the gateway at {}: {e}", plan.gateway))?;
    if !health.status().is_success() || !health.headers().contains_key("x-promptgate-overhead-us") {
        return Err(format!(
            "{} does not answer as a promptgate gateway; refusing to send load",
            plan.gateway
        ));
    }
    let mut fault = plan.fault.clone();
    fault["provider"] = json!(plan.provider);
    fault["duration"] = json!(format!(
        "{}ms",
        (plan.duration + Duration::from_secs(60)).as_millis()
    ));
    // Check the admin API before any load (a wrong key must not leave load running).
    admin_call(&client, &plan, reqwest::Method::GET, "/admin/status", None).await?;

    let url = format!("{}/v1/chat/completions", plan.gateway);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let fault_at = plan.warmup;
    let restore_at = plan.warmup + plan.duration;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rps)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut injected = false;
    let mut restored = false;
    let mut n = 0u64;
    let mut tasks = Vec::new();
    loop {
        ticker.tick().await;
        let now = start.elapsed();
        if now >= total {
            break;
        }
        if !injected && now >= fault_at {
            admin_call(
                &client,
                &plan,
                reqwest::Method::POST,
                "/admin/faults",
                Some(fault.clone()),
            )
            .await?;
            injected = true;
        }
        if !restored && now >= restore_at {
            admin_call(
                &client,
                &plan,
                reqwest::Method::DELETE,
                &format!("/admin/faults/{}", plan.provider),
                None,
            )
            .await?;
            restored = true;
        }
        let phase = if now < fault_at {
            "baseline"
        } else if now < restore_at {
            "fault"
        } else {
            "recovery"
        };
        n += 1;
        let stream = n % 2 == 0;
        let (client, url, route, samples) = (
            client.clone(),
            url.clone(),
            plan.route.clone(),
            samples.clone(),
        );
        tasks.push(crate::task::spawn("drill-request", async move {
            let sent = start.elapsed();
            let t = Instant::now();
            let (ok, target, error) = one_request(&client, &url, &route, stream).await;
            samples.lock().await.push(Sample {
                at: sent.as_secs_f64(),
                phase,
                stream,
                ok,
                latency_ms: t.elapsed().as_secs_f64() * 1000.0,
                target,
                error,
            });
        }));
    }
    if !restored {
        admin_call(
            &client,
            &plan,
            reqwest::Method::DELETE,
            &format!("/admin/faults/{}", plan.provider),
            None,
        )
        .await?;
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut samples = samples.lock().await.clone();
    samples.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(report(&plan, &samples))
}

fn report(plan: &DrillPlan, samples: &[Sample]) -> Value {
    let prefix = format!("{}/", plan.provider);
    let on_faulty = |s: &Sample| s.target.starts_with(&prefix);
    let fault_at = plan.warmup.as_secs_f64();
    let restore_at = (plan.warmup + plan.duration).as_secs_f64();
    let mut seconds: BTreeMap<u64, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        seconds.entry(s.at as u64).or_default().push(s);
    }
    let per_second: Vec<Value> = seconds
        .iter()
        .map(|(sec, ss)| {
            let mut lat: Vec<f64> = ss.iter().map(|s| s.latency_ms).collect();
            lat.sort_by(f64::total_cmp);
            let ok = ss.iter().filter(|s| s.ok).count();
            let mut targets: BTreeMap<&str, u64> = BTreeMap::new();
            for s in ss.iter().filter(|s| s.ok) {
                *targets.entry(s.target.as_str()).or_default() += 1;
            }
            json!({
                "second": sec,
                "phase": ss[0].phase,
                "requests": ss.len(),
                "success_rate": ok as f64 / ss.len() as f64,
                "latency_p50_ms": percentile(&lat, 0.5),
                "latency_p99_ms": percentile(&lat, 0.99),
                "served_by": targets,
            })
        })
        .collect();
    // Time until all traffic had left the faulty provider: the last request sent
    // during the fault that it still served.
    let last_on_faulty = samples
        .iter()
        .filter(|s| s.at >= fault_at && s.at < restore_at && s.ok && on_faulty(s))
        .map(|s| s.at)
        .fold(None, |acc: Option<f64>, x| {
            Some(acc.map_or(x, |a| a.max(x)))
        });
    let switch_s = last_on_faulty.map_or(0.0, |t| t - fault_at);
    let back = samples
        .iter()
        .find(|s| s.at >= restore_at && s.ok && on_faulty(s))
        .map(|s| s.at - restore_at);
    let errors: Vec<&Sample> = samples.iter().filter(|s| !s.ok).collect();
    let mut examples: Vec<String> = errors.iter().filter_map(|s| s.error.clone()).collect();
    examples.dedup();
    examples.truncate(5);
    let mut lat: Vec<f64> = samples.iter().map(|s| s.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    json!({
        "route": plan.route,
        "provider": plan.provider,
        "fault": plan.fault,
        "rps": plan.rps,
        "phases_s": {"baseline": plan.warmup.as_secs_f64(), "fault": plan.duration.as_secs_f64(), "recovery": plan.recovery.as_secs_f64()},
        "requests": samples.len(),
        "streaming_requests": samples.iter().filter(|s| s.stream).count(),
        "client_visible_errors": errors.len(),
        "client_visible_errors_during_fault": errors.iter().filter(|s| s.phase == "fault").count(),
        "error_examples": examples,
        "latency_p50_ms": percentile(&lat, 0.5),
        "latency_p99_ms": percentile(&lat, 0.99),
        "time_to_move_off_faulty_provider_s": switch_s,
        "time_to_return_after_restore_s": back,
        "per_second": per_second,
    })
}

/// The report as Markdown.
pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# Drill report: route `{}`, fault {} on provider `{}`\n\n",
        r["route"].as_str().unwrap_or(""),
        r["fault"],
        r["provider"].as_str().unwrap_or("")
    ));
    s.push_str(&format!(
        "- load: {} req/s, {} requests ({} streaming)\n- phases: baseline {}s, fault {}s, recovery {}s\n",
        r["rps"], r["requests"], r["streaming_requests"], r["phases_s"]["baseline"], r["phases_s"]["fault"], r["phases_s"]["recovery"]
    ));
    s.push_str(&format!(
        "- client-visible errors: {} ({} during the fault)\n- latency p50 {:.2} ms, p99 {:.2} ms\n",
        r["client_visible_errors"],
        r["client_visible_errors_during_fault"],
        r["latency_p50_ms"].as_f64().unwrap_or(0.0),
        r["latency_p99_ms"].as_f64().unwrap_or(0.0)
    ));
    s.push_str(&format!(
        "- time until all traffic had left the provider: {:.2} s\n- time until it served again after the restore: {}\n\n",
        r["time_to_move_off_faulty_provider_s"].as_f64().unwrap_or(0.0),
        r["time_to_return_after_restore_s"].as_f64().map_or("never".to_string(), |t| format!("{t:.2} s"))
    ));
    if let Some(ex) = r["error_examples"].as_array().filter(|a| !a.is_empty()) {
        s.push_str("Errors seen:\n");
        for e in ex {
            s.push_str(&format!("- {}\n", e.as_str().unwrap_or("")));
        }
        s.push('\n');
    }
    s.push_str("| second | phase | requests | success | p50 ms | p99 ms | served by |\n|---:|---|---:|---:|---:|---:|---|\n");
    for row in r["per_second"].as_array().into_iter().flatten() {
        let served: Vec<String> = row["served_by"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {:.0}% | {:.2} | {:.2} | {} |\n",
            row["second"],
            row["phase"].as_str().unwrap_or(""),
            row["requests"],
            row["success_rate"].as_f64().unwrap_or(0.0) * 100.0,
            row["latency_p50_ms"].as_f64().unwrap_or(0.0),
            row["latency_p99_ms"].as_f64().unwrap_or(0.0),
            served.join(", ")
        ));
    }
    s
}
