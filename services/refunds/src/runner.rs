//! Carrying out owed refunds through WalletService.

use betting_db::StoreError;
use betting_wallet_client::{WalletCallError, WalletClient};
use rust_decimal::Decimal;

use crate::{Outbox, OwedRefund};

#[derive(Debug, thiserror::Error)]
pub enum RefundError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The wallet did not answer, or answered "try again": still owed.
    #[error("wallet unavailable")]
    WalletUnavailable(#[source] WalletCallError),
    /// The wallet considered the refund and refused it: a bug somewhere,
    /// for a human (the refund stays owed, and the audit says so).
    #[error("wallet refused refund {key}: {reason}")]
    Refused {
        key: String,
        reason: String,
        #[source]
        source: WalletCallError,
    },
}

impl RefundError {
    /// Whether waiting for a dependency is all it takes.
    pub fn is_outage(&self) -> bool {
        match self {
            RefundError::Store(e) => e.is_unavailable(),
            RefundError::WalletUnavailable(_) => true,
            RefundError::Refused { .. } => false,
        }
    }
}

/// Executes owed refunds and records them done.
#[derive(Clone)]
pub struct Refunder {
    outbox: Outbox,
    wallet: WalletClient,
}

impl Refunder {
    pub fn new(outbox: Outbox, wallet: WalletClient) -> Self {
        Self { outbox, wallet }
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Carries out the refund with this key, if it is still owed. `None`
    /// when there is no such refund or it was done already.
    #[tracing::instrument(name = "refund", skip(self), fields(key = %key))]
    pub async fn execute_key(&self, key: &str) -> Result<Option<Decimal>, RefundError> {
        match self.outbox.get(key).await? {
            Some(owed) if owed.done_at.is_none() => self.execute(&owed).await.map(Some),
            _ => Ok(None),
        }
    }

    /// Carries out a refund and records it done; returns the balance right
    /// after. Safe to repeat, and to run on two processes at once: the
    /// wallet answers a repeat from the original movement.
    pub async fn execute(&self, owed: &OwedRefund) -> Result<Decimal, RefundError> {
        match self
            .wallet
            .refund_stake(owed.user, owed.amount, owed.bet)
            .await
        {
            Ok(balance) => {
                self.outbox.done(&owed.key).await?;
                Ok(balance)
            }
            Err(e) => {
                self.outbox.failed(&owed.key, &e.to_string()).await?;
                Err(match e {
                    WalletCallError::Unavailable(_) | WalletCallError::Malformed(_) => {
                        RefundError::WalletUnavailable(e)
                    }
                    WalletCallError::Refused { ref reason, .. } => RefundError::Refused {
                        key: owed.key.to_string(),
                        reason: reason.clone(),
                        source: e,
                    },
                })
            }
        }
    }
}
