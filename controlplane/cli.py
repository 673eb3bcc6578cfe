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
import urllib.request
from typing import Any

from controlplane import __version__, logs
from controlplane.config import default_config_path, load_config
from controlplane.errors import ConfigError

DEFAULT_SERVER = "http://127.0.0.1:9000"


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
    sim.add_argument("--version", dest="sim_version", default=None, help="label for x-sim-version")

    boot = command("bootstrap", cmd_bootstrap, "print the Envoy bootstrap YAML")
    with_config(boot)
    boot.add_argument("--node-id", default=None)
    boot.add_argument("--xds-host", default=None, help="address Envoy dials (default: listen.xds)")

    client(command("models", cmd_models, "list models, versions, weights and readiness"))
    weights = client(command("weights", cmd_weights, "set a model's traffic split"))
    weights.add_argument("model")
    weights.add_argument("weights", nargs="+", metavar="VERSION=PERCENT")
    client(command("envoys", cmd_envoys, "connected Envoys and what they ACKed"))
    return parser


# -- server commands -----------------------------------------------------------------------


def _load(args: argparse.Namespace):
    return load_config(args.config or default_config_path())


def cmd_up(args: argparse.Namespace) -> int:
    from controlplane.service import run

    asyncio.run(run(_load(args), with_envoy=True))
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
            wake_ms=args.wake_ms,
        ),
        args.host,
        args.port,
    )
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from controlplane.proxy import render_bootstrap

    print(render_bootstrap(_load(args), args.node_id, args.xds_host), end="")
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
                    "yes" if version["ready"] else "no",
                    ",".join(version["endpoints"]) or "-",
                )
            )
    _print_table(rows)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    weights: dict[str, int] = {}
    for item in args.weights:
        version, sep, percent = item.partition("=")
        if not sep or not version or not percent.strip().lstrip("-").isdigit():
            raise CliError(f"expected VERSION=PERCENT, got {item!r}", code=2)
        weights[version] = int(percent)
    model = api(args, "PUT", f"/v1/models/{args.model}/weights", {"weights": weights})
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
