#!/usr/bin/env python3
"""The checks of deploy/check that no off-the-shelf validator makes.

    check.py static ROOT BASE.yaml OVERLAY.yaml
        Cross-checks of the artifacts against each other and the code:
        every metric the dashboard and the alert rules name exists (in the
        code's metrics macros, or announced below); every alert's
        runbook_url anchor is a heading of docs/runbook.md; Prometheus
        scrapes every betting service of compose.yaml under its role; the
        drain fits compose's stop_grace_period and each Deployment's
        terminationGracePeriodSeconds; the token settings each service
        gets are ones `betting serve` accepts (a signing key only for
        betting and settler, and so on); only the roles that call
        WalletService may reach it (NetworkPolicy); each Deployment probes
        gRPC health on 50051.

    check.py k8s-prometheus SRC DEST
        A copy of the Kubernetes Prometheus config that Debian's promtool
        can read (it is built without Kubernetes service discovery): each
        kubernetes_sd_configs becomes a static target.

    check.py compose-run ROOT --binary B --pg-port P --redis-port R --pg-bin D --work W [--buf BUF]
        Runs compose.yaml's betting services as compose would, without
        Docker: the image's ENTRYPOINT and ENV (deploy/Dockerfile), each
        service's command and environment, hosts rewritten to 127.0.0.1 and
        ports shifted to free ones; PostgreSQL and Redis are the throwaway
        servers on P and R (the postgres service's init scripts run on it
        first, as the image would); depends_on order and conditions, each
        service probed with its own healthcheck; then /metrics of each, and
        with `buf curl` a whole round through every role (deposits, a round,
        two bets on two betting instances, matched, settled, paid, audited);
        then SIGTERM to all, which must drain and exit 0 within their
        stop_grace_period. Bounded in time; only 127.0.0.1.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

# Metrics another change adds to the code (the dashboard and the alerts use
# them already); a name here that the code also has is fine.
ANNOUNCED = {
    "grpc_server_requests_total",
    "grpc_server_request_duration_seconds",
    "db_pool_connections",
    "db_query_duration_seconds",
    "bets",
    "escrow_money",
    "streams_open",
    "stream_lag_seconds",
    "reconciler_repairs_total",
    "queue_waiting",
    "queue_in_flight",
    "queue_delayed",
    "queue_dead",
    "queue_job_duration_seconds",
    "queue_jobs_processed_total",
    "queue_jobs_failed_total",
    "queue_jobs_dead_total",
}
# Series Prometheus makes itself.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

ROLES = ["wallet", "betting", "settlement", "matcher", "settler"]
GRPC_PORT = 50051
METRICS_PORT = 9464

failures = []


def fail(message):
    failures.append(message)
    print(f"  FAIL {message}", file=sys.stderr)


def ok(message):
    print(f"  ok   {message}")


# ---------------------------------------------------------------- metrics


def code_metrics(root):
    names = set()
    pattern = re.compile(r'metrics::(?:counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
    for path in (root / "services").rglob("*.rs"):
        if "/tests/" in str(path) or "/target/" in str(path):
            continue
        names.update(pattern.findall(path.read_text(errors="replace")))
    return names


PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}


def promql_metrics(expr):
    """The metric names an expression reads (a regex reading, enough for ours)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        before = text[: match.start()]
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # 5m, 1e3
        names.add(word)
    return names


def known(name, metrics):
    if name in metrics:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in metrics:
            return True
    return False


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def duration(text):
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?", str(text).strip())
    if not match or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r}")
    minutes, seconds, millis = match.groups()
    return int(minutes or 0) * 60 + float(seconds or 0) + int(millis or 0) / 1000


def drain_bound(grace):
    """The longest drain after SIGTERM (services/server/src/serve.rs): in-flight
    calls get the grace; then the workers the grace, a 1 s poll and 1 s."""
    return 2 * grace + 2


def settings_problems(env):
    """What `betting serve` would refuse at start-up in these settings, for
    the rules a file can show (services/config: TokenSettings::validate and
    the wallet endpoint): the token mode, who holds a signing key, who
    needs BETTING_WALLET_ENDPOINT."""
    roles = set(filter(None, env.get("BETTING_ROLES", "").split(","))) or set(ROLES)
    unknown = roles - set(ROLES)
    if unknown:
        return [f"unknown roles {sorted(unknown)}"]
    problems = []
    signs = bool(roles & {"betting", "settler"})
    key, kid = env.get("BETTING_JWT_SIGNING_KEY"), env.get("BETTING_JWT_SIGNING_KID")
    if env.get("BETTING_JWT_JWKS"):
        if env.get("BETTING_JWT_SECRET"):
            problems.append("BETTING_JWT_SECRET beside BETTING_JWT_JWKS")
        if not (env.get("BETTING_JWT_ISSUER") and env.get("BETTING_JWT_AUDIENCE")):
            problems.append("production mode without BETTING_JWT_ISSUER and BETTING_JWT_AUDIENCE")
        if signs and not (key and kid):
            problems.append("a betting/settler process without BETTING_JWT_SIGNING_KEY and _KID")
        if not signs and (key or kid):
            problems.append("BETTING_JWT_SIGNING_* on a process that signs nothing")
    else:
        if len(env.get("BETTING_JWT_SECRET", "")) < 32:
            problems.append("local mode without a BETTING_JWT_SECRET of 32 bytes or more")
        if key or kid:
            problems.append("BETTING_JWT_SIGNING_* in local mode")
    if signs and "wallet" not in roles and not env.get("BETTING_WALLET_ENDPOINT"):
        problems.append("betting/settler without the wallet role needs BETTING_WALLET_ENDPOINT")
    return problems


def static(root, base_path, overlay_path):
    metrics = code_metrics(root) | ANNOUNCED | BUILTIN
    print(f"  ({len(code_metrics(root))} metric names in the code, {len(ANNOUNCED)} announced)")

    # The dashboard.
    dashboard = json.loads((root / "deploy/grafana/dashboard.json").read_text())
    datasources = yaml.safe_load((root / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    exprs = 0
    for panel in panels:
        targets = panel.get("targets") or []
        if not targets:
            fail(f"dashboard panel {panel.get('title')!r} has no query")
        for target in targets:
            uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
            if uid not in uids:
                fail(f"dashboard panel {panel.get('title')!r}: datasource {uid!r} is not provisioned")
            names = promql_metrics(target.get("expr", ""))
            if not names:
                fail(f"dashboard panel {panel.get('title')!r}: no metric in {target.get('expr')!r}")
            for name in sorted(names):
                if not known(name, metrics):
                    fail(f"dashboard panel {panel.get('title')!r} reads unknown metric {name}")
            exprs += 1
    ok(f"dashboard: {len(panels)} panels, {exprs} queries, every metric known")

    # The alerts and the runbook.
    runbook = (root / "docs/runbook.md").read_text()
    anchors = {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", runbook, re.M)}
    rules = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    for rule in alerts:
        name = rule["alert"]
        for metric in sorted(promql_metrics(rule["expr"])):
            if not known(metric, metrics):
                fail(f"alert {name} reads unknown metric {metric}")
        url = rule.get("annotations", {}).get("runbook_url", "")
        path, _, anchor = url.partition("#")
        if not path.endswith("docs/runbook.md") or not anchor:
            fail(f"alert {name}: runbook_url {url!r} is not docs/runbook.md#anchor")
        elif anchor not in anchors:
            fail(f"alert {name}: docs/runbook.md has no heading with anchor #{anchor}")
    ok(f"alerts: {len(alerts)} rules, every metric known, every runbook_url anchor in docs/runbook.md")

    # Prometheus scrapes every betting service of compose.yaml, under its role.
    compose = load_compose(root / "deploy/compose.yaml")
    services = betting_services(compose)
    prometheus = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
    targets = {}
    for job in prometheus["scrape_configs"]:
        for static_config in job.get("static_configs", []):
            for target in static_config.get("targets", []):
                targets[target] = job["job_name"]
    for name, service in services.items():
        env = environment(service)
        if "BETTING_ROLES" not in env:
            continue  # one-shot (migrate)
        role = env["BETTING_ROLES"]
        target = f"{name}:{METRICS_PORT}"
        if targets.get(target) != role:
            fail(f"prometheus.yml does not scrape {target} as job {role!r} (found {targets.get(target)!r})")
        for problem in settings_problems(env):
            fail(f"compose {name}: `betting serve` would refuse to start: {problem}")
        grace = float(env.get("BETTING_SHUTDOWN_GRACE_SECS", 10))
        stop = duration(service.get("stop_grace_period", "10s"))
        if stop < drain_bound(grace):
            fail(f"compose {name}: stop_grace_period {stop:g}s < the drain's {drain_bound(grace):g}s")
    served = sum(1 for s in services.values() if "BETTING_ROLES" in environment(s))
    ok(f"compose: {served} betting services scraped by role, token and wallet settings consistent, "
       "stop_grace_period covers the drain")

    # Kubernetes: grace periods, probes, and who may reach the wallet.
    for label, path in (("base", base_path), ("overlay", overlay_path)):
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        callers = set()
        deployments = [d for d in docs if d["kind"] == "Deployment"]
        for deployment in deployments:
            name = deployment["metadata"]["name"]
            pod = deployment["spec"]["template"]["spec"]
            container = pod["containers"][0]
            env = {}
            for source in container.get("envFrom", []):
                env.update(configmaps.get(source.get("configMapRef", {}).get("name"), {}))
            for item in container.get("env", []):
                env[item["name"]] = item.get("value", "<from a reference>")
            role = env.get("BETTING_ROLES")
            if role not in ROLES:
                fail(f"k8s {label} {name}: BETTING_ROLES {role!r}")
            for problem in settings_problems(env):
                fail(f"k8s {label} {name}: `betting serve` would refuse to start: {problem}")
            if "BETTING_WALLET_ENDPOINT" in env:
                callers.add(role)
            grace = float(env.get("BETTING_SHUTDOWN_GRACE_SECS", 10))
            pre_stop = (container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}) or {}).get("seconds", 0)
            needed = drain_bound(grace) + pre_stop
            period = pod.get("terminationGracePeriodSeconds", 30)
            if period < needed:
                fail(f"k8s {label} {name}: terminationGracePeriodSeconds {period} < {needed:g} (drain + preStop)")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("grpc", {}).get("port")
                if port != GRPC_PORT:
                    fail(f"k8s {label} {name}: {probe} is not a gRPC probe of port {GRPC_PORT}")
            security = container.get("securityContext", {})
            if not (pod.get("securityContext", {}).get("runAsNonRoot")
                    and security.get("readOnlyRootFilesystem")
                    and security.get("capabilities", {}).get("drop") == ["ALL"]):
                fail(f"k8s {label} {name}: not non-root, read-only and without capabilities")
        wallet_from = set()
        for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            if selector.get("app.kubernetes.io/component") != "wallet":
                continue
            for rule in policy["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    for expression in peer.get("podSelector", {}).get("matchExpressions", []):
                        if expression["key"] == "app.kubernetes.io/component":
                            wallet_from.update(expression["values"])
        if wallet_from != callers:
            fail(f"k8s {label}: the wallet admits {sorted(wallet_from)}, the roles that call it are {sorted(callers)}")
        ok(f"k8s {label}: {len(deployments)} Deployments; token mode and signing keys consistent; "
           f"drain fits the grace period; gRPC probes; "
           f"wallet reachable from {sorted(wallet_from)} only")


def k8s_prometheus(src, dest):
    config = yaml.safe_load(Path(src).read_text())
    for job in config.get("scrape_configs", []):
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["placeholder.invalid:9464"]}]
    Path(dest).write_text(yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------- compose


def interpolate(value):
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def one(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3)
        current = os.environ.get(name)
        if operator == ":-" and not current:
            return default or ""
        if operator == "-" and current is None:
            return default or ""
        if operator in (":?", "?") and not current:
            raise SystemExit(f"compose variable {name} is required: {default}")
        return current or ""

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, value)


def load_compose(path):
    return interpolate(yaml.safe_load(Path(path).read_text()))


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def betting_services(compose):
    """The services that run our image: those built from deploy/Dockerfile
    and those naming the image they build."""
    services = compose["services"]
    images = {s.get("image") for s in services.values() if "build" in s}
    return {n: s for n, s in services.items() if "build" in s or s.get("image") in images}


def image_config(dockerfile):
    """ENTRYPOINT, CMD and ENV of the Dockerfile's last stage (the forms we use)."""
    text = Path(dockerfile).read_text().replace("\\\n", " ")
    stage = re.split(r"^FROM\s", text, flags=re.M)[-1]
    entrypoint, cmd, env = [], [], {}
    for line in stage.splitlines():
        line = line.strip()
        if line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line[len("ENTRYPOINT "):])
        elif line.startswith("CMD "):
            cmd = json.loads(line[len("CMD "):])
        elif line.startswith("ENV "):
            for item in line[len("ENV "):].split():
                key, _, value = item.partition("=")
                env[key] = value
    return entrypoint, cmd, env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports_of(service):
    ports = {int(p) for p in service.get("expose", []) or []}
    for port in service.get("ports", []) or []:
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split(":")[-1].split("/")[0]))
    return ports


class Topology:
    def __init__(self, compose, externals):
        self.compose = compose
        # (service, container port) -> port on 127.0.0.1
        self.ports = {}
        for name, service in compose["services"].items():
            for port in ports_of(service):
                self.ports[(name, port)] = externals.get((name, port)) or free_port()

    def rewrite(self, text, own):
        """Hosts of the compose network to 127.0.0.1, ports to their stand-ins;
        in service `own`, its own listen addresses and loopback too."""
        def one(match):
            host, port = match.group(1), int(match.group(2))
            if host in ("0.0.0.0", "127.0.0.1", "localhost", "[::]", "::"):
                mapped = self.ports.get((own, port))
            else:
                mapped = self.ports.get((host, port))
            if mapped is None:
                return match.group(0)
            return f"127.0.0.1:{mapped}"
        return re.sub(r"(?<![\w.-])(\[::\]|[A-Za-z0-9_.-]+):(\d+)(?!\d)", one, text)


def order(services, runnable):
    """Services in an order where every dependency comes first."""
    done, out = set(), []

    def visit(name, path):
        if name in done or name not in runnable:
            return
        if name in path:
            raise SystemExit(f"compose depends_on cycle: {' -> '.join(path + [name])}")
        for dependency in depends(services[name]):
            visit(dependency, path + [name])
        done.add(name)
        out.append(name)

    for name in runnable:
        visit(name, [])
    return out


def depends(service):
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def init_postgres(root, compose_dir, compose, pg_bin, pg_port):
    """What the postgres image does on a new data directory: POSTGRES_DB,
    then each /docker-entrypoint-initdb.d/*.sql as POSTGRES_USER."""
    service = compose["services"]["postgres"]
    env = environment(service)
    user, database = env.get("POSTGRES_USER", "postgres"), env.get("POSTGRES_DB") or env.get("POSTGRES_USER", "postgres")
    psql = [f"{pg_bin}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres"]
    if user != "postgres":
        subprocess.run(psql + ["-d", "postgres", "-c", f'CREATE ROLE "{user}" SUPERUSER LOGIN'], check=True)
    if database != "postgres":
        subprocess.run(psql + ["-d", "postgres", "-c", f'CREATE DATABASE "{database}" OWNER "{user}"'], check=True)
    scripts = 0
    for volume in service.get("volumes", []) or []:
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] != "/docker-entrypoint-initdb.d":
            continue
        for script in sorted((compose_dir / source).iterdir()):
            if script.suffix != ".sql":
                raise SystemExit(f"{script}: only .sql init scripts are emulated")
            user_psql = psql[:-1] + [user]
            subprocess.run(user_psql + ["-d", database, "-f", str(script)], check=True)
            scripts += 1
    ok(f"postgres: database {database!r}, {scripts} init script(s) as {user!r}")


class Runner:
    def __init__(self, work):
        self.work = work
        self.children = {}

    def start(self, name, argv, env):
        log = open(self.work / f"{name}.log", "wb")
        child = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[name] = child
        return child

    def tail(self, name, lines=25):
        path = self.work / f"{name}.log"
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            for line in text:
                print(f"    {name}| {line}", file=sys.stderr)

    def kill_all(self):
        for child in self.children.values():
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()


def probe(test, env, timeout):
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    kind, args = test[0], test[1:]
    if kind == "CMD":
        argv = args
    elif kind == "CMD-SHELL":
        argv = ["/bin/sh", "-c", args[0]]
    else:
        raise SystemExit(f"healthcheck test {test!r}: only CMD and CMD-SHELL are emulated")
    try:
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout)
        return done.returncode == 0, done.stdout.decode(errors="replace").strip()
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:g}s"


def round_trip(topology, ours, envs, betting, buf):
    """A whole round through the split topology, each call to the role that
    serves it: deposits (wallet), a round (settlement), two opposite bets on
    two betting instances, matched (matcher), settled and paid (settler),
    then the audit (settlement's AdminService)."""
    by_role = {}
    for name in ours:
        role = envs.get(name, {}).get("BETTING_ROLES")
        if role:
            by_role.setdefault(role, []).append(name)
    missing = [r for r in ROLES if r not in by_role]
    if missing:
        fail(f"round trip: no service runs {missing}")
        return
    first = by_role["betting"][0]
    second = by_role["betting"][-1]
    url = {name: f"http://127.0.0.1:{topology.ports[(name, GRPC_PORT)]}" for name in ours if (name, GRPC_PORT) in topology.ports}

    def token(*args):
        done = subprocess.run([str(betting), "token", *args], env=envs[first], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"betting token {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip().splitlines()[-1]

    def call(service, method, bearer, body):
        done = subprocess.run(
            [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "10s",
             "-H", f"authorization: Bearer {bearer}", "-d", json.dumps(body), f"{url[service]}/{method}"],
            capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"{service} {method}: {(done.stderr or done.stdout).strip()}")
        return json.loads(done.stdout or "{}")

    def until(what, check, within=30):
        end = time.monotonic() + within
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > end:
                raise RuntimeError(f"not within {within}s: {what}")
            time.sleep(0.25)

    started = time.monotonic()
    round_id = f"deploy-check-{int(time.time())}"
    try:
        cashier = token("--role", "cashier", "--subject", "deploy-check")
        game = token("--role", "game", "--subject", "deploy-check")
        admin = token("--role", "admin", "--subject", "deploy-check")
        players = {user: token("--role", "player", "--user", str(user)) for user in (1, 2)}
        wallet, settlement = by_role["wallet"][0], by_role["settlement"][0]
        for user in (1, 2):
            call(wallet, "betting.v1.WalletService/Deposit", cashier,
                 {"userId": user, "amount": "100", "idempotencyKey": f"{round_id}-deposit-{user}"})
        call(settlement, "betting.v1.SettlementService/OpenRound", game, {"roundId": round_id})
        for user, side, instance in ((1, "SIDE_A", first), (2, "SIDE_B", second)):
            call(instance, "betting.v1.BettingService/PlaceBet", players[user],
                 {"roundId": round_id, "side": side, "amount": "10", "idempotencyKey": f"{round_id}-bet-{user}"})

        def matched():
            bets = call(first, "betting.v1.BettingService/ListBets", players[1], {"roundId": round_id}).get("bets", [])
            return bets and bets[0].get("status") == "BET_STATUS_MATCHED"

        until("player 1's bet MATCHED (matcher)", matched)
        call(settlement, "betting.v1.SettlementService/SettleRound", game, {"roundId": round_id, "winningSide": "SIDE_A"})

        def paid():
            answer = call(wallet, "betting.v1.WalletService/GetWallet", players[1], {})
            return answer.get("wallet", {}).get("balance") in ("110", "110.00000000")

        until("player 1 paid 20 (settler, through the wallet)", paid)
        audit = call(settlement, "betting.v1.AdminService/RunAudit", admin, {})
        if not audit.get("clean"):
            fail(f"round trip: the audit is not clean: {audit.get('violations')}")
            return
        ok(f"a round through every role: deposits on {wallet}, bets on {first} and {second}, matched, settled, "
           f"paid, audit clean ({audit.get('checksRun')} checks) in {time.monotonic() - started:.1f}s")
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        fail(f"round trip: {error}")


def compose_run(root, binary, pg_port, redis_port, pg_bin, work, budget, buf=None):
    deadline = time.monotonic() + budget
    compose_path = root / "deploy/compose.yaml"
    compose = load_compose(compose_path)
    services = compose["services"]
    ours = betting_services(compose)
    externals = {("postgres", 5432): pg_port, ("redis", 6379): redis_port}
    topology = Topology(compose, externals)
    entrypoint, default_cmd, image_env = image_config(root / "deploy/Dockerfile")
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / Path(entrypoint[0]).name
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(Path(binary).resolve())
    base_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(work)}

    init_postgres(root, compose_path.parent, compose, pg_bin, pg_port)

    runner = Runner(work)
    state = {"postgres": "healthy", "redis": "healthy"}
    envs = {}

    def stopped_early():
        for name, child in runner.children.items():
            if state.get(name) in ("started", "healthy") and child.poll() is not None:
                fail(f"{name} exited with {child.returncode} while it should be serving")
                runner.tail(name)
                return True
        return False

    try:
        for name in order(services, list(ours) + ["postgres", "redis"]):
            if name in ("postgres", "redis"):
                continue
            service = services[name]
            for dependency, condition in depends(service).items():
                if dependency not in ours and dependency not in ("postgres", "redis"):
                    raise SystemExit(f"{name} depends on {dependency}, which the emulation does not run")
                want = {"service_started": ("started", "healthy", "completed"),
                        "service_healthy": ("healthy",),
                        "service_completed_successfully": ("completed",)}[condition]
                if state.get(dependency) not in want:
                    fail(f"{name}: {dependency} is {state.get(dependency)!r}, needs {condition}")
                    return
            env = dict(image_env)
            env.update(environment(service))
            env = {k: topology.rewrite(v, name) for k, v in env.items()}
            env.update(base_env)
            envs[name] = env
            command = service.get("command", default_cmd)
            if isinstance(command, str):
                command = command.split()
            argv = [str(link)] + [topology.rewrite(str(a), name) for a in service.get("entrypoint", entrypoint)[1:] + command]
            started = time.monotonic()
            child = runner.start(name, argv, env)
            condition_needed = {c for s in services.values() for d, c in depends(s).items() if d == name}
            if "service_completed_successfully" in condition_needed or service.get("restart") == "no":
                try:
                    code = child.wait(timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    fail(f"{name} ({' '.join(command)}) did not finish in time")
                    runner.tail(name)
                    return
                if code != 0:
                    fail(f"{name} ({' '.join(command)}) exited {code}")
                    runner.tail(name)
                    return
                state[name] = "completed"
                ok(f"{name}: `{' '.join(command)}` exited 0 in {time.monotonic() - started:.1f}s")
                continue
            state[name] = "started"
            check = service.get("healthcheck") or {}
            if check.get("disable") or "test" not in check:
                ok(f"{name}: started (no healthcheck)")
                continue
            timeout = duration(check.get("timeout", "30s"))
            interval = duration(check.get("interval", "30s"))
            window = duration(check.get("start_period", "0s")) + interval * int(check.get("retries", 3))
            # Probed more often than compose would (every 0.5 s), within the
            # same window: the run stays short.
            until = min(deadline, time.monotonic() + window)
            test = [topology.rewrite(str(a), name) for a in check["test"]] if isinstance(check["test"], list) else topology.rewrite(check["test"], name)
            while True:
                healthy, said = probe(test, env, timeout)
                if healthy:
                    state[name] = "healthy"
                    ok(f"{name} (BETTING_ROLES={env.get('BETTING_ROLES')}): healthy in "
                       f"{time.monotonic() - started:.1f}s on 127.0.0.1:{topology.ports[(name, GRPC_PORT)]} ({said})")
                    break
                if stopped_early():
                    return
                if time.monotonic() > until:
                    fail(f"{name}: not healthy within {window:g}s: {said}")
                    runner.tail(name)
                    return
                time.sleep(0.5)

        # Everything up: each process answers /metrics where Prometheus will
        # look, and is still running.
        for name in ours:
            if state.get(name) != "healthy":
                continue
            port = topology.ports.get((name, METRICS_PORT))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as answer:
                    if answer.status != 200:
                        fail(f"{name}: /metrics answered {answer.status}")
            except OSError as error:
                fail(f"{name}: /metrics on {port}: {error}")
        if stopped_early():
            return
        ok(f"every service answers /metrics ({sum(1 for n in ours if state.get(n) == 'healthy')} processes)")

        if buf:
            round_trip(topology, ours, envs, link, buf)
            if stopped_early():
                return

        # Stop as compose does: SIGTERM, then SIGKILL after stop_grace_period.
        stopping = time.monotonic()
        running = {n: c for n, c in runner.children.items() if c.poll() is None}
        for child in running.values():
            child.send_signal(signal.SIGTERM)
        for name, child in running.items():
            grace = duration(services[name].get("stop_grace_period", "10s"))
            left = max(0.1, min(deadline + 30, stopping + grace) - time.monotonic())
            try:
                code = child.wait(timeout=left)
            except subprocess.TimeoutExpired:
                fail(f"{name}: still running {grace:g}s after SIGTERM")
                runner.tail(name)
                continue
            if code != 0:
                fail(f"{name}: exited {code} after SIGTERM")
                runner.tail(name)
        ok(f"SIGTERM: every process drained and exited within {time.monotonic() - stopping:.1f}s")
    finally:
        runner.kill_all()


def main():
    command, root = sys.argv[1], Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None
    if command == "static":
        static(root, sys.argv[3], sys.argv[4])
    elif command == "k8s-prometheus":
        k8s_prometheus(sys.argv[2], sys.argv[3])
        return 0
    elif command == "compose-run":
        args = dict(zip(sys.argv[3::2], sys.argv[4::2]))

        def stop(signum, _frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        compose_run(root, args["--binary"], int(args["--pg-port"]), int(args["--redis-port"]),
                    args["--pg-bin"], Path(args["--work"]), float(args.get("--budget", 120)),
                    args.get("--buf"))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
