//! Production-mode tokens end to end: the server verifies against a JWKS
//! (no shared secret anywhere), our own processes sign their service tokens
//! with the private key only they hold, and a whole round — stakes, matching,
//! the settler's payout — runs on them. Unsafe mixes stop the process at
//! start-up.

use std::path::PathBuf;

use betting_api::pb;
use betting_auth::{Role, SigningKey, TokenMinter, generate_ed25519};
use betting_config::{ProcessRole, TokenSettings};
use betting_test_kit::{SECRET, TestApp, authed, dec, expect_code, fresh_database, redis_url};
use tonic::Code;
use uuid::Uuid;

const ISS: &str = "betting";
const AUD: &str = "betting-api";

/// A directory with two key pairs (one for our services, one for people and
/// game servers) and the JWKS of both public halves.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("betting-keys-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("key dir");
        let mut keys = Vec::new();
        for kid in ["svc", "ops"] {
            let (pem, jwks) = generate_ed25519(kid).expect("generate");
            std::fs::write(dir.join(format!("{kid}.pem")), pem).expect("pem");
            let set: serde_json::Value = serde_json::from_str(&jwks).expect("jwks");
            keys.push(set["keys"][0].clone());
        }
        std::fs::write(
            dir.join("jwks.json"),
            serde_json::json!({ "keys": keys }).to_string(),
        )
        .expect("jwks");
        Self { dir }
    }

    fn settings(&self, signs: bool) -> TokenSettings {
        TokenSettings {
            jwt_secret: None,
            jwt_jwks: Some(self.dir.join("jwks.json")),
            jwt_signing_key: signs.then(|| self.dir.join("svc.pem")),
            jwt_signing_kid: signs.then(|| "svc".to_owned()),
            jwt_issuer: Some(ISS.into()),
            jwt_audience: Some(AUD.into()),
            jwt_max_lifetime_secs: 3600,
        }
    }

    /// The minter of people's and game servers' tokens.
    fn ops(&self) -> TokenMinter {
        let pem = std::fs::read(self.dir.join("ops.pem")).expect("pem");
        TokenMinter::with_key(
            SigningKey::from_pem(&pem, "ops").expect("key"),
            Some(ISS),
            Some(AUD),
        )
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_round_runs_on_signed_tokens_and_the_shared_secret_is_refused() {
    let keys = Keys::new();
    let database = fresh_database().await;
    let mut settings = betting_test_kit::settings(&database, &redis_url());
    settings.tokens = keys.settings(true);
    let app = TestApp::spawn_with(settings).await.with_minter(keys.ops());

    app.deposit(1, "100").await;
    app.deposit(2, "100").await;
    app.open_round("r").await;
    let a = app.place_ok(1, "r", pb::Side::A, "10").await;
    app.place_ok(2, "r", pb::Side::B, "10").await;
    app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Matched).await;
    app.settle_round("r", pb::Side::A).await.expect("settle");
    // The settler paid through WalletService with its own signed service token.
    app.wait_for_bet(1, &a.bet_id, pb::BetStatus::Settled).await;
    assert_eq!(app.balance(1).await, dec("110"));
    assert_eq!(app.balance(2).await, dec("90"));

    // A local-mode token, however valid its HS256 signature, is not accepted.
    let hs256 = TokenMinter::new(SECRET.as_bytes(), Some(ISS), Some(AUD))
        .mint(1, Role::Player, std::time::Duration::from_secs(60))
        .expect("mint");
    expect_code(
        app.wallet()
            .get_wallet(authed(pb::GetWalletRequest { user_id: 0 }, &hs256))
            .await,
        Code::Unauthenticated,
    );
    app.assert_audit_clean().await;
    drop(app);
    drop(database);
}

#[tokio::test]
async fn unsafe_token_settings_stop_the_process_at_start_up() {
    let keys = Keys::new();
    let database = fresh_database().await;
    let base = betting_test_kit::settings(&database, &redis_url());

    let mut mixed = base.clone();
    mixed.tokens = keys.settings(true);
    mixed.tokens.jwt_secret = Some(betting_config::Secret::new(SECRET));
    // A wallet-only process holds no private key.
    let mut verifier_with_key = base.clone();
    verifier_with_key.tokens = keys.settings(true);
    verifier_with_key.roles = vec![ProcessRole::Wallet];
    // A signer without its key.
    let mut signer_without_key = base.clone();
    signer_without_key.tokens = keys.settings(false);
    // A signing key whose kid the key set names with another key.
    let mut wrong_kid = base.clone();
    wrong_kid.tokens = keys.settings(true);
    wrong_kid.tokens.jwt_signing_kid = Some("ops".into());

    for (name, settings) in [
        ("secret beside a key set", mixed),
        ("private key in a verifier", verifier_with_key),
        ("signer without a key", signer_without_key),
        ("key under another kid", wrong_kid),
    ] {
        let built = betting_server::Application::build(settings).await;
        assert!(built.is_err(), "{name}: started");
    }
}
