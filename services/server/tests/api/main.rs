//! Black-box tests: the real server on port 0, called through the generated
//! tonic clients, against real PostgreSQL and Redis (`DATABASE_URL` and
//! `REDIS_URL`, as `deploy/local/test` sets them). Each test gets its own
//! database (cloned from a migrated template, dropped when the test ends) and
//! its own Redis namespace: the harness is `betting-test-kit`.

mod attack;
mod attack10;
mod attack11;
mod attack15;
mod attack16;
mod attack9;
mod attack_outbox;
mod audit;
mod auth;
mod authz;
mod betting;
mod chaos;
mod compression;
mod concurrency;
mod crash;
mod edge;
mod group_commit;
mod health;
mod internal_money;
mod ledger;
mod legacy_paths;
mod lifecycle;
mod limits;
mod money_safety;
mod placement;
mod plans;
mod privileged_actions;
mod property;
mod queue;
mod roles;
mod rows;
mod streams;
mod tls;
mod tls_stores;
mod tokens;
mod wallet;
mod watch_cursors;
