//! Sides, statuses and kinds, with their storage spelling.
//!
//! Storage uses short upper-case words (`'PENDING'`) guarded by CHECK
//! constraints; [`as_db`](Side::as_db)/[`from_db`](Side::from_db) are the only
//! translation. `FromStr` and `TryFrom<String>` decode through `from_db` and
//! refuse any other word with an [`UnknownDbValue`], so a store can read a
//! column straight into its enum (`#[sqlx(try_from = "String")]`).

/// A stored word that no variant spells: a value no version of the code wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a stored {kind}")]
pub struct UnknownDbValue {
    /// The enum that was asked for.
    pub kind: &'static str,
    pub value: String,
}

macro_rules! db_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $db:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_db(self) -> &'static str {
                match self {
                    $($name::$variant => $db),+
                }
            }

            pub fn from_db(text: &str) -> Option<Self> {
                match text {
                    $($db => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownDbValue;

            fn from_str(text: &str) -> Result<Self, UnknownDbValue> {
                Self::from_db(text).ok_or_else(|| UnknownDbValue {
                    kind: stringify!($name),
                    value: text.to_owned(),
                })
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownDbValue;

            fn try_from(text: String) -> Result<Self, UnknownDbValue> {
                match Self::from_db(&text) {
                    Some(value) => Ok(value),
                    None => Err(UnknownDbValue {
                        kind: stringify!($name),
                        value: text,
                    }),
                }
            }
        }
    };
}

db_enum!(
    /// The side of a round a bet backs.
    Side { A => "A", B => "B" }
);

impl Side {
    pub fn opposite(self) -> Self {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

db_enum!(
    /// A bet's state. `Placing` and `Rejected` are internal: a bet is `Placing`
    /// between its row being written and its stake being held, and `Rejected`
    /// when the stake could not be taken. Clients never see either.
    BetStatus {
        Placing => "PLACING",
        Rejected => "REJECTED",
        Pending => "PENDING",
        Matched => "MATCHED",
        Settled => "SETTLED",
        Refunded => "REFUNDED",
    }
);

impl BetStatus {
    /// Whether clients may see a bet in this state.
    pub fn is_visible(self) -> bool {
        !matches!(self, BetStatus::Placing | BetStatus::Rejected)
    }
}

db_enum!(
    BetResult { Won => "WON", Lost => "LOST" }
);

db_enum!(
    RefundReason {
        Cancelled => "CANCELLED",
        MatchTimeout => "MATCH_TIMEOUT",
        RoundClosed => "ROUND_CLOSED",
        RoundVoided => "ROUND_VOIDED",
    }
);

db_enum!(
    RoundStatus {
        Open => "OPEN",
        Closed => "CLOSED",
        Settled => "SETTLED",
        Voided => "VOIDED",
    }
);

db_enum!(
    /// A match's state: `Open` until it is paid (`Settled`) or its round is
    /// voided (`Voided`).
    MatchStatus {
        Open => "OPEN",
        Settled => "SETTLED",
        Voided => "VOIDED",
    }
);

db_enum!(
    /// The kind of a ledger movement.
    EntryKind {
        Deposit => "DEPOSIT",
        Withdrawal => "WITHDRAWAL",
        Stake => "STAKE",
        Refund => "REFUND",
        Payout => "PAYOUT",
    }
);

impl EntryKind {
    /// The system account on the other side of the user's wallet, and whether
    /// the movement credits the wallet.
    pub fn counterparty(self) -> (Account, bool) {
        match self {
            EntryKind::Deposit => (Account::External, true),
            EntryKind::Withdrawal => (Account::External, false),
            EntryKind::Stake => (Account::Escrow, false),
            EntryKind::Refund => (Account::Escrow, true),
            EntryKind::Payout => (Account::Escrow, true),
        }
    }
}

db_enum!(
    /// System accounts. Their balances are never stored: each is derived from
    /// the ledger, so no row is locked by every transaction.
    Account {
        External => "EXTERNAL",
        Escrow => "ESCROW",
        House => "HOUSE",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_spelling_round_trips() {
        for s in BetStatus::ALL {
            assert_eq!(BetStatus::from_db(s.as_db()), Some(*s));
        }
        for k in EntryKind::ALL {
            assert_eq!(EntryKind::from_db(k.as_db()), Some(*k));
        }
        assert_eq!(Side::from_db("C"), None);
        assert_eq!(Side::A.opposite(), Side::B);
    }

    /// Every variant of `E` decodes back from its storage spelling, through
    /// both `FromStr` and `TryFrom<String>`.
    fn decodes_every_variant<E>(all: &[E], as_db: fn(E) -> &'static str)
    where
        E: Copy + PartialEq + std::fmt::Debug + std::str::FromStr<Err = UnknownDbValue>,
        E: TryFrom<String, Error = UnknownDbValue>,
    {
        for value in all {
            let text = as_db(*value);
            assert_eq!(text.parse::<E>(), Ok(*value), "{text}");
            assert_eq!(E::try_from(text.to_owned()), Ok(*value), "{text}");
        }
    }

    #[test]
    fn every_enum_decodes_its_storage_spelling() {
        decodes_every_variant(Side::ALL, Side::as_db);
        decodes_every_variant(BetStatus::ALL, BetStatus::as_db);
        decodes_every_variant(BetResult::ALL, BetResult::as_db);
        decodes_every_variant(RefundReason::ALL, RefundReason::as_db);
        decodes_every_variant(RoundStatus::ALL, RoundStatus::as_db);
        decodes_every_variant(MatchStatus::ALL, MatchStatus::as_db);
        decodes_every_variant(EntryKind::ALL, EntryKind::as_db);
        decodes_every_variant(Account::ALL, Account::as_db);
    }

    #[test]
    fn unknown_words_are_refused() {
        let refused = UnknownDbValue {
            kind: "BetStatus",
            value: "pending".to_owned(),
        };
        // Spellings are exact: no case folding, no trimming.
        assert_eq!("pending".parse::<BetStatus>(), Err(refused.clone()));
        assert_eq!(BetStatus::try_from("pending".to_owned()), Err(refused));
        assert!(" OPEN".parse::<RoundStatus>().is_err());
        assert!(RoundStatus::try_from(String::new()).is_err());
        assert!(MatchStatus::try_from("CLOSED".to_owned()).is_err());
        assert!("WITHDRAW".parse::<EntryKind>().is_err());
        assert_eq!(
            Side::try_from("C".to_owned()).map_err(|e| e.to_string()),
            Err("\"C\" is not a stored Side".to_owned())
        );
    }
}
