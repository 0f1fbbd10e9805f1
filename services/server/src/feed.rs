//! The hubs' sweep source: what the bet and round stores say changed lately.

use betting_bets::BetStore;
use betting_settlement::RoundStore;
use betting_streams::{ChangeFeed, Changes};
use chrono::{DateTime, Utc};
use futures::{FutureExt, future::BoxFuture};

/// Reads recent bet and round changes for the streams' safety-net sweep.
pub struct StoreFeed {
    pub bets: BetStore,
    pub rounds: RoundStore,
}

impl ChangeFeed for StoreFeed {
    fn changed_since(
        &self,
        from: DateTime<Utc>,
    ) -> BoxFuture<'_, Result<Changes, Box<dyn std::error::Error + Send + Sync>>> {
        async move {
            Ok(Changes {
                bets: self.bets.changed_since(from).await?,
                rounds: self.rounds.changed_since(from).await?,
            })
        }
        .boxed()
    }
}
