//! Active health checks: each provider with `health_check` set is probed on its
//! schedule, and each result counts for the breakers of every target on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Gateway;
use crate::backend::ProviderState;

/// Runs the providers' active health checks (those with `health_check` set) for
/// the life of the gateway; each result counts for the breakers of every target
/// on that provider. Follows reloads: the schedule is read from the current
/// snapshot every tick.
pub fn spawn_health_checks(gw: Arc<Gateway>) -> tokio::task::JoinHandle<()> {
    crate::task::spawn("health-checks", async move {
        let mut last: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let snap = gw.snapshot();
            for (id, p) in &snap.config.providers {
                let Some(every) = p.health_check else {
                    continue;
                };
                if last.get(id).is_some_and(|t| t.elapsed() < every) {
                    continue;
                }
                last.insert(id.clone(), Instant::now());
                let Some(ProviderState::Ready(provider)) = snap.providers.get(id).cloned() else {
                    continue;
                };
                let (gw, snap, id) = (gw.clone(), snap.clone(), id.clone());
                crate::task::spawn("health-check", async move {
                    let Some(check) = provider.health() else {
                        return;
                    };
                    let result = check.await;
                    let failed = result.is_err();
                    gw.metrics.health_check(&id, failed);
                    if let Err(e) = &result {
                        tracing::warn!(provider = %id, kind = e.kind.as_str(), error = %crate::server::LogSafe(&e.message), "health check failed");
                    }
                    // Once per target: a target shared by several routes or arms
                    // has one `Health`, and one check is one observation of it.
                    let mut seen = std::collections::HashSet::new();
                    for route in snap.routes() {
                        for t in route.targets() {
                            if *t.provider_id == *id && seen.insert(t.id.clone()) {
                                let state = t.health.record(&snap.breaker, failed);
                                t.metrics(&gw.metrics).breaker(state);
                            }
                        }
                    }
                });
            }
        }
    })
}
