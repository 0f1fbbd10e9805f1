//! Carrying out the money the betting side owes (the `wallet_commands` outbox).

use betting_domain::{Amount, BetId, UserId};
use rust_decimal::Decimal;

use crate::{BetStore, BettingError, WalletCallError, WalletClient, WalletCommand};

/// Executes wallet commands through WalletService and records them done.
#[derive(Clone)]
pub struct CommandRunner {
    store: BetStore,
    wallet: WalletClient,
}

impl CommandRunner {
    pub fn new(store: BetStore, wallet: WalletClient) -> Self {
        Self { store, wallet }
    }

    /// Carries out the command with this key, if it is still owed. `None`
    /// when there is no such command or it was done already.
    pub async fn execute_key(&self, key: &str) -> Result<Option<Decimal>, BettingError> {
        match self.store.command_by_key(key).await? {
            Some(command) if command.done_at.is_none() => self.execute(&command).await.map(Some),
            _ => Ok(None),
        }
    }

    /// Carries out a wallet command and records it done; returns the balance
    /// right after. Safe to repeat: the wallet answers a repeat from the
    /// original movement.
    pub async fn execute(&self, command: &WalletCommand) -> Result<Decimal, BettingError> {
        let bet = command.bet_id.map(BetId::from).ok_or_else(|| {
            BettingError::Internal(anyhow::anyhow!(
                "wallet command {} names no bet",
                command.idempotency_key
            ))
        })?;
        let user = UserId::new(command.user_id)
            .map_err(|_| BettingError::Internal(anyhow::anyhow!("bad user in wallet command")))?;
        let amount = Amount::try_from_decimal(command.amount)
            .map_err(|_| BettingError::Internal(anyhow::anyhow!("bad amount in wallet command")))?;
        let result = match command.kind.as_str() {
            "REFUND" => self.wallet.refund_stake(user, amount, bet).await,
            other => {
                return Err(BettingError::Internal(anyhow::anyhow!(
                    "wallet command kind {other} is not carried out by betting"
                )));
            }
        };
        match result {
            Ok(balance) => {
                self.store.command_done(&command.idempotency_key).await?;
                Ok(balance)
            }
            Err(e) => {
                self.store
                    .command_failed(&command.idempotency_key, &e.to_string())
                    .await?;
                Err(match e {
                    WalletCallError::Unavailable(status) => BettingError::WalletUnavailable(status),
                    WalletCallError::Refused { reason, status } => {
                        BettingError::Internal(anyhow::anyhow!(
                            "wallet refused {}: {reason}: {}",
                            command.idempotency_key,
                            status.message()
                        ))
                    }
                })
            }
        }
    }
}
