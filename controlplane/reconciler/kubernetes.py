"""The Kubernetes runtime: model versions are VLLMModel resources, served by one Deployment and
one headless Service each; Envoy gets the ready pod addresses from their EndpointSlices.

The VLLMModel resources are the catalog: a new one adds its model/version to the controller
(the first version of a model takes all traffic, later ones join at weight 0), a deleted one
leaves EDS at once and is removed from the controller unless it still has traffic. A version
added through the admin API gets a VLLMModel made from its backend, so both ways lead to the
same place. Parking is durable on the resource: the annotation `switchyard.io/parked`
(`stopped`: the Deployment runs 0 pods; `sleep1`/`sleep2`: the pods run in vLLM sleep mode).

Two watches (VLLMModels and EndpointSlices, namespace-wide) run in their own threads with the
synchronous `kubernetes` client: list, then watch from the list's resourceVersion; 410 Gone
relists, other errors back off and retry. Their events are handled on the event loop, one
reconcile task per resource, so a slow API call never blocks another resource or the loop.
Writes of Deployments and Services read, compare and replace with the resourceVersion read,
and re-read on 409 Conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from controlplane import logs
from controlplane.config import Backend, ModelConfig, VersionConfig
from controlplane.controller import Controller
from controlplane.errors import Conflict, Invalid, NotFound, SwitchyardError, Unavailable
from controlplane.reconciler import vllm_args
from controlplane.reconciler.vllm_args import API_VERSION, GROUP, KIND, PLURAL, ModelSpec
from controlplane.state import Endpoint

log = logs.get("kubernetes")

LABEL_MODEL = "switchyard.io/model"
LABEL_VERSION = "switchyard.io/version"
LABEL_WORKLOAD = "switchyard.io/workload"
PARKED = "switchyard.io/parked"  # annotation: stopped | sleep1 | sleep2
SPEC_HASH = "switchyard.io/spec-hash"
SERVICE_NAME = "kubernetes.io/service-name"
DEFAULT_SIM_IMAGE = "switchyard:0.1.0"
MAX_BACKOFF_S = 30.0
WATCH_TIMEOUT_S = 300  # the API server ends a watch after this; we resume from its last version
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def load_api_client() -> client.ApiClient:
    """In a pod, the service account; elsewhere the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def default_namespace() -> str:
    """$SWITCHYARD_NAMESPACE, else the pod's own namespace, else `default`."""
    if os.environ.get("SWITCHYARD_NAMESPACE"):
        return os.environ["SWITCHYARD_NAMESPACE"]
    with contextlib.suppress(OSError), open(SERVICE_ACCOUNT_NAMESPACE) as file:
        return file.read().strip()
    return "default"


def workload_name(resource_name: str) -> str:
    """Deployment and Service name of a VLLMModel: its own name when it is a valid Service
    name (a DNS-1035 label), else a stable hash of it."""
    if re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", resource_name):
        return resource_name
    return "vllm-" + hashlib.sha1(resource_name.encode()).hexdigest()[:12]


def resource_name(model: str, version: str) -> str:
    """The name of a VLLMModel made for a version added through the admin API."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{model}-{version}".lower()).strip("-")
    if not re.match(r"[a-z]", name):
        name = "m-" + name
    if len(name) > 63:
        name = name[:50].rstrip("-") + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def label_value(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]", "_", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


@dataclass
class _Resource:
    """What we know of one VLLMModel."""

    name: str
    obj: dict
    spec: ModelSpec | None
    error: str | None = None
    waking: bool = False
    reported: tuple | None = None  # (urls, state) last sent to the controller
    status: dict | None = None  # last status written
    dirty: bool = False
    task: asyncio.Task | None = None

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.spec.model, self.spec.version) if self.spec else None

    @property
    def parked(self) -> str | None:
        return (self.obj["metadata"].get("annotations") or {}).get(PARKED)

    @property
    def uid(self) -> str:
        return self.obj["metadata"].get("uid", "")


@dataclass
class _Status:
    pending: dict | None = None
    task: asyncio.Task | None = None
    written: dict = field(default_factory=dict)


class KubernetesRuntime:
    def __init__(
        self,
        controller: Controller,
        namespace: str | None = None,
        api_client: client.ApiClient | None = None,
        sim_image: str | None = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
    ) -> None:
        self.controller = controller
        self.namespace = namespace or default_namespace()
        self.api = api_client or load_api_client()
        self.sim_image = sim_image or os.environ.get("SWITCHYARD_SIM_IMAGE", DEFAULT_SIM_IMAGE)
        self.watch_timeout_s = watch_timeout_s
        self.custom = client.CustomObjectsApi(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)
        self.resources: dict[str, _Resource] = {}
        self.slices: dict[str, dict[str, list[str]]] = {}  # Service -> EndpointSlice -> URLs
        self._statuses: dict[str, _Status] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="k8s-api")
        self._watches: list[_Watch] = []
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._synced = {PLURAL: asyncio.Event(), "endpointslices": asyncio.Event()}
        # A LoRA adapter's VLLMModel has no pods: its status follows the version, which
        # reconciler/adapters.py keeps on its base's pods.
        controller.endpoint_watchers.append(self._adapter_status)

    # -- the Runtime interface ---------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for plural, list_fn, handler in (
            (PLURAL, self._list_models, self._on_model),
            ("endpointslices", self._list_slices, self._on_slice),
        ):
            queue: asyncio.Queue = asyncio.Queue()
            watch = _Watch(plural, list_fn, queue, loop, self.watch_timeout_s)
            self._watches.append(watch)
            watch.start()
            self._tasks.append(
                asyncio.create_task(self._consume(plural, queue, handler), name=f"k8s-{plural}")
            )

    async def wait_synced(self, timeout: float = 10.0) -> bool:
        """True once both watches have listed once (the catalog is known)."""
        try:
            async with asyncio.timeout(timeout):
                for event in self._synced.values():
                    await event.wait()
            return True
        except TimeoutError:
            return False

    async def wait_ready(self, timeout: float) -> bool:
        """True once every version of the controller is active (or timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.wait_synced(timeout)
        while loop.time() < deadline:
            versions = [
                v for m in self.controller.state.models.values() for v in m.versions.values()
            ]
            if all(version.ready for version in versions):
                return True
            await asyncio.sleep(0.1)
        return False

    def validate(self, model: str, version: str, backend: Backend) -> None:
        """A version that is no VLLMModel yet must be able to become one (not `url`)."""
        if self._find(model, version) is None:
            try:
                vllm_args.parse_spec(vllm_args.spec_of(model, version, backend))
            except Invalid as exc:
                raise Invalid(exc.message, field="backend") from None

    async def ensure(self, model: str, version: str, backend: Backend) -> None:
        resource = self._find(model, version)
        if resource is not None:
            self._kick(resource)
            return
        spec = vllm_args.spec_of(model, version, backend)
        known = self.controller.state.models.get(model)
        if known is not None and version in known.versions:
            spec["replicas"] = known.versions[version].replicas
        body = {
            "apiVersion": f"{GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {
                "name": resource_name(model, version),
                "labels": {LABEL_MODEL: label_value(model), LABEL_VERSION: label_value(version)},
            },
            "spec": spec,
        }
        try:
            await self._call(
                self.custom.create_namespaced_custom_object,
                GROUP, API_VERSION, self.namespace, PLURAL, body,
            )  # fmt: skip
            logs.event(log, "vllmmodel.created", model=model, version=version)
        except ApiException as exc:
            if exc.status != 409:
                raise _convert(exc, "create the VLLMModel") from None
        # The watch brings it back as ADDED, which creates its Deployment and Service.

    async def remove(self, model: str, version: str) -> None:
        resource = self._find(model, version)
        if resource is None:
            return
        self.resources.pop(resource.name, None)
        if resource.task is not None:
            resource.task.cancel()
        self._set_endpoints(model, version, [], "stopped")
        with contextlib.suppress(NotFound):
            await self._delete(
                self.custom.delete_namespaced_custom_object,
                GROUP, API_VERSION, self.namespace, PLURAL, resource.name,
            )  # fmt: skip
        await self._delete_workload(resource.name)

    async def sleep(self, model: str, version: str, level: int) -> None:
        resource = self._require(model, version)
        if not resource.spec.enable_sleep_mode:
            await self.scale(model, version, 0)  # without sleep mode, stopping frees the GPU
            return
        urls = self._urls(resource)
        timeout = self.controller.state.model(model).wake_timeout_s
        await self._annotate(resource, f"sleep{level}")
        self._report(resource)  # out of EDS, as every Envoy confirms, before the engines sleep
        await self.controller.endpoints_applied(timeout)
        for url in urls:  # mode=wait: requests already in the engine finish, none is aborted
            await self._post(f"{url}/sleep?level={level}&mode=wait", timeout)
        await self._wait_sleeping(urls, True, timeout)

    async def wake(self, model: str, version: str) -> float:
        resource = self._require(model, version)
        loop = asyncio.get_running_loop()
        started = loop.time()
        parked = resource.parked
        if parked is None and self._urls(resource):
            return 0.0
        resource.waking = True
        self._report(resource)
        try:
            if parked and parked.startswith("sleep"):
                urls = self._urls(resource)
                timeout = self.controller.state.model(model).wake_timeout_s
                for url in urls:
                    await self._wake_engine(url, 2 if parked == "sleep2" else 1, timeout)
                await self._wait_sleeping(urls, False, timeout)
                await self._annotate(resource, None)
            else:
                await self._patch_model(resource, {"metadata": {"annotations": {PARKED: None}}})
            timeout = self.controller.state.model(model).wake_timeout_s
            while not self._urls(resource):
                if loop.time() - started > timeout:
                    raise Unavailable(f"{model}@{version} not ready after {timeout:.0f}s")
                await asyncio.sleep(0.1)
        finally:
            resource.waking = False
            self._report(resource)
        return loop.time() - started

    async def scale(self, model: str, version: str, replicas: int) -> None:
        resource = self._require(model, version)
        if replicas == 0:
            await self._annotate(resource, "stopped")
        else:
            await self._patch_model(
                resource,
                {"metadata": {"annotations": {PARKED: None}}, "spec": {"replicas": replicas}},
            )
        self._report(resource)

    async def stop(self) -> None:
        """Stop watching; the workloads keep serving (they belong to their VLLMModels)."""
        for watch in self._watches:
            watch.stop()
        tasks = [*self._tasks, *(r.task for r in self.resources.values() if r.task)]
        tasks += [s.task for s in self._statuses.values() if s.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(w.join, 5) for w in self._watches))
        if self._session is not None:
            await self._session.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- watch events --------------------------------------------------------------------------

    async def _consume(self, plural: str, queue: asyncio.Queue, handler) -> None:
        while True:
            kind, payload = await queue.get()
            try:
                if kind == "SYNC":
                    await self._sync(plural, payload, handler)
                    self._synced[plural].set()
                else:
                    await handler(kind, payload)
            except Exception:
                log.exception("handling a %s %s event failed", plural, kind)

    async def _sync(self, plural: str, items: list[dict], handler) -> None:
        """A (re)list: everything in it is ADDED/MODIFIED, what we knew and is gone DELETED."""
        names = {item["metadata"]["name"] for item in items}
        if plural == PLURAL:
            gone = [dict(r.obj) for name, r in self.resources.items() if name not in names]
            items = sorted(items, key=lambda i: (i["metadata"].get("creationTimestamp") or "",
                                                 i["metadata"]["name"]))  # fmt: skip
        else:
            gone = [
                {"metadata": {"name": name, "labels": {SERVICE_NAME: service}}}
                for service, slices in self.slices.items()
                for name in slices
                if name not in names
            ]
        for obj in gone:
            await handler("DELETED", obj)
        if plural == PLURAL:
            await self._register_models(items)
        for obj in items:
            await handler("MODIFIED", obj)

    async def _register_models(self, items: list[dict]) -> None:
        """A model new to the controller is added with all its listed versions at once (the
        oldest VLLMModel takes the traffic), so the controller can restore its persisted
        weights over the whole set rather than see the versions trickle in one by one."""
        by_model: dict[str, list[VersionConfig]] = {}
        for item in items:
            with contextlib.suppress(Invalid):
                spec = vllm_args.parse_spec(item.get("spec"))
                versions = by_model.setdefault(spec.model, [])
                if spec.model not in self.controller.state.models and all(
                    v.name != spec.version for v in versions
                ):
                    weight = 0 if versions else 100
                    backend = vllm_args.backend_of(spec)
                    version = VersionConfig(name=spec.version, weight=weight, backend=backend)
                    versions.append(version)
        for model, versions in by_model.items():
            if versions:
                with contextlib.suppress(Conflict):
                    await self.controller.add_model(ModelConfig(name=model, versions=versions))

    async def _on_model(self, kind: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            await self._forget(name)
            return
        try:
            spec, error = vllm_args.parse_spec(obj.get("spec")), None
        except Invalid as exc:
            spec, error = None, exc.message
        known = self.resources.get(name)
        if known is not None and known.key is not None and spec is not None and (
            known.key != (spec.model, spec.version)
        ):
            await self._forget(name)  # its model or version changed: a different version now
            known = None
        if spec is not None and error is None:
            owner = self._find(spec.model, spec.version)
            if owner is not None and owner.name != name:
                spec, error = None, (
                    f"{spec.model}@{spec.version} is already served by VLLMModel {owner.name}"
                )
        if known is None:
            known = self.resources[name] = _Resource(name, obj, spec, error)
        known.obj, known.spec, known.error = obj, spec, error
        if error is not None:
            logs.event(log, "vllmmodel.invalid", logging.WARNING, name=name, error=error)
            self._write_status(known)
            return
        await self._register(spec)
        self._kick(known)

    async def _register(self, spec: ModelSpec) -> None:
        """Make the version known to the controller (a no-op when it is)."""
        backend = vllm_args.backend_of(spec)
        models = self.controller.state.models
        try:
            if spec.model not in models:
                version = VersionConfig(name=spec.version, weight=100, backend=backend)
                await self.controller.add_model(ModelConfig(name=spec.model, versions=[version]))
            elif spec.version not in models[spec.model].versions:
                version = VersionConfig(name=spec.version, weight=0, backend=backend)
                await self.controller.add_version(spec.model, version)
        except Conflict:
            pass  # added meanwhile (the admin API, or a relist)

    async def _forget(self, name: str) -> None:
        resource = self.resources.pop(name, None)
        if resource is None:
            return
        if resource.task is not None:
            resource.task.cancel()
        self._statuses.pop(name, None)
        await self._delete_workload(name)
        if resource.key is None:
            return
        model, version = resource.key
        self._set_endpoints(model, version, [], "stopped")
        try:
            await self.controller.remove_version(model, version)
            logs.event(log, "vllmmodel.removed", model=model, version=version)
        except Conflict as exc:
            logs.event(log, "vllmmodel.deleted_but_kept", logging.WARNING, model=model,
                       version=version, reason=exc.message)  # fmt: skip
        except NotFound:
            pass

    async def _on_slice(self, kind: str, obj: dict) -> None:
        service = (obj["metadata"].get("labels") or {}).get(SERVICE_NAME)
        if not service:
            return
        slices = self.slices.setdefault(service, {})
        if kind == "DELETED":
            slices.pop(obj["metadata"]["name"], None)
        else:
            slices[obj["metadata"]["name"]] = ready_urls(obj)
        for resource in self.resources.values():
            if workload_name(resource.name) == service:
                self._report(resource)

    # -- reconciling one VLLMModel -------------------------------------------------------------

    def _kick(self, resource: _Resource) -> None:
        """Reconcile `resource` soon; one task per resource, re-run while it changes."""
        resource.dirty = True
        if resource.task is None or resource.task.done():
            resource.task = asyncio.create_task(
                self._reconcile_loop(resource), name=f"k8s-reconcile-{resource.name}"
            )

    async def _reconcile_loop(self, resource: _Resource) -> None:
        backoff = 0.5
        while resource.dirty and self.resources.get(resource.name) is resource:
            resource.dirty = False
            try:
                await self._apply_workload(resource)
                backoff = 0.5
            except Exception as exc:
                logs.event(log, "vllmmodel.reconcile_failed", logging.WARNING,
                           name=resource.name, error=_describe(exc), retry_in=backoff)  # fmt: skip
                resource.dirty = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        self._report(resource)

    async def _apply_workload(self, resource: _Resource) -> None:
        if resource.spec is not None and resource.spec.adapter is not None:
            return  # a LoRA adapter: loaded on its base's pods, no workload of its own
        deployment, service = self.workload(resource.obj, resource.spec)
        await self._upsert(
            deployment, self.apps.read_namespaced_deployment,
            self.apps.create_namespaced_deployment, self.apps.replace_namespaced_deployment,
        )  # fmt: skip
        await self._upsert(
            service, self.core.read_namespaced_service,
            self.core.create_namespaced_service, self.core.replace_namespaced_service,
        )  # fmt: skip

    def workload(self, obj: dict, spec: ModelSpec) -> tuple[dict, dict]:
        """The Deployment and Service a VLLMModel should have."""
        name = workload_name(obj["metadata"]["name"])
        labels = {
            LABEL_MODEL: label_value(spec.model),
            LABEL_VERSION: label_value(spec.version),
            LABEL_WORKLOAD: name,
            "app.kubernetes.io/managed-by": "switchyard",
        }
        owner = {
            "apiVersion": f"{GROUP}/{API_VERSION}", "kind": KIND,
            "name": obj["metadata"]["name"], "uid": obj["metadata"].get("uid", ""),
            "controller": True, "blockOwnerDeletion": True,
        }  # fmt: skip
        parked = (obj["metadata"].get("annotations") or {}).get(PARKED)
        serving = vllm_args.container(spec, self.sim_image)
        pod: dict[str, Any] = {"containers": [serving], "terminationGracePeriodSeconds": 30}
        if spec.simulator is None:  # tensor parallelism talks through shared memory
            serving["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}]
            pod["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
        template = {"metadata": {"labels": labels}, "spec": pod}
        replicas = 0 if parked == "stopped" else spec.replicas
        digest = hashlib.sha256(json.dumps([template, replicas], sort_keys=True).encode())
        meta = {
            "name": name, "namespace": self.namespace, "labels": labels,
            "annotations": {SPEC_HASH: digest.hexdigest()[:16]}, "ownerReferences": [owner],
        }  # fmt: skip
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {LABEL_WORKLOAD: name}},
                "template": template,
            },
        }
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {**meta, "annotations": {}},
            "spec": {
                "clusterIP": "None",  # Envoy balances per pod: no kube-proxy in the way
                "selector": {LABEL_WORKLOAD: name},
                "ports": [{"name": "http", "port": vllm_args.PORT, "targetPort": "http"}],
            },
        }
        return deployment, service

    async def _upsert(self, body: dict, read: Callable, create: Callable, replace: Callable):
        """Create, or replace when it differs; on 409 re-read and try again."""
        name = body["metadata"]["name"]
        for _ in range(8):
            try:
                current = await self._call(read, name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                try:
                    await self._call(create, self.namespace, body)
                    logs.event(log, "workload.created", kind=body["kind"], name=name)
                    return
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    continue  # created meanwhile: read it
            if _same(current, body):
                return
            new = copy.deepcopy(body)
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            if body["kind"] == "Service":  # immutable once set
                new["spec"]["clusterIP"] = current.get("spec", {}).get("clusterIP", "None")
            try:
                await self._call(replace, name, self.namespace, new)
                logs.event(log, "workload.updated", kind=body["kind"], name=name)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
                logs.event(log, "workload.conflict", kind=body["kind"], name=name)
        raise Conflict(f"{body['kind']} {name}: kept changing while we updated it")

    async def _delete_workload(self, name: str) -> None:
        """Delete the Deployment and Service (the garbage collector would too: owner refs)."""
        workload = workload_name(name)
        for delete in (self.apps.delete_namespaced_deployment, self.core.delete_namespaced_service):
            with contextlib.suppress(NotFound):
                await self._delete(delete, workload, self.namespace)

    # -- endpoints and status --------------------------------------------------------------------

    def _urls(self, resource: _Resource) -> list[str]:
        slices = self.slices.get(workload_name(resource.name), {})
        return sorted({url for urls in slices.values() for url in urls})

    def _state(self, resource: _Resource) -> tuple[list[str], str]:
        if resource.error is not None or resource.spec is None:
            return [], "error"
        if resource.spec.adapter is not None:  # as reconciler/adapters.py reports it
            model = self.controller.state.models.get(resource.spec.model)
            version = model.versions.get(resource.spec.version) if model else None
            if version is None:
                return [], "starting"
            return [e.url for e in version.endpoints if e.ready], version.state
        parked = resource.parked
        urls = self._urls(resource)
        if resource.waking:
            return [], "waking"
        if parked and parked.startswith("sleep"):
            return [], "sleeping"
        if parked == "stopped" or resource.spec.replicas == 0:
            return [], "stopped"
        return urls, "active" if urls else "starting"

    def _report(self, resource: _Resource) -> None:
        """Send the version's ready endpoints to the controller and its status to the CR."""
        if resource.spec is not None and resource.spec.adapter is not None:
            self._write_status(resource)  # its endpoints are reconciler/adapters.py's
            return
        urls, state = self._state(resource)
        changed = resource.key is not None and (urls, state) != resource.reported
        if changed and self._set_endpoints(*resource.key, [Endpoint(u) for u in urls], state):
            resource.reported = (urls, state)
        self._write_status(resource)

    def _adapter_status(self, model: str) -> None:
        for resource in list(self.resources.values()):
            spec = resource.spec
            if spec is not None and spec.adapter is not None and spec.model == model:
                self._write_status(resource)

    def _set_endpoints(self, model: str, version: str, endpoints: list[Endpoint], state: str):
        known = self.controller.state.models.get(model)
        if known is None or version not in known.versions:
            return False
        self.controller.set_endpoints(model, version, endpoints, state)
        return True

    def _write_status(self, resource: _Resource) -> None:
        urls, state = self._state(resource)
        ready = state == "active"
        if resource.error:
            reason, message = "InvalidSpec", resource.error
        elif ready:
            reason, message = "EndpointsReady", f"{len(urls)} ready endpoint(s)"
        else:
            reason, message = state.capitalize(), "no ready endpoint"
        wanted = {"readyReplicas": len(urls), "endpoints": urls, "state": state,
                  "observedGeneration": resource.obj["metadata"].get("generation", 1)}  # fmt: skip
        tracker = self._statuses.setdefault(resource.name, _Status())
        previous = tracker.written.get("conditions", [{}])[0]
        since = previous.get("lastTransitionTime") if previous.get("status") == str(ready) else None
        condition = {
            "type": "Ready", "status": str(ready), "reason": reason, "message": message,
            "lastTransitionTime": since or _now(),
        }  # fmt: skip
        status = {**wanted, "conditions": [condition]}
        if status == tracker.written or status == tracker.pending:
            return
        tracker.pending = status
        if tracker.task is None or tracker.task.done():
            tracker.task = asyncio.create_task(
                self._status_loop(resource.name, tracker), name=f"k8s-status-{resource.name}"
            )

    async def _status_loop(self, name: str, tracker: _Status) -> None:
        backoff = 0.5
        while tracker.pending is not None and self._statuses.get(name) is tracker:
            status = tracker.pending
            try:
                await self._call(
                    self.custom.patch_namespaced_custom_object_status,
                    GROUP, API_VERSION, self.namespace, PLURAL, name, {"status": status},
                )  # fmt: skip
                tracker.written = status
                if tracker.pending is status:
                    tracker.pending = None
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 404:
                    return  # deleted meanwhile
                logs.event(log, "vllmmodel.status_failed", logging.WARNING, name=name,
                           error=_describe(exc), retry_in=backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                logs.event(log, "vllmmodel.status_failed", logging.WARNING, name=name,
                           error=_describe(exc), retry_in=backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    # -- helpers ---------------------------------------------------------------------------------

    def _find(self, model: str, version: str) -> _Resource | None:
        for resource in self.resources.values():
            if resource.key == (model, version) and resource.error is None:
                return resource
        return None

    def _require(self, model: str, version: str) -> _Resource:
        resource = self._find(model, version)
        if resource is None:
            raise NotFound(f"no VLLMModel for {model}@{version}", field="version")
        return resource

    async def _annotate(self, resource: _Resource, parked: str | None) -> None:
        await self._patch_model(resource, {"metadata": {"annotations": {PARKED: parked}}})

    async def _patch_model(self, resource: _Resource, patch: dict) -> None:
        """Patch the VLLMModel and apply the result at once (the watch confirms it later)."""
        try:
            obj = await self._call(
                self.custom.patch_namespaced_custom_object,
                GROUP, API_VERSION, self.namespace, PLURAL, resource.name, patch,
            )  # fmt: skip
        except ApiException as exc:
            raise _convert(exc, f"patch VLLMModel {resource.name}") from None
        if isinstance(obj, dict) and obj.get("metadata"):
            resource.obj = obj
            resource.spec = vllm_args.parse_spec(obj.get("spec"))
        self._kick(resource)

    async def _post(self, url: str, timeout: float, json: dict | None = None) -> None:
        """vLLM's sleep-mode calls answer when done: seconds to minutes for a large model
        (`timeout` is the model's wake_timeout_seconds)."""
        assert self._session is not None
        try:
            async with self._session.post(
                url, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.status >= 400:
                    raise Unavailable(f"{url}: HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{url}: {exc or type(exc).__name__}") from None

    async def _wake_engine(self, url: str, level: int, timeout: float) -> None:
        """After level 2 the weights were discarded (a plain /wake_up serves garbage): wake
        the weights, reload them, then the KV cache."""
        if level >= 2:
            await self._post(f"{url}/wake_up?tags=weights", timeout)
            await self._post(f"{url}/collective_rpc", timeout, {"method": "reload_weights"})
            await self._post(f"{url}/wake_up?tags=kv_cache", timeout)
        else:
            await self._post(f"{url}/wake_up", timeout)

    async def _wait_sleeping(self, urls: list[str], sleeping: bool, timeout: float = 60) -> None:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = list(urls)
        while pending and loop.time() < deadline:
            url = pending[0]
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with self._session.get(f"{url}/is_sleeping") as response:
                    if (await response.json()).get("is_sleeping") == sleeping:
                        pending.pop(0)
                        continue
            await asyncio.sleep(0.05)
        if pending:
            raise Unavailable(f"{pending[0]} did not {'sleep' if sleeping else 'wake'} in time")

    async def _call(self, fn: Callable, *args: Any) -> Any:
        """Run one API call in our threads; the answer as plain JSON (dicts)."""
        loop = asyncio.get_running_loop()

        def call():
            response = fn(*args, _preload_content=False, _request_timeout=(5, 30))
            data = response.data
            return json.loads(data) if data else None

        return await loop.run_in_executor(self._executor, call)

    async def _delete(self, fn: Callable, *args: Any) -> None:
        try:
            await self._call(fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(f"{args[-1]} not found") from None
            raise _convert(exc, f"delete {args[-1]}") from None

    def _list_models(self, **kwargs):
        return self.custom.list_namespaced_custom_object(
            GROUP, API_VERSION, self.namespace, PLURAL, **kwargs
        )

    def _list_slices(self, **kwargs):
        return self.discovery.list_namespaced_endpoint_slice(self.namespace, **kwargs)


def ready_urls(endpoint_slice: dict) -> list[str]:
    """`http://ip:port` of every endpoint the slice says is ready (and not terminating)."""
    ports = endpoint_slice.get("ports") or []
    port = next((p for p in ports if p.get("name") == "http"), ports[0] if ports else None)
    if not port or port.get("port") is None:
        return []
    ipv6 = endpoint_slice.get("addressType") == "IPv6"
    urls = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is not True or conditions.get("terminating") is True:
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ipv6 else address
            urls.append(f"http://{host}:{port['port']}")
    return urls


def _same(current: dict, wanted: dict) -> bool:
    meta, want = current.get("metadata", {}), wanted["metadata"]
    if wanted["kind"] == "Deployment":
        return (
            (meta.get("annotations") or {}).get(SPEC_HASH) == want["annotations"][SPEC_HASH]
            and current.get("spec", {}).get("replicas") == wanted["spec"]["replicas"]
            and meta.get("ownerReferences") == want["ownerReferences"]
        )
    spec = current.get("spec", {})
    return (
        spec.get("selector") == wanted["spec"]["selector"]
        and [(p.get("name"), p.get("port")) for p in spec.get("ports", [])]
        == [(p["name"], p["port"]) for p in wanted["spec"]["ports"]]
        and meta.get("ownerReferences") == want["ownerReferences"]
    )


def _now() -> str:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc) or type(exc).__name__


def _convert(exc: ApiException, doing: str) -> SwitchyardError:
    """A Kubernetes API error as one of ours, where it enters our code."""
    message = f"Kubernetes API: cannot {doing}: HTTP {exc.status} {exc.reason}"
    if exc.status == 404:
        return NotFound(message)
    if exc.status == 409:
        return Conflict(message)
    if exc.status in (400, 422):
        return Invalid(message)
    return Unavailable(message)


class _Watch(threading.Thread):
    """List, then watch from the list's resourceVersion, forever, in a thread of its own.

    Events go to `queue` on the event loop: ("SYNC", items) after each (re)list, then
    (type, object). A 410 Gone (history compacted) relists; any other failure backs off
    (0.5 s doubling to 30 s) and resumes from the last resourceVersion seen.
    """

    def __init__(self, plural: str, list_fn, queue: asyncio.Queue, loop, timeout_s: int):
        super().__init__(name=f"k8s-watch-{plural}", daemon=True)
        self.plural = plural
        self.list_fn = list_fn
        self.queue = queue
        self.loop = loop
        self.timeout_s = timeout_s
        self._stopping = threading.Event()
        self._response: urllib3.HTTPResponse | None = None
        self.relists = 0

    def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()

    def _emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))

    def run(self) -> None:
        version: str | None = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    listing = self._request()
                    version = listing["metadata"]["resourceVersion"]
                    self.relists += 1
                    self._emit("SYNC", listing.get("items") or [])
                version = self._stream(version)
                backoff = 0.5
            except Exception as exc:
                if self._stopping.is_set():
                    return
                if isinstance(exc, ApiException) and exc.status == 410:
                    version = None
                    continue
                logs.event(log, "watch.failed", logging.WARNING, resource=self.plural,
                           error=_describe(exc), retry_in=backoff)  # fmt: skip
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _request(self, **kwargs) -> dict:
        response = self.list_fn(_preload_content=False, _request_timeout=(5, 30), **kwargs)
        return json.loads(response.data)

    def _stream(self, version: str) -> str | None:
        """Follow one watch; the resourceVersion to resume from, None to relist."""
        response = self.list_fn(
            watch=True, resource_version=version, timeout_seconds=self.timeout_s,
            allow_watch_bookmarks=True, _preload_content=False,
            _request_timeout=(5, self.timeout_s + 30),
        )  # fmt: skip
        self._response = response
        try:
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return version
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") != "BOOKMARK":
                    self._emit(event["type"], obj)
        finally:
            self._response = None
            response.release_conn()
        return version

