//! Per-user limits: how much of the service one player (or one connection)
//! may take, so that no single client can slow the others down. Each is on
//! by default, generous enough that a real player never meets it, and `0`
//! turns it off (benchmarks and the simulation turn them all off with
//! [`UserLimits::off`]).

use rust_decimal::Decimal;

/// The per-user limits (`betting serve --help` lists the flags).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct UserLimits {
    /// PlaceBet + CancelBet calls per user per second, sustained (token
    /// bucket refill rate). 0: unlimited.
    #[arg(long, env = "BETTING_USER_BET_RATE", default_value_t = 50)]
    pub user_bet_rate: u32,

    /// PlaceBet + CancelBet calls a user may make at once before the rate
    /// applies (token bucket size).
    #[arg(long, env = "BETTING_USER_BET_BURST", default_value_t = 100)]
    pub user_bet_burst: u32,

    /// WatchBets + WatchRound opens per user per second, sustained. Every
    /// open costs a token, even one the client resets at once: each open
    /// reads a snapshot. 0: unlimited.
    #[arg(long, env = "BETTING_USER_STREAM_OPEN_RATE", default_value_t = 5)]
    pub user_stream_open_rate: u32,

    /// WatchBets + WatchRound opens a user may make at once.
    #[arg(long, env = "BETTING_USER_STREAM_OPEN_BURST", default_value_t = 20)]
    pub user_stream_open_burst: u32,

    /// Unmatched bets (PLACING or PENDING) a user may hold; PlaceBet beyond
    /// is refused with TOO_MANY_OPEN_BETS. 0: unlimited.
    #[arg(long, env = "BETTING_USER_MAX_OPEN_BETS", default_value_t = 1000)]
    pub user_max_open_bets: u32,

    /// Live WatchBets + WatchRound streams per user on this instance. 0: unlimited.
    #[arg(long, env = "BETTING_USER_MAX_STREAMS", default_value_t = 16)]
    pub user_max_streams: u32,

    /// Live streams per client connection (remote socket address), whoever
    /// the users. 0: unlimited.
    #[arg(long, env = "BETTING_CONNECTION_MAX_STREAMS", default_value_t = 64)]
    pub connection_max_streams: u32,

    /// GetRound, GetBet and ListBets calls a player may make per second
    /// (each one a read; 20 clients hammering GetRound answered from a cache
    /// still took the CPU from everyone else). 0: unlimited.
    #[arg(long, env = "BETTING_USER_READ_RATE", default_value_t = 100)]
    pub user_read_rate: u32,

    /// Reads a player may make at once before the rate applies.
    #[arg(long, env = "BETTING_USER_READ_BURST", default_value_t = 200)]
    pub user_read_burst: u32,

    /// The smallest stake PlaceBet accepts. 0: any positive stake.
    #[arg(long, env = "BETTING_MIN_STAKE", default_value_t = Decimal::new(1, 2))]
    pub min_stake: Decimal,
}

impl UserLimits {
    /// Every limit off: for benchmarks, the simulation and tests that are
    /// not about limits.
    pub fn off() -> Self {
        Self {
            user_bet_rate: 0,
            user_bet_burst: 0,
            user_stream_open_rate: 0,
            user_stream_open_burst: 0,
            user_max_open_bets: 0,
            user_max_streams: 0,
            connection_max_streams: 0,
            user_read_rate: 0,
            user_read_burst: 0,
            min_stake: Decimal::ZERO,
        }
    }
}

impl Default for UserLimits {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            user_bet_rate: 50,
            user_bet_burst: 100,
            user_stream_open_rate: 5,
            user_stream_open_burst: 20,
            user_max_open_bets: 1000,
            user_max_streams: 16,
            connection_max_streams: 64,
            user_read_rate: 100,
            user_read_burst: 200,
            min_stake: Decimal::new(1, 2),
        }
    }
}
