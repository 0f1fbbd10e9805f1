//! The audit: every money and bet invariant, checked by SQL against the live
//! tables. `betting audit` and `AdminService.RunAudit` both run [`run`].
//!
//! (a) WALLET_LEDGER_MISMATCH: every wallet balance equals the sum of its entries.
//! (b) ACCOUNTS_NOT_ZERO: the stored wallet balances plus the escrow the bets
//!     account for equal the money that came in from outside (deposits less
//!     withdrawals); no system account, derived from the ledger, has the wrong
//!     sign (escrow below zero, more withdrawn than deposited).
//! (c) ESCROW_MISMATCH: escrow equals the stakes of bets not yet SETTLED or
//!     REFUNDED (counting refunds owed but not yet carried out, and stakes held
//!     for bets still PLACING), and every bet's money agrees with its state.
//! (d) DUPLICATE_KEY: no idempotency key, stake, refund or payout twice.
//! (e) PAYOUT_WRONG: every settled match paid exactly once, 2 × stake, to the
//!     owner of the winning bet; nothing paid for any other match.
//! (f) MATCHABLE_PAIR_WAITING: no open round holds a PENDING A and a PENDING B
//!     of equal stake from different users, older than the quiescence period.
//! (g) OVERDUE_BET: no bet in a non-terminal state past its deadline.
//! (h) LEDGER_CHAIN_BROKEN: each user's entries, in order, form a chain: every
//!     entry's balance_after is the previous one's plus its amount.
//! (i) REFUND_MISSING: every REFUNDED bet whose stake was taken has its refund
//!     owed or paid.
//! (j) PAYOUT_UNSETTLED_ROUND: no payout for a match of a round not SETTLED.
//! (k) REJECTED_WITH_STAKE: no REJECTED bet had its stake taken.
//! (l) MATCH_LINK_BROKEN: every bet naming a match is one of its two bets, of
//!     its round and stake, and both bets of every match name it (no foreign
//!     key holds these links: the matcher writes them in one transaction).

#![forbid(unsafe_code)]

mod service;

use std::time::Duration;

use sqlx::PgPool;

pub use service::{AdminError, AdminService};

#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Work younger than this may legitimately still be in flight.
    pub quiescence: Duration,
    /// The match timeout: PENDING bets older than this (plus quiescence) are overdue.
    pub match_timeout: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            quiescence: Duration::from_secs(30),
            match_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AuditReport {
    pub violations: Vec<Violation>,
    pub checks_run: u32,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The escrow the bets account for, as the CTE `bets_escrow (amount)`: the
/// stakes of PENDING and MATCHED bets, of PLACING bets whose stake was already
/// taken, and of REFUNDED bets whose refund is not yet carried out; less the
/// stakes of MATCHED bets whose match is already paid (the payout lands before
/// its bets say SETTLED). A macro, not a `const`, so `concat!` can splice it
/// into (b) and (c), which must agree on it.
macro_rules! bets_escrow_cte {
    () => {
        "bets_escrow AS ( \
           SELECT held.expected - paid_early.amount AS amount FROM ( \
             SELECT coalesce(sum(b.amount), 0) AS expected FROM bets b \
             WHERE b.status IN ('PENDING', 'MATCHED') \
                OR (b.status = 'PLACING' AND EXISTS (SELECT 1 FROM ledger_entries s \
                      WHERE s.kind = 'STAKE' AND s.reference = b.bet_id::TEXT)) \
                OR (b.status = 'REFUNDED' AND NOT EXISTS (SELECT 1 FROM ledger_entries r \
                      WHERE r.idempotency_key = 'REFUND:' || b.bet_id)) \
           ) held, ( \
             SELECT coalesce(sum(b.amount), 0) AS amount FROM bets b \
             JOIN payout_bets p ON p.bet_id = b.bet_id WHERE b.status = 'MATCHED' \
           ) paid_early \
         )"
    };
}

/// One check: its name and a query returning one text row per violation.
struct Check {
    name: &'static str,
    sql: &'static str,
    /// Binds $1 (quiescence, seconds) and $2 (match timeout, seconds).
    params: u8,
}

const CHECKS: &[Check] = &[
    Check {
        name: "WALLET_LEDGER_MISMATCH",
        sql: "SELECT format('wallet of user %s holds %s but its entries sum to %s', \
                w.user_id, w.balance, coalesce(e.total, 0)) \
              FROM wallets w LEFT JOIN \
                (SELECT user_id, sum(amount) AS total FROM ledger_entries GROUP BY user_id) e \
                USING (user_id) \
              WHERE w.balance <> coalesce(e.total, 0) \
              UNION ALL \
              SELECT format('user %s has ledger entries but no wallet', e.user_id) \
              FROM (SELECT DISTINCT user_id FROM ledger_entries) e \
              WHERE NOT EXISTS (SELECT 1 FROM wallets w WHERE w.user_id = e.user_id) \
              LIMIT 20",
        params: 0,
    },
    // The ledger's system accounts mirror its user rows, so summing them
    // proves nothing; this compares sources kept apart: the stored balances,
    // the bets' states, and the money the ledger says came in and went out.
    // HOUSE takes no entries (the counterparty constraint), so it is not a term.
    Check {
        name: "ACCOUNTS_NOT_ZERO",
        sql: concat!(
            "WITH stored AS ( \
               SELECT coalesce(sum(balance), 0) AS amount FROM wallets \
             ), external AS ( \
               SELECT coalesce(sum(amount) FILTER (WHERE kind = 'DEPOSIT'), 0) AS deposited, \
                 coalesce(-sum(amount) FILTER (WHERE kind = 'WITHDRAWAL'), 0) AS withdrawn \
               FROM ledger_entries WHERE kind IN ('DEPOSIT', 'WITHDRAWAL') \
             ), ",
            bets_escrow_cte!(),
            " SELECT format('wallets hold %s and bets account for %s in escrow, but %s came in \
                (%s deposited, %s withdrawn)', stored.amount, bets_escrow.amount, \
                external.deposited - external.withdrawn, external.deposited, external.withdrawn) \
              FROM stored, external, bets_escrow \
              WHERE stored.amount + bets_escrow.amount <> external.deposited - external.withdrawn \
              UNION ALL \
              SELECT format('%s account holds %s: %s', account, balance, CASE account \
                  WHEN 'ESCROW' THEN 'more returned than staked' \
                  ELSE 'more withdrawn than deposited' END) \
              FROM account_balances \
              WHERE (account = 'ESCROW' AND balance < 0) OR (account = 'EXTERNAL' AND balance > 0) \
              LIMIT 20"
        ),
        params: 0,
    },
    Check {
        name: "ESCROW_MISMATCH",
        sql: concat!(
            "WITH ledger AS ( \
               SELECT coalesce(-sum(amount), 0) AS escrow FROM ledger_entries \
               WHERE counterparty = 'ESCROW' \
             ), ",
            bets_escrow_cte!(),
            " SELECT format('escrow holds %s but bets account for %s', ledger.escrow, \
                bets_escrow.amount) \
              FROM ledger, bets_escrow WHERE ledger.escrow <> bets_escrow.amount \
              UNION ALL \
              SELECT format('bet %s is %s but %s', b.bet_id, b.status, problem) FROM ( \
                SELECT b.*, CASE \
                  WHEN b.status IN ('PENDING', 'MATCHED', 'SETTLED', 'REFUNDED') AND s.entry_id IS NULL \
                    THEN 'no stake was taken' \
                  WHEN s.entry_id IS NOT NULL AND (-s.amount <> b.amount OR s.user_id <> b.user_id) \
                    THEN 'its stake differs from the bet' \
                  WHEN b.status = 'SETTLED' AND p.bet_id IS NULL THEN 'its match was not paid' \
                  WHEN b.status <> 'SETTLED' AND b.status <> 'MATCHED' AND p.bet_id IS NOT NULL \
                    THEN 'its match was paid' \
                  WHEN b.status <> 'REFUNDED' AND r.entry_id IS NOT NULL THEN 'it was refunded' \
                END AS problem \
                FROM bets b \
                LEFT JOIN ledger_entries s ON s.kind = 'STAKE' AND s.reference = b.bet_id::TEXT \
                LEFT JOIN ledger_entries r ON r.idempotency_key = 'REFUND:' || b.bet_id \
                LEFT JOIN payout_bets p ON p.bet_id = b.bet_id \
              ) b WHERE problem IS NOT NULL \
              LIMIT 20"
        ),
        params: 0,
    },
    Check {
        name: "DUPLICATE_KEY",
        sql: "SELECT format('idempotency key %s used %s times', idempotency_key, count(*)) \
              FROM ledger_entries GROUP BY idempotency_key HAVING count(*) > 1 \
              UNION ALL \
              SELECT format('%s %s recorded %s times', kind, reference, count(*)) \
              FROM ledger_entries WHERE kind IN ('STAKE', 'REFUND', 'PAYOUT') \
              GROUP BY kind, reference HAVING count(*) > 1 \
              LIMIT 20",
        params: 0,
    },
    Check {
        name: "PAYOUT_WRONG",
        sql: "SELECT format('settled match %s: %s', m.match_id, problem) FROM ( \
                SELECT m.match_id, CASE \
                  WHEN count(p.entry_id) = 0 THEN 'not paid' \
                  WHEN count(p.entry_id) > 1 THEN 'paid ' || count(p.entry_id) || ' times' \
                  WHEN min(p.amount) <> 2 * m.amount THEN 'paid ' || min(p.amount) || ' instead of ' || 2 * m.amount \
                  WHEN min(p.user_id) <> min(w.user_id) THEN 'paid user ' || min(p.user_id) || ', not the winner ' || min(w.user_id) \
                END AS problem \
                FROM matches m \
                JOIN bets w ON w.match_id = m.match_id AND w.side = m.winning_side \
                LEFT JOIN ledger_entries p ON p.kind = 'PAYOUT' AND p.reference = m.match_id::TEXT \
                WHERE m.status = 'SETTLED' GROUP BY m.match_id, m.amount \
              ) m WHERE problem IS NOT NULL \
              UNION ALL \
              SELECT format('match %s is %s but was paid', m.match_id, m.status) \
              FROM matches m JOIN ledger_entries p ON p.kind = 'PAYOUT' AND p.reference = m.match_id::TEXT \
              WHERE m.status = 'VOIDED' \
              UNION ALL \
              SELECT format('payout %s names no match', p.reference) FROM ledger_entries p \
              WHERE p.kind = 'PAYOUT' AND NOT EXISTS \
                (SELECT 1 FROM matches m WHERE m.match_id::TEXT = p.reference) \
              LIMIT 20",
        params: 0,
    },
    Check {
        name: "MATCHABLE_PAIR_WAITING",
        sql: "SELECT format('round %s: bets %s (A) and %s (B) of %s are both PENDING', \
                a.round_id, a.bet_id, b.bet_id, a.amount) \
              FROM bets a JOIN rounds r ON r.round_id = a.round_id AND r.status = 'OPEN' \
              JOIN bets b ON b.round_id = a.round_id AND b.amount = a.amount \
                AND b.side = 'B' AND b.status = 'PENDING' AND b.user_id <> a.user_id \
              WHERE a.side = 'A' AND a.status = 'PENDING' \
                AND a.updated_at < now() - make_interval(secs => $1) \
                AND b.updated_at < now() - make_interval(secs => $1) \
              LIMIT 20",
        params: 1,
    },
    Check {
        name: "OVERDUE_BET",
        sql: "SELECT format('bet %s has been PENDING since %s', bet_id, created_at) FROM bets \
              WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1 + $2) \
              UNION ALL \
              SELECT format('bet %s has been PLACING since %s', bet_id, created_at) FROM bets \
              WHERE status = 'PLACING' AND created_at < now() - make_interval(secs => $1 + 60) \
              UNION ALL \
              SELECT format('bet %s is PENDING in round %s, which is %s', b.bet_id, r.round_id, r.status) \
              FROM bets b JOIN rounds r USING (round_id) \
              WHERE b.status = 'PENDING' AND r.status <> 'OPEN' \
                AND b.updated_at < now() - make_interval(secs => $1) \
              UNION ALL \
              SELECT format('bet %s is MATCHED in round %s, which is %s', b.bet_id, r.round_id, r.status) \
              FROM bets b JOIN rounds r USING (round_id) \
              WHERE b.status = 'MATCHED' AND r.status IN ('SETTLED', 'VOIDED') \
                AND coalesce(r.settled_at, r.closed_at) < now() - make_interval(secs => $1) \
              UNION ALL \
              SELECT format('refund %s owed since %s not carried out', idempotency_key, created_at) \
              FROM wallet_commands WHERE done_at IS NULL \
                AND created_at < now() - make_interval(secs => $1) \
              LIMIT 20",
        params: 2,
    },
    // Entry ids are assigned by the INSERT that follows the UPDATE locking the
    // wallet row, and the lock is held until commit: one user's entries get
    // their ids in commit order, so entry_id order is the order of the chain.
    Check {
        name: "LEDGER_CHAIN_BROKEN",
        sql: "SELECT format('user %s: entry %s leaves the balance at %s, but %s before it \
                plus its %s makes %s', user_id, entry_id, balance_after, coalesce(previous, 0), \
                amount, coalesce(previous, 0) + amount) FROM ( \
                SELECT user_id, entry_id, amount, balance_after, \
                  lag(balance_after) OVER (PARTITION BY user_id ORDER BY entry_id) AS previous \
                FROM ledger_entries \
              ) e WHERE balance_after <> coalesce(previous, 0) + amount \
              LIMIT 20",
        params: 0,
    },
    Check {
        name: "REFUND_MISSING",
        sql: "SELECT format('bet %s is REFUNDED (%s) but no refund is owed or paid', \
                b.bet_id, b.refund_reason) FROM bets b \
              WHERE b.status = 'REFUNDED' \
                AND EXISTS (SELECT 1 FROM ledger_entries s \
                  WHERE s.kind = 'STAKE' AND s.reference = b.bet_id::TEXT) \
                AND NOT EXISTS (SELECT 1 FROM wallet_commands c \
                  WHERE c.idempotency_key = 'REFUND:' || b.bet_id) \
                AND NOT EXISTS (SELECT 1 FROM ledger_entries r \
                  WHERE r.idempotency_key = 'REFUND:' || b.bet_id) \
              LIMIT 20",
        params: 0,
    },
    // A round becomes SETTLED before any of its matches is paid, and the
    // settler pays only matches of SETTLED rounds, which never change again.
    Check {
        name: "PAYOUT_UNSETTLED_ROUND",
        sql: "SELECT format('match %s was paid but its round %s is %s', \
                m.match_id, m.round_id, coalesce(r.status, 'missing')) \
              FROM ledger_entries p JOIN matches m ON m.match_id::TEXT = p.reference \
              LEFT JOIN rounds r ON r.round_id = m.round_id \
              WHERE p.kind = 'PAYOUT' AND r.status IS DISTINCT FROM 'SETTLED' \
              LIMIT 20",
        params: 0,
    },
    Check {
        name: "REJECTED_WITH_STAKE",
        sql: "SELECT format('bet %s is REJECTED (%s) but its stake %s was taken', \
                b.bet_id, b.reject_reason, s.idempotency_key) \
              FROM bets b JOIN ledger_entries s ON s.kind = 'STAKE' AND s.reference = b.bet_id::TEXT \
              WHERE b.status = 'REJECTED' \
              LIMIT 20",
        params: 0,
    },
    // The matcher writes a match and its two bets' links in one
    // transaction; no foreign key holds them (migration
    // 20261205000001_match_links_audited), so this check does, and more: the
    // bets are the match's, of its round and stake, and name it back; its
    // first bet is on A and its second on B (the settler pays by that order),
    // of two users; and each bet's status follows its match's (OPEN with
    // MATCHED, SETTLED with SETTLED, VOIDED with REFUNDED: each pair of moves
    // is one transaction).
    Check {
        name: "MATCH_LINK_BROKEN",
        sql: "SELECT format('bet %s names match %s, which is not its match (%s)', \
                b.bet_id, b.match_id, CASE WHEN m.match_id IS NULL THEN 'no such match' \
                  ELSE format('of bets %s and %s, round %s, stake %s', \
                    m.bet_a_id, m.bet_b_id, m.round_id, m.amount) END) \
              FROM bets b LEFT JOIN matches m ON m.match_id = b.match_id \
              WHERE b.match_id IS NOT NULL AND (m.match_id IS NULL \
                OR b.bet_id NOT IN (m.bet_a_id, m.bet_b_id) \
                OR b.round_id <> m.round_id OR b.amount <> m.amount) \
              UNION ALL \
              SELECT format('match %s names bet %s, which names %s', \
                m.match_id, x.bet_id, CASE WHEN b.bet_id IS NULL THEN 'nothing: no such bet' \
                  ELSE coalesce(b.match_id::TEXT, 'no match') END) \
              FROM matches m CROSS JOIN LATERAL (VALUES (m.bet_a_id), (m.bet_b_id)) AS x(bet_id) \
              LEFT JOIN bets b ON b.bet_id = x.bet_id \
              WHERE b.match_id IS DISTINCT FROM m.match_id \
              UNION ALL \
              SELECT format('match %s (%s) pairs bet %s (side %s, user %s, %s) \
                  with bet %s (side %s, user %s, %s)', m.match_id, m.status, \
                a.bet_id, a.side, a.user_id, a.status, b.bet_id, b.side, b.user_id, b.status) \
              FROM matches m JOIN bets a ON a.bet_id = m.bet_a_id \
                JOIN bets b ON b.bet_id = m.bet_b_id \
                CROSS JOIN LATERAL (SELECT CASE m.status WHEN 'OPEN' THEN 'MATCHED' \
                  WHEN 'SETTLED' THEN 'SETTLED' ELSE 'REFUNDED' END AS status) AS want \
              WHERE a.side <> 'A' OR b.side <> 'B' OR a.user_id = b.user_id \
                OR a.status <> want.status OR b.status <> want.status \
              LIMIT 20",
        params: 0,
    },
];

/// The name of every check, in the order [`run`] runs them.
pub fn check_names() -> impl Iterator<Item = &'static str> {
    CHECKS.iter().map(|check| check.name)
}

/// Runs every check.
pub async fn run(pool: &PgPool, settings: &AuditSettings) -> Result<AuditReport, sqlx::Error> {
    let mut report = AuditReport::default();
    // One snapshot for all checks, so they agree with each other; bounded by
    // the request's deadline when an RPC runs it.
    let mut tx = betting_db::begin(pool).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    for check in CHECKS {
        let mut query = sqlx::query_scalar(check.sql);
        if check.params >= 1 {
            query = query.bind(settings.quiescence.as_secs_f64());
        }
        if check.params >= 2 {
            query = query.bind(settings.match_timeout.as_secs_f64());
        }
        let rows: Vec<String> = query.fetch_all(&mut *tx).await?;
        report.checks_run += 1;
        report
            .violations
            .extend(rows.into_iter().map(|detail| Violation {
                check: check.name,
                detail,
            }));
    }
    tx.commit().await?;
    Ok(report)
}
