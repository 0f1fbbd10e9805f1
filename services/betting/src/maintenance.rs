//! The betting role's background pass: it finishes what requests left
//! unfinished, so that no crash, outage or lost Redis job strands a bet or a
//! cent.
//!
//! - PLACING bets older than a grace period are driven forward through the
//!   same idempotent saga a retry would run ([`BettingService::complete`]).
//! - Wallet commands not yet carried out are carried out.
//! - PENDING bets are handed to the matcher queue again; the queue drops
//!   duplicates, so this re-derives lost jobs after a Redis flush.

use std::time::Duration;

use tokio::sync::watch;

use crate::BettingService;

#[derive(Debug, Clone)]
pub struct MaintenanceSettings {
    /// Time between passes.
    pub interval: Duration,
    /// How old a PLACING bet must be before the pass takes it over from the
    /// request that wrote it.
    pub placing_grace: Duration,
    /// How old a PENDING bet must be before the pass re-enqueues it.
    pub sweep_after: Duration,
    /// Rows per step per pass.
    pub batch: i64,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            placing_grace: Duration::from_secs(10),
            sweep_after: Duration::from_secs(5),
            batch: 500,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub recovered: usize,
    pub commands: usize,
    pub requeued: usize,
    pub failures: usize,
}

impl BettingService {
    /// One maintenance pass.
    pub async fn maintain(&self, settings: &MaintenanceSettings) -> PassReport {
        let mut report = PassReport::default();

        match self
            .store()
            .stale_placing(settings.placing_grace, settings.batch)
            .await
        {
            Ok(rows) => {
                for row in rows {
                    let bet_id = row.bet_id;
                    match self.complete(row, true).await {
                        Ok(_) => report.recovered += 1,
                        // A rejection is a resolution too.
                        Err(crate::BettingError::InsufficientFunds) => report.recovered += 1,
                        Err(error) => {
                            report.failures += 1;
                            tracing::warn!(%bet_id, %error, "placing bet not recovered yet");
                        }
                    }
                }
            }
            Err(error) => {
                report.failures += 1;
                tracing::warn!(%error, "could not read placing bets");
            }
        }

        match self
            .store()
            .due_commands(Duration::from_secs(1), settings.batch)
            .await
        {
            Ok(commands) => {
                for command in commands {
                    match self.execute(&command).await {
                        Ok(_) => report.commands += 1,
                        Err(error) => {
                            report.failures += 1;
                            tracing::warn!(key = %command.idempotency_key, %error, "wallet command not carried out yet");
                        }
                    }
                }
            }
            Err(error) => {
                report.failures += 1;
                tracing::warn!(%error, "could not read wallet commands");
            }
        }

        match self
            .store()
            .pending_older_than(settings.sweep_after, settings.batch)
            .await
        {
            Ok(pending) => {
                for (bet_id, round_id) in pending {
                    let (id, payload) = crate::match_job(bet_id, &round_id);
                    match self.match_queue().enqueue(&id, payload).await {
                        Ok(true) => report.requeued += 1,
                        Ok(false) => {}
                        Err(error) => {
                            report.failures += 1;
                            tracing::warn!(%error, "match queue unavailable");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                report.failures += 1;
                tracing::warn!(%error, "could not read pending bets");
            }
        }

        if report != PassReport::default() {
            tracing::info!(?report, "maintenance pass");
        }
        report
    }

    /// Runs passes until `shutdown` flips to true.
    pub async fn run_maintenance(
        self,
        settings: MaintenanceSettings,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.maintain(&settings).await; }
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }
}
