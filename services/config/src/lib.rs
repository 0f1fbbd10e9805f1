//! Settings for `betting serve`: flags with environment fallbacks, validated
//! before anything starts. Secrets are wrapped so they never print.

#![forbid(unsafe_code)]

mod edge;

pub use edge::EdgeSettings;
mod limits;
mod tokens;

pub use tokens::TokenSettings;

mod postgres_tls;
pub mod tls;

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

pub use tls::TlsSettings;

pub use limits::UserLimits;

/// A value that must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// The parts of the suite a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ProcessRole {
    /// WalletService (gRPC).
    Wallet,
    /// BettingService (gRPC) and its recovery pass.
    Betting,
    /// SettlementService (gRPC).
    Settlement,
    /// The matcher worker.
    Matcher,
    /// The settler worker.
    Settler,
}

impl ProcessRole {
    pub const ALL: [ProcessRole; 5] = [
        ProcessRole::Wallet,
        ProcessRole::Betting,
        ProcessRole::Settlement,
        ProcessRole::Matcher,
        ProcessRole::Settler,
    ];
}

/// Connection settings shared by every subcommand that talks to storage.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageSettings {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,

    /// Largest number of PostgreSQL connections this process opens.
    #[arg(long, env = "BETTING_DB_MAX_CONNECTIONS", default_value_t = 32)]
    pub db_max_connections: u32,
}

/// Everything `betting serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    pub storage: StorageSettings,

    #[command(flatten)]
    pub tls: TlsSettings,

    /// Redis URL.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Secret,

    /// Prefix of every Redis key, so deployments (and tests) can share a Redis.
    #[arg(long, env = "BETTING_REDIS_NAMESPACE", default_value = "betting")]
    pub redis_namespace: String,

    /// Where the gRPC server listens. Port 0 picks a free port.
    #[arg(long, env = "BETTING_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen_addr: SocketAddr,

    /// Where Prometheus metrics are served. Port 0 picks a free port.
    #[arg(long, env = "BETTING_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub tokens: TokenSettings,

    /// Where other roles reach WalletService, e.g. http://wallet:50051.
    /// Defaults to this process's own server when it runs the wallet role.
    #[arg(long, env = "BETTING_WALLET_ENDPOINT")]
    pub wallet_endpoint: Option<String>,

    /// The roles to run; repeat the flag. None means all of them.
    #[arg(
        long = "role",
        value_enum,
        env = "BETTING_ROLES",
        value_delimiter = ','
    )]
    pub roles: Vec<ProcessRole>,

    /// Seconds a PLACING bet is left to its request before the recovery pass takes over.
    #[arg(long, env = "BETTING_PLACING_GRACE_SECS", default_value_t = 10)]
    pub placing_grace_secs: u64,

    /// Milliseconds between recovery passes (the betting role).
    #[arg(
        long,
        alias = "maintenance-interval-ms",
        env = "BETTING_RECOVERY_INTERVAL_MS",
        default_value_t = 2000
    )]
    pub recovery_interval_ms: u64,

    /// Seconds a bet may wait for an opponent before it is refunded.
    #[arg(long, env = "BETTING_MATCH_TIMEOUT_SECS", default_value_t = 300)]
    pub match_timeout_secs: u64,

    /// Whether concurrent new PlaceBets share their commit (group commit:
    /// one PlaceStakes call, one wallet transaction, per batch). `false`
    /// places each bet alone, for comparison.
    #[arg(long, env = "BETTING_PLACE_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub place_group_commit: bool,

    /// Jobs each worker runs at once.
    #[arg(long, env = "BETTING_WORKER_CONCURRENCY", default_value_t = 8)]
    pub worker_concurrency: usize,

    /// Milliseconds a consumer's lease lasts without a heartbeat; after that a
    /// dead consumer's jobs go back to the queue. At least six fetch polls
    /// (6 s), so a live consumer's heartbeat is never late.
    #[arg(long, env = "BETTING_QUEUE_VISIBILITY_MS", default_value_t = 30_000)]
    pub queue_visibility_ms: u64,

    /// Milliseconds between reconciler passes.
    #[arg(long, env = "BETTING_RECONCILE_INTERVAL_MS", default_value_t = 5000)]
    pub reconcile_interval_ms: u64,

    /// Milliseconds between heartbeats on an idle stream.
    #[arg(long, env = "BETTING_STREAM_HEARTBEAT_MS", default_value_t = 15_000)]
    pub stream_heartbeat_ms: u64,

    /// Milliseconds a stream waits for a client that stopped reading before
    /// ending it with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BETTING_STREAM_SEND_TIMEOUT_MS", default_value_t = 10_000)]
    pub stream_send_timeout_ms: u64,

    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, env = "BETTING_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    #[command(flatten)]
    pub edge: EdgeSettings,

    #[command(flatten)]
    pub limits: UserLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("BETTING_JWT_SECRET must be at least 32 bytes")]
    WeakSecret,
    #[error(
        "BETTING_WALLET_ENDPOINT is required when the betting or settler role runs without the wallet role"
    )]
    NoWalletEndpoint,
    #[error("BETTING_WALLET_ENDPOINT must be an http:// or https:// URL")]
    BadWalletEndpoint,
    #[error("{0} must be a postgres:// URL")]
    BadDatabaseUrl(&'static str),
    #[error("REDIS_URL must be a redis:// or rediss:// URL")]
    BadRedisUrl,
    #[error("BETTING_REDIS_NAMESPACE must be 1-64 characters of [A-Za-z0-9._:-]")]
    BadNamespace,
    #[error(
        "BETTING_QUEUE_VISIBILITY_MS must be at least {minimum_ms}: a worker heartbeats between fetches that wait up to {poll_ms} ms, and its lease must outlast twice the longest gap between heartbeats"
    )]
    ShortVisibility { minimum_ms: u128, poll_ms: u128 },
    #[error("{0}")]
    Tokens(&'static str),
    #[error("{set} is set without {missing}: give both or neither")]
    TlsHalfPair {
        set: &'static str,
        missing: &'static str,
    },
    #[error("{variable} ({}) {problem}", path.display())]
    TlsFile {
        variable: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error(
        "BETTING_TLS_CLIENT_CA needs BETTING_TLS_CERT and BETTING_TLS_KEY: mutual TLS is served over TLS"
    )]
    ClientCaWithoutTls,
    #[error(
        "BETTING_TLS_CLIENT_CERT is set without BETTING_TLS_CA: our clients present it only over TLS, which needs a CA to trust"
    )]
    ClientIdentityWithoutCa,
    #[error(
        "BETTING_WALLET_ENDPOINT is https:// but BETTING_TLS_CA is not set: give the CA that signs the wallet's certificate"
    )]
    HttpsWithoutCa,
    #[error(
        "this process serves TLS and calls its own wallet over loopback (https://127.0.0.1): set BETTING_TLS_CA to the CA of BETTING_TLS_CERT, or set BETTING_WALLET_ENDPOINT"
    )]
    LoopbackTlsWithoutCa,
    #[error(
        "this process requires client certificates (BETTING_TLS_CLIENT_CA) and calls its own wallet over loopback: set BETTING_TLS_CLIENT_CERT and BETTING_TLS_CLIENT_KEY, or set BETTING_WALLET_ENDPOINT"
    )]
    LoopbackMtlsWithoutIdentity,
    #[error("BETTING_REDIS_TLS_CA is set but REDIS_URL is not a rediss:// URL")]
    RedisCaWithoutTls,
    #[error(
        "DATABASE_URL sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    BadSslMode,
    #[error(
        "DATABASE_URL names {0} but its sslmode is not verify-ca or verify-full: a CA or certificate given for TLS must be used, never skipped"
    )]
    SslFileWithoutVerify(&'static str),
    #[error("BETTING_MIN_STAKE must not be negative")]
    NegativeMinStake,
    #[error("{old} was renamed {new}: set that instead")]
    Renamed {
        old: &'static str,
        new: &'static str,
    },
}

/// Environment variables an earlier version read, and their new names: a
/// process refuses to start with an old one rather than silently ignore it.
const RENAMED_VARIABLES: &[(&str, &str)] = &[(
    "BETTING_MAINTENANCE_INTERVAL_MS",
    "BETTING_RECOVERY_INTERVAL_MS",
)];

impl Settings {
    /// The roles to run, all of them when none was named.
    pub fn roles(&self) -> Vec<ProcessRole> {
        if self.roles.is_empty() {
            ProcessRole::ALL.to_vec()
        } else {
            let mut roles = self.roles.clone();
            roles.dedup();
            roles
        }
    }

    pub fn runs(&self, role: ProcessRole) -> bool {
        self.roles.is_empty() || self.roles.contains(&role)
    }

    /// Whether this process calls WalletService, and so mints service tokens.
    pub fn signs_service_tokens(&self) -> bool {
        self.runs(ProcessRole::Betting) || self.runs(ProcessRole::Settler)
    }

    pub fn placing_grace(&self) -> Duration {
        Duration::from_secs(self.placing_grace_secs)
    }

    pub fn recovery_interval(&self) -> Duration {
        Duration::from_millis(self.recovery_interval_ms.max(10))
    }

    pub fn match_timeout(&self) -> Duration {
        Duration::from_secs(self.match_timeout_secs)
    }

    pub fn queue_visibility(&self) -> Duration {
        Duration::from_millis(self.queue_visibility_ms.max(100))
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms.max(10))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Checks what clap cannot: run before anything is started.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(&(old, new)) = RENAMED_VARIABLES
            .iter()
            .find(|(old, _)| std::env::var_os(old).is_some())
        {
            return Err(ConfigError::Renamed { old, new });
        }
        self.tokens.validate(self.signs_service_tokens())?;
        self.storage.validate()?;
        self.tls.validate()?;
        if self.limits.min_stake.is_sign_negative() {
            return Err(ConfigError::NegativeMinStake);
        }
        let redis = self.redis_url.expose();
        if !(redis.starts_with("redis://") || redis.starts_with("rediss://")) {
            return Err(ConfigError::BadRedisUrl);
        }
        if self.tls.redis_tls_ca.is_some() && !redis.starts_with("rediss://") {
            return Err(ConfigError::RedisCaWithoutTls);
        }
        let ns = &self.redis_namespace;
        let ns_ok = !ns.is_empty()
            && ns.len() <= 64
            && ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !ns_ok {
            return Err(ConfigError::BadNamespace);
        }
        // Workers poll with the default poll; `Worker::new` checks the same
        // rule again, this is only the clearer message at start-up.
        let minimum = betting_queue::min_visibility_timeout(betting_queue::DEFAULT_POLL);
        if self.queue_visibility() < minimum {
            return Err(ConfigError::ShortVisibility {
                minimum_ms: minimum.as_millis(),
                poll_ms: betting_queue::DEFAULT_POLL.as_millis(),
            });
        }
        match &self.wallet_endpoint {
            Some(e) if !(e.starts_with("http://") || e.starts_with("https://")) => {
                return Err(ConfigError::BadWalletEndpoint);
            }
            Some(e) if e.starts_with("https://") && self.tls.client()?.is_none() => {
                return Err(ConfigError::HttpsWithoutCa);
            }
            None if self.calls_wallet() && !self.runs(ProcessRole::Wallet) => {
                return Err(ConfigError::NoWalletEndpoint);
            }
            None if self.calls_wallet() => self.check_loopback_tls()?,
            _ => {}
        }
        Ok(())
    }

    /// Whether a role of this process calls WalletService.
    fn calls_wallet(&self) -> bool {
        self.runs(ProcessRole::Betting) || self.runs(ProcessRole::Settler)
    }

    /// All-in-one under TLS: the loopback wallet client dials our own TLS
    /// listener, so it needs to trust our certificate and, under mutual TLS,
    /// to present one.
    fn check_loopback_tls(&self) -> Result<(), ConfigError> {
        let Some(server) = self.tls.server()? else {
            return Ok(());
        };
        let Some(client) = self.tls.client()? else {
            return Err(ConfigError::LoopbackTlsWithoutCa);
        };
        if server.client_ca.is_some() && client.identity.is_none() {
            return Err(ConfigError::LoopbackMtlsWithoutIdentity);
        }
        Ok(())
    }

    /// The URL our own clients reach WalletService at: the configured
    /// endpoint, or this process's listener over loopback, with TLS when the
    /// listener serves TLS.
    pub fn wallet_url(&self, local_addr: SocketAddr) -> String {
        match &self.wallet_endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let scheme = if self.tls.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{local_addr}")
            }
        }
    }
}

impl StorageSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.database_url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::BadDatabaseUrl("DATABASE_URL"));
        }
        postgres_tls::check(url)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    /// The recovery pass's interval had another name; scripts that pass the
    /// old flag keep working (the old environment variable is refused at
    /// start-up by `validate`, never silently ignored).
    #[test]
    fn the_old_flag_of_the_recovery_interval_still_sets_it() {
        let cli = Cli::try_parse_from([
            "betting",
            "--database-url",
            "postgres://localhost/x",
            "--redis-url",
            "redis://localhost",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--maintenance-interval-ms",
            "7",
        ])
        .expect("parses");
        assert_eq!(cli.settings.recovery_interval_ms, 7);
        // `UserLimits::default` is what the command line gives.
        assert_eq!(cli.settings.limits, UserLimits::default());
        assert_eq!(
            ConfigError::Renamed {
                old: RENAMED_VARIABLES[0].0,
                new: RENAMED_VARIABLES[0].1
            }
            .to_string(),
            "BETTING_MAINTENANCE_INTERVAL_MS was renamed BETTING_RECOVERY_INTERVAL_MS: set that instead"
        );
    }
}
