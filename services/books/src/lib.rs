//! The client's own books: what each request was answered, kept apart from
//! anything the server says about itself. Kept by the seeded simulation
//! (`betting-sim`) and by `betting chaos` alike.
//!
//! The idempotency contract is checked as answers arrive: the same key with
//! the same payload must always get the same answer (whatever the
//! concurrency), and a key that stored something must refuse a changed
//! payload. A request whose answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED)
//! is unresolved until a retry with the same key resolves it.

use std::collections::HashMap;

use rust_decimal::Decimal;
use tonic::{Code, Status};

/// A bet's side, as the client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// A resolved answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A bet was placed: its id.
    Bet(String),
    /// Money moved: the ledger entry's id.
    Entry(i64),
    /// Refused, with the ErrorInfo reason (or the code when there is none).
    Refused(String),
}

impl Answer {
    /// Whether this answer means the server stored something under the key,
    /// so that the key is taken for good.
    fn stores(&self) -> bool {
        match self {
            Answer::Bet(_) | Answer::Entry(_) => true,
            Answer::Refused(reason) => {
                matches!(reason.as_str(), "INSUFFICIENT_FUNDS" | "BALANCE_LIMIT")
            }
        }
    }
}

/// How a call ended, from the client's side.
pub enum Reply {
    Resolved(Answer),
    /// The outcome is unknown: retry with the same key.
    Unknown,
    /// A status no well-formed request should ever get.
    Unexpected(Status),
}

impl Reply {
    pub fn of_error(status: Status) -> Reply {
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Reply::Unknown
            }
            Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::InvalidArgument => Reply::Resolved(Answer::Refused(
                betting_api::reason_of(&status).unwrap_or_else(|| format!("{:?}", status.code())),
            )),
            _ => Reply::Unexpected(status),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceRequest {
    pub user: i64,
    pub key: String,
    pub round: String,
    pub side: Side,
    pub stake: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoneyRequest {
    pub user: i64,
    pub key: String,
    pub amount: Decimal,
    pub withdraw: bool,
}

#[derive(Debug, Clone)]
pub enum Request {
    Place(PlaceRequest),
    Money(MoneyRequest),
}

#[derive(Debug, Clone)]
struct Record<R> {
    request: R,
    answer: Answer,
}

#[derive(Debug, Default)]
pub struct Books {
    bets: HashMap<(i64, String), Record<PlaceRequest>>,
    money: HashMap<String, Record<MoneyRequest>>,
    /// Money put in before the schedule ran, per user.
    pub genesis: HashMap<i64, Decimal>,
    /// Requests whose outcome is not known yet.
    pub unresolved: Vec<Request>,
    pub violations: Vec<String>,
    pub unknown_answers: usize,
}

impl Books {
    pub fn place(&mut self, request: &PlaceRequest, reply: Reply) {
        let answer = match reply {
            Reply::Resolved(answer) => answer,
            Reply::Unknown => {
                self.unknown_answers += 1;
                self.unresolved.push(Request::Place(request.clone()));
                return;
            }
            Reply::Unexpected(status) => {
                self.violations.push(format!(
                    "PlaceBet {} of user {} got {:?}: {}",
                    request.key,
                    request.user,
                    status.code(),
                    status.message()
                ));
                return;
            }
        };
        let slot = (request.user, request.key.clone());
        match self.bets.get(&slot) {
            // Once an answer stored something under the key, it is the key's
            // answer for good: the same payload gets it again, another payload
            // is a reused key.
            Some(first) if first.answer.stores() => {
                // (A changed payload may also be malformed: validation
                // comes before the key is looked up.)
                let malformed = answer == Answer::Refused("INVALID_ARGUMENT".into());
                let expected = if first.request == *request {
                    first.answer.clone()
                } else {
                    Answer::Refused("IDEMPOTENCY_KEY_REUSED".into())
                };
                if answer != expected && !(malformed && first.request != *request) {
                    self.violations.push(format!(
                        "PlaceBet key {} of user {} ({request:?}) was answered {answer:?} after {:?}",
                        request.key, request.user, first.answer
                    ));
                }
            }
            // Nothing is known to be stored yet (the round was not open yet,
            // say): this answer is the key's now. A reused-key answer says
            // something is stored whose own answer is still on its way (or
            // was lost and will be retried); it settles nothing.
            _ => {
                if answer != Answer::Refused("IDEMPOTENCY_KEY_REUSED".into()) {
                    self.bets.insert(
                        slot,
                        Record {
                            request: request.clone(),
                            answer,
                        },
                    );
                }
            }
        }
    }

    pub fn money(&mut self, request: &MoneyRequest, reply: Reply) {
        let answer = match reply {
            Reply::Resolved(answer) => answer,
            Reply::Unknown => {
                self.unknown_answers += 1;
                self.unresolved.push(Request::Money(request.clone()));
                return;
            }
            Reply::Unexpected(status) => {
                self.violations.push(format!(
                    "{} {} of user {} got {:?}: {}",
                    if request.withdraw {
                        "Withdraw"
                    } else {
                        "Deposit"
                    },
                    request.key,
                    request.user,
                    status.code(),
                    status.message()
                ));
                return;
            }
        };
        match self.money.get(&request.key) {
            None => {
                self.money.insert(
                    request.key.clone(),
                    Record {
                        request: request.clone(),
                        answer,
                    },
                );
            }
            Some(first) if first.request == *request => {
                if first.answer != answer {
                    self.violations.push(format!(
                        "{} key {}: the same request was answered {:?}, then {:?}",
                        if request.withdraw {
                            "Withdraw"
                        } else {
                            "Deposit"
                        },
                        request.key,
                        first.answer,
                        answer
                    ));
                }
            }
            Some(first) => self.violations.push(format!(
                "money key {} used for two different requests ({:?} and {:?})",
                request.key, first.request, request
            )),
        }
    }

    /// The bet placed under a request's key, if it was.
    pub fn bet_of(&self, user: i64, key: &str) -> Option<String> {
        match self.bets.get(&(user, key.to_owned())) {
            Some(Record {
                answer: Answer::Bet(id),
                ..
            }) => Some(id.clone()),
            _ => None,
        }
    }

    /// Every acknowledged bet: id → request.
    pub fn acknowledged(&self) -> HashMap<String, PlaceRequest> {
        self.bets
            .values()
            .filter_map(|r| match &r.answer {
                Answer::Bet(id) => Some((id.clone(), r.request.clone())),
                _ => None,
            })
            .collect()
    }

    /// Net money each user brought in: genesis + deposits − withdrawals.
    pub fn net_external(&self) -> HashMap<i64, Decimal> {
        let mut net = self.genesis.clone();
        for record in self.money.values() {
            if let Answer::Entry(_) = record.answer {
                let signed = if record.request.withdraw {
                    -record.request.amount
                } else {
                    record.request.amount
                };
                *net.entry(record.request.user).or_default() += signed;
            }
        }
        net
    }

    /// Every resolved request whose answer stored something, to be asked
    /// again at the end: the answer must not have changed.
    pub fn replays(&self) -> Vec<Request> {
        let bets = self
            .bets
            .values()
            .filter(|r| r.answer.stores())
            .map(|r| Request::Place(r.request.clone()));
        let money = self
            .money
            .values()
            .filter(|r| r.answer.stores())
            .map(|r| Request::Money(r.request.clone()));
        bets.chain(money).collect()
    }
}
