//! Bets in PostgreSQL.

use std::time::Duration;

use betting_db::{ChangedBet, NullableText, StoreError};
use betting_domain::{
    Amount, BetId, BetResult, BetStatus, IdempotencyKey, RefundReason, RoundId, RoundStatus, Side,
    Stake, UserId,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use betting_streams::BetNote;

/// A bet as stored, decoded: a value its type refuses fails the read
/// ([`StoreError::Corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BetRow {
    pub bet_id: Uuid,
    #[sqlx(try_from = "i64")]
    pub user_id: UserId,
    pub idempotency_key: String,
    pub round_id: String,
    #[sqlx(try_from = "String")]
    pub side: Side,
    #[sqlx(try_from = "Decimal")]
    pub amount: Amount,
    #[sqlx(try_from = "String")]
    pub status: BetStatus,
    pub reject_reason: Option<String>,
    pub match_id: Option<Uuid>,
    #[sqlx(try_from = "NullableText")]
    pub result: Option<BetResult>,
    pub payout: Option<Decimal>,
    #[sqlx(try_from = "NullableText")]
    pub refund_reason: Option<RefundReason>,
    pub balance_after: Option<Decimal>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl BetRow {
    pub fn id(&self) -> BetId {
        BetId::from(self.bet_id)
    }

    /// Whether a retry asks for the same bet as this one.
    pub fn same_request(&self, round: &RoundId, side: Side, amount: Amount) -> bool {
        self.round_id == round.as_str() && self.side == side && self.amount == amount
    }
}

macro_rules! bet_columns {
    () => {
        "bet_id, user_id, idempotency_key, round_id, side, amount, status, reject_reason, \
         match_id, result, payout, refund_reason, balance_after, version, created_at, updated_at"
    };
}

/// A new bet to place (`placer.rs`, the wallet's PlaceStakes).
#[derive(Debug, Clone)]
pub struct NewBet {
    pub bet: BetId,
    pub user: UserId,
    pub key: IdempotencyKey,
    pub round: RoundId,
    pub side: Side,
    pub amount: Stake,
}

impl NewBet {
    /// What the wallet is asked to place.
    pub fn placement(&self) -> betting_wallet_client::Placement<'_> {
        betting_wallet_client::Placement {
            bet: self.bet,
            user: self.user,
            amount: self.amount.amount(),
            round: &self.round,
            side: self.side,
            key: &self.key,
        }
    }

    /// The row PlaceStakes writes for this bet when it holds its stake
    /// (the wallet's `placement.rs`): PENDING at version 1, with the balance
    /// after the stake, written `at` (its `created_at` and `updated_at`).
    /// What a held outcome's `bet_written_at` vouches for, so the placer
    /// need not read it back; `place_bet_takes_the_stake_and_hands_the_bet_to_the_matcher`
    /// checks it against GetBet's row.
    pub fn written_row(&self, balance: Decimal, at: DateTime<Utc>) -> BetRow {
        BetRow {
            bet_id: self.bet.as_uuid(),
            user_id: self.user,
            idempotency_key: self.key.as_str().to_owned(),
            round_id: self.round.as_str().to_owned(),
            side: self.side,
            amount: self.amount.amount(),
            status: BetStatus::Pending,
            reject_reason: None,
            match_id: None,
            result: None,
            payout: None,
            refund_reason: None,
            balance_after: Some(balance),
            version: 1,
            created_at: at,
            updated_at: at,
        }
    }
}

#[derive(Clone)]
pub struct BetStore {
    pool: PgPool,
}

impl BetStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn find_by_key(
        &self,
        user: UserId,
        key: &IdempotencyKey,
    ) -> Result<Option<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets WHERE user_id = $1 AND idempotency_key = $2"
        ))
        .bind(user.get())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn get(&self, bet: BetId) -> Result<Option<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets WHERE bet_id = $1"
        ))
        .bind(bet.as_uuid())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The bets of these ids that exist, in any order.
    pub async fn get_many(&self, bets: &[BetId]) -> Result<Vec<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets WHERE bet_id = ANY($1)"
        ))
        .bind(bets.iter().map(BetId::as_uuid).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Writes a new PLACING bet if the round is open and the key is new, in one
    /// statement. `None` tells the caller to find out which of the two failed.
    pub async fn insert_placing(
        &self,
        bet: BetId,
        user: UserId,
        key: &IdempotencyKey,
        round: &RoundId,
        side: Side,
        amount: Stake,
    ) -> Result<Option<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "INSERT INTO bets (bet_id, user_id, idempotency_key, round_id, side, amount, status) \
             SELECT $1, $2, $3, $4, $5, $6, 'PLACING' \
             WHERE EXISTS (SELECT 1 FROM rounds WHERE round_id = $4 AND status = 'OPEN') \
             ON CONFLICT ON CONSTRAINT bets_user_key_unique DO NOTHING \
             RETURNING ",
            bet_columns!()
        ))
        .bind(bet.as_uuid())
        .bind(user.get())
        .bind(key.as_str())
        .bind(round.as_str())
        .bind(side.as_db())
        .bind(amount.as_decimal())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// How many of the user's bets are open (PLACING or PENDING), counting
    /// no further than `cap`: an index-only count over
    /// `bets_open_by_user_idx`, at most `cap` entries.
    pub async fn open_bets(&self, user: UserId, cap: u32) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM bets \
             WHERE user_id = $1 AND status IN ('PLACING', 'PENDING') LIMIT $2) open",
        )
        .bind(user.get())
        .bind(i64::from(cap))
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn round_status(&self, round: &RoundId) -> Result<Option<RoundStatus>, StoreError> {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM rounds WHERE round_id = $1")
                .bind(round.as_str())
                .fetch_optional(&self.pool)
                .await?;
        status
            .map(RoundStatus::try_from)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The database's clock (bets' `updated_at` is that clock too), read in
    /// a statement of its own before a stream's read: every change stamped
    /// before it, less the resume margin, committed before the read's
    /// snapshot was taken.
    async fn database_now(&self) -> Result<DateTime<Utc>, StoreError> {
        let (now,): (DateTime<Utc>,) = sqlx::query_as("SELECT now()").fetch_one(&self.pool).await?;
        Ok(now)
    }

    /// A stream's snapshot: the named bets if any, else the user's bets still
    /// in play and the `held` ones whatever their state (at most 2,000), and
    /// the database's time just before it.
    pub async fn watch_snapshot(
        &self,
        user: UserId,
        bet_ids: &[Uuid],
        held: &[Uuid],
    ) -> Result<(Vec<BetRow>, DateTime<Utc>), StoreError> {
        let read_at = self.database_now().await?;
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets \
             WHERE user_id = $1 AND status NOT IN ('PLACING', 'REJECTED') AND ( \
               (cardinality($2::UUID[]) > 0 AND bet_id = ANY($2)) \
               OR (cardinality($2::UUID[]) = 0 \
                   AND (status IN ('PENDING', 'MATCHED') OR bet_id = ANY($3)))) \
             ORDER BY updated_at LIMIT 2000"
        ))
        .bind(user.get())
        .bind(bet_ids)
        .bind(held)
        .fetch_all(&self.pool)
        .await?;
        Ok((rows, read_at))
    }

    /// A resume's catch-up: the user's visible bets (among `bet_ids`, if
    /// any) changed at or after `since`, oldest first, at most `limit`, and
    /// the database's time just before them.
    pub async fn watch_changes_since(
        &self,
        user: UserId,
        bet_ids: &[Uuid],
        since: DateTime<Utc>,
        limit: i64,
    ) -> Result<(Vec<BetRow>, DateTime<Utc>), StoreError> {
        let read_at = self.database_now().await?;
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets \
             WHERE user_id = $1 AND status NOT IN ('PLACING', 'REJECTED') \
               AND updated_at >= $3 \
               AND (cardinality($2::UUID[]) = 0 OR bet_id = ANY($2)) \
             ORDER BY updated_at LIMIT $4"
        ))
        .bind(user.get())
        .bind(bet_ids)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok((rows, read_at))
    }

    /// The user's visible bets among `ids`.
    pub async fn user_bets(&self, user: UserId, ids: &[Uuid]) -> Result<Vec<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets \
             WHERE bet_id = ANY($1) AND user_id = $2 AND status NOT IN ('PLACING', 'REJECTED')"
        ))
        .bind(ids)
        .bind(user.get())
        .fetch_all(&self.pool)
        .await?)
    }

    /// PLACING -> PENDING once the stake is held. `None` if the bet had already
    /// moved on (a concurrent retry or the recovery pass got there first).
    pub async fn mark_pending(
        &self,
        bet: BetId,
        balance_after: Decimal,
    ) -> Result<Option<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "UPDATE bets SET status = 'PENDING', balance_after = $2, version = version + 1, \
               updated_at = now() \
             WHERE bet_id = $1 AND status = 'PLACING' RETURNING ",
            bet_columns!()
        ))
        .bind(bet.as_uuid())
        .bind(balance_after)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// PLACING -> REJECTED when the stake cannot be taken.
    pub async fn mark_rejected(&self, bet: BetId, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE bets SET status = 'REJECTED', reject_reason = $2, updated_at = now() \
             WHERE bet_id = $1 AND status = 'PLACING'",
        )
        .bind(bet.as_uuid())
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A page of a user's visible bets, newest first, strictly before `before`.
    ///
    /// Read through the user's bets, newest first (`bets_user_idx`), until
    /// the page is full: the subquery's `OFFSET 0` keeps the planner from
    /// reading a round's bets (`bets_round_idx`) and picking the user's out
    /// of them, which it did whenever the round was newer than the table's
    /// statistics and so looked small — a hot round, every page reading the
    /// whole of it (`plans::a_players_page_of_a_round_reads_the_players_bets_not_the_rounds`).
    pub async fn list(
        &self,
        user: UserId,
        round: Option<&RoundId>,
        status: Option<BetStatus>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM (SELECT * FROM bets \
                     WHERE user_id = $1 AND ($4::UUID IS NULL OR bet_id < $4) \
                     ORDER BY bet_id DESC OFFSET 0) bets \
             WHERE status NOT IN ('PLACING', 'REJECTED') \
               AND ($2::TEXT IS NULL OR round_id = $2) \
               AND ($3::TEXT IS NULL OR status = $3) \
             ORDER BY bet_id DESC LIMIT $5"
        ))
        .bind(user.get())
        .bind(round.map(RoundId::as_str))
        .bind(status.map(BetStatus::as_db))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// PENDING -> REFUNDED (a cancel), with the refund owed recorded in the
    /// same transaction ([`betting_refunds::refund_bets`]). `None` if the bet
    /// was not PENDING (or not this user's).
    pub async fn refund_pending(
        &self,
        bet: BetId,
        owner: Option<UserId>,
        reason: RefundReason,
    ) -> Result<Option<BetRow>, StoreError> {
        let mut tx = betting_db::begin(&self.pool).await?;
        let refunded =
            betting_refunds::refund_bets(&mut tx, &[(bet, reason)], &[BetStatus::Pending], owner)
                .await?;
        if refunded.is_empty() {
            return Ok(None);
        }
        let row: BetRow = sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets WHERE bet_id = $1"
        ))
        .bind(bet.as_uuid())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    /// PLACING bets older than `age`: left behind by a crash or an outage.
    pub async fn stale_placing(
        &self,
        age: Duration,
        limit: i64,
    ) -> Result<Vec<BetRow>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            bet_columns!(),
            " FROM bets \
             WHERE status = 'PLACING' AND created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2"
        ))
        .bind(age.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// PENDING bets older than `age`, in id order (time order: ids are
    /// UUIDv7) after `after`: the matcher's work, re-derived, paged through
    /// across calls so that no bet is starved by the ones before it.
    pub async fn pending_older_than(
        &self,
        age: Duration,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<PendingBet>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT bet_id, round_id FROM bets \
             WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1) \
               AND ($2::UUID IS NULL OR bet_id > $2) \
             ORDER BY bet_id LIMIT $3",
        )
        .bind(age.as_secs_f64())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One page of the bets changed at or after `from` that streams may
    /// show, for the hubs' sweep: oldest change first, after `after` (the
    /// previous page's last change, [`ChangePage::next`]). Paged by
    /// (change time, bet id) rather than cut at a limit: one transaction
    /// stamps every bet it changes with the same time (a voided round's
    /// refunds), and a sweep cut at a limit would read the same first rows
    /// every second and never the rest.
    pub async fn changed_since(
        &self,
        from: DateTime<Utc>,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<ChangePage, StoreError> {
        // `updated_at >= coalesce($2, $1)` repeats the cursor's bound in a
        // form the BRIN index can use (it cannot use the row comparison), so
        // a later page reads from its cursor on, not the whole window again.
        // One row past the page tells whether another page follows.
        let mut bets: Vec<ChangedBetAt> = sqlx::query_as(
            "SELECT user_id, bet_id, round_id, version, updated_at FROM bets \
             WHERE updated_at >= coalesce($2, $1) AND status NOT IN ('PLACING', 'REJECTED') \
               AND ($2::TIMESTAMPTZ IS NULL OR (updated_at, bet_id) > ($2, $3)) \
             ORDER BY updated_at, bet_id LIMIT $4 + 1",
        )
        .bind(from)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, bet)| bet))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let more = bets.len() as i64 > limit;
        bets.truncate(usize::try_from(limit).unwrap_or(0));
        let next = match bets.last() {
            Some(last) if more => Some((last.updated_at, last.bet.bet_id)),
            _ => None,
        };
        Ok(ChangePage {
            notes: bets
                .into_iter()
                .map(|ChangedBetAt { bet: b, .. }| {
                    BetNote::changed(b.user_id, b.bet_id, b.round_id, b.version)
                })
                .collect(),
            next,
        })
    }
}

/// A page of [`BetStore::changed_since`].
#[derive(Debug, Default)]
pub struct ChangePage {
    pub notes: Vec<BetNote>,
    /// Where the next page starts; `None`: this was the last.
    pub next: Option<(DateTime<Utc>, Uuid)>,
}

#[derive(sqlx::FromRow)]
struct ChangedBetAt {
    #[sqlx(flatten)]
    bet: ChangedBet,
    updated_at: DateTime<Utc>,
}

/// A PENDING bet, as the reconciler re-derives match jobs.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingBet {
    pub bet_id: Uuid,
    pub round_id: String,
}

impl BetRow {
    /// This bet's change note.
    pub fn note(&self) -> BetNote {
        BetNote {
            user_id: self.user_id.get(),
            bet_id: self.bet_id,
            round_id: self.round_id.clone(),
            version: Some(self.version),
        }
    }
}
