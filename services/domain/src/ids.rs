//! Identifiers, parsed at the edge.

use std::fmt;

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    #[error("is required")]
    Empty,
    #[error("must be a positive integer")]
    NotPositive,
    #[error("must be a UUID")]
    NotUuid,
    #[error("must be 1-64 characters of [A-Za-z0-9._:-]")]
    BadRoundId,
    #[error("must be 1-128 printable ASCII characters without spaces")]
    BadIdempotencyKey,
    #[error("must be at most 128 printable characters")]
    BadReference,
}

/// A user, as named by the `sub` claim of a token. Always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(i64);

impl UserId {
    pub fn new(id: i64) -> Result<Self, ParseIdError> {
        if id > 0 {
            Ok(Self(id))
        } else {
            Err(ParseIdError::NotPositive)
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for UserId {
    type Error = ParseIdError;

    fn try_from(id: i64) -> Result<Self, ParseIdError> {
        Self::new(id)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id (UUIDv7), so that btree indexes on it stay compact.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn parse(text: &str) -> Result<Self, ParseIdError> {
                if text.is_empty() {
                    return Err(ParseIdError::Empty);
                }
                Uuid::try_parse(text).map(Self).map_err(|_| ParseIdError::NotUuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A bet.
    BetId
);
uuid_id!(
    /// A pair of opposite bets of equal stake.
    MatchId
);

/// A round, named by the game: 1-64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoundId(String);

impl RoundId {
    pub fn parse(text: &str) -> Result<Self, ParseIdError> {
        if text.is_empty() {
            return Err(ParseIdError::Empty);
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if text.len() > 64 || !text.bytes().all(allowed) {
            return Err(ParseIdError::BadRoundId);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-chosen key that makes a money movement safe to retry:
/// 1-128 printable ASCII characters, no spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<Self, ParseIdError> {
        if text.is_empty() {
            return Err(ParseIdError::Empty);
        }
        if text.len() > 128 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ParseIdError::BadIdempotencyKey);
        }
        Ok(Self(text.to_owned()))
    }

    /// The key of a stake taken for a bet.
    pub fn stake(bet: BetId) -> Self {
        Self(format!("BET:{bet}"))
    }

    /// The key of a bet's refund: a bet is refunded at most once.
    pub fn refund(bet: BetId) -> Self {
        Self(format!("REFUND:{bet}"))
    }

    /// The key of a match's payout: a match pays out at most once.
    pub fn settle(m: MatchId) -> Self {
        Self(format!("SETTLE:{m}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Free text a caller attaches to a deposit or withdrawal: at most 128
/// characters, no control characters. Empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Reference(String);

impl Reference {
    pub fn parse(text: &str) -> Result<Self, ParseIdError> {
        if text.chars().count() > 128 || text.chars().any(char::is_control) {
            return Err(ParseIdError::BadReference);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ids() {
        assert!(RoundId::parse("round-2024.01:x_Y").is_ok());
        assert!(RoundId::parse(&"a".repeat(64)).is_ok());
        assert_eq!(RoundId::parse(""), Err(ParseIdError::Empty));
        assert_eq!(
            RoundId::parse(&"a".repeat(65)),
            Err(ParseIdError::BadRoundId)
        );
        assert_eq!(RoundId::parse("a b"), Err(ParseIdError::BadRoundId));
        assert_eq!(RoundId::parse("é"), Err(ParseIdError::BadRoundId));
    }

    #[test]
    fn idempotency_keys() {
        assert!(IdempotencyKey::parse("client-1:retry/ok").is_ok());
        assert_eq!(IdempotencyKey::parse(""), Err(ParseIdError::Empty));
        assert_eq!(
            IdempotencyKey::parse("a b"),
            Err(ParseIdError::BadIdempotencyKey)
        );
        assert_eq!(
            IdempotencyKey::parse(&"k".repeat(129)),
            Err(ParseIdError::BadIdempotencyKey)
        );
    }

    #[test]
    fn user_ids_are_positive() {
        assert!(UserId::new(1).is_ok());
        assert_eq!(UserId::new(0), Err(ParseIdError::NotPositive));
        assert_eq!(UserId::new(-5), Err(ParseIdError::NotPositive));
        assert_eq!(UserId::try_from(7).map(UserId::get), Ok(7));
        assert_eq!(UserId::try_from(0), Err(ParseIdError::NotPositive));
    }

    #[test]
    fn bet_ids() {
        let id = BetId::generate();
        assert_eq!(BetId::parse(&id.to_string()), Ok(id));
        assert_eq!(BetId::parse("nope"), Err(ParseIdError::NotUuid));
    }
}
