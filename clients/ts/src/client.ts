// The SDK's entry point: typed clients of the four public services over one
// transport that adds the bearer token, and the calls a game needs most.

import { type Client, ConnectError, type Interceptor, type Transport, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AdminService } from "./gen/betting/v1/admin_pb.js";
import { BettingService } from "./gen/betting/v1/betting_pb.js";
import { SettlementService } from "./gen/betting/v1/settlement_pb.js";
import type { Bet, Side } from "./gen/betting/v1/types_pb.js";
import { WalletService } from "./gen/betting/v1/wallet_pb.js";
import { isRetryable, retryDelayMs } from "./errors.js";
import { type Backoff, defaultBackoff, sleep } from "./retry.js";

export interface BettingClientOptions {
  /**
   * Where the suite listens, e.g. "http://127.0.0.1:50051". Ignored when
   * `transport` is given.
   */
  baseUrl?: string;
  /**
   * The bearer token (from `betting token`): a string, or a function asked
   * before every call (to refresh it).
   */
  token?: string | (() => string | undefined);
  /**
   * The transport to call through. Default: gRPC-Web over fetch (browsers,
   * and Node 18+); in Node, `createGrpcTransport` of @connectrpc/connect-node
   * speaks plain gRPC over HTTP/2.
   */
  transport?: Transport;
  /** How retries and reconnects wait. */
  backoff?: Backoff;
}

/** The typed clients, and the transport they share. */
export interface BettingClient {
  readonly transport: Transport;
  readonly wallet: Client<typeof WalletService>;
  readonly betting: Client<typeof BettingService>;
  readonly settlement: Client<typeof SettlementService>;
  readonly admin: Client<typeof AdminService>;
  readonly backoff: Backoff;
}

/** Sends `authorization: Bearer <token>` on every call that has a token. */
export function bearer(token: string | (() => string | undefined)): Interceptor {
  return (next) => async (request) => {
    const value = typeof token === "function" ? token() : token;
    if (value) request.header.set("authorization", `Bearer ${value}`);
    return next(request);
  };
}

export function createBettingClient(options: BettingClientOptions): BettingClient {
  const interceptors = options.token === undefined ? [] : [bearer(options.token)];
  let transport = options.transport;
  if (transport === undefined) {
    if (!options.baseUrl) throw new Error("createBettingClient: give baseUrl or transport");
    transport = createGrpcWebTransport({ baseUrl: options.baseUrl, interceptors });
  } else if (interceptors.length > 0) {
    throw new Error("createBettingClient: with a transport of your own, add bearer(token) to its interceptors");
  }
  return {
    transport,
    wallet: createClient(WalletService, transport),
    betting: createClient(BettingService, transport),
    settlement: createClient(SettlementService, transport),
    admin: createClient(AdminService, transport),
    backoff: options.backoff ?? defaultBackoff,
  };
}

export interface PlaceBetInput {
  roundId: string;
  side: Side;
  /** The stake: a decimal string in currency units, e.g. "10" or "2.50". */
  amount: string;
  /**
   * The bet's idempotency key; a fresh UUID when absent. Keep it to retry
   * the same bet later (after a crash, a lost reply): it is never placed
   * twice.
   */
  idempotencyKey?: string;
}

export interface PlacedBet {
  bet: Bet;
  /** The caller's balance right after the stake was taken. */
  balance: string;
  /** The key the bet was placed under. */
  idempotencyKey: string;
  /** True if the server answered with a bet this key had already placed. */
  replayed: boolean;
}

export interface CallOptions {
  signal?: AbortSignal;
  /** Tries in all, the first included (default 4). */
  attempts?: number;
}

/**
 * Places a bet, retrying with the same idempotency key when the server or
 * the network failed (so a reply lost after the stake was taken is answered
 * by the retry, never by a second stake). Refusals (insufficient funds, a
 * closed round) are thrown at once: read them with `errorReason`.
 */
export async function placeBet(client: BettingClient, input: PlaceBetInput, options: CallOptions = {}): Promise<PlacedBet> {
  const idempotencyKey = input.idempotencyKey ?? crypto.randomUUID();
  const attempts = options.attempts ?? 4;
  for (let attempt = 1; ; attempt++) {
    let replayed = false;
    try {
      const response = await client.betting.placeBet(
        { roundId: input.roundId, side: input.side, amount: input.amount, idempotencyKey },
        {
          signal: options.signal,
          onHeader: (headers) => {
            replayed = headers.get("idempotent-replayed") === "true";
          },
        },
      );
      if (response.bet === undefined) throw new ConnectError("PlaceBet answered without a bet");
      return { bet: response.bet, balance: response.balance, idempotencyKey, replayed };
    } catch (err) {
      if (attempt >= attempts || options.signal?.aborted || !isRetryable(err)) throw err;
      await sleep(retryDelayMs(err) ?? client.backoff(attempt), options.signal);
    }
  }
}
