//! GetRound's totals, computed once per change of the round rather than once
//! per call.
//!
//! A round's totals take several aggregate statements over its bets and
//! matches; twenty clients polling GetRound on a 5,000-bet round used to run
//! them twenty times over, for the same answer. The cache keeps, per round,
//! the last totals and a hub registration made *before* they were computed:
//! any change of the round's bets or status after that point leaves a note
//! there, and a note (or a lagged registration) makes the next caller
//! recompute. Callers of one round queue on the round's slot, so N
//! concurrent callers cause one computation (single flight), and at most one
//! computation per round runs at a time, whatever the load.
//!
//! Staleness, bounded:
//! - changes made by this process reach its hub before their request
//!   answers (`Publisher` routes locally), so a client reads its own writes;
//! - changes made elsewhere arrive by pub/sub (milliseconds) or, if a note is
//!   lost, by the hub's sweep (about a second);
//! - what no note announces (a refund's wallet command completing, which
//!   `outstanding_jobs` counts) is recomputed after [`MAX_AGE`] at the most.
//!
//! Memory: at most [`MAX_ROUNDS`] rounds, each one hub registration; rounds
//! not asked about for [`IDLE`] are dropped first, and past the cap a call is
//! simply computed without caching. No row is written: nothing here
//! serialises PlaceBets (a maintained stats row per round would be a hot row).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use betting_domain::{RoundId, RoundStatus};
use betting_streams::{Hub, Subscription};

use crate::RoundTotals;

/// The longest cached totals are served without a note saying they changed.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// Rounds whose totals are cached at once.
const MAX_ROUNDS: usize = 1024;
/// A round nobody asked about for this long gives its place up first.
const IDLE: Duration = Duration::from_secs(30);

struct Slot {
    /// Notes of the round since the cached totals were computed.
    sub: Subscription,
    /// The totals, the round's status they were computed for, and when their
    /// computation started.
    cached: Option<(RoundTotals, RoundStatus, Instant)>,
}

struct Entry {
    slot: Arc<tokio::sync::Mutex<Slot>>,
    used: Instant,
}

/// The per-round totals cache. Cheap to clone.
#[derive(Clone)]
pub(crate) struct StatsCache {
    hub: Option<Hub>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    computations: Arc<AtomicU64>,
}

impl StatsCache {
    /// A cache fed by `hub`'s notes; without a hub nothing is cached.
    pub fn new(hub: Option<Hub>) -> Self {
        Self {
            hub,
            entries: Arc::default(),
            computations: Arc::default(),
        }
    }

    /// Totals computed so far (cache misses).
    pub fn computations(&self) -> u64 {
        self.computations.load(Ordering::Relaxed)
    }

    /// The round's totals for a row read with `status`: cached if nothing
    /// changed since they were computed, else `compute`d (once, however many
    /// callers ask meanwhile).
    pub async fn totals<E, F>(
        &self,
        round: &RoundId,
        status: RoundStatus,
        compute: impl FnOnce() -> F,
    ) -> Result<RoundTotals, E>
    where
        F: Future<Output = Result<RoundTotals, E>>,
    {
        let Some(slot) = self.slot(round) else {
            self.computations.fetch_add(1, Ordering::Relaxed);
            return compute().await;
        };
        let mut slot = slot.lock().await;
        let mut changed = slot.sub.take_lagged();
        while slot.sub.try_recv().is_some() {
            changed = true;
        }
        if let Some((totals, cached_status, at)) = &slot.cached
            && !changed
            && *cached_status == status
            && at.elapsed() < MAX_AGE
        {
            return Ok(totals.clone());
        }
        // Notes from here on are of changes this computation may miss: they
        // stay in the registration for the next caller.
        let started = Instant::now();
        self.computations.fetch_add(1, Ordering::Relaxed);
        slot.cached = None;
        let totals = compute().await?;
        slot.cached = Some((totals.clone(), status, started));
        Ok(totals)
    }

    /// The round's slot, made (and registered with the hub) if it is new;
    /// `None` when nothing is cached (no hub, or every place taken).
    fn slot(&self, round: &RoundId) -> Option<Arc<tokio::sync::Mutex<Slot>>> {
        let hub = self.hub.as_ref()?;
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if let Some(entry) = entries.get_mut(round.as_str()) {
            entry.used = now;
            return Some(entry.slot.clone());
        }
        if entries.len() >= MAX_ROUNDS {
            entries.retain(|_, e| now.duration_since(e.used) < IDLE);
            if entries.len() >= MAX_ROUNDS {
                return None;
            }
        }
        let slot = Arc::new(tokio::sync::Mutex::new(Slot {
            sub: hub.watch_round_changes(round.as_str()),
            cached: None,
        }));
        entries.insert(
            round.to_string(),
            Entry {
                slot: slot.clone(),
                used: now,
            },
        );
        Some(slot)
    }
}
