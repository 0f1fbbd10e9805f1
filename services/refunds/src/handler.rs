//! The `refund` queue's handler.

use betting_jobs::{JobKind, RefundJob};
use betting_queue::{Handler, Job, JobError};

use crate::Refunder;

/// Carries out one owed refund: `refund:REFUND:{bet_id}`.
pub struct RefundHandler {
    refunder: Refunder,
}

impl RefundHandler {
    pub fn new(refunder: Refunder) -> Self {
        Self { refunder }
    }
}

impl Handler for RefundHandler {
    async fn handle(&self, job: &Job) -> Result<(), JobError> {
        let job = RefundJob::decode(job)?;
        match self.refunder.execute_key(&job.key).await {
            Ok(_) => Ok(()),
            // An outage uses up no attempt: the refund is owed until done.
            Err(e) if e.is_outage() => Err(JobError::Unavailable(e.to_string())),
            Err(e) => Err(JobError::Retry(format!(
                "{e}: {:?}",
                std::error::Error::source(&e).map(ToString::to_string)
            ))),
        }
    }
}
