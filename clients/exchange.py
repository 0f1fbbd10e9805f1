#!/usr/bin/env python3
"""A short scripted exchange through the generated Python client (clients/check).

    exchange.py STUBS_DIR ADDRESS

STUBS_DIR holds the modules grpcio-tools generated from proto/betting/v1;
ADDRESS is a fresh suite's host:port. Tokens come from the environment:
CASHIER, GAME, PLAYER_A (user USER_A) and PLAYER_B (user USER_B).

A cashier funds both players, a game server opens a round, the players bet
opposite sides; player A's WatchBets stream must show its bet go PENDING ->
MATCHED -> SETTLED, and its wallet end at 110. A bet beyond player B's funds
must fail FAILED_PRECONDITION with a google.rpc.ErrorInfo (domain
betting.v1, reason INSUFFICIENT_FUNDS) that grpcio-status decodes; and a
gzip-compressed call must succeed. Every step prints one line; the first
failed check exits 1.
"""

import os
import queue
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
ADDRESS = sys.argv[2]

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from betting.v1 import (  # noqa: E402
    betting_pb2,
    betting_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    types_pb2,
    wallet_pb2,
    wallet_pb2_grpc,
)

TIMEOUT = 10  # seconds, for every unary call
USER_A = int(os.environ["USER_A"])
USER_B = int(os.environ["USER_B"])
ROUND = os.environ.get("ROUND", "clients-round-1")


def auth(variable):
    return (("authorization", f"Bearer {os.environ[variable]}"),)


def check(condition, message):
    if not condition:
        print(f"  FAIL {message}", file=sys.stderr)
        sys.exit(1)
    print(f"  ok   {message}")


def status_name(value):
    return types_pb2.BetStatus.Name(value)


def main():
    channel = grpc.insecure_channel(ADDRESS)
    grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    wallet = wallet_pb2_grpc.WalletServiceStub(channel)
    bets = betting_pb2_grpc.BettingServiceStub(channel)
    rounds = settlement_pb2_grpc.SettlementServiceStub(channel)

    for user in (USER_A, USER_B):
        deposited = wallet.Deposit(
            wallet_pb2.DepositRequest(user_id=user, amount="100", idempotency_key=f"clients-dep-{user}"),
            metadata=auth("CASHIER"),
            timeout=TIMEOUT,
        )
        check(deposited.wallet.balance == "100", f"cashier deposited 100 for user {user}")

    opened = rounds.OpenRound(
        settlement_pb2.OpenRoundRequest(round_id=ROUND), metadata=auth("GAME"), timeout=TIMEOUT
    )
    check(
        opened.round.status == types_pb2.ROUND_STATUS_OPEN,
        f"game server opened {ROUND} ({types_pb2.RoundStatus.Name(opened.round.status)})",
    )

    # Player A watches its bets from before the bet is placed, so the stream
    # shows every status the bet takes.
    stream = bets.WatchBets(betting_pb2.WatchBetsRequest(), metadata=auth("PLAYER_A"))
    events = queue.Queue()

    def read():
        try:
            for event in stream:
                events.put(event)
        except grpc.RpcError as error:
            events.put(error)

    threading.Thread(target=read, daemon=True).start()

    def next_event(deadline):
        item = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(item, grpc.RpcError):
            check(item.code() == grpc.StatusCode.CANCELLED, f"stream ended early: {item.code()} {item.details()}")
        return item

    deadline = time.monotonic() + TIMEOUT
    while next_event(deadline).type != betting_pb2.WATCH_EVENT_TYPE_SNAPSHOT_END:
        pass
    check(True, "player A's WatchBets stream is live (SNAPSHOT_END)")

    # A stream sends each bet as it is when the stream reads it: a status the
    # bet leaves within that read's latency (a few milliseconds) can be passed
    # over, the later version standing for both. So player B bets only once
    # player A's stream has shown A's bet PENDING, and the game server settles
    # only once it has shown MATCHED: every status is then on the stream.
    mine = None
    seen = []

    def watch_until(status):
        deadline = time.monotonic() + 30
        while not seen or seen[-1] != status:
            try:
                event = next_event(deadline)
            except queue.Empty:
                check(False, f"no {status_name(status)} within 30 s; seen {[status_name(s) for s in seen]}")
            if event.HasField("bet") and event.bet.bet_id == mine:
                if not seen or seen[-1] != event.bet.status:
                    seen.append(event.bet.status)

    placed = {}
    for user, side, token in ((USER_A, types_pb2.SIDE_A, "PLAYER_A"), (USER_B, types_pb2.SIDE_B, "PLAYER_B")):
        response = bets.PlaceBet(
            betting_pb2.PlaceBetRequest(
                round_id=ROUND, side=side, amount="10", idempotency_key=f"clients-bet-{user}"
            ),
            metadata=auth(token),
            timeout=TIMEOUT,
        )
        placed[user] = response.bet
        check(
            response.bet.status == types_pb2.BET_STATUS_PENDING,
            f"user {user} bet 10 on {types_pb2.Side.Name(side)} ({status_name(response.bet.status)})",
        )
        if user == USER_A:
            mine = response.bet.bet_id
            watch_until(types_pb2.BET_STATUS_PENDING)

    # Matching is asynchronous: wait for MATCHED on the stream, then settle.
    watch_until(types_pb2.BET_STATUS_MATCHED)
    rounds.SettleRound(
        settlement_pb2.SettleRoundRequest(round_id=ROUND, winning_side=types_pb2.SIDE_A),
        metadata=auth("GAME"),
        timeout=TIMEOUT,
    )
    check(True, f"game server settled {ROUND}: SIDE_A won")
    watch_until(types_pb2.BET_STATUS_SETTLED)
    stream.cancel()
    names = [status_name(s) for s in seen]
    check(
        names == ["BET_STATUS_PENDING", "BET_STATUS_MATCHED", "BET_STATUS_SETTLED"],
        f"player A's stream showed {' -> '.join(names)}",
    )

    # A refusal, with its details decoded by grpcio-status: a bet beyond
    # player B's funds, in a round that is open.
    rounds.OpenRound(
        settlement_pb2.OpenRoundRequest(round_id=ROUND + "-b"), metadata=auth("GAME"), timeout=TIMEOUT
    )
    try:
        bets.PlaceBet(
            betting_pb2.PlaceBetRequest(
                round_id=ROUND + "-b", side=types_pb2.SIDE_B, amount="1000", idempotency_key="clients-too-much"
            ),
            metadata=auth("PLAYER_B"),
            timeout=TIMEOUT,
        )
        check(False, "a bet of 1000 with 90 in the wallet was refused")
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        check(status is not None, f"the refusal carries google.rpc.Status details ({error.code()})")
        infos = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(info)
        check(
            error.code() == grpc.StatusCode.FAILED_PRECONDITION
            and [(i.domain, i.reason) for i in infos] == [("betting.v1", "INSUFFICIENT_FUNDS")],
            f"a bet beyond the funds: {error.code().name}, ErrorInfo {[(i.domain, i.reason) for i in infos]}",
        )

    # Compressed: the request goes gzip-compressed, and the answer must be the
    # settled balance (the payout lands a moment after SettleRound).
    deadline = time.monotonic() + 30
    while True:
        response = wallet.GetWallet(
            wallet_pb2.GetWalletRequest(),
            metadata=auth("PLAYER_A"),
            timeout=TIMEOUT,
            compression=grpc.Compression.Gzip,
        )
        if response.wallet.balance == "110" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    check(response.wallet.balance == "110", f"a gzip-compressed GetWallet: player A has {response.wallet.balance}")
    channel.close()


if __name__ == "__main__":
    main()
