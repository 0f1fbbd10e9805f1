//! Sides, statuses and kinds, with their storage spelling.
//!
//! Storage uses short upper-case words (`'PENDING'`) guarded by CHECK
//! constraints; [`as_db`](Side::as_db)/[`from_db`](Side::from_db) are the only
//! translation.

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
}
