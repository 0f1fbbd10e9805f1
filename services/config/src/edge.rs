//! Settings of the server's edge: HTTP/2 limits, connection and request caps,
//! deadlines and message sizes. The defaults are what one instance on a small
//! machine should accept; every one can be raised for a benchmark.

use std::time::Duration;

/// How much a process accepts before it refuses, and how long a call may take.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeSettings {
    /// Milliseconds a call may take when its client sends no `grpc-timeout`.
    /// A client's own timeout is honoured up to BETTING_REQUEST_TIMEOUT_MAX_MS.
    #[arg(long, env = "BETTING_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,

    /// The longest `grpc-timeout` a client may ask for, in milliseconds.
    /// RunAudit is allowed this long even without one.
    #[arg(long, env = "BETTING_REQUEST_TIMEOUT_MAX_MS", default_value_t = 60_000)]
    pub request_timeout_max_ms: u64,

    /// Calls this process works on at once; beyond that a call is refused at
    /// once with RESOURCE_EXHAUSTED (reason OVERLOADED) instead of queueing.
    /// Health and reflection are never refused. The internal StakeService's
    /// calls (the services' own, to the wallet) have a cap of their own of
    /// the same size. 0 = no limit.
    #[arg(long, env = "BETTING_MAX_INFLIGHT_REQUESTS", default_value_t = 512)]
    pub max_inflight_requests: usize,

    /// Open client connections; a connection over the cap is closed as soon as
    /// it is accepted. 0 = no limit.
    #[arg(long, env = "BETTING_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,

    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        env = "BETTING_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 128
    )]
    pub max_streams_per_connection: u32,

    /// Seconds a connection lives before the server asks the client to
    /// reconnect (GOAWAY); spreads long-lived clients over new instances.
    /// 0 = forever.
    #[arg(long, env = "BETTING_MAX_CONNECTION_AGE_SECS", default_value_t = 3_600)]
    pub max_connection_age_secs: u64,

    /// Seconds an aged connection's open calls and streams get to finish
    /// before it is closed.
    #[arg(
        long,
        env = "BETTING_MAX_CONNECTION_AGE_GRACE_SECS",
        default_value_t = 300
    )]
    pub max_connection_age_grace_secs: u64,
}

/// The same values as the flags' defaults (a test holds them equal), for
/// code that builds `Settings` without parsing a command line.
impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            request_timeout_ms: 5_000,
            request_timeout_max_ms: 60_000,
            max_inflight_requests: 512,
            max_connections: 4_096,
            max_streams_per_connection: 128,
            max_connection_age_secs: 3_600,
            max_connection_age_grace_secs: 300,
        }
    }
}

impl EdgeSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn request_timeout_max(&self) -> Duration {
        Duration::from_millis(
            self.request_timeout_max_ms
                .max(self.request_timeout_ms)
                .max(1),
        )
    }

    pub fn max_connection_age(&self) -> Option<Duration> {
        (self.max_connection_age_secs > 0)
            .then(|| Duration::from_secs(self.max_connection_age_secs))
    }

    pub fn max_connection_age_grace(&self) -> Duration {
        Duration::from_secs(self.max_connection_age_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        edge: EdgeSettings,
    }

    #[test]
    fn the_default_is_the_flags_default() {
        let parsed = Cli::try_parse_from(["betting"]).expect("parses").edge;
        let default = EdgeSettings::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
    }
}
