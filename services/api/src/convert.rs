//! Conversions between wire types and domain types.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use betting_domain::{Account, BetResult, BetStatus, EntryKind, RefundReason, RoundStatus, Side};
use chrono::{DateTime, Utc};

use crate::pb;

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        // Always below 10^9, so it fits an i32.
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The inverse of [`timestamp`]; `None` for a time no `DateTime` holds.
pub fn datetime(t: prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

pub fn side_from_pb(value: i32) -> Result<Side, &'static str> {
    match pb::Side::try_from(value) {
        Ok(pb::Side::A) => Ok(Side::A),
        Ok(pb::Side::B) => Ok(Side::B),
        _ => Err("must be SIDE_A or SIDE_B"),
    }
}

pub fn side_to_pb(side: Side) -> pb::Side {
    match side {
        Side::A => pb::Side::A,
        Side::B => pb::Side::B,
    }
}

/// A status filter: unspecified means any.
pub fn bet_status_filter_from_pb(value: i32) -> Result<Option<BetStatus>, &'static str> {
    match pb::BetStatus::try_from(value) {
        Ok(pb::BetStatus::Unspecified) => Ok(None),
        Ok(pb::BetStatus::Pending) => Ok(Some(BetStatus::Pending)),
        Ok(pb::BetStatus::Matched) => Ok(Some(BetStatus::Matched)),
        Ok(pb::BetStatus::Settled) => Ok(Some(BetStatus::Settled)),
        Ok(pb::BetStatus::Refunded) => Ok(Some(BetStatus::Refunded)),
        Err(_) => Err("must be a BET_STATUS_* value"),
    }
}

pub fn bet_status_to_pb(status: BetStatus) -> pb::BetStatus {
    match status {
        // Internal states are never shown; map defensively.
        BetStatus::Placing | BetStatus::Rejected => pb::BetStatus::Unspecified,
        BetStatus::Pending => pb::BetStatus::Pending,
        BetStatus::Matched => pb::BetStatus::Matched,
        BetStatus::Settled => pb::BetStatus::Settled,
        BetStatus::Refunded => pb::BetStatus::Refunded,
    }
}

pub fn bet_result_to_pb(result: BetResult) -> pb::BetResult {
    match result {
        BetResult::Won => pb::BetResult::Won,
        BetResult::Lost => pb::BetResult::Lost,
    }
}

pub fn refund_reason_to_pb(reason: RefundReason) -> pb::RefundReason {
    match reason {
        RefundReason::Cancelled => pb::RefundReason::Cancelled,
        RefundReason::MatchTimeout => pb::RefundReason::MatchTimeout,
        RefundReason::RoundClosed => pb::RefundReason::RoundClosed,
        RefundReason::RoundVoided => pb::RefundReason::RoundVoided,
    }
}

pub fn round_status_to_pb(status: RoundStatus) -> pb::RoundStatus {
    match status {
        RoundStatus::Open => pb::RoundStatus::Open,
        RoundStatus::Closed => pb::RoundStatus::Closed,
        RoundStatus::Settled => pb::RoundStatus::Settled,
        RoundStatus::Voided => pb::RoundStatus::Voided,
    }
}

pub fn entry_kind_to_pb(kind: EntryKind) -> pb::EntryKind {
    match kind {
        EntryKind::Deposit => pb::EntryKind::Deposit,
        EntryKind::Withdrawal => pb::EntryKind::Withdrawal,
        EntryKind::Stake => pb::EntryKind::Stake,
        EntryKind::Refund => pb::EntryKind::Refund,
        EntryKind::Payout => pb::EntryKind::Payout,
    }
}

pub fn account_to_pb(account: Account) -> pb::Account {
    match account {
        Account::External => pb::Account::External,
        Account::Escrow => pb::Account::Escrow,
        Account::House => pb::Account::House,
    }
}

/// Default and largest page sizes of every list RPC.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 500;

pub fn page_size(requested: i32) -> Result<i64, &'static str> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 || i64::from(n) > MAX_PAGE_SIZE => Err("must be between 1 and 500"),
        n => Ok(i64::from(n)),
    }
}

/// Page tokens are opaque to clients: the service's cursor text, base64url.
pub fn encode_page_token(cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(cursor)
}

pub fn decode_page_token(token: &str) -> Result<Option<String>, &'static str> {
    if token.is_empty() {
        return Ok(None);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Some)
        .ok_or("is not a page token this service issued")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides() {
        assert_eq!(side_from_pb(1), Ok(Side::A));
        assert_eq!(side_from_pb(2), Ok(Side::B));
        assert!(side_from_pb(0).is_err());
        assert!(side_from_pb(7).is_err());
    }

    #[test]
    fn page_tokens_round_trip() {
        let token = encode_page_token("2024|abc");
        assert_eq!(decode_page_token(&token), Ok(Some("2024|abc".to_owned())));
        assert_eq!(decode_page_token(""), Ok(None));
        assert!(decode_page_token("***").is_err());
        assert_eq!(page_size(0), Ok(50));
        assert!(page_size(501).is_err());
        assert!(page_size(-1).is_err());
    }
}
