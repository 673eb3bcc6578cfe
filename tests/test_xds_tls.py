"""The xDS port is guarded: mutual TLS beyond loopback, and no client that merely connects can
hold weight changes back (docs/security.md). Real Envoy, real gRPC, certificates made by
`switchyard certs` (openssl)."""

from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from controlplane.xds.snapshot import CLUSTER
from tests.conftest import (
    complete_once,
    switchyard,
    two_version_models,
    wait_for_proxy,
    wait_until,
    write_config,
)

SHIFT = {"weights": {"v1": 0, "v2": 100}}
BACK = {"weights": {"v1": 100, "v2": 0}}


def make_certs(directory: Path, *hosts: str) -> dict[str, str]:
    """`switchyard certs`, as a user runs it."""
    args = [arg for host in hosts for arg in ("--host", host)]
    subprocess.run([sys.executable, "-m", "controlplane", "certs", str(directory), *args],
                   check=True, capture_output=True)  # fmt: skip
    names = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key",
             "envoy_cert": "envoy.crt", "envoy_key": "envoy.key"}  # fmt: skip
    return {name: str(directory / file) for name, file in names.items()}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    return make_certs(tmp_path_factory.mktemp("certs"), "127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> dict[str, str]:
    """Certificates from another CA: well formed, but not ours."""
    return make_certs(tmp_path_factory.mktemp("rogue"), "127.0.0.1")


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, certs):
    with switchyard("up", tmp_path_factory.mktemp("tls"), two_version_models(),
                    xds={"tls": certs}) as running:  # fmt: skip
        wait_for_proxy(running.proxy)
        yield running


class AdsClient:
    """A hand-driven ADS client: it sends what the test says, when the test says."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.ssl_target_name_override", "127.0.0.1")]
        self.channel = (
            grpc.insecure_channel(target)
            if credentials is None
            else grpc.secure_channel(target, credentials, options)
        )
        self.requests: queue.Queue = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        # A deadline, so that a test that goes wrong fails instead of hanging.
        self.responses = stub.StreamAggregatedResources(iter(self.requests.get, None), timeout=60)

    def subscribe(self, type_url: str, node: str = "intruder") -> discovery_pb2.DiscoveryResponse:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url)
        request.node.id, request.node.cluster = node, "switchyard"
        self.requests.put(request)
        return next(self.responses)

    def nack(self, response: discovery_pb2.DiscoveryResponse) -> None:
        self.requests.put(discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce,
            error_detail=status_pb2.Status(code=3, message="refusing everything")))  # fmt: skip

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


def credentials_from(paths: dict[str, str], ca: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(paths["envoy_key"]).read_bytes(),
        certificate_chain=Path(paths["envoy_cert"]).read_bytes(),
    )


def envoys(stack) -> list[dict]:
    return stack.api("GET", "/v1/envoys")[1]["envoys"]


def test_an_envoy_with_the_bootstrap_certificate_connects_and_serves(tls_stack):
    status, version = complete_once(tls_stack.proxy)
    assert (status, version) == (200, "v1")
    try:
        status, body = tls_stack.api("PUT", "/v1/models/llama-3-8b/weights", SHIFT)
        assert status == 200, body
        assert complete_once(tls_stack.proxy) == (200, "v2")
        [envoy] = envoys(tls_stack)
        assert envoy["types"]["rds"]["nack"] is None
    finally:
        tls_stack.api("PUT", "/v1/models/llama-3-8b/weights", BACK)


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "another CA's certificate"])
def test_clients_without_our_certificate_are_refused_and_delay_nothing(
    tls_stack, certs, rogue, client
):
    target = tls_stack.config["listen"]["xds"]
    credentials = {
        "plaintext": None,
        "no certificate": grpc.ssl_channel_credentials(Path(certs["ca"]).read_bytes()),
        "another CA's certificate": credentials_from(rogue, certs["ca"]),
    }[client]
    intruder = AdsClient(target, credentials)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            intruder.subscribe(CLUSTER)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [envoy["node_id"] for envoy in envoys(tls_stack)] != ["intruder"]
        assert all(envoy["node_id"] != "intruder" for envoy in envoys(tls_stack))
        status, body = tls_stack.api("PUT", "/v1/models/llama-3-8b/weights", SHIFT)
        assert status == 200, body
        assert complete_once(tls_stack.proxy) == (200, "v2")
    finally:
        intruder.close()
        tls_stack.api("PUT", "/v1/models/llama-3-8b/weights", BACK)


def test_a_client_with_our_certificate_reads_the_configuration(tls_stack, certs):
    """The positive control of the test above: the same client, with the Envoy certificate."""
    client = AdsClient(tls_stack.config["listen"]["xds"], credentials_from(certs, certs["ca"]))
    try:
        response = client.subscribe(CLUSTER, node="trusted")
        assert response.resources
    finally:
        client.close()


def test_a_client_that_never_acks_or_nacks_everything_holds_back_nothing(tmp_path):
    """On loopback without TLS any local process may connect: one that subscribes and never
    answers, or refuses every response, runs nothing of ours and is not waited for."""
    with switchyard("up", tmp_path, two_version_models()) as stack:
        wait_for_proxy(stack.proxy)
        silent = AdsClient(stack.config["listen"]["xds"])
        refusing = AdsClient(stack.config["listen"]["xds"])
        try:
            assert silent.subscribe(CLUSTER, node="silent").resources
            refusing.nack(refusing.subscribe(CLUSTER, node="refusing"))
            wait_until(lambda: {"silent", "refusing"} <= {e["node_id"] for e in envoys(stack)},
                       10, message="both clients to be listed")  # fmt: skip
            for weights, version in ((SHIFT, "v2"), (BACK, "v1"), (SHIFT, "v2")):
                status, body = stack.api("PUT", "/v1/models/llama-3-8b/weights", weights)
                assert status == 200, body  # not 504 after the ACK timeout, nor 502
                assert complete_once(stack.proxy) == (200, version)
        finally:
            silent.close()
            refusing.close()


def test_the_xds_port_refuses_a_public_address_without_tls(tmp_path, certs):
    config_path, config = write_config(tmp_path, two_version_models())
    config["listen"]["xds"] = config["listen"]["xds"].replace("127.0.0.1", "0.0.0.0")
    config_path.write_text(yaml.safe_dump(config))
    serve = [sys.executable, "-m", "controlplane", "serve", "--config", str(config_path)]
    result = subprocess.run(serve, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert "listen.xds" in result.stderr and "xds.tls" in result.stderr
    assert "Traceback" not in result.stderr


def test_bootstrap_names_the_envoy_certificate(tmp_path, certs):
    config_path, config = write_config(tmp_path, two_version_models(), xds={"tls": certs})
    bootstrap = subprocess.run(
        [sys.executable, "-m", "controlplane", "bootstrap", "--config", str(config_path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    (xds,) = yaml.safe_load(bootstrap)["static_resources"]["clusters"]
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["tls_certificates"][0]["certificate_chain"]["filename"] == certs["envoy_cert"]
    assert context["validation_context"]["trusted_ca"]["filename"] == certs["ca"]
    # Without the Envoy's certificate there is nothing to render: a message, not a traceback.
    config["xds"]["tls"] = {k: v for k, v in certs.items() if not k.startswith("envoy_")}
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "bootstrap", "--config", str(config_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "xds.tls.envoy_cert" in result.stderr and "Traceback" not in result.stderr


def test_envoy_stats_arrive_over_the_tls_port(tls_stack):
    """The stats push shares the TLS port: health keeps working."""
    for _ in range(20):
        complete_once(tls_stack.proxy)

    def counted() -> bool:
        health = tls_stack.api("GET", "/v1/models/llama-3-8b/health")[1]
        return health["versions"]["v1"]["requests"] > 0

    wait_until(counted, 10, message="Envoy's stats over the TLS connection")
