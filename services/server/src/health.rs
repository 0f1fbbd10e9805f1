//! `grpc.health.v1.Health`: SERVING only while PostgreSQL and Redis both answer.

use std::{sync::Arc, time::Duration};

use betting_shutdown::Shutdown;
use tonic_health::{ServingStatus, server::HealthReporter};

#[derive(Default)]
struct Published {
    last: Option<ServingStatus>,
    shutting_down: bool,
}

#[derive(Clone)]
pub struct HealthWatch {
    reporter: HealthReporter,
    services: Arc<Vec<&'static str>>,
    pool: sqlx::PgPool,
    redis: fred::prelude::Client,
    /// The status last published. Publishing wakes every `Watch` stream,
    /// even with an unchanged status: publish changes only, or 10,000
    /// anonymous watchers cost 10,000 messages a second.
    /// Held while publishing, so two publishers cannot interleave.
    /// Once shutting down, nothing publishes SERVING again (a probe that
    /// finishes after the signal must not undo it).
    published: Arc<tokio::sync::Mutex<Published>>,
}

impl HealthWatch {
    pub fn new(
        reporter: HealthReporter,
        services: Vec<&'static str>,
        pool: sqlx::PgPool,
        redis: fred::prelude::Client,
    ) -> Self {
        Self {
            reporter,
            services: Arc::new(services),
            pool,
            redis,
            published: Arc::default(),
        }
    }

    async fn set(&self, status: ServingStatus) {
        let mut published = self.published.lock().await;
        if published.last == Some(status)
            || (published.shutting_down && status == ServingStatus::Serving)
        {
            return;
        }
        published.last = Some(status);
        // "" is the whole server.
        self.reporter.set_service_status("", status).await;
        for service in self.services.iter() {
            self.reporter.set_service_status(*service, status).await;
        }
    }

    /// Probes both stores once and publishes the result.
    pub async fn check_once(&self) -> bool {
        let probe = Duration::from_secs(2);
        let (db, redis) = tokio::join!(
            tokio::time::timeout(probe, betting_db::ping(&self.pool)),
            tokio::time::timeout(probe, betting_queue::ping(&self.redis)),
        );
        let db = db.unwrap_or(false);
        let redis = redis.unwrap_or(false);
        let healthy = db && redis;
        self.set(if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        })
        .await;
        if !healthy {
            tracing::warn!(postgres = db, redis, "not serving: a store is unreachable");
        }
        healthy
    }

    pub async fn shutting_down(&self) {
        self.published.lock().await.shutting_down = true;
        self.set(ServingStatus::NotServing).await;
    }

    pub async fn run(self, every: Duration, stop: Shutdown) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.signalled() => return,
            }
            if stop.is_signalled() {
                return;
            }
            self.check_once().await;
        }
    }
}
