//! The betting role's recovery pass: PLACING bets left behind by a crash or
//! an outage of an older release, which placed bets in three steps (this one
//! places a bet and its stake in one transaction and writes no PLACING row),
//! older than a grace period, are driven forward through the same
//! idempotent saga a client retry would run ([`BettingService::complete`]), so
//! each ends PENDING with its stake held or REJECTED with nothing debited.
//!
//! Everything else that re-derives work from PostgreSQL (match jobs, refunds,
//! payouts) is the reconciler's (`betting-reconciler`).

use std::time::Duration;

use betting_shutdown::Shutdown;

use crate::{BettingError, BettingService};

#[derive(Debug, Clone)]
pub struct RecoverySettings {
    /// Time between passes.
    pub interval: Duration,
    /// How old a PLACING bet must be before the pass takes it over from the
    /// request that wrote it.
    pub placing_grace: Duration,
    /// Bets per pass.
    pub batch: i64,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            placing_grace: Duration::from_secs(10),
            batch: 500,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Bets resolved: now PENDING or REJECTED.
    pub recovered: usize,
    pub failures: usize,
}

impl BettingService {
    /// One recovery pass.
    pub async fn recover(&self, settings: &RecoverySettings) -> PassReport {
        let mut report = PassReport::default();
        let rows = match self
            .store()
            .stale_placing(settings.placing_grace, settings.batch)
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "could not read placing bets");
                report.failures += 1;
                return report;
            }
        };
        for row in rows {
            let bet_id = row.bet_id;
            match self.complete(row, true).await {
                // A rejection is a resolution too.
                Ok(_) | Err(BettingError::InsufficientFunds) => report.recovered += 1,
                Err(error) => {
                    report.failures += 1;
                    tracing::warn!(%bet_id, %error, "placing bet not recovered yet");
                }
            }
        }
        if report != PassReport::default() {
            tracing::info!(?report, "recovery pass");
        }
        report
    }

    /// Runs passes until `shutdown` is signalled.
    pub async fn run_recovery(self, settings: RecoverySettings, shutdown: Shutdown) {
        let mut ticker = tokio::time::interval(settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.recover(&settings).await; }
                () = shutdown.signalled() => break,
            }
            if shutdown.is_signalled() {
                break;
            }
        }
    }
}
