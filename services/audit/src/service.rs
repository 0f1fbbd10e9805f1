//! AdminService: the audit on request, for admins only. It takes the caller's
//! `Principal` and answers with the [`AuditReport`] or an [`AdminError`]; the
//! server's gRPC adapter converts to the wire.

use betting_auth::{AuthError, Principal, Role};
use betting_db::actions::{ActionKind, Actor, PrivilegedAction};
use betting_domain::{ErrorCode, ErrorReason, ServiceError};
use sqlx::PgPool;

use crate::{AuditReport, AuditSettings};

/// Why an audit was not run or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("audit failed to run")]
    Storage(#[source] sqlx::Error),
}

impl ServiceError for AdminError {
    fn code(&self) -> ErrorCode {
        match self {
            AdminError::Auth(e) => e.code(),
            AdminError::Storage(e) if betting_db::is_unavailable(e) => ErrorCode::Unavailable,
            AdminError::Storage(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            AdminError::Auth(e) => e.reason(),
            AdminError::Storage(_) => ErrorReason::AuditFailed,
        }
    }
}

#[derive(Clone)]
pub struct AdminService {
    pool: PgPool,
    settings: AuditSettings,
}

impl AdminService {
    pub fn new(pool: PgPool, settings: AuditSettings) -> Self {
        Self { pool, settings }
    }

    /// RunAudit: every check over one snapshot; admins only. The run is
    /// recorded in the privileged-action trail once it finished. It changes
    /// nothing, and its checks run in a READ ONLY snapshot that cannot hold
    /// the insert, so the row has a transaction of its own: an audit whose
    /// row failed to commit answers with the error, never unrecorded.
    pub async fn run_audit(&self, principal: &Principal) -> Result<AuditReport, AdminError> {
        principal.require(&[Role::Admin])?;
        let report = crate::run(&self.pool, &self.settings)
            .await
            .map_err(AdminError::Storage)?;
        let actor = Actor::new(&principal.subject, principal.role.as_str());
        let action = PrivilegedAction {
            actor: &actor,
            kind: ActionKind::AuditRun,
            target: "books".into(),
            idempotency_key: None,
            detail: vec![
                ("checks_run", report.checks_run.to_string()),
                ("violations", report.violations.len().to_string()),
            ],
        };
        let mut conn = self.pool.acquire().await.map_err(AdminError::Storage)?;
        betting_db::actions::record(&mut conn, &action)
            .await
            .map_err(AdminError::Storage)?;
        Ok(report)
    }
}
