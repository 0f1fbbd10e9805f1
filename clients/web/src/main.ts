// The demo page: a player logs in with a token, sees the wallet, bets on an
// open round, and watches the bets and the round move live. Everything goes
// through @betting/client over gRPC-Web; the watches resume by themselves
// (from the last cursor, kept in sessionStorage across a reload) when the
// server restarts.
//
// Elements carry data-* attributes (data-status, data-balance, data-state,
// data-reason) so that clients/web/test/browser.mjs can read the page as a
// person would see it, without depending on wording.

import {
  type Bet,
  BetResult,
  BetStatus,
  type BettingClient,
  type ConnectionState,
  ErrorReason,
  RefundReason,
  type Round,
  RoundStatus,
  Side,
  createBettingClient,
  describeError,
  errorReason,
  placeBet,
  watchBets,
  watchRound,
} from "@betting/client";

const $ = <T extends HTMLElement>(id: string) => {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`#${id} missing`);
  return element as T;
};

interface Session {
  server: string;
  token: string;
  userId: bigint;
  client: BettingClient;
  stop: AbortController;
}

const CURSOR_KEY = "betting.cursor";
const SESSION_KEY = "betting.session";
let session: Session | undefined;
let watchedRound: { id: string; stop: AbortController } | undefined;
// Each watch reports its own state; the badge shows the worst of them.
const states = new Map<string, ConnectionState>();

/** The claims a token carries, read (not verified: the server does that). */
function claims(token: string): { sub?: string; role?: string; exp?: number } {
  const payload = token.split(".")[1];
  if (!payload) throw new Error("not a JWT");
  const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
  return JSON.parse(json);
}

function setState(name: string, state: ConnectionState | "offline") {
  if (state === "offline") states.delete(name);
  else states.set(name, state);
  const all = [...states.values()];
  const shown = all.length === 0 ? "offline" : all.includes("reconnecting") ? "reconnecting" : all.includes("connecting") ? "connecting" : "live";
  const badge = $("connection");
  badge.dataset.state = shown;
  badge.textContent = shown === "reconnecting" ? "reconnecting…" : shown;
}

function showMessage(text: string, kind: "ok" | "error", reason?: ErrorReason) {
  const message = $("message");
  message.textContent = text;
  message.className = kind;
  message.dataset.reason = reason === undefined ? "" : ErrorReason[reason];
}

function login(server: string, token: string, resumeFrom?: string) {
  let who: ReturnType<typeof claims>;
  try {
    who = claims(token);
  } catch {
    return loginError("That is not a token: paste the last line `betting token --role player --user N` prints.");
  }
  if (who.role !== "player" || !who.sub || !/^\d+$/.test(who.sub)) {
    return loginError(`This is a ${who.role ?? "role-less"} token: log in with a player's (--role player --user N).`);
  }
  logout();
  sessionStorage.setItem(SESSION_KEY, JSON.stringify({ server, token }));
  if (resumeFrom !== undefined) sessionStorage.setItem(CURSOR_KEY, resumeFrom);
  const stop = new AbortController();
  session = { server, token, userId: BigInt(who.sub), client: createBettingClient({ baseUrl: server, token }), stop };
  $("who").textContent = `Player ${who.sub}`;
  for (const id of ["wallet-panel", "bet-panel", "bets-panel"]) $(id).hidden = false;
  $("login-panel").hidden = true;
  void refreshWallet();
  void loadHistory(session);
  void followBets(session);
  const round = $<HTMLInputElement>("round-id").value;
  if (round) follow(round);
}

function loginError(text: string) {
  $("login-panel").hidden = false;
  let error = document.getElementById("login-error");
  if (error === null) {
    error = document.createElement("p");
    error.id = "login-error";
    error.className = "error";
    $("login-form").append(error);
  }
  error.textContent = text;
}

function logout() {
  session?.stop.abort();
  watchedRound?.stop.abort();
  session = undefined;
  watchedRound = undefined;
  states.clear();
  setState("bets", "offline");
  sessionStorage.removeItem(SESSION_KEY);
  sessionStorage.removeItem(CURSOR_KEY);
  $("bets").replaceChildren();
  for (const id of ["wallet-panel", "bet-panel", "bets-panel", "round-panel"]) $(id).hidden = true;
  $("login-panel").hidden = false;
}

// Balance answers can arrive out of order (a GetWallet sent before a
// PlaceBet may answer after it): each read takes a number when it is sent,
// and an answer older than the one shown is dropped.
let balanceReads = 0;
let balanceShown = 0;
function showBalance(read: number, balance: string) {
  if (read < balanceShown) return;
  balanceShown = read;
  const element = $("balance");
  element.textContent = balance;
  element.dataset.balance = balance;
}

let walletTimer: ReturnType<typeof setTimeout> | undefined;
/** Reads the balance again, soon (bursts of bet events read it once). */
function refreshWalletSoon() {
  clearTimeout(walletTimer);
  walletTimer = setTimeout(() => void refreshWallet(), 100);
}

async function refreshWallet() {
  const current = session;
  if (current === undefined) return;
  const read = ++balanceReads;
  try {
    const { wallet } = await current.client.wallet.getWallet({ userId: current.userId }, { signal: current.stop.signal });
    if (current !== session || wallet === undefined) return;
    showBalance(read, wallet.balance);
  } catch (err) {
    // While the server restarts, the watch's badge says so; the next bet
    // event (or a later try) reads the balance again.
    if (current === session && !current.stop.signal.aborted) {
      if (errorReason(err) === ErrorReason.UNAUTHENTICATED) loginError(describeError(err));
      setTimeout(refreshWalletSoon, 1_000);
    }
  }
}

/**
 * The newest bets, finished ones included (the watch's snapshot lists only
 * bets in play, and a resume sends only what changed since its cursor).
 */
async function loadHistory(current: Session) {
  try {
    const { bets } = await current.client.betting.listBets({ pageSize: 20 }, { signal: current.stop.signal });
    if (current !== session) return;
    // Oldest first, so that the newest ends on top.
    for (const bet of [...bets].reverse()) showBet(bet);
  } catch (err) {
    if (current === session && !current.stop.signal.aborted) {
      showMessage(`Could not read your bets: ${describeError(err)}`, "error", errorReason(err));
    }
  }
}

async function cancel(betId: string, button: HTMLButtonElement) {
  const current = session;
  if (current === undefined) return;
  button.disabled = true;
  const read = ++balanceReads;
  try {
    const { bet, balance } = await current.client.betting.cancelBet({ betId }, { signal: current.stop.signal });
    if (bet !== undefined) showBet(bet);
    showBalance(read, balance);
    showMessage("Bet cancelled: the stake is back in your wallet.", "ok");
  } catch (err) {
    showMessage(describeError(err), "error", errorReason(err));
    button.disabled = false;
  }
}

async function followBets(current: Session) {
  try {
    for await (const update of watchBets(current.client, {
      signal: current.stop.signal,
      cursor: sessionStorage.getItem(CURSOR_KEY) ?? undefined,
      onState: (state) => setState("bets", state),
    })) {
      if (update.kind === "bet") {
        showBet(update.bet);
        refreshWalletSoon();
      }
      if (update.kind !== "resync" && update.cursor) sessionStorage.setItem(CURSOR_KEY, update.cursor);
    }
  } catch (err) {
    if (current !== session) return;
    setState("bets", "offline");
    showMessage(`Bet updates stopped: ${describeError(err)}`, "error", errorReason(err));
    if (errorReason(err) === ErrorReason.UNAUTHENTICATED) loginError(describeError(err));
  }
}

function follow(roundId: string) {
  if (session === undefined || watchedRound?.id === roundId) return;
  watchedRound?.stop.abort();
  const stop = new AbortController();
  const current = session;
  current.stop.signal.addEventListener("abort", () => stop.abort(), { once: true });
  watchedRound = { id: roundId, stop };
  $("round-name").textContent = roundId;
  $("round-panel").hidden = false;
  void (async () => {
    try {
      for await (const round of watchRound(current.client, roundId, {
        signal: stop.signal,
        onState: (state) => setState("round", state),
      })) {
        showRound(round);
      }
    } catch (err) {
      if (stop.signal.aborted) return;
      showMessage(`Round updates stopped: ${describeError(err)}`, "error", errorReason(err));
    } finally {
      if (watchedRound?.stop === stop) setState("round", "offline");
    }
  })();
}

function showRound(round: Round) {
  const status = $("round-status");
  const name = RoundStatus[round.status];
  status.dataset.status = name;
  const winner = round.winningSide === undefined ? "" : `, side ${Side[round.winningSide]} won`;
  status.textContent = `(${name.toLowerCase()}${winner})`;
  const stats = round.stats;
  if (stats === undefined) return;
  for (const cell of $("round-stats").querySelectorAll<HTMLElement>("dd[data-stat]")) {
    const value = stats[cell.dataset.stat as keyof typeof stats];
    cell.textContent = String(value);
  }
}

function showBet(bet: Bet) {
  const rows = $("bets");
  let row = rows.querySelector<HTMLTableRowElement>(`tr[data-bet-id="${CSS.escape(bet.betId)}"]`);
  if (row === null) {
    row = document.createElement("tr");
    row.dataset.betId = bet.betId;
    for (const field of ["id", "round", "side", "amount", "status", "outcome"]) {
      const cell = document.createElement("td");
      cell.dataset.field = field;
      row.append(cell);
    }
    rows.prepend(row);
  }
  // PlaceBet's answer may arrive after the watch showed a later state.
  if (row.dataset.version !== undefined && BigInt(row.dataset.version) >= bet.version) return;
  row.dataset.version = String(bet.version);
  const status = BetStatus[bet.status];
  row.dataset.status = status;
  row.dataset.side = Side[bet.side];
  const cell = (field: string) => row.querySelector<HTMLElement>(`td[data-field="${field}"]`) as HTMLElement;
  cell("id").textContent = bet.betId.slice(0, 8);
  cell("id").title = bet.betId;
  cell("round").textContent = bet.roundId;
  cell("side").textContent = row.dataset.side;
  cell("amount").textContent = bet.amount;
  cell("status").textContent = status;
  cell("outcome").textContent = outcome(bet);
  if (bet.status === BetStatus.PENDING) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cancel";
    button.textContent = "Cancel";
    button.addEventListener("click", () => void cancel(bet.betId, button));
    cell("outcome").append(" ", button);
  }
}

function outcome(bet: Bet): string {
  if (bet.status === BetStatus.SETTLED) {
    return bet.result === BetResult.WON ? `won, paid ${bet.payout ?? "?"}` : "lost";
  }
  if (bet.status === BetStatus.REFUNDED) {
    const why = bet.refundReason === undefined ? "" : ` (${RefundReason[bet.refundReason].toLowerCase().replace(/_/g, " ")})`;
    return `refunded${why}`;
  }
  return bet.status === BetStatus.MATCHED ? "matched, waiting for the result" : "waiting for a counterparty";
}

async function place(event: SubmitEvent) {
  event.preventDefault();
  if (session === undefined) return;
  const form = new FormData(event.target as HTMLFormElement);
  const roundId = String(form.get("round") ?? "").trim();
  const side = form.get("side") === "B" ? Side.B : Side.A;
  const amount = String(form.get("amount") ?? "").trim();
  follow(roundId);
  const button = $<HTMLButtonElement>("place");
  button.disabled = true;
  try {
    const read = ++balanceReads;
    const placed = await placeBet(session.client, { roundId, side, amount });
    showBet(placed.bet);
    showBalance(read, placed.balance);
    showMessage(`Bet placed: ${amount} on side ${side === Side.A ? "A" : "B"} of ${roundId}.`, "ok");
  } catch (err) {
    showMessage(describeError(err), "error", errorReason(err));
  } finally {
    button.disabled = false;
  }
}

function start() {
  const params = new URLSearchParams(location.search);
  const server = $<HTMLInputElement>("server");
  server.value = params.get("server") ?? server.value;
  $<HTMLInputElement>("round-id").value = params.get("round") ?? "";
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    login(server.value.trim(), $<HTMLTextAreaElement>("token").value.trim());
  });
  $("logout").addEventListener("click", logout);
  $("bet-form").addEventListener("submit", (event) => void place(event as SubmitEvent));
  $("round-id").addEventListener("change", (event) => {
    const value = (event.target as HTMLInputElement).value.trim();
    if (value) follow(value);
  });
  const saved = sessionStorage.getItem(SESSION_KEY);
  if (saved !== null) {
    const { server: url, token } = JSON.parse(saved) as { server: string; token: string };
    // A reload resumes the watch from its cursor.
    login(url, token, sessionStorage.getItem(CURSOR_KEY) ?? undefined);
  }
}

start();
