// The SDK's own logic, against scripted servers in memory (Connect's router
// transport): the paths of WatchBets' contract a real suite rarely takes on
// cue (a resume answered by RESYNC, a refused cursor, a replayed change),
// and placeBet's retries. The browser test (clients/web/test/browser.ts)
// runs the same SDK against the real suite.
//
// Run by clients/web/check: bundled by esbuild, then `node --test`.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import {
  type Bet,
  BetStatus,
  type BetUpdate,
  ErrorReason,
  Side,
  createBettingClient,
  errorReason,
  placeBet,
  retryDelayMs,
  watchBets,
} from "@betting/client";
import {
  BettingService,
  type WatchBetsRequest,
  type WatchBetsResponse,
  WatchBetsResponseSchema,
  WatchEventType,
} from "@betting/client/gen/betting/v1/betting_pb.js";
import { BetSchema } from "@betting/client/gen/betting/v1/types_pb.js";
import { ErrorInfoSchema, RetryInfoSchema } from "@betting/client/gen/google/rpc/error_details_pb.js";

const fast = () => 1; // backoff, ms

function bet(betId: string, version: number, status: BetStatus): Bet {
  return create(BetSchema, { betId, version: BigInt(version), status, userId: 7n, roundId: "r", side: Side.A, amount: "10" });
}

function event(type: WatchEventType, cursor: string, b?: Bet): WatchBetsResponse {
  return create(WatchBetsResponseSchema, { type, cursor, bet: b });
}

function refusal(code: Code, reason: string, retryMs?: number): ConnectError {
  const details: ConstructorParameters<typeof ConnectError>[3] = [
    { desc: ErrorInfoSchema, value: { reason, domain: "betting.v1" } },
  ];
  if (retryMs !== undefined) {
    details.push({ desc: RetryInfoSchema, value: { retryDelay: { seconds: 0n, nanos: retryMs * 1e6 } } });
  }
  return new ConnectError(reason.toLowerCase(), code, undefined, details);
}

/**
 * A client whose WatchBets answers each open with the next script: events,
 * then (optionally) an error. Records each open's request.
 */
function scripted(scripts: { events: WatchBetsResponse[]; error?: ConnectError }[], bets: Map<string, Bet> = new Map()) {
  const opens: WatchBetsRequest[] = [];
  const gets: string[] = [];
  const transport = createRouterTransport(({ service }) => {
    service(BettingService, {
      async *watchBets(request) {
        opens.push(request);
        const script = scripts.shift();
        if (script === undefined) throw new ConnectError("no more scripts", Code.Unauthenticated);
        yield* script.events;
        if (script.error) throw script.error;
      },
      getBet(request) {
        gets.push(request.betId);
        const found = bets.get(request.betId);
        if (found === undefined) throw new ConnectError("no such bet", Code.NotFound);
        return { bet: found };
      },
    });
  });
  return { client: createBettingClient({ transport, backoff: fast }), opens, gets };
}

/** Every update until the watch ends (it throws when the scripts run out). */
async function drain(watch: AsyncGenerator<BetUpdate>): Promise<{ updates: BetUpdate[]; error: unknown }> {
  const updates: BetUpdate[] = [];
  try {
    for await (const update of watch) updates.push(update);
  } catch (error) {
    return { updates, error };
  }
  return { updates, error: undefined };
}

const shown = (updates: BetUpdate[]) =>
  updates.map((u) => (u.kind === "bet" ? `${u.bet.betId}@${u.bet.version}:${BetStatus[u.bet.status]}` : u.kind));

test("a resume sends the last cursor and a replayed version is yielded once", async () => {
  const { client, opens } = scripted([
    {
      events: [
        event(WatchEventType.SNAPSHOT, "c1", bet("x", 1, BetStatus.PENDING)),
        event(WatchEventType.SNAPSHOT_END, "c1"),
        event(WatchEventType.CHANGE, "c2", bet("x", 2, BetStatus.MATCHED)),
      ],
      error: refusal(Code.Unavailable, "SHUTTING_DOWN"),
    },
    {
      events: [
        // The server may replay a change from just before the cursor.
        event(WatchEventType.CHANGE, "c2", bet("x", 2, BetStatus.MATCHED)),
        event(WatchEventType.SNAPSHOT_END, "c2"),
        event(WatchEventType.CHANGE, "c3", bet("x", 3, BetStatus.SETTLED)),
        event(WatchEventType.HEARTBEAT, ""),
      ],
    },
  ]);
  const { updates, error } = await drain(watchBets(client));
  assert.deepEqual(shown(updates), ["x@1:PENDING", "live", "x@2:MATCHED", "live", "x@3:SETTLED"]);
  assert.deepEqual(
    opens.map((o) => o.cursor),
    ["", "c2", "c3"],
    "each open resumes from the last cursor received",
  );
  assert.equal(errorReason(error), undefined, "ends only when the (scripted) server refuses for good");
  assert.equal(ConnectError.from(error).code, Code.Unauthenticated);
});

test("a RESYNC answering a resume: a bet held in play that the snapshot lacks is read with GetBet", async () => {
  const ended = bet("held", 3, BetStatus.SETTLED);
  const { client, gets } = scripted(
    [
      {
        events: [
          event(WatchEventType.SNAPSHOT, "c1", bet("held", 2, BetStatus.MATCHED)),
          event(WatchEventType.SNAPSHOT, "c1", bet("other", 1, BetStatus.PENDING)),
          event(WatchEventType.SNAPSHOT_END, "c1"),
        ],
        error: new ConnectError("connection reset", Code.Unknown),
      },
      {
        events: [
          event(WatchEventType.RESYNC, "c1"),
          event(WatchEventType.SNAPSHOT, "c9", bet("other", 1, BetStatus.PENDING)),
          event(WatchEventType.SNAPSHOT_END, "c9"),
        ],
      },
    ],
    new Map([["held", ended]]),
  );
  const { updates } = await drain(watchBets(client));
  assert.deepEqual(shown(updates), ["held@2:MATCHED", "other@1:PENDING", "live", "resync", "held@3:SETTLED", "live"]);
  assert.deepEqual(gets, ["held"], "only the bet held in play and missing from the snapshot is read");
});

test("a cursor the server refuses is dropped: a fresh snapshot, then GetBet for what it lacks", async () => {
  const { client, opens, gets } = scripted(
    [
      {
        events: [
          event(WatchEventType.SNAPSHOT, "c1", bet("held", 2, BetStatus.MATCHED)),
          event(WatchEventType.SNAPSHOT_END, "c1"),
        ],
        error: refusal(Code.Unavailable, "SHUTTING_DOWN"),
      },
      // Say the deployment was replaced: its cursors mean nothing here.
      { events: [], error: refusal(Code.InvalidArgument, "INVALID_ARGUMENT") },
      { events: [event(WatchEventType.SNAPSHOT_END, "")] },
    ],
    new Map([["held", bet("held", 4, BetStatus.REFUNDED)]]),
  );
  const { updates } = await drain(watchBets(client, { cursor: "from-a-reload" }));
  assert.deepEqual(
    opens.map((o) => o.cursor),
    ["from-a-reload", "c1", "", ""],
  );
  assert.deepEqual(shown(updates), ["held@2:MATCHED", "live", "held@4:REFUNDED", "live"]);
  assert.deepEqual(gets, ["held"], "the bet held in play, missing from the fresh snapshot");
});

test("a refusal that retrying cannot fix ends the watch with it", async () => {
  const { client, opens } = scripted([{ events: [], error: refusal(Code.PermissionDenied, "ROLE_REQUIRED") }]);
  const { updates, error } = await drain(watchBets(client));
  assert.deepEqual(updates, []);
  assert.equal(errorReason(error), ErrorReason.ROLE_REQUIRED);
  assert.equal(opens.length, 1, "not retried");
});

test("an aborted watch returns without an error", async () => {
  const stop = new AbortController();
  const { client } = scripted([
    { events: [event(WatchEventType.SNAPSHOT_END, "")], error: refusal(Code.Unavailable, "UNAVAILABLE") },
    { events: [event(WatchEventType.SNAPSHOT_END, "")] },
  ]);
  const updates: BetUpdate[] = [];
  for await (const update of watchBets(client, { signal: stop.signal })) {
    updates.push(update);
    stop.abort();
  }
  assert.deepEqual(shown(updates), ["live"]);
});

test("placeBet retries an unavailable server with the same key, and throws a refusal at once", async () => {
  const keys: string[] = [];
  let calls = 0;
  const transport = createRouterTransport(({ service }) => {
    service(BettingService, {
      placeBet(request, context) {
        calls++;
        keys.push(request.idempotencyKey);
        if (request.amount === "1000") throw refusal(Code.FailedPrecondition, "INSUFFICIENT_FUNDS");
        if (calls === 1) throw refusal(Code.Unavailable, "UNAVAILABLE");
        if (calls === 2) throw refusal(Code.ResourceExhausted, "RATE_LIMITED", 5);
        context.responseHeader.set("idempotent-replayed", "true");
        return { bet: bet("b", 1, BetStatus.PENDING), balance: "90" };
      },
    });
  });
  const client = createBettingClient({ transport, backoff: fast });
  const placed = await placeBet(client, { roundId: "r", side: Side.A, amount: "10" });
  assert.equal(calls, 3);
  assert.equal(new Set(keys).size, 1, "every try under the one key");
  assert.equal(placed.idempotencyKey, keys[0]);
  assert.equal(placed.balance, "90");
  assert.equal(placed.replayed, true, "the idempotent-replayed header is read");

  calls = 10;
  await assert.rejects(placeBet(client, { roundId: "r", side: Side.A, amount: "1000", idempotencyKey: "k" }), (err) => {
    assert.equal(errorReason(err), ErrorReason.INSUFFICIENT_FUNDS);
    return true;
  });
  assert.equal(calls, 11, "a refusal is not retried");
});

test("retryDelayMs reads RetryInfo", () => {
  assert.equal(retryDelayMs(refusal(Code.ResourceExhausted, "RATE_LIMITED", 250)), 250);
  assert.equal(retryDelayMs(new ConnectError("x", Code.Unavailable)), undefined);
  assert.equal(errorReason(refusal(Code.FailedPrecondition, "A_REASON_FROM_THE_FUTURE")), undefined);
});
