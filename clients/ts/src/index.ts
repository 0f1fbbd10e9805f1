// @betting/client: the betting suite's public API (betting.v1) for browsers
// and Node. The generated messages and service descriptors are under
// ./gen (protobuf-es v2, Connect-ES v2; `npm run generate` in clients/);
// this wrapper adds what a game needs: bets placed under an idempotency key
// with safe retries, a bet watch that resumes and dedupes by itself, a
// round watch, and readable errors.

export {
  type BettingClient,
  type BettingClientOptions,
  type CallOptions,
  type PlaceBetInput,
  type PlacedBet,
  bearer,
  createBettingClient,
  placeBet,
} from "./client.js";
export { ERROR_DOMAIN, badFields, describeError, errorReason, isRetryable, retryDelayMs } from "./errors.js";
export { type Backoff, defaultBackoff, sleep } from "./retry.js";
export {
  type BetUpdate,
  type ConnectionState,
  type WatchBetsOptions,
  type WatchOptions,
  watchBets,
  watchRound,
} from "./watch.js";
export { ErrorReason } from "./gen/betting/v1/errors_pb.js";
export { BetResult, BetStatus, RefundReason, RoundStatus, Side } from "./gen/betting/v1/types_pb.js";
export type { Bet, Round, RoundStats, Wallet } from "./gen/betting/v1/types_pb.js";
