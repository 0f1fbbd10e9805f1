//! The privileged-action trail (`privileged_actions`): who did each deposit,
//! withdrawal, round transition, audit run and queue requeue. A row is
//! written with [`record`] inside the transaction of the change it records,
//! so the two commit or roll back together.

use sqlx::PgConnection;

/// Who acted: the token's subject and role (or an operator of the CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub subject: String,
    pub role: &'static str,
}

impl Actor {
    pub fn new(subject: impl Into<String>, role: &'static str) -> Self {
        Self {
            subject: subject.into(),
            role,
        }
    }
}

/// What was done; the names are the table's CHECK list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Deposit,
    Withdrawal,
    RoundOpen,
    RoundClose,
    RoundSettle,
    RoundVoid,
    AuditRun,
    QueueRetry,
}

impl ActionKind {
    pub fn as_db(self) -> &'static str {
        match self {
            ActionKind::Deposit => "DEPOSIT",
            ActionKind::Withdrawal => "WITHDRAWAL",
            ActionKind::RoundOpen => "ROUND_OPEN",
            ActionKind::RoundClose => "ROUND_CLOSE",
            ActionKind::RoundSettle => "ROUND_SETTLE",
            ActionKind::RoundVoid => "ROUND_VOID",
            ActionKind::AuditRun => "AUDIT_RUN",
            ActionKind::QueueRetry => "QUEUE_RETRY",
        }
    }
}

/// One row of the trail.
#[derive(Debug, Clone)]
pub struct PrivilegedAction<'a> {
    pub actor: &'a Actor,
    pub kind: ActionKind,
    /// `user:<id>`, `round:<id>`, `job:<queue>:<id>` or `books`.
    pub target: String,
    pub idempotency_key: Option<&'a str>,
    /// Flat string pairs, stored as a JSON object.
    pub detail: Vec<(&'static str, String)>,
}

/// Appends `action` inside the caller's transaction.
pub async fn record(
    conn: &mut PgConnection,
    action: &PrivilegedAction<'_>,
) -> Result<(), sqlx::Error> {
    let (keys, values): (Vec<&str>, Vec<&str>) =
        action.detail.iter().map(|(k, v)| (*k, v.as_str())).unzip();
    sqlx::query(
        "INSERT INTO privileged_actions (subject, role, action, target, idempotency_key, detail) \
         VALUES ($1, $2, $3, $4, $5, jsonb_object($6::TEXT[], $7::TEXT[]))",
    )
    .bind(&action.actor.subject)
    .bind(action.actor.role)
    .bind(action.kind.as_db())
    .bind(&action.target)
    .bind(action.idempotency_key)
    .bind(&keys)
    .bind(&values)
    .execute(conn)
    .await?;
    Ok(())
}
