//! A seed's schedule: groups of steps, each group run concurrently.
//!
//! Everything random about a run is drawn here, from the seed alone, before
//! anything runs; replaying a seed replays the same schedule. (The real
//! services still decide the exact interleaving inside a group, as a real
//! deployment would: a seed that found a race reproduces it often, not always.)

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use rust_decimal::Decimal;

use crate::proxy::{Fault, Rpc};

/// Players with small wallets: stakes of 1, 2 or 5 out of 20 make exact
/// "balance equals the stake" moments common.
pub const SMALL_USERS: [i64; 4] = [1, 2, 3, 4];
/// Players who can afford the largest stakes.
pub const RICH_USERS: [i64; 2] = [5, 6];
/// A player whose wallet sits at the balance limit.
pub const WHALE: i64 = 7;

pub const SMALL_START: i64 = 20;
/// 10^12: the largest single movement.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// 10^15: the wallet balance limit.
pub const BALANCE_LIMIT: i64 = 1_000_000_000_000_000;

pub use betting_books::Side;

/// What a PlaceBet reusing an earlier key changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Side,
    Stake,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `copies` identical requests at once (a client retry racing the original).
    Deposit {
        user: i64,
        amount: Decimal,
        key: String,
        copies: usize,
        fault: Option<Fault>,
    },
    Withdraw {
        user: i64,
        amount: Decimal,
        key: String,
        copies: usize,
        fault: Option<Fault>,
    },
    /// Deposits whatever brings the wallet to the balance limit.
    TopUp {
        user: i64,
        key: String,
    },
    /// `copies` identical PlaceBets at once, spread over the betting
    /// instances; `faults` are armed on the user's next PlaceStakes (or HoldStake) first.
    Place {
        user: i64,
        round: usize,
        side: Side,
        stake: Decimal,
        key: String,
        copies: usize,
        faults: Vec<Fault>,
    },
    /// The key of the `nth` PlaceBet so far, with a changed payload.
    Reuse {
        nth: usize,
        change: Change,
    },
    Cancel {
        nth: usize,
    },
    /// Recovery passes (grace zero) of these betting instances, at once.
    Recovery {
        instances: Vec<usize>,
    },
    /// A reconciler pass; with `timeout`, every PENDING bet counts as timed out.
    Reconcile {
        timeout: bool,
    },
    OpenRound,
    Close {
        round: usize,
    },
    Settle {
        round: usize,
        side: Side,
    },
    Void {
        round: usize,
    },
    /// Stops a worker process: gracefully (SIGTERM) or abruptly (SIGKILL).
    StopWorker {
        graceful: bool,
    },
    StartWorker,
    FlushRedis,
    /// Arms a fault on the settle/refund path (payouts, refunds).
    Arm {
        rpc: Rpc,
        user: i64,
        fault: Fault,
    },
    Pause(Duration),
}

/// Who takes part in a seed's run.
#[derive(Debug, Clone, PartialEq)]
pub struct Cast {
    pub rich: bool,
    pub whale: bool,
}

impl Cast {
    pub fn users(&self) -> Vec<i64> {
        let mut users = SMALL_USERS.to_vec();
        if self.rich {
            users.extend(RICH_USERS);
        }
        if self.whale {
            users.push(WHALE);
        }
        users
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub cast: Cast,
    pub groups: Vec<Vec<Step>>,
}

/// Draws the schedule of `seed`, `steps` groups long.
pub fn generate(seed: u64, steps: usize) -> Schedule {
    let mut rng = StdRng::seed_from_u64(seed);
    let cast = Cast {
        rich: rng.random_bool(0.35),
        whale: rng.random_bool(0.35),
    };
    let mut g = Generator {
        rng,
        cast: cast.clone(),
        rounds: 2,
        places: 0,
        keys: 0,
    };
    let groups = (0..steps).map(|_| g.group()).collect();
    Schedule { cast, groups }
}

struct Generator {
    rng: StdRng,
    cast: Cast,
    /// Rounds opened so far (the first two are open from the start).
    rounds: usize,
    places: usize,
    keys: usize,
}

impl Generator {
    fn key(&mut self, prefix: &str) -> String {
        self.keys += 1;
        format!("{prefix}-{}", self.keys)
    }

    fn user(&mut self) -> i64 {
        let users = self.cast.users();
        *users.choose(&mut self.rng).unwrap_or(&1)
    }

    fn side(&mut self) -> Side {
        if self.rng.random_bool(0.5) {
            Side::A
        } else {
            Side::B
        }
    }

    fn round(&mut self) -> usize {
        self.rng.random_range(0..self.rounds)
    }

    fn copies(&mut self) -> usize {
        if self.rng.random_bool(0.3) {
            self.rng.random_range(2..=3)
        } else {
            1
        }
    }

    fn stake(&mut self, user: i64) -> Decimal {
        if RICH_USERS.contains(&user) && self.rng.random_bool(0.6) {
            // Around half the largest movement: the payout doubles it.
            let big = [
                MAX_AMOUNT,
                MAX_AMOUNT / 2,
                MAX_AMOUNT / 2 + 1,
                MAX_AMOUNT * 3 / 5,
            ];
            return Decimal::from(*big.choose(&mut self.rng).unwrap_or(&MAX_AMOUNT));
        }
        Decimal::from(*[1_i64, 2, 5].choose(&mut self.rng).unwrap_or(&1))
    }

    /// A fault on a client's own deposit or withdrawal: the network's, not
    /// a refusal (a client whose credential is refused is not retrying).
    fn wallet_fault(&mut self) -> Option<Fault> {
        match self.rng.random_range(0..10) {
            0 => Some(Fault::FailBefore),
            1 | 2 => Some(Fault::LoseReply),
            3 => Some(Fault::Delay(Duration::from_millis(
                self.rng.random_range(5..60),
            ))),
            _ => None,
        }
    }

    fn place(&mut self) -> Step {
        let user = self.user();
        let faults = match self.rng.random_range(0..12) {
            0 => vec![Fault::FailBefore],
            1 => vec![Fault::LoseReply],
            2 => vec![Fault::Refuse],
            // The reply of the first attempt is lost; the retry is refused.
            3 => vec![Fault::LoseReply, Fault::Refuse],
            4 | 5 => vec![Fault::Delay(Duration::from_millis(
                self.rng.random_range(5..80),
            ))],
            _ => Vec::new(),
        };
        self.places += 1;
        let stake = self.stake(user);
        let round = self.round();
        let side = self.side();
        let key = self.key("bet");
        let copies = self.copies();
        Step::Place {
            user,
            round,
            side,
            stake,
            key,
            copies,
            faults,
        }
    }

    fn step(&mut self) -> Step {
        match self.rng.random_range(0..100) {
            0..=39 => self.place(),
            40..=45 => {
                let user = self.user();
                let amount = Decimal::from(self.rng.random_range(1..=10));
                let fault = self.wallet_fault();
                let key = self.key("dep");
                let copies = self.copies();
                Step::Deposit {
                    user,
                    amount,
                    key,
                    copies,
                    fault,
                }
            }
            46..=49 => {
                let user = self.user();
                let amount = Decimal::from(self.rng.random_range(1..=8));
                let fault = self.wallet_fault();
                let key = self.key("wd");
                let copies = self.copies();
                Step::Withdraw {
                    user,
                    amount,
                    key,
                    copies,
                    fault,
                }
            }
            50..=52 if self.cast.whale => {
                let key = self.key("top");
                Step::TopUp { user: WHALE, key }
            }
            53..=55 if self.places > 0 => Step::Reuse {
                nth: self.rng.random_range(0..self.places),
                change: if self.rng.random_bool(0.5) {
                    Change::Side
                } else {
                    Change::Stake
                },
            },
            56..=60 if self.places > 0 => Step::Cancel {
                nth: self.rng.random_range(0..self.places),
            },
            61..=65 => Step::Recovery {
                instances: if self.rng.random_bool(0.6) {
                    vec![0, 1]
                } else {
                    vec![self.rng.random_range(0..2)]
                },
            },
            66..=69 => Step::Reconcile {
                timeout: self.rng.random_bool(0.25),
            },
            70..=71 if self.rounds < 6 => {
                self.rounds += 1;
                Step::OpenRound
            }
            72..=73 => Step::Close {
                round: self.round(),
            },
            74..=76 => Step::Settle {
                round: self.round(),
                side: self.side(),
            },
            77 => Step::Void {
                round: self.round(),
            },
            78..=80 => Step::StopWorker {
                graceful: self.rng.random_bool(0.6),
            },
            81..=83 => Step::StartWorker,
            84 => Step::FlushRedis,
            85..=88 => {
                let rpc = if self.rng.random_bool(0.5) {
                    Rpc::PayWinnings
                } else {
                    Rpc::RefundStake
                };
                let user = self.user();
                let fault = match self.rng.random_range(0..4) {
                    0 => Fault::Refuse,
                    _ => self.wallet_fault().unwrap_or(Fault::LoseReply),
                };
                Step::Arm { rpc, user, fault }
            }
            _ => Step::Pause(Duration::from_millis(self.rng.random_range(1..40))),
        }
    }

    /// One to three steps that run at once.
    fn group(&mut self) -> Vec<Step> {
        let n = match self.rng.random_range(0..10) {
            0..=5 => 1,
            6..=8 => 2,
            _ => 3,
        };
        (0..n).map(|_| self.step()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_schedule() {
        let a = generate(42, 50);
        let b = generate(42, 50);
        assert_eq!(a.cast, b.cast);
        assert_eq!(a.groups, b.groups);
        assert_ne!(generate(43, 50).groups, a.groups);
    }
}
