//! The operator's commands: `betting keys generate` and `betting token`
//! with a private key (production-mode tokens), and `betting queue retry`
//! and `betting audit` leaving their rows in the privileged-action trail.

use std::{path::Path, process::Command, time::Duration};

use betting_auth::{KeySet, Role, TokenPolicy, Verifier};
use betting_queue::{Queue, QueueSettings};
use betting_test_kit::{SECRET, fresh_database};
use uuid::Uuid;

fn betting(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_betting"))
        .args(args)
        .env_remove("BETTING_JWT_SECRET")
        .output()
        .expect("run betting")
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn generated_keys_sign_tokens_the_key_set_verifies() {
    let dir = std::env::temp_dir().join(format!("betting-cli-keys-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let d = dir.to_str().expect("utf-8 path");
    for kid in ["k1", "k2"] {
        stdout(&betting(&["keys", "generate", "--kid", kid, "--dir", d]));
    }
    // The same kid again is refused: the key set stays unambiguous.
    assert!(
        !betting(&["keys", "generate", "--kid", "k1", "--dir", d])
            .status
            .success()
    );
    let key = Path::new(d).join("k2.pem");
    let token = stdout(&betting(&[
        "token",
        "--role",
        "game",
        "--subject",
        "table-7",
        "--key",
        key.to_str().expect("path"),
        "--kid",
        "k2",
        "--jwt-issuer",
        "betting",
        "--jwt-audience",
        "betting-api",
    ]));
    let token = token.lines().last().expect("a token").to_owned();
    let jwks = std::fs::read_to_string(dir.join("jwks.json")).expect("jwks");
    let verifier = Verifier::key_set(
        KeySet::from_jwks(&jwks).expect("two keys"),
        TokenPolicy {
            issuer: Some("betting".into()),
            audience: Some("betting-api".into()),
            max_lifetime: Duration::from_secs(86_400),
        },
    );
    let principal = verifier.verify(&token).expect("verifies");
    assert_eq!(
        (principal.role, principal.subject.as_str()),
        (Role::Game, "table-7")
    );
    // The retired role cannot be minted.
    let old = Command::new(env!("CARGO_BIN_EXE_betting"))
        .args(["token", "--user", "0", "--role", "backend"])
        .env("BETTING_JWT_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(!old.status.success());
    assert!(String::from_utf8_lossy(&old.stderr).contains("split"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_is_recorded_with_its_operator() {
    let database = fresh_database().await;
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL");
    let namespace = format!("t-{}", Uuid::new_v4().simple());
    let client = betting_queue::connect(&redis).expect("redis");
    let queue = Queue::new(
        client.clone(),
        &namespace,
        "settle",
        QueueSettings::default(),
    );
    queue
        .enqueue("settle:job-1", serde_json::json!({}))
        .await
        .expect("enqueue");
    let blocking = betting_queue::connect(&redis).expect("redis");
    let job = queue
        .fetch(&blocking, "c1", Duration::from_secs(1))
        .await
        .expect("fetch")
        .expect("a job");
    queue
        .fail("c1", &job, "poisoned", true)
        .await
        .expect("bury");

    let output = Command::new(env!("CARGO_BIN_EXE_betting"))
        .args([
            "queue",
            "retry",
            "settle:job-1",
            "--queue",
            "settle",
            "--operator",
            "alice",
        ])
        .env("REDIS_URL", &redis)
        .env("BETTING_REDIS_NAMESPACE", &namespace)
        .env("DATABASE_URL", &*database)
        .output()
        .expect("run");
    stdout(&output);

    let pool =
        betting_db::connect_lazy(&database, &betting_db::PoolSettings::default()).expect("pool");
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT subject, role, action, target FROM privileged_actions ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("trail");
    assert_eq!(
        rows,
        [(
            "alice".to_owned(),
            "operator-cli".to_owned(),
            "QUEUE_RETRY".to_owned(),
            "job:settle:settle:job-1".to_owned()
        )]
    );

    // `betting audit` is recorded too.
    let output = Command::new(env!("CARGO_BIN_EXE_betting"))
        .args(["audit", "--operator", "bob"])
        .env("DATABASE_URL", &*database)
        .output()
        .expect("run");
    stdout(&output);
    let audits: Vec<(String, String)> =
        sqlx::query_as("SELECT subject, action FROM privileged_actions WHERE action = 'AUDIT_RUN'")
            .fetch_all(&pool)
            .await
            .expect("trail");
    assert_eq!(audits, [("bob".to_owned(), "AUDIT_RUN".to_owned())]);
}
