// Watching bets and rounds the way a game needs: one async iterator that
// survives disconnects and server restarts, resumes from the last cursor,
// and yields each bet state once, never an older one after a newer.
//
// WatchBets' contract (proto/betting/v1/betting.proto) and what this does
// with each part of it:
// - events carry the whole bet and its version: a bet is yielded only when
//   its version is higher than the last one yielded (a resume may replay a
//   change the client has; a snapshot may repeat a bet);
// - a reconnect sends the last cursor received: the server replays what
//   changed since, then SNAPSHOT_END;
// - RESYNC, then a fresh snapshot: the server may have missed changes. When
//   it answers a resume, the server cannot know which bets the client holds
//   in play; a bet held PENDING or MATCHED that the snapshot lacks has ended
//   since, so it is read with GetBet before "live" is yielded. A cursor the
//   server refuses (INVALID_ARGUMENT: another deployment's) is dropped and
//   handled the same way: a fresh snapshot, then GetBet for what is missing;
// - a stream silent for longer than three heartbeats is treated as broken.

import { Code, ConnectError } from "@connectrpc/connect";
import { WatchEventType } from "./gen/betting/v1/betting_pb.js";
import { type Bet, BetStatus, type Round, RoundStatus } from "./gen/betting/v1/types_pb.js";
import type { BettingClient } from "./client.js";
import { isRetryable, retryDelayMs } from "./errors.js";
import { sleep } from "./retry.js";

/** Where a watch is: opening its first stream, resuming, or up to date. */
export type ConnectionState = "connecting" | "reconnecting" | "live";

export interface WatchOptions {
  /** Stops the watch: the iterator returns. */
  signal?: AbortSignal;
  /** Told whenever the connection's state changes (`error`: why it broke). */
  onState?: (state: ConnectionState, error?: unknown) => void;
  /** A stream that sends nothing for this long is reopened (default 45 s). */
  idleTimeoutMs?: number;
}

export interface WatchBetsOptions extends WatchOptions {
  /** Only these bets (up to 100); default: all of the caller's. */
  betIds?: string[];
  /**
   * Resume after this cursor (one a previous watch yielded, e.g. kept in
   * localStorage across a page reload) instead of starting with a snapshot.
   */
  cursor?: string;
}

export type BetUpdate =
  /** A bet, newer than any state of it yielded before. */
  | { kind: "bet"; bet: Bet; cursor: string }
  /** Caught up: what follows is live. Keep `cursor` to resume later. */
  | { kind: "live"; cursor: string }
  /** The server resynced this watch: bets that follow bring the view up to date. */
  | { kind: "resync" };

const IN_PLAY = new Set([BetStatus.PENDING, BetStatus.MATCHED]);
const DEFAULT_IDLE_MS = 45_000;

/** The caller's bets as they change; see the module comment. */
export async function* watchBets(client: BettingClient, options: WatchBetsOptions = {}): AsyncGenerator<BetUpdate> {
  const { signal, betIds = [] } = options;
  const versions = new Map<string, bigint>();
  // Bets yielded PENDING or MATCHED and not yielded in a final state since.
  const inPlay = new Set<string>();
  let cursor = options.cursor ?? "";
  // While a fresh snapshot is read after RESYNC (or a refused cursor): the
  // bets it has listed so far.
  let resync: Set<string> | undefined;
  let failures = 0;

  function accept(bet: Bet | undefined): BetUpdate | undefined {
    if (bet === undefined) return undefined;
    resync?.add(bet.betId);
    const known = versions.get(bet.betId);
    if (known !== undefined && bet.version <= known) return undefined;
    versions.set(bet.betId, bet.version);
    if (IN_PLAY.has(bet.status)) inPlay.add(bet.betId);
    else inPlay.delete(bet.betId);
    return { kind: "bet", bet, cursor };
  }

  while (!signal?.aborted) {
    options.onState?.(failures === 0 && versions.size === 0 ? "connecting" : "reconnecting");
    const attempt = new Idle(signal, options.idleTimeoutMs ?? DEFAULT_IDLE_MS);
    try {
      const stream = client.betting.watchBets({ betIds, cursor }, { signal: attempt.signal });
      for await (const event of stream) {
        attempt.touch();
        if (event.cursor) cursor = event.cursor;
        switch (event.type) {
          case WatchEventType.SNAPSHOT:
          case WatchEventType.CHANGE: {
            const update = accept(event.bet);
            if (update) yield update;
            break;
          }
          case WatchEventType.RESYNC:
            resync = new Set();
            yield { kind: "resync" };
            break;
          case WatchEventType.SNAPSHOT_END: {
            if (resync !== undefined) {
              const missing = [...inPlay].filter((id) => !resync?.has(id));
              for (const betId of missing) {
                const update = accept(await getBet(client, betId, attempt.signal));
                if (update) yield update;
              }
              resync = undefined;
            }
            failures = 0;
            options.onState?.("live");
            yield { kind: "live", cursor };
            break;
          }
          default:
            break; // HEARTBEAT
        }
      }
      // The server ended the stream without an error: reopen it.
    } catch (err) {
      if (signal?.aborted) return;
      const error = attempt.failure(err);
      if (error.code === Code.InvalidArgument && cursor !== "") {
        // A cursor this deployment did not issue: start over, then read
        // with GetBet whatever the client holds in play that it lacks.
        cursor = "";
        resync = new Set();
      } else if (!isRetryable(error)) {
        throw error;
      }
      await reconnectAfter(client, options, error, ++failures);
    } finally {
      attempt.done();
    }
  }
}

/** One bet as it is now; undefined if the server no longer shows it. */
async function getBet(client: BettingClient, betId: string, signal: AbortSignal): Promise<Bet | undefined> {
  try {
    return (await client.betting.getBet({ betId }, { signal })).bet;
  } catch (err) {
    if (ConnectError.from(err).code === Code.NotFound) return undefined;
    throw err;
  }
}

/**
 * A round as it changes: its state on every (re)connect, then each change.
 * Returns when the server ends the stream of a round that is settled or
 * voided with nothing left to pay, or when `signal` aborts.
 */
export async function* watchRound(client: BettingClient, roundId: string, options: WatchOptions = {}): AsyncGenerator<Round> {
  const { signal } = options;
  let last: Round | undefined;
  let failures = 0;
  while (!signal?.aborted) {
    options.onState?.(last === undefined && failures === 0 ? "connecting" : "reconnecting");
    const attempt = new Idle(signal, options.idleTimeoutMs ?? DEFAULT_IDLE_MS);
    try {
      const stream = client.settlement.watchRound({ roundId }, { signal: attempt.signal });
      for await (const event of stream) {
        attempt.touch();
        if (event.type === WatchEventType.HEARTBEAT || event.round === undefined) continue;
        if (event.type === WatchEventType.SNAPSHOT) {
          failures = 0;
          options.onState?.("live");
        }
        last = event.round;
        yield event.round;
      }
      if (last !== undefined && isFinished(last)) return;
    } catch (err) {
      if (signal?.aborted) return;
      const error = attempt.failure(err);
      if (!isRetryable(error)) throw error;
      await reconnectAfter(client, options, error, ++failures);
    } finally {
      attempt.done();
    }
  }
}

/** Says the watch is reconnecting, then waits as the server asked or backs off. */
async function reconnectAfter(client: BettingClient, options: WatchOptions, error: ConnectError, failures: number) {
  options.onState?.("reconnecting", error);
  await sleep(retryDelayMs(error) ?? client.backoff(failures), options.signal);
}

function isFinished(round: Round): boolean {
  const final = round.status === RoundStatus.SETTLED || round.status === RoundStatus.VOIDED;
  return final && (round.stats?.outstandingJobs ?? 0n) === 0n;
}

/**
 * One stream's abort signal: aborted by the caller's signal, or when the
 * stream has been silent for `idleMs` (`timedOut` then says so).
 */
class Idle {
  private readonly controller = new AbortController();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly onAbort = () => this.controller.abort();
  timedOut = false;

  constructor(
    private readonly parent: AbortSignal | undefined,
    private readonly idleMs: number,
  ) {
    parent?.addEventListener("abort", this.onAbort, { once: true });
    this.touch();
  }

  /** Why the stream ended: silence past the idle time, or `err`. */
  failure(err: unknown): ConnectError {
    return this.timedOut ? new ConnectError("no heartbeat", Code.Unavailable) : ConnectError.from(err);
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  touch(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timedOut = true;
      this.controller.abort();
    }, this.idleMs);
  }

  done(): void {
    clearTimeout(this.timer);
    this.parent?.removeEventListener("abort", this.onAbort);
    this.controller.abort();
  }
}
