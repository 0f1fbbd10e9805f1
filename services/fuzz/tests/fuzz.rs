//! Fuzz targets: request parsing and validation (amounts, ids, enums, page
//! sizes and tokens, the api crate's conversions), bearer tokens, and queue
//! job decoding. Each states a property, not only "does not panic".
//!
//! Cases per target: `BETTING_FUZZ_CASES` (default 5,000). A failure prints
//! the minimal input proptest shrank it to.

use betting_api::convert::{
    bet_status_filter_from_pb, bet_status_to_pb, decode_page_token, encode_page_token, page_size,
    side_from_pb, side_to_pb,
};
use betting_auth::{Role, TokenMinter, TokenPolicy, Verifier};
use betting_domain::{Amount, BetId, IdempotencyKey, Reference, RoundId, Stake, UserId};
use betting_jobs::{JobKind, MatchJob, RefundJob, SettleJob};
use betting_queue::Job;
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::time::Duration;

fn config() -> ProptestConfig {
    let cases = std::env::var("BETTING_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    ProptestConfig {
        cases,
        // Keep shrinking bounded on a long run's failure.
        max_shrink_iters: 10_000,
        ..ProptestConfig::default()
    }
}

/// Strings shaped like amounts, and near misses: digits, points, signs,
/// exponents, spaces, non-ASCII digits.
fn amount_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,16}(\\.[0-9]{1,10})?",
        "[0-9.+\\-eE ,_]{0,24}",
        "[0-9٠-٩０-９]{1,6}",
        any::<String>(),
    ]
}

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret!";

proptest! {
    #![proptest_config(config())]

    /// An accepted amount is positive, at most 10^12 with at most 8
    /// fractional digits, equals the decimal it was written as, and its
    /// printed form parses back to itself.
    #[test]
    fn amounts_round_trip_exactly(text in amount_like()) {
        if let Ok(amount) = Amount::parse(&text) {
            let value = amount.as_decimal();
            prop_assert!(value > Decimal::ZERO && value <= Amount::MAX);
            prop_assert!(value.normalize().scale() <= 8);
            prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
            let written: Decimal = text.parse().expect("an accepted amount is a decimal");
            prop_assert_eq!(value, written);
            let again = Amount::parse(&amount.to_string()).expect("its printed form parses");
            prop_assert_eq!(again, amount);
            // A stake is exactly an amount of at most half the maximum.
            prop_assert_eq!(Stake::parse(&text).is_ok(), value * Decimal::TWO <= Amount::MAX);
        }
    }

    /// Every amount the domain can hold is printed in a form that is
    /// accepted and means the same value.
    #[test]
    fn every_valid_amount_prints_parseably(
        units in prop_oneof![1i64..=1_000_000_000_000, 1i64..=i64::MAX],
        scale in 0u32..=8,
    ) {
        if let Ok(amount) = Amount::try_from_decimal(Decimal::new(units, scale)) {
            let parsed = Amount::parse(&amount.to_string());
            prop_assert_eq!(parsed, Ok(amount));
        }
    }

    /// Ids: accepted ones satisfy the schema's CHECKs and print back to
    /// what parses to the same id.
    #[test]
    fn ids_parse_only_what_the_schema_allows(text in prop_oneof![
        "[A-Za-z0-9._:\\-]{0,70}",
        "[0-9a-fA-F\\-]{30,40}",
        any::<String>(),
    ], number in any::<i64>()) {
        if let Ok(round) = RoundId::parse(&text) {
            prop_assert!((1..=64).contains(&text.len()));
            prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b)));
            prop_assert_eq!(round.as_str(), text.as_str());
        }
        if let Ok(key) = IdempotencyKey::parse(&text) {
            prop_assert!((1..=128).contains(&text.len()));
            prop_assert!(text.bytes().all(|b| b.is_ascii_graphic()));
            prop_assert_eq!(key.as_str(), text.as_str());
        }
        if let Ok(reference) = Reference::parse(&text) {
            prop_assert!(!text.chars().any(char::is_control));
            prop_assert_eq!(reference.as_str(), text.as_str());
        }
        if let Ok(bet) = BetId::parse(&text) {
            prop_assert_eq!(BetId::parse(&bet.to_string()), Ok(bet));
        }
        match UserId::new(number) {
            Ok(user) => {
                prop_assert!(number > 0);
                prop_assert_eq!(user.get(), number);
            }
            Err(_) => prop_assert!(number <= 0),
        }
    }

    /// Wire enums and page sizes: exactly the defined values are accepted.
    #[test]
    fn enums_and_page_sizes_accept_only_defined_values(value in any::<i32>()) {
        prop_assert_eq!(side_from_pb(value).is_ok(), value == 1 || value == 2);
        // A filter names a status that maps back to the same wire value.
        match bet_status_filter_from_pb(value) {
            Ok(Some(status)) => prop_assert_eq!(bet_status_to_pb(status) as i32, value),
            Ok(None) => prop_assert_eq!(value, 0),
            Err(_) => prop_assert!(value != 0),
        }
        if let Ok(side) = side_from_pb(value) {
            prop_assert_eq!(side_to_pb(side) as i32, value);
        }
        match page_size(value) {
            Ok(size) => prop_assert!((1..=500).contains(&size)),
            Err(_) => prop_assert!(!(0..=500).contains(&value)),
        }
    }

    /// Page tokens: every cursor round-trips; a token the service accepts
    /// is exactly the one it would have issued for that cursor; garbage is
    /// refused, never a panic.
    #[test]
    fn page_tokens_round_trip_and_refuse_garbage(cursor in any::<String>(), token in prop_oneof![
        "[A-Za-z0-9_\\-]{0,40}",
        "[A-Za-z0-9+/=_\\-]{0,40}",
        any::<String>(),
    ]) {
        // The empty token means "from the start", so the empty cursor has no token.
        let expected = (!cursor.is_empty()).then(|| cursor.clone());
        prop_assert_eq!(decode_page_token(&encode_page_token(&cursor)), Ok(expected));
        if let Ok(Some(decoded)) = decode_page_token(&token) {
            prop_assert_eq!(encode_page_token(&decoded), token);
        }
    }

    /// Bearer tokens: arbitrary header values are refused without a panic.
    #[test]
    fn arbitrary_authorization_headers_are_refused(header in prop_oneof![
        "(Bearer|bearer|BEARER|Basic) [A-Za-z0-9_\\-.=]{0,200}",
        "Bearer ey[A-Za-z0-9_\\-]{10,60}\\.ey[A-Za-z0-9_\\-]{10,80}\\.[A-Za-z0-9_\\-]{0,50}",
        any::<String>(),
    ]) {
        let verifier = Verifier::hs256(SECRET, TokenPolicy::local());
        prop_assert!(verifier.verify_header(Some(&header)).is_err());
    }

    /// A valid token with any one character changed, inserted or removed is
    /// refused (its signature covers every byte), unless the change left
    /// it the same token.
    #[test]
    fn mutated_tokens_are_never_accepted(
        user in 1i64..1_000_000,
        role in prop_oneof![Just(Role::Player), Just(Role::Game), Just(Role::Admin)],
        at in any::<prop::sample::Index>(),
        edit in 0u8..3,
        with in prop_oneof![proptest::char::range('!', '~'), any::<char>()],
    ) {
        let minter = TokenMinter::new(SECRET, None, None);
        let verifier = Verifier::hs256(SECRET, TokenPolicy::local());
        let token = minter.mint(user, role, Duration::from_secs(600)).expect("mint");
        let original = verifier.verify_header(Some(&format!("Bearer {token}"))).expect("valid");
        prop_assert_eq!(original.role, role);

        let mut chars: Vec<char> = token.chars().collect();
        let i = at.index(chars.len());
        match edit {
            0 => chars[i] = with,
            1 => chars.insert(i, with),
            _ => { chars.remove(i); }
        }
        let mutated: String = chars.into_iter().collect();
        if mutated.trim() != token {
            let verdict = verifier.verify_header(Some(&format!("Bearer {mutated}")));
            // Refused, whichever check sees the damage first (the header's
            // `typ`, the signature, the encoding).
            prop_assert!(verdict.is_err(), "accepted a mutated token: {} -> {:?}", mutated, verdict);
        }
        // Another secret never accepts it either.
        let other = Verifier::hs256(b"another-secret-another-secret-0123456", TokenPolicy::local());
        let header = format!("Bearer {token}");
        prop_assert!(other.verify_header(Some(&header)).is_err());
    }

    /// Queue jobs: any stored text either decodes to a job or is refused;
    /// a payload decodes as at most what it says; a valid job re-encodes to
    /// the same id and payload.
    #[test]
    fn queue_jobs_decode_or_refuse(raw in prop_oneof![
        any::<String>(),
        "\\{\"id\":\"[a-z:0-9\\-]{0,20}\",\"payload\":\\{\"(bet_id|match_id|key|round_id)\":\"[a-zA-Z0-9:\\-]{0,40}\"\\},\"enqueued_at_ms\":[0-9]{1,14}\\}",
    ]) {
        if let Ok(job) = serde_json::from_str::<Job>(&raw) {
            // Each kind decides for itself, never a panic.
            if let Ok(m) = MatchJob::decode(&job) {
                prop_assert_eq!(MatchJob::decode(&reencode(&m)).ok().map(|j| j.id()), Some(m.id()));
            }
            if let Ok(s) = SettleJob::decode(&job) {
                prop_assert_eq!(SettleJob::decode(&reencode(&s)).ok().map(|j| j.id()), Some(s.id()));
            }
            if let Ok(r) = RefundJob::decode(&job) {
                prop_assert_eq!(RefundJob::decode(&reencode(&r)).ok().map(|j| j.id()), Some(r.id()));
            }
        }
    }

    /// A producer's job with one field of its JSON replaced: either refused,
    /// or decoded faithfully (an unknown field ignored; a known one read as
    /// exactly what it says, never coerced into some other job).
    #[test]
    fn mutated_job_payloads_never_change_identity(
        bet in any::<u128>(),
        round in "[A-Za-z0-9._:\\-]{1,64}",
        junk in prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
            Just(serde_json::json!({"nested": true})),
        ],
        field in prop_oneof![Just("bet_id"), Just("round_id"), Just("extra")],
    ) {
        let original = MatchJob { bet_id: uuid::Uuid::from_u128(bet), round_id: round };
        let job = reencode(&original);
        prop_assert_eq!(MatchJob::decode(&job).ok(), Some(original.clone()));
        let mut mutated = job.clone();
        if let Some(object) = mutated.payload.as_object_mut() {
            object.insert(field.to_owned(), junk);
        }
        if let Ok(decoded) = MatchJob::decode(&mutated) {
            if field == "extra" {
                prop_assert_eq!(decoded, original);
            } else {
                prop_assert_eq!(&decoded.payload()[field], &mutated.payload[field]);
            }
        }
    }
}

/// A job of `kind` as the queue stores it, through its JSON text.
fn reencode<K: JobKind>(kind: &K) -> Job {
    let job = serde_json::json!({
        "id": kind.id(),
        "payload": kind.payload(),
        "enqueued_at_ms": 1,
    });
    serde_json::from_str(&job.to_string()).expect("a job of ours decodes")
}
