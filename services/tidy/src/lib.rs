//! Architecture invariants, checked by `tests/tidy.rs` (in the spirit of
//! rust-analyzer's tidy test): rules that the compiler cannot see but a
//! reviewer would otherwise have to remember. The crate holds only the
//! error-message scan's rules ([`leaks`]).
//!
//! The rules, and why:
//!
//! - **Money tables have one writer.** Only `services/wallet` writes
//!   `wallets`, `ledger_entries`, `wallet_refusals` and `payout_bets`:
//!   every movement of money goes through its idempotent, locked path.
//! - **gRPC stays at the edge.** `tonic` and `prost` appear only in the API
//!   crate, the server (composition root), the gRPC clients and
//!   interceptors (`wallet-client`, `auth`, `streams`' stream type) and the
//!   CLI. The services (wallet, betting, settlement, audit) expose
//!   domain-typed operations and the server's `grpc/` adapters implement
//!   the generated traits over them; stores, the ledger, the matcher,
//!   refunds, the reconciler, jobs, the queue, the domain and the database
//!   crate know nothing of the transport either.
//! - **Statuses come from one mapping.** No `Status::…` is built outside
//!   `services/api/src/status.rs`, so every error a client sees has its
//!   code, a safe message and an `ErrorInfo` reason.
//! - **Manifests tell the truth.** Every crate has a description and is
//!   `publish = false`; every declared dependency is named in the code that
//!   may use it (what cargo-machete checks, without the tool); no comment
//!   points outside the repository.
//! - **No internals reach a client.** Every error message the servers send
//!   during the whole test suite is recorded and scanned for SQL, driver
//!   text, paths and panics ([`leaks`], `tests/leaks.rs`).

pub mod leaks;
