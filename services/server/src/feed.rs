//! The hubs' sweep source: what the bet and round stores say changed lately.

use betting_bets::BetStore;
use betting_settlement::RoundStore;
use betting_streams::{ChangeFeed, Changes, Swept};
use chrono::{DateTime, Utc};
use futures::{FutureExt, future::BoxFuture};

/// Changed bets a page reads.
const PAGE: i64 = 10_000;
/// Changed bets one sweep reads at most (ten pages), and rounds. Past it
/// the hub resynchronises every stream: at that rate of change, re-reading
/// every stream's state costs less than reading every change every second.
const MAX_SWEPT: usize = 100_000;

/// Reads recent bet and round changes for the streams' safety-net sweep.
pub struct StoreFeed {
    pub bets: BetStore,
    pub rounds: RoundStore,
}

impl ChangeFeed for StoreFeed {
    fn changed_since(
        &self,
        from: DateTime<Utc>,
    ) -> BoxFuture<'_, Result<Swept, Box<dyn std::error::Error + Send + Sync>>> {
        async move {
            let mut bets = Vec::new();
            let mut after = None;
            let complete = loop {
                let page = self.bets.changed_since(from, after, PAGE).await?;
                bets.extend(page.notes);
                match page.next {
                    None => break true,
                    Some(_) if bets.len() >= MAX_SWEPT => break false,
                    next => after = next,
                }
            };
            let rounds = self.rounds.changed_since(from, MAX_SWEPT as i64).await?;
            Ok(Swept {
                complete: complete && rounds.len() < MAX_SWEPT,
                changes: Changes { bets, rounds },
            })
        }
        .boxed()
    }
}
