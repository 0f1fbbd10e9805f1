//! `betting health`, the probe the compose file and exec health checks run:
//! exit 0 only while the server answers SERVING for the service asked about.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use betting_test_kit::{
    ChildGuard, SECRET, TestApp, TestRedis, eventually, free_port, fresh_database, service_url,
    settings,
};

/// Runs `betting health ARGS` with `env`, and nothing of the test's own
/// settings that it reads; off the runtime's threads, which serve the app.
async fn health(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_betting"));
    command.arg("health").args(args);
    for name in [
        "BETTING_LISTEN_ADDR",
        "BETTING_TLS_CERT",
        "BETTING_TLS_CA",
        "BETTING_TLS_CLIENT_CERT",
        "BETTING_TLS_CLIENT_KEY",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run betting health")
}

fn says(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn a_serving_server_passes_for_itself_and_each_mounted_service() {
    let app = TestApp::spawn().await;
    let addr = format!("http://{}", app.addr);
    for service in ["", "betting.v1.WalletService", "betting.v1.BettingService"] {
        let output = health(&["--addr", &addr, "--service", service], &[]).await;
        assert!(output.status.success(), "{service:?}: {}", says(&output));
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    }
    // A name the server does not serve is a failure, not a pass.
    let output = health(&["--addr", &addr, "--service", "betting.v1.Nope"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", says(&output));

    // Without --addr: the address the server's own environment names, an
    // unspecified one asked on loopback (as in a container).
    let listen = format!("0.0.0.0:{}", app.addr.port());
    let output = health(&[], &[("BETTING_LISTEN_ADDR", listen)]).await;
    assert!(output.status.success(), "{}", says(&output));
}

#[tokio::test]
async fn nothing_listening_fails_within_the_timeout() {
    let started = Instant::now();
    let addr = format!("http://127.0.0.1:{}", free_port());
    let output = health(&["--addr", &addr, "--timeout", "2"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", says(&output));
    assert!(started.elapsed() < Duration::from_secs(10));
    // An https:// server needs a CA to check it with; saying so is a failure too.
    let https = format!("https://127.0.0.1:{}", free_port());
    let output = health(&["--addr", &https], &[]).await;
    assert_eq!(output.status.code(), Some(1));
    let said = says(&output);
    assert!(said.contains("BETTING_TLS_CA"), "{said}");
}

#[tokio::test]
async fn a_server_whose_redis_is_down_fails_until_it_is_back() {
    let mut redis = TestRedis::start();
    let url = fresh_database().await;
    let app = TestApp::spawn_with(settings(&url, &redis.url())).await;
    let addr = format!("http://{}", app.addr);
    let passes = |want: bool| {
        let addr = addr.clone();
        async move {
            let output = health(&["--addr", &addr], &[]).await;
            (output.status.success() == want).then_some(says(&output))
        }
    };
    let within = Duration::from_secs(15);
    eventually("health passes", within, || passes(true)).await;
    redis.stop();
    let said = eventually("health fails", within, || passes(false)).await;
    assert!(said.contains("NOT_SERVING"), "{said}");
    redis.restart();
    eventually("health passes again", within, || passes(true)).await;
}

/// Over mutual TLS, as a container whose server serves TLS probes itself:
/// the address and the scheme from the server's own settings, the CA and
/// the client certificate from the same environment.
#[tokio::test]
async fn a_tls_server_passes_with_the_ca_and_a_client_certificate() {
    let dir = std::env::temp_dir().join(format!("betting-health-tls-{}", free_port()));
    let certs = Command::new(env!("CARGO_BIN_EXE_betting"))
        .args(["dev-certs", "--out", dir.to_str().expect("utf-8 path")])
        .output()
        .expect("dev-certs");
    assert!(certs.status.success(), "{}", says(&certs));
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let url = fresh_database().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let _server = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_betting"))
            .args(["serve", "--role", "wallet"])
            .env("DATABASE_URL", service_url(&url))
            .env("REDIS_URL", std::env::var("REDIS_URL").expect("REDIS_URL"))
            .env(
                "BETTING_REDIS_NAMESPACE",
                format!("t-health-{}", free_port()),
            )
            .env("BETTING_JWT_SECRET", SECRET)
            .env("BETTING_LISTEN_ADDR", &listen)
            .env("BETTING_METRICS_ADDR", "127.0.0.1:0")
            .env("BETTING_TLS_CERT", file("server.pem"))
            .env("BETTING_TLS_KEY", file("server.key"))
            .env("BETTING_TLS_CLIENT_CA", file("ca.pem"))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .expect("start a TLS server");
    let env = vec![
        ("BETTING_LISTEN_ADDR", listen.clone()),
        ("BETTING_TLS_CERT", file("server.pem")),
        ("BETTING_TLS_CA", file("ca.pem")),
        ("BETTING_TLS_CLIENT_CERT", file("client.pem")),
        ("BETTING_TLS_CLIENT_KEY", file("client.key")),
    ];
    eventually(
        "health passes over mutual TLS",
        Duration::from_secs(30),
        async || health(&[], &env).await.status.success().then_some(()),
    )
    .await;
    // Without a client certificate the server refuses the handshake.
    let output = health(&[], &env[..3]).await;
    assert_eq!(output.status.code(), Some(1), "{}", says(&output));
    // Plaintext to a TLS port is no answer either.
    let plain = format!("http://{listen}");
    let output = health(&["--addr", &plain], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", says(&output));
    let _ = std::fs::remove_dir_all(&dir);
}
