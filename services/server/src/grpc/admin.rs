//! AdminService over gRPC: the adapter of [`betting_audit::AdminService`].

use betting_api::{
    convert, pb,
    pb::admin_service_server::{AdminService as AdminApi, AdminServiceServer},
    respond,
};
use betting_audit::{AdminService, AuditReport};
use betting_auth::{AuthInterceptor, Principal};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

/// The generated trait's implementation for [`AdminService`].
#[derive(Clone)]
pub(crate) struct AdminGrpc(AdminService);

/// The tonic service, behind the bearer-token check.
pub(crate) fn server(
    service: AdminService,
    auth: AuthInterceptor,
) -> InterceptedService<AdminServiceServer<AdminGrpc>, AuthInterceptor> {
    let server = super::compressed!(AdminServiceServer::new(AdminGrpc(service)))
        .max_decoding_message_size(super::MAX_REQUEST_BYTES);
    InterceptedService::new(server, auth)
}

fn report_pb(report: &AuditReport) -> pb::RunAuditResponse {
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
}

#[tonic::async_trait]
impl AdminApi for AdminGrpc {
    #[tracing::instrument(skip_all)]
    async fn run_audit(
        &self,
        request: Request<pb::RunAuditRequest>,
    ) -> Result<Response<pb::RunAuditResponse>, Status> {
        let principal = Principal::caller(&request)?;
        let result = self.0.run_audit(&principal).await;
        respond(result.map(|report| report_pb(&report)))
    }
}
