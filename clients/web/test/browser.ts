// The demo page in a real browser (Debian's headless Chromium, driven by
// puppeteer-core) against a real suite, as two players would use it:
//
//   1. a suite (`betting serve`, every role) on a free port; the cashier
//      funds two players and the game server opens a round, through the SDK
//      in Node (plain gRPC over HTTP/2);
//   2. each player logs in on a page of their own (separate browser
//      contexts), sees a balance of 100, bets 10 on opposite sides; both
//      pages show their bet MATCHED, a balance of 90 and the round's totals;
//   3. a refusal is shown clearly: a stake over the balance reads
//      INSUFFICIENT_FUNDS and the balance is unchanged; a bet nobody takes
//      is cancelled from its row and its stake comes back;
//   4. the pages' server stops (SIGTERM) mid-stream: both pages say
//      "reconnecting"; while it is down, a second instance (same stores)
//      closes and settles the round and pays; then the first comes back on
//      the same address and both pages resume from their cursors (every
//      WatchBets reopen carries it: read off the wire) and show the bets
//      SETTLED (won, paid 20 / lost) and balances of 110 and 90; a reload
//      keeps the session, lists the finished bet and resumes from the
//      cursor it kept;
//   5. betting on the settled round reads ROUND_NOT_OPEN;
//   6. a screenshot of the winner's page is saved; `betting audit` is clean;
//      no page threw.
//
// Run by clients/web/check (bundled with esbuild first); it needs
// BETTING_BIN, DATABASE_URL, REDIS_URL and BETTING_JWT_SECRET (a migrated,
// empty database), CHROMIUM (default /usr/bin/chromium) and WEB_SCREENSHOT
// (where the screenshot goes).

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { once } from "node:events";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { type BettingClient, RoundStatus, Side, bearer, createBettingClient } from "@betting/client";
import puppeteer, { type Browser, type Page } from "puppeteer-core";

const here = dirname(fileURLToPath(import.meta.url));
const web = join(here, "..", "..", "web");
const env = (name: string, fallback?: string): string => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const bin = env("BETTING_BIN");
const chromium = env("CHROMIUM", "/usr/bin/chromium");
const screenshot = env("WEB_SCREENSHOT");
const WAIT_MS = 20_000;
const started = Date.now();

function step(text: string) {
  console.log(`  ok   ${text} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
}

async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

function betting(...args: string[]): string {
  return execFileSync(bin, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function token(...args: string[]): string {
  return betting("token", ...args).trim().split("\n").pop() ?? "";
}

/** A `betting serve` of every role on `port`, healthy. */
class Suite {
  private child: ChildProcess | undefined;
  private log = "";
  constructor(readonly port: number) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    this.child = spawn(bin, ["serve"], {
      env: { ...process.env, BETTING_LISTEN_ADDR: `127.0.0.1:${this.port}`, BETTING_METRICS_ADDR: "127.0.0.1:0" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    for (const stream of [this.child.stdout, this.child.stderr]) {
      stream?.on("data", (chunk: Buffer) => {
        this.log = (this.log + chunk.toString()).slice(-20_000);
      });
    }
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (this.child.exitCode !== null) throw new Error(`betting serve exited ${this.child.exitCode}:\n${this.log}`);
      try {
        betting("health", "--addr", this.url);
        return;
      } catch {
        if (Date.now() > deadline) throw new Error(`betting serve on ${this.url} not healthy in 30 s:\n${this.log}`);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    }
  }

  /** SIGTERM, and wait for a clean exit. */
  async stop(): Promise<void> {
    const child = this.child;
    if (child === undefined || child.exitCode !== null) return;
    child.kill("SIGTERM");
    const [code] = await once(child, "exit");
    this.child = undefined;
    if (code !== 0) throw new Error(`betting serve exited ${code} on SIGTERM:\n${this.log}`);
  }

  kill(): void {
    this.child?.kill("SIGKILL");
  }
}

/** An SDK client in Node, over plain gRPC. */
function nodeClient(suite: Suite, bearerToken: string): BettingClient {
  return createBettingClient({
    transport: createGrpcTransport({ baseUrl: suite.url, interceptors: [bearer(bearerToken)] }),
  });
}

async function servePage(port: number): Promise<{ url: string; child: ChildProcess }> {
  const child = spawn(process.execPath, [join(web, "build.mjs"), "--serve", "--port", String(port)], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  for await (const chunk of child.stdout as AsyncIterable<Buffer>) {
    out += chunk.toString();
    const match = /serving (http:\/\/\S+)/.exec(out);
    if (match) return { url: match[1], child };
  }
  throw new Error(`the page server exited: ${out}`);
}

/** Waits until `selector` matches on `page`, saying what was awaited if not. */
async function see(page: Page, selector: string, what: string): Promise<void> {
  try {
    await page.waitForSelector(selector, { timeout: WAIT_MS });
  } catch {
    const shown = await page.evaluate(() => document.querySelector("main")?.innerText ?? "");
    throw new Error(`${what}: "${selector}" not seen in ${WAIT_MS / 1000} s; the page shows:\n${shown}`);
  }
}

async function logIn(browser: Browser, pageUrl: string, suite: Suite, player: "A" | "B", round: string): Promise<Page> {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  page.on("pageerror", (error) => errors.push(`${player}: ${error}`));
  page.on("console", (message) => {
    // A page's fetches fail while its server is down: expected, not shown.
    if (message.type() === "error" && !message.text().includes("ERR_CONNECTION_REFUSED")) {
      console.log(`  [${player} console] ${message.text()}`);
    }
  });
  page.on("request", (request) => {
    if (request.method() === "POST" && request.url().endsWith("/betting.v1.BettingService/WatchBets")) {
      watchOpens[player].push(request.postData() ?? "");
    }
  });
  await page.setViewport({ width: 1100, height: 820 });
  await page.goto(`${pageUrl}?server=${encodeURIComponent(suite.url)}&round=${encodeURIComponent(round)}`);
  // Pasted, as a person would (typing 300 characters one CDP call each is slow).
  await page.$eval("#token", (input, value) => {
    (input as HTMLTextAreaElement).value = value;
  }, player === "A" ? tokens.A : tokens.B);
  await page.click("#login");
  return page;
}

async function bet(page: Page, side: "A" | "B", amount: string): Promise<void> {
  await page.click(`input[name=side][value=${side}]`);
  await page.$eval("#amount", (input) => {
    (input as HTMLInputElement).value = "";
  });
  await page.type("#amount", amount);
  await page.$eval("#message", (message) => {
    message.className = "";
    message.textContent = "";
  });
  await page.click("#place");
}

const errors: string[] = [];
// The body of each WatchBets request a page sent (gRPC-Web framing around a
// WatchBetsRequest: the cursor, when one is sent, is in it as text).
const watchOpens: Record<"A" | "B", string[]> = { A: [], B: [] };
const tokens = { A: "", B: "" };

async function main(): Promise<void> {
  const users = { A: "3001", B: "3002" };
  tokens.A = token("--role", "player", "--user", users.A);
  tokens.B = token("--role", "player", "--user", users.B);
  const cashier = token("--role", "cashier", "--subject", "web-desk");
  const game = token("--role", "game", "--subject", "web-table");
  const round = `web-${Date.now()}`;

  const suite = new Suite(await freePort());
  const other = new Suite(await freePort());
  let browser: Browser | undefined;
  let page: ChildProcess | undefined;
  try {
    await suite.start();
    for (const [side, user] of Object.entries(users)) {
      await nodeClient(suite, cashier).wallet.deposit({ userId: BigInt(user), amount: "100", idempotencyKey: `web-deposit-${side}` });
    }
    await nodeClient(suite, game).settlement.openRound({ roundId: round });
    step(`suite on ${suite.url}; players ${users.A} and ${users.B} hold 100; round ${round} open (SDK over gRPC, Node)`);

    const served = await servePage(await freePort());
    page = served.child;
    browser = await puppeteer.launch({
      executablePath: chromium,
      headless: true,
      // Root needs --no-sandbox; the rest keeps Chromium off the network
      // (this machine's is closed: its background fetches only fail).
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    step(`${(await browser.version()).replace("/", " ")} on ${served.url} (esbuild serve)`);

    const a = await logIn(browser, served.url, suite, "A", round);
    const b = await logIn(browser, served.url, suite, "B", round);
    for (const [name, p] of [["A", a], ["B", b]] as const) {
      await see(p, '#balance[data-balance="100"]', `player ${name}'s balance`);
      await see(p, '#connection[data-state="live"]', `player ${name}'s watches`);
      await see(p, '#round-status[data-status="OPEN"]', `player ${name}'s round`);
    }
    step("both players logged in: balance 100, watches live, round OPEN");

    await bet(a, "A", "10");
    await see(a, "#message.ok", "A's bet placed");
    await bet(b, "B", "10");
    await see(b, "#message.ok", "B's bet placed");
    for (const [name, p] of [["A", a], ["B", b]] as const) {
      await see(p, `#bets tr[data-status="MATCHED"][data-side="${name}"]`, `player ${name}'s bet matched`);
      await see(p, '#balance[data-balance="90"]', `player ${name}'s balance after the stake`);
    }
    for (const p of [a, b]) await see(p, "xpath///dd[@data-stat='matchedBets' and text()='2']", "the round's matched count");
    step("A bet 10 on A, B bet 10 on B: both pages show the bet MATCHED, balance 90, the round 2 matched");

    await bet(b, "B", "1000");
    await see(b, '#message.error[data-reason="INSUFFICIENT_FUNDS"]', "the refusal of a stake over the balance");
    const refusal = await b.$eval("#message", (m) => m.textContent ?? "");
    if (!/insufficient funds/i.test(refusal)) throw new Error(`the refusal reads "${refusal}"`);
    await see(b, '#balance[data-balance="90"]', "B's balance after the refusal");
    step(`a stake of 1000 is refused on B's page: "${refusal}"`);

    await bet(b, "B", "5");
    await see(b, '#bets tr[data-status="PENDING"][data-side="B"] button.cancel', "B's second bet, waiting, with its Cancel button");
    await see(b, '#balance[data-balance="85"]', "B's balance after the second stake");
    await b.click('#bets tr[data-status="PENDING"][data-side="B"] button.cancel');
    await see(b, '#bets tr[data-status="REFUNDED"][data-side="B"]', "B's cancelled bet, refunded");
    await see(b, '#balance[data-balance="90"]', "B's balance after the cancel");
    step("B bet 5 more, nobody took it, B cancelled it: REFUNDED, balance back to 90");

    const cursors = {
      A: await a.evaluate(() => sessionStorage.getItem("betting.cursor") ?? ""),
      B: await b.evaluate(() => sessionStorage.getItem("betting.cursor") ?? ""),
    };
    const opensBefore = { A: watchOpens.A.length, B: watchOpens.B.length };
    for (const name of ["A", "B"] as const) {
      if (cursors[name] === "") throw new Error(`player ${name}'s page kept no cursor`);
      if (watchOpens[name].length !== 1) throw new Error(`player ${name}'s page opened WatchBets ${watchOpens[name].length} times`);
    }
    await suite.stop();
    for (const [name, p] of [["A", a], ["B", b]] as const) {
      await see(p, '#connection[data-state="reconnecting"]', `player ${name}'s page noticing the restart`);
    }
    step("the pages' server stopped (SIGTERM): both pages show reconnecting");

    await other.start();
    const settlement = nodeClient(other, game).settlement;
    await settlement.closeRound({ roundId: round });
    await settlement.settleRound({ roundId: round, winningSide: Side.A });
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const { round: now } = await settlement.getRound({ roundId: round });
      if (now?.status === RoundStatus.SETTLED && now.stats?.settledBets === 2n && now.stats.outstandingJobs === 0n) break;
      if (Date.now() > deadline) throw new Error(`round ${round} not paid in time: ${JSON.stringify(now?.stats, (_, v) => (typeof v === "bigint" ? String(v) : v))}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    await other.stop();
    step(`meanwhile another instance (${other.url}) closed and settled the round, side A won, and paid`);

    await suite.start();
    for (const [name, p, balance, outcome] of [
      ["A", a, "110", "won, paid 20"],
      ["B", b, "90", "lost"],
    ] as const) {
      await see(p, `#bets tr[data-status="SETTLED"][data-side="${name}"]`, `player ${name}'s bet settled after the resume`);
      await see(p, `#balance[data-balance="${balance}"]`, `player ${name}'s balance after settlement`);
      await see(p, '#connection[data-state="live"]', `player ${name}'s watches live again`);
      await see(p, '#round-status[data-status="SETTLED"]', `player ${name}'s round settled`);
      const shown = await p.$eval(`#bets tr[data-status="SETTLED"][data-side="${name}"] td[data-field="outcome"]`, (td) => td.textContent ?? "");
      if (shown !== outcome) throw new Error(`player ${name}'s bet shows "${shown}", expected "${outcome}"`);
    }
    await see(a, "xpath///dd[@data-stat='totalPaidOut' and text()='20']", "the round's payout total");
    for (const name of ["A", "B"] as const) {
      const reopened = watchOpens[name].slice(opensBefore[name]);
      if (reopened.length === 0) throw new Error(`player ${name}'s page never reopened WatchBets`);
      const fresh = reopened.filter((body) => !body.includes(cursors[name]));
      if (fresh.length > 0) throw new Error(`player ${name}'s page reopened WatchBets without its cursor ${fresh.length} of ${reopened.length} times`);
    }
    step("the server came back: both pages resumed from their cursors (every reopen sent it): A won, paid 20, balance 110; B lost, balance 90");

    // A reload keeps the session, resumes the watch from its cursor, and
    // shows the finished bets from ListBets.
    const lastCursor = await a.evaluate(() => sessionStorage.getItem("betting.cursor") ?? "");
    const opensBeforeReload = watchOpens.A.length;
    await a.reload();
    await see(a, '#bets tr[data-status="SETTLED"][data-side="A"]', "A's settled bet after a reload");
    await see(a, '#balance[data-balance="110"]', "A's balance after a reload");
    await see(a, '#connection[data-state="live"]', "A's watches after a reload");
    const reloaded = watchOpens.A.slice(opensBeforeReload);
    if (lastCursor === "" || reloaded.length === 0 || !reloaded.every((body) => body.includes(lastCursor))) {
      throw new Error(`A's page did not resume from its cursor after the reload (${reloaded.length} opens)`);
    }
    step("A's page reloaded: still logged in, the settled bet listed (ListBets), the watch live again");

    await bet(b, "A", "5");
    await see(b, '#message.error[data-reason="ROUND_NOT_OPEN"]', "the refusal of a bet on a settled round");
    step(`a bet on the settled round is refused: "${await b.$eval("#message", (m) => m.textContent ?? "")}"`);

    await a.screenshot({ path: screenshot, fullPage: true });
    step(`screenshot of A's page: ${screenshot}`);

    const audit = betting("audit");
    step(`betting audit: ${audit.trim().split("\n").pop()}`);
    if (errors.length > 0) throw new Error(`the pages threw:\n${errors.join("\n")}`);
  } finally {
    await browser?.close().catch(() => {});
    page?.kill();
    suite.kill();
    other.kill();
  }
}

const timeout = setTimeout(() => {
  console.error("error: the browser test did not finish in 180 s");
  process.exit(1);
}, 180_000);
main().then(
  () => {
    clearTimeout(timeout);
    console.log(`  browser test passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    process.exit(0);
  },
  (err) => {
    console.error(`error: ${err instanceof Error ? err.message : err}`);
    process.exit(1);
  },
);
