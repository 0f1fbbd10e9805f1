//! The test harness every crate's tests share: the real [`Application`]
//! spawned per test on a database of its own, clients and tokens, small
//! assertions on statuses, Redis servers a test may stop, child processes
//! that die with the test, and polling with a deadline.
//!
//! - [`database`]: a migrated template database per set of migrations, built
//!   once by whichever test process comes first; each test clones it
//!   ([`fresh_database`]) and the clone is dropped when the test ends, even
//!   when it panicked.
//! - [`app`]: [`TestApp`], the whole suite in the test's process, and the
//!   [`settings`] it runs with.
//! - [`calls`]: requests with a bearer token and what a failed call said.
//! - [`process`]: [`TestRedis`], [`ChildGuard`] and [`free_port`].
//! - [`wait`]: [`eventually`] and [`poll_until`], instead of hand-written loops.
//!
//! The servers come from `DATABASE_URL` and `REDIS_URL`, as
//! `deploy/local/test` sets them.
//!
//! [`Application`]: betting_server::Application

#![forbid(unsafe_code)]

pub mod app;
pub mod calls;
pub mod database;
pub mod process;
pub mod wait;

pub use app::{API_ONLY, SECRET, TestApp, genesis, settings};
pub use calls::{authed, bad_fields, dec, expect_code, reason, retry_delay};
pub use database::{
    SERVICE_ROLE, TestDatabase, database_url, fresh_database, owner_url, service_url, template,
};
pub use process::{ChildGuard, TestRedis, free_port};
pub use wait::{eventually, poll_until};

/// A variable `deploy/local/test` sets; panics with how to run the tests if
/// it is missing.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests through deploy/local/test"))
}

/// The shared Redis (`REDIS_URL`); tests keep apart by namespace.
pub fn redis_url() -> String {
    env("REDIS_URL")
}

/// The PostgreSQL admin URL (`DATABASE_URL`) that test databases are made from.
pub fn admin_url() -> String {
    env("DATABASE_URL")
}
