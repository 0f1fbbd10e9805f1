//! The matcher: pairs opposite PENDING bets of equal stake in a round.
//!
//! The original design locked one bet and looked for an opponent with `SKIP
//! LOCKED`; two opposite bets whose jobs ran at once skipped each other and both
//! stayed PENDING forever. Here all matching of a round is serialised on a
//! per-round advisory lock (the same lock close, settle and void take), and a
//! job matches its bet's whole (round, stake) group in one transaction. So
//! whichever job runs second sees the first bet committed, and batches of
//! bets match in one round trip.
//!
//! Pairing is greedy, oldest first: each bet takes the oldest unmatched
//! opposite bet of another user. After it, no opposite pair of different users
//! is left unmatched in the batch (if X and a later Y were both left, Y would
//! have taken X). Batches are bounded, with at most `PER_USER` bets of one user
//! per side, so every user with a bet on a side is represented in a batch as
//! long as there are fewer than BATCH/PER_USER such users, and at least two
//! users are whenever two exist: a batch that pairs nothing therefore proves
//! that no matchable pair exists in the group. Matching moves no money.

use std::{collections::HashMap, sync::Arc};

use betting_db::{ChangedBet, StoreError};
use betting_domain::{RoundStatus, Side};
use betting_jobs::{JobKind, MatchJob, store_failure};
use betting_queue::{Handler, Job, JobError};
use betting_streams::BetNote;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

/// Bets read per side per batch.
const BATCH: i64 = 500;
/// At most this many of one user's bets per side per batch, so that one user
/// with many bets (who cannot be matched with themselves) never crowds the
/// others out of a batch. Must be below `BATCH`.
const PER_USER: i64 = 50;
// The proof above needs room for two users in a batch.
const _: () = assert!(PER_USER < BATCH && PER_USER >= 1);

/// A PENDING bet as the matcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub bet_id: Uuid,
    pub user_id: i64,
    pub side: Side,
}

/// Pairs candidates given oldest first; returns (side A bet, side B bet) pairs.
pub fn pair_oldest_first(candidates: &[Candidate]) -> Vec<(Uuid, Uuid)> {
    let mut waiting_a: Vec<Candidate> = Vec::new();
    let mut waiting_b: Vec<Candidate> = Vec::new();
    let mut pairs = Vec::new();
    for bet in candidates {
        let (opposite, own) = match bet.side {
            Side::A => (&mut waiting_b, &mut waiting_a),
            Side::B => (&mut waiting_a, &mut waiting_b),
        };
        // Never against themselves.
        match opposite.iter().position(|o| o.user_id != bet.user_id) {
            Some(i) => {
                let other = opposite.remove(i);
                pairs.push(match bet.side {
                    Side::A => (bet.bet_id, other.bet_id),
                    Side::B => (other.bet_id, bet.bet_id),
                });
            }
            None => own.push(*bet),
        }
    }
    pairs
}

/// The bet a match job names, as read, and whether its group has work.
#[derive(sqlx::FromRow)]
struct JobBet {
    round_id: String,
    amount: Decimal,
    work: bool,
}

/// What one matching transaction did.
struct Batch {
    pairs: usize,
    /// It read every PENDING bet of the group.
    complete: bool,
    /// Its lock dropped candidates its read had chosen (a cancel or refund
    /// moved them out of PENDING while it waited for them, and the read's
    /// LIMIT is not run again), or it found a side empty that has PENDING
    /// bets: what it read proves nothing about the rest of the group.
    disturbed: bool,
}

/// A PENDING bet of a batch, as read (locked).
#[derive(sqlx::FromRow)]
struct Queued {
    created_at: chrono::DateTime<chrono::Utc>,
    bet_id: Uuid,
    user_id: i64,
    #[sqlx(try_from = "String")]
    side: Side,
    /// How many bets of its side the inner read chose (before the lock
    /// dropped any).
    chosen: i64,
}

#[derive(Clone)]
pub struct Matcher {
    pool: PgPool,
    publisher: Option<betting_streams::Publisher>,
    batch: i64,
    per_user: i64,
    waiting: Arc<Waiting>,
}

/// A (round, stake) group.
type Group = (String, Decimal);

/// Group runs of this process that have not read their candidates yet, per
/// group: a job that finds one needs no run of its own.
///
/// A job is taken after its bets were committed (PlaceBet enqueues after
/// its commit), and a run that has not read yet reads after it, so that
/// run sees the job's bets and matches them as this job's own run would.
/// Under load the placing batches enqueue a job per batch for the same hot
/// group, and each of them waited for the round's lock (holding a
/// connection) to run a transaction that mostly found its bets matched
/// already: now one waits and the others are done at once. If the waiting
/// run then fails, its job is retried (or redelivered after its lease) and
/// reads later still; if it is dead-lettered, the reconciler enqueues the
/// group's PENDING bets again. Matching moves no money.
#[derive(Default)]
struct Waiting(std::sync::Mutex<HashMap<Group, usize>>);

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Group, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has(&self, group: &Group) -> bool {
        self.lock().get(group).is_some_and(|n| *n > 0)
    }

    /// Registers a run until its guard drops (right before its first read).
    fn enter(self: &Arc<Self>, group: Group) -> WaitGuard {
        *self.lock().entry(group.clone()).or_default() += 1;
        WaitGuard {
            waiting: self.clone(),
            group,
        }
    }
}

struct WaitGuard {
    waiting: Arc<Waiting>,
    group: Group,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock();
        if let Some(n) = waiting.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.group);
            }
        }
    }
}

impl Matcher {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            publisher: None,
            batch: BATCH,
            per_user: PER_USER,
            waiting: Arc::default(),
        }
    }

    /// Smaller batches, for tests of the batch boundaries. `per_user` must be
    /// below `batch` (then a batch that pairs nothing proves no pair exists).
    pub fn with_batch(mut self, batch: i64, per_user: i64) -> Self {
        self.batch = batch.max(2);
        self.per_user = per_user.clamp(1, self.batch - 1);
        self
    }

    /// Announces matches to live streams.
    pub fn with_publisher(mut self, publisher: betting_streams::Publisher) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// Matches the group of one bet; returns how many pairs were made.
    ///
    /// A job names one bet, but since group commit it stands for every bet
    /// that became PENDING in the same statement: PlaceBet enqueues one job
    /// per (round, stake) group of a batch, named after its first bet. So
    /// the group is matched when the named bet is still PENDING, and also
    /// when it is not but the group still has PENDING bets on both sides
    /// (the named bet was cancelled before the matcher came, say). A bet
    /// that moved on because a group run matched it needs nothing more: that
    /// run began after the bet's commit, so after its batch-mates' too, and
    /// matched every pair it could.
    #[tracing::instrument(name = "match.group", skip(self), fields(bet_id = %bet))]
    pub async fn match_bet(&self, bet: Uuid) -> Result<usize, StoreError> {
        let row: Option<JobBet> = sqlx::query_as(
            "SELECT b.round_id, b.amount, ( \
               b.status = 'PENDING' OR ( \
                 EXISTS (SELECT 1 FROM bets p WHERE p.round_id = b.round_id \
                         AND p.status = 'PENDING' AND p.amount = b.amount AND p.side = 'A') \
                 AND EXISTS (SELECT 1 FROM bets p WHERE p.round_id = b.round_id \
                         AND p.status = 'PENDING' AND p.amount = b.amount AND p.side = 'B')) \
             ) AS work FROM bets b WHERE b.bet_id = $1",
        )
        .bind(bet)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            // A run of the group that has not read yet will match this
            // job's bets (`Waiting`).
            Some(bet) if bet.work && self.waiting.has(&(bet.round_id.clone(), bet.amount)) => {
                metrics::counter!("match_jobs_coalesced_total").increment(1);
                Ok(0)
            }
            Some(bet) if bet.work => self.match_group(&bet.round_id, bet.amount).await,
            // Gone, or matched, cancelled or refunded meanwhile with nothing
            // left to pair: nothing to do.
            _ => Ok(0),
        }
    }

    /// Matches every matchable pair of a (round, stake) group.
    pub async fn match_group(&self, round: &str, amount: Decimal) -> Result<usize, StoreError> {
        let mut total = 0;
        // Registered until the first batch reads its candidates.
        let mut waiting = Some(self.waiting.enter((round.to_owned(), amount)));
        loop {
            let batch = self.match_batch(round, amount, waiting.take()).await?;
            total += batch.pairs;
            // A batch that pairs nothing proves no pair is left; so does one
            // that read every PENDING bet of the group (no side cut short by
            // the batch size or the per-user bound): greedy pairing leaves no
            // matchable pair among what it read. Neither holds of a batch
            // whose lock dropped candidates: it read less than the oldest
            // of the group (and each such batch saw a bet leave PENDING for
            // good, or a new one come, so the loop ends).
            if !batch.disturbed && (batch.pairs == 0 || batch.complete) {
                return Ok(total);
            }
        }
    }

    /// One matching transaction; `waiting` (the run's registration, on its
    /// first batch) ends right before the candidates are read.
    async fn match_batch(
        &self,
        round: &str,
        amount: Decimal,
        waiting: Option<WaitGuard>,
    ) -> Result<Batch, StoreError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        betting_db::lock_round(&mut tx, round).await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM rounds WHERE round_id = $1")
                .bind(round)
                .fetch_optional(&mut *tx)
                .await?;
        let status = status
            .map(RoundStatus::try_from)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if status != Some(RoundStatus::Open) {
            // Closed, settled or voided rounds refund their unmatched bets instead.
            return Ok(Batch {
                pairs: 0,
                complete: true,
                disturbed: false,
            });
        }
        // From here on, a job taken now is not sure to be seen by this read
        // (its bets may commit after the read's snapshot): it runs itself.
        drop(waiting);
        // The oldest of each side, locked: a cancel or timeout racing us waits,
        // then finds the bet no longer PENDING (or we find it gone).
        let mut rows: Vec<Queued> = Vec::new();
        let mut complete = true;
        let mut disturbed = false;
        for side in [Side::A, Side::B] {
            let read = rows.len();
            rows.extend(
                sqlx::query_as::<_, Queued>(
                    // The outer read locks the chosen bets by primary key
                    // and checks again, on the row it locked, that each is
                    // still PENDING: against the status the inner read saw
                    // (a join condition, so no partial index is read for
                    // it: `betting_db::from_status`).
                    // `chosen` is how many the inner read chose: the lock
                    // drops a bet that left PENDING while it waited, after
                    // the LIMIT.
                    "SELECT b.created_at, b.bet_id, b.user_id, b.side, c.chosen FROM bets b JOIN ( \
                       SELECT bet_id, status, least(count(*) OVER (), $4) AS chosen FROM ( \
                         SELECT bet_id, status, created_at, row_number() OVER \
                           (PARTITION BY user_id ORDER BY created_at, bet_id) AS nth \
                         FROM bets \
                         WHERE round_id = $1 AND amount = $2 AND status = 'PENDING' AND side = $3 \
                       ) ranked WHERE nth <= $5 ORDER BY created_at, bet_id LIMIT $4) c \
                     ON b.bet_id = c.bet_id AND b.status = c.status \
                     ORDER BY b.created_at, b.bet_id FOR UPDATE OF b",
                )
                .bind(round)
                .bind(amount)
                .bind(side.as_db())
                .bind(self.batch)
                .bind(self.per_user)
                .fetch_all(&mut *tx)
                .await?,
            );
            // Cut short by the batch size, or some user by the per-user
            // bound: more PENDING bets of this side may exist.
            let side_rows = &rows[read..];
            let chosen = side_rows.first().map_or(0, |bet| bet.chosen);
            if (side_rows.len() as i64) < chosen {
                disturbed = true;
            } else if side_rows.is_empty() {
                // Every chosen bet dropped, or none there: ask again.
                let left: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM bets WHERE round_id = $1 AND amount = $2 \
                       AND status = 'PENDING' AND side = $3)",
                )
                .bind(round)
                .bind(amount)
                .bind(side.as_db())
                .fetch_one(&mut *tx)
                .await?;
                disturbed |= left;
            }
            let mut per_user: std::collections::HashMap<i64, i64> = Default::default();
            for bet in side_rows {
                *per_user.entry(bet.user_id).or_default() += 1;
            }
            if side_rows.len() as i64 >= self.batch
                || per_user.values().any(|&n| n >= self.per_user)
            {
                complete = false;
            }
        }
        rows.sort_by_key(|bet| (bet.created_at, bet.bet_id));
        let candidates: Vec<Candidate> = rows
            .into_iter()
            .map(|bet| Candidate {
                bet_id: bet.bet_id,
                user_id: bet.user_id,
                side: bet.side,
            })
            .collect();
        let pairs = pair_oldest_first(&candidates);
        if pairs.is_empty() {
            return Ok(Batch {
                pairs: 0,
                complete,
                disturbed,
            });
        }
        let match_ids: Vec<Uuid> = pairs.iter().map(|_| Uuid::now_v7()).collect();
        let a_ids: Vec<Uuid> = pairs.iter().map(|p| p.0).collect();
        let b_ids: Vec<Uuid> = pairs.iter().map(|p| p.1).collect();
        sqlx::query(
            "INSERT INTO matches (match_id, round_id, bet_a_id, bet_b_id, amount) \
             SELECT m, $4, a, b, $5 FROM UNNEST($1::UUID[], $2::UUID[], $3::UUID[]) AS t(m, a, b)",
        )
        .bind(&match_ids)
        .bind(&a_ids)
        .bind(&b_ids)
        .bind(round)
        .bind(amount)
        .execute(&mut *tx)
        .await?;
        // The time of the write, not the transaction's start (`now()`),
        // which came before the wait for the round's lock: a bet placed
        // during that wait must not look matched before it was placed.
        let updated: Vec<ChangedBet> = sqlx::query_as(
            "UPDATE bets SET status = 'MATCHED', match_id = t.m, version = version + 1, \
               updated_at = clock_timestamp() \
             FROM UNNEST($1::UUID[] || $1::UUID[], $2::UUID[] || $3::UUID[], $4::TEXT[]) \
               AS t(m, b, from_status) \
             WHERE bets.bet_id = t.b AND bets.status = t.from_status \
             RETURNING bets.user_id, bets.bet_id, bets.round_id, bets.version",
        )
        .bind(&match_ids)
        .bind(&a_ids)
        .bind(&b_ids)
        // By primary key only: `betting_db::from_status`.
        .bind(betting_db::from_status(
            2 * pairs.len(),
            betting_domain::BetStatus::Pending.as_db(),
        ))
        .fetch_all(&mut *tx)
        .await?;
        if updated.len() != 2 * pairs.len() {
            // Every row was locked above, so this cannot happen; refuse to
            // commit a half-made match if it ever does.
            return Err(StoreError::Corrupt(format!(
                "matched {} bets for {} pairs in round {round}",
                updated.len(),
                pairs.len()
            )));
        }
        tx.commit().await?;
        metrics::counter!("bets_matched_total").increment(2 * pairs.len() as u64);
        if let Some(publisher) = &self.publisher {
            publisher
                .bets(
                    updated
                        .into_iter()
                        .map(|b| BetNote::changed(b.user_id, b.bet_id, b.round_id, b.version))
                        .collect(),
                )
                .await;
        }
        tracing::debug!(round, %amount, pairs = pairs.len(), "matched");
        Ok(Batch {
            pairs: pairs.len(),
            complete,
            disturbed,
        })
    }
}

/// The match queue's handler: `match:{bet_id}` matches the bet's group.
pub struct MatchHandler {
    matcher: Matcher,
}

impl MatchHandler {
    pub fn new(matcher: Matcher) -> Self {
        Self { matcher }
    }
}

impl Handler for MatchHandler {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        let job = MatchJob::decode(job)?;
        self.matcher
            .match_bet(job.bet_id)
            .await
            .map(|_| ())
            .map_err(store_failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bet(n: u128, user: i64, side: Side) -> Candidate {
        Candidate {
            bet_id: Uuid::from_u128(n),
            user_id: user,
            side,
        }
    }

    #[test]
    fn pairs_oldest_first_and_never_self() {
        let bets = [
            bet(1, 7, Side::A),
            bet(2, 7, Side::B), // same user as 1: skipped
            bet(3, 8, Side::B), // takes 1
            bet(4, 9, Side::A), // takes 2
            bet(5, 9, Side::B), // only 4's user on A side left? no: 4 is taken; waits
        ];
        let pairs = pair_oldest_first(&bets);
        assert_eq!(
            pairs,
            vec![
                (Uuid::from_u128(1), Uuid::from_u128(3)),
                (Uuid::from_u128(4), Uuid::from_u128(2)),
            ]
        );
    }

    #[test]
    fn leaves_no_matchable_pair() {
        // Exhaustive over small sequences: after pairing, no unmatched A and B
        // of different users remain.
        let users = [1_i64, 2, 3];
        for n in 1..=7_u32 {
            for code in 0..(6_u32.pow(n)) {
                let mut c = code;
                let bets: Vec<Candidate> = (0..n)
                    .map(|i| {
                        let side = if c % 2 == 0 { Side::A } else { Side::B };
                        let user = users[((c / 2) % 3) as usize];
                        c /= 6;
                        bet(u128::from(i), user, side)
                    })
                    .collect();
                let pairs = pair_oldest_first(&bets);
                let used: std::collections::HashSet<Uuid> =
                    pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
                let left: Vec<&Candidate> =
                    bets.iter().filter(|b| !used.contains(&b.bet_id)).collect();
                for x in &left {
                    for y in &left {
                        assert!(
                            !(x.side != y.side && x.user_id != y.user_id),
                            "matchable pair left in {bets:?}"
                        );
                    }
                }
                for (a, b) in &pairs {
                    let a = bets.iter().find(|x| x.bet_id == *a).expect("a");
                    let b = bets.iter().find(|x| x.bet_id == *b).expect("b");
                    assert_eq!((a.side, b.side), (Side::A, Side::B));
                    assert_ne!(a.user_id, b.user_id);
                }
            }
        }
    }
}
