//! AdminService: the audit over gRPC, for admins only.

use betting_api::{
    convert, pb,
    pb::admin_service_server::{AdminService as AdminApi, AdminServiceServer},
    respond,
};
use betting_auth::{AuthError, AuthInterceptor, Principal};
use betting_domain::{ErrorCode, ServiceError};
use sqlx::PgPool;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use crate::AuditSettings;

#[derive(Debug, thiserror::Error)]
enum AdminError {
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

    fn reason(&self) -> &'static str {
        match self {
            AdminError::Auth(e) => e.reason(),
            AdminError::Storage(_) => "AUDIT_FAILED",
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

    pub fn into_server(
        self,
        auth: AuthInterceptor,
    ) -> InterceptedService<AdminServiceServer<Self>, AuthInterceptor> {
        AdminServiceServer::with_interceptor(self, auth)
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    #[tracing::instrument(skip_all)]
    async fn run_audit(
        &self,
        request: Request<pb::RunAuditRequest>,
    ) -> Result<Response<pb::RunAuditResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = async {
            principal.require_admin()?;
            crate::run(&self.pool, &self.settings)
                .await
                .map_err(AdminError::Storage)
        }
        .await;
        respond(result.map(|report| {
            pb::RunAuditResponse {
                clean: report.is_clean(),
                violations: report
                    .violations
                    .iter()
                    .map(|v| pb::AuditViolation {
                        check: v.check.to_owned(),
                        detail: v.detail.clone(),
                    })
                    .collect(),
                checked_at: Some(convert::timestamp(chrono::Utc::now())),
                checks_run: i32::try_from(report.checks_run).unwrap_or(i32::MAX),
            }
        }))
    }
}
