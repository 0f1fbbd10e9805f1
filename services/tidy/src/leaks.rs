//! The error-message scan: what no message sent to a client may contain.
//!
//! `deploy/local/test` runs the whole suite with `BETTING_TEST_STATUS_LOG`
//! set, so every server records each error status it sends (code, message,
//! details; `betting-server`'s `status_log`), then runs the test
//! `every_error_message_sent_is_clean` (`tests/leaks.rs`) over that file,
//! which fails listing every line [`leaks`] finds something in. Internals
//! are logged for operators; a client gets a code, a reason and a plain
//! message, never SQL, a driver's words, a path on our disks or a panic.

/// One kind of leak, and the words that give it away.
struct Rule {
    name: &'static str,
    /// Matched case-insensitively.
    words: &'static [&'static str],
    /// Matched case-insensitively as whole words (no letter, digit or `_`
    /// on either side), for short words that occur inside others.
    whole_words: &'static [&'static str],
}

const RULES: &[Rule] = &[
    Rule {
        name: "SQL",
        words: &[
            "insert into",
            "delete from",
            "syntax error at",
            "violates",
            "sqlstate",
            "duplicate key value",
            "pg_catalog",
        ],
        whole_words: &["relation", "column", "constraint", "tuple"],
    },
    Rule {
        name: "driver",
        words: &[
            "tokio-postgres",
            "tokio_postgres",
            "error communicating with database",
            "pool timed out",
            "error returned from database",
            "redis error",
            "connection refused",
            "broken pipe",
            "connection reset",
        ],
        whole_words: &["sqlx", "fred", "postgres", "hyper", "h2"],
    },
    Rule {
        name: "path",
        words: &[
            "/work/", "/home", "/root/", "/tmp/", "/usr/", ".rs:", "/src/", "\\src\\",
        ],
        whole_words: &[],
    },
    Rule {
        name: "panic",
        words: &[
            "panicked at",
            "called `option::unwrap()`",
            "called `result::unwrap()`",
            "rust_backtrace",
            "stack backtrace",
        ],
        whole_words: &[],
    },
];

/// The kinds of leak `message` shows, with the word that gave each away
/// (empty when clean). SQL is also recognised by its shape: a `SELECT`
/// with a `FROM` or `WHERE`, an `UPDATE` with a `SET`.
pub fn leaks(message: &str) -> Vec<(&'static str, &'static str)> {
    let lower = message.to_lowercase();
    let mut found = Vec::new();
    for rule in RULES {
        if let Some(word) = rule.words.iter().find(|w| lower.contains(*w)) {
            found.push((rule.name, *word));
        } else if let Some(word) = rule.whole_words.iter().find(|w| has_word(&lower, w)) {
            found.push((rule.name, *word));
        }
    }
    let statement = (has_word(&lower, "select")
        && (has_word(&lower, "from") || has_word(&lower, "where")))
        || (has_word(&lower, "update") && has_word(&lower, "set"));
    if statement && !found.iter().any(|(rule, _)| *rule == "SQL") {
        found.push(("SQL", "a statement"));
    }
    found
}

/// Whether `word` occurs in `text` with no word character either side.
fn has_word(text: &str, word: &str) -> bool {
    let inner = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    text.match_indices(word).any(|(i, _)| {
        !inner(text[..i].chars().next_back()) && !inner(text[i + word.len()..].chars().next())
    })
}

#[cfg(test)]
mod tests {
    use super::leaks;

    #[test]
    fn what_we_send_is_clean() {
        for message in [
            "service temporarily unavailable, retry later",
            "internal error",
            "insufficient funds",
            "invalid amount: at most 8 fractional digits",
            "round r-1 is not open",
            "the token has expired",
            "idempotency key reused with a different request",
            "page_token: not a page token of this list",
            "Timeout expired",
            "grpc-status header missing, mapped from HTTP status code 404",
        ] {
            assert_eq!(leaks(message), [], "{message}");
        }
    }

    #[test]
    fn each_kind_of_leak_is_caught() {
        for (message, kind) in [
            (
                "error returned from database: relation \"bets\" does not exist",
                "SQL",
            ),
            ("SELECT balance FROM wallets WHERE user_id = $1", "SQL"),
            ("update wallets set balance = 0", "SQL"),
            (
                "duplicate key value violates unique constraint \"bets_user_key_unique\"",
                "SQL",
            ),
            ("null value in column \"amount\"", "SQL"),
            (
                "error communicating with database: Connection refused",
                "driver",
            ),
            (
                "pool timed out while waiting for an open connection",
                "driver",
            ),
            ("sqlx::Error::RowNotFound", "driver"),
            ("Redis Error - kind: IO, details: Broken pipe", "driver"),
            ("fred: connection closed", "driver"),
            (
                "h2 protocol error: error reading a body from connection",
                "driver",
            ),
            ("at /work/main/services/wallet/src/ledger.rs:120:5", "path"),
            (
                "/home/ci/.cargo/registry/src/tonic-0.14/src/codec.rs",
                "path",
            ),
            (
                "thread 'tokio-runtime-worker' panicked at services/x.rs:1:1",
                "panic",
            ),
            ("called `Option::unwrap()` on a `None` value", "panic"),
        ] {
            let found = leaks(message);
            assert!(
                found.iter().any(|(k, _)| *k == kind),
                "{message}: expected {kind}, found {found:?}"
            );
        }
    }
}
