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
        WalletService and StakeService may reach the wallet (NetworkPolicy);
        the wallet serves StakeService (health); each Deployment probes
        gRPC health on 50051.

    check.py k8s-prometheus SRC DEST
        A copy of the Kubernetes Prometheus config that Debian's promtool
        can read (it is built without Kubernetes service discovery): each
        kubernetes_sd_configs becomes a static target.

    check.py k8s-run ROOT --rendered R.yaml --binary B --pg-port P --redis-port R --work W --buf BUF
        The rendered Kubernetes objects as processes, likewise (k8s_run);
        run after compose-run, on the database it migrated.

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
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import ports  # deploy/ports.py, next to this script

import yaml

# Every metric the dashboard and alerts use must be in the code now.
ANNOUNCED: set[str] = set()
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
    return ports.free_port()


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


def round_trip(urls, envs, betting, buf, users=(1, 2), signing=()):
    """A whole round through a split topology, each call to the role that
    serves it: deposits (wallet), a round (settlement), two opposite bets on
    two betting instances, matched (matcher), settled and paid (settler),
    then the audit (settlement's AdminService). `urls`: process -> its gRPC
    URL; tokens are minted by `betting token` in the first betting
    process's environment, with `signing` added (a key, its kid, iss, aud)."""
    by_role = {}
    for name in urls:
        role = envs.get(name, {}).get("BETTING_ROLES")
        if role:
            by_role.setdefault(role, []).append(name)
    missing = [r for r in ROLES if r not in by_role]
    if missing:
        fail(f"round trip: no service runs {missing}")
        return
    first = by_role["betting"][0]
    second = by_role["betting"][-1]
    url = urls
    winner, loser = users

    def token(*args):
        done = subprocess.run([str(betting), "token", *args, *signing], env=envs[first],
                              capture_output=True, text=True, timeout=10)
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
        players = {user: token("--role", "player", "--user", str(user)) for user in users}
        wallet, settlement = by_role["wallet"][0], by_role["settlement"][0]
        for user in users:
            call(wallet, "betting.v1.WalletService/Deposit", cashier,
                 {"userId": user, "amount": "100", "idempotencyKey": f"{round_id}-deposit-{user}"})
        # The internal StakeService (betting.internal.v1) is the wallet's,
        # on WalletService's port: the bets below are staked through it.
        stakes = call(wallet, "grpc.health.v1.Health/Check", cashier,
                      {"service": "betting.internal.v1.StakeService"})
        if stakes.get("status") != "SERVING":
            fail(f"round trip: {wallet} does not serve betting.internal.v1.StakeService: {stakes}")
            return
        call(settlement, "betting.v1.SettlementService/OpenRound", game, {"roundId": round_id})
        for user, side, instance in ((winner, "SIDE_A", first), (loser, "SIDE_B", second)):
            call(instance, "betting.v1.BettingService/PlaceBet", players[user],
                 {"roundId": round_id, "side": side, "amount": "10", "idempotencyKey": f"{round_id}-bet-{user}"})

        def matched():
            bets = call(first, "betting.v1.BettingService/ListBets", players[winner], {"roundId": round_id}).get("bets", [])
            return bets and bets[0].get("status") == "BET_STATUS_MATCHED"

        until(f"player {winner}'s bet MATCHED (matcher)", matched)
        call(settlement, "betting.v1.SettlementService/SettleRound", game, {"roundId": round_id, "winningSide": "SIDE_A"})

        def paid():
            answer = call(wallet, "betting.v1.WalletService/GetWallet", players[winner], {})
            return answer.get("wallet", {}).get("balance") in ("110", "110.00000000")

        until(f"player {winner} paid 20 (settler, through the wallet)", paid)
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
            urls = {n: f"http://127.0.0.1:{topology.ports[(n, GRPC_PORT)]}" for n in ours if (n, GRPC_PORT) in topology.ports}
            round_trip(urls, envs, link, buf)
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


def k8s_run(root, rendered, binary, pg_port, redis_port, work, budget, buf):
    """The rendered Kubernetes objects as processes: the migration Job, then
    one process per Deployment with the pod's environment (ConfigMaps,
    Secrets, the image's ENV) and its volumes as local directories. The
    placeholders are replaced by what this machine runs: the stores on
    127.0.0.1, and a JWKS and signing key made by `betting keys generate`
    under the Secret's kid (production token mode, as the manifests say).
    Services resolve to their pods' ports; every other host:port to a
    closed local port. Each pod is probed as its gRPC probes would, a round
    goes through every role with tokens signed by a key of the JWKS, then
    SIGTERM, within terminationGracePeriodSeconds."""
    import base64

    deadline = time.monotonic() + budget
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    _, _, image_env = image_config(root / "deploy/Dockerfile")
    configmaps = {d["metadata"]["name"]: dict(d.get("data") or {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {}
    for d in (d for d in docs if d["kind"] == "Secret"):
        values = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
        values.update(d.get("stringData") or {})
        secrets[d["metadata"]["name"]] = values

    # The placeholders, replaced.
    keys = work / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    kid = secrets["betting-signing-key"]["kid"]
    ops = "deploy-check-ops"
    for key_id in (kid, ops):
        subprocess.run([binary, "keys", "generate", "--kid", key_id, "--dir", str(keys)],
                       check=True, capture_output=True, timeout=10)
    configmaps["betting-jwks"]["jwks.json"] = (keys / "jwks.json").read_text()
    secrets["betting-signing-key"]["service.pem"] = (keys / f"{kid}.pem").read_text()
    secrets["betting-secrets"].update(
        DATABASE_URL=f"postgres://betting_service@127.0.0.1:{pg_port}/betting",
        MIGRATE_DATABASE_URL=f"postgres://postgres@127.0.0.1:{pg_port}/betting",
        REDIS_URL=f"redis://127.0.0.1:{redis_port}",
    )

    workloads = [d for d in docs if d["kind"] in ("Job", "Deployment")]
    ports = {}  # (workload, container port) -> local port
    for w in workloads:
        for port in w["spec"]["template"]["spec"]["containers"][0].get("ports", []):
            ports[(w["metadata"]["name"], port["containerPort"])] = free_port()
    # Service name -> {service port: local port of the pod behind it}.
    services = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        pods = [w for w in workloads if w["kind"] == "Deployment"
                and all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())]
        if len(pods) != 1:
            fail(f"k8s Service {svc['metadata']['name']} selects {len(pods)} Deployments")
            return
        pod = pods[0]
        named = {p["name"]: p["containerPort"] for p in pod["spec"]["template"]["spec"]["containers"][0].get("ports", [])}
        services[svc["metadata"]["name"]] = {
            p["port"]: ports[(pod["metadata"]["name"], named.get(p["targetPort"], p["targetPort"]))]
            for p in svc["spec"]["ports"]
        }
    closed = free_port()

    def rewrite(text, own):
        def one(match):
            host, port = match.group(1), int(match.group(2))
            if host in ("0.0.0.0", "127.0.0.1", "localhost"):
                mapped = ports.get((own, port))
                return f"127.0.0.1:{mapped}" if mapped else match.group(0)
            short = host.split(".")[0]
            if short in services and port in services[short]:
                return f"127.0.0.1:{services[short][port]}"
            return f"127.0.0.1:{closed}"
        return re.sub(r"(?<![\w.@:-])([A-Za-z0-9][A-Za-z0-9.-]*):(\d+)(?!\d)", one, text)

    def lookup(ref):
        if "configMapKeyRef" in ref:
            return configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        if "secretKeyRef" in ref:
            return secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        raise SystemExit(f"env valueFrom {ref!r} is not emulated")

    def pod_env(w):
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = dict(image_env)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(configmaps[source["configMapRef"]["name"]])
            elif "secretRef" in source:
                env.update(secrets[source["secretRef"]["name"]])
        for item in container.get("env", []):
            env[item["name"]] = str(item["value"]) if "value" in item else lookup(item["valueFrom"])
        # Volumes as directories of this run.
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            local = work / "pods" / name / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            source = None
            if "configMap" in volume:
                source = configmaps[volume["configMap"]["name"]]
                items = volume["configMap"].get("items")
            elif "secret" in volume:
                source = secrets[volume["secret"]["secretName"]]
                items = volume["secret"].get("items")
            if source is not None:
                for item in items or [{"key": k, "path": k} for k in source]:
                    (local / item["path"]).write_text(source[item["key"]])
            mounts[mount["mountPath"]] = str(local)
        out = {}
        for key, value in env.items():
            for path in sorted(mounts, key=len, reverse=True):
                if value.startswith(path):
                    value = mounts[path] + value[len(path):]
                    break
            out[key] = rewrite(value, name)
        out.update({"PATH": "/usr/bin:/bin", "HOME": str(work)})
        return out, container

    runner = Runner(work)
    envs, urls = {}, {}
    try:
        for job in (w for w in workloads if w["kind"] == "Job"):
            name = job["metadata"]["name"]
            env, container = pod_env(job)
            child = runner.start(name, [binary, *container.get("args", [])], env)
            code = child.wait(timeout=max(1, deadline - time.monotonic()))
            if code != 0:
                fail(f"k8s Job {name} exited {code}")
                runner.tail(name)
                return
            ok(f"k8s Job {name}: `{' '.join(container.get('args', []))}` exited 0")
        deployments = [w for w in workloads if w["kind"] == "Deployment"]
        started = time.monotonic()
        for w in deployments:
            name = w["metadata"]["name"]
            env, container = pod_env(w)
            envs[name] = env
            runner.start(name, [binary, *container.get("args", [])], env)
            urls[name] = f"http://127.0.0.1:{ports[(name, GRPC_PORT)]}"
        for w in deployments:
            name = w["metadata"]["name"]
            container = w["spec"]["template"]["spec"]["containers"][0]
            startup = container.get("startupProbe", {})
            window = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
            until = min(deadline, started + window)
            while True:
                healthy, said = probe(["CMD", binary, "health", "--addr", urls[name]], envs[name], 5)
                if healthy:
                    ok(f"k8s {name} (BETTING_ROLES={envs[name].get('BETTING_ROLES')}, production tokens): "
                       f"ready in {time.monotonic() - started:.1f}s")
                    break
                child = runner.children[name]
                if child.poll() is not None or time.monotonic() > until:
                    fail(f"k8s {name}: not ready ({said}; exit {child.poll()})")
                    runner.tail(name)
                    return
                time.sleep(0.5)
        iss, aud = configmaps["betting-config"]["BETTING_JWT_ISSUER"], configmaps["betting-config"]["BETTING_JWT_AUDIENCE"]
        round_trip(urls, envs, binary, buf, users=(3, 4),
                   signing=("--key", str(keys / f"{ops}.pem"), "--kid", ops, "--jwt-issuer", iss, "--jwt-audience", aud))
        stopping = time.monotonic()
        for child in runner.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for w in deployments:
            name = w["metadata"]["name"]
            spec = w["spec"]["template"]["spec"]
            pre_stop = (spec["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep") or {}).get("seconds", 0)
            left = max(0.1, stopping + spec.get("terminationGracePeriodSeconds", 30) - pre_stop - time.monotonic())
            try:
                code = runner.children[name].wait(timeout=left)
            except subprocess.TimeoutExpired:
                fail(f"k8s {name}: still running after terminationGracePeriodSeconds")
                continue
            if code != 0:
                fail(f"k8s {name}: exited {code} after SIGTERM")
                runner.tail(name)
        ok(f"k8s: SIGTERM, every pod's process drained and exited within {time.monotonic() - stopping:.1f}s")
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
    elif command == "k8s-run":
        args = dict(zip(sys.argv[3::2], sys.argv[4::2]))

        def stop(signum, _frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        k8s_run(root, args["--rendered"], args["--binary"], int(args["--pg-port"]), int(args["--redis-port"]),
                Path(args["--work"]), float(args.get("--budget", 120)), args["--buf"])
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
