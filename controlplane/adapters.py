"""LoRA adapters as model versions: the names and the rules, pure (docs/lora.md).

A version whose backend is `{adapter: {base, path, lora_name?}}` is served by another model's
servers (its *base*): the controller loads the adapter on every ready replica of the base's
serving versions (reconciler/adapters.py) and Envoy rewrites the request body's `model` to
the adapter's `lora_name` (xds/lora.py), under which vLLM serves it.

The rules here are checked on `switchyard.yaml` (config.py) and on every addition at run time
(controller.py), so a file and an API call are refused for the same reasons, naming the
same field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

# vLLM takes any string; ours also travel in Envoy's configuration (a JSON body template and
# a Lua string), so they keep to characters that need no escaping anywhere.
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
LORA_NAME_RULE = "letters, digits, '.', '_', ':', '/', '+' or '-' (at most 128)"


class _Adapter(Protocol):
    base: str
    path: str
    lora_name: str | None


class _Backend(Protocol):
    @property
    def adapter(self) -> _Adapter | None: ...


def lora_name(model: str, version: str, adapter: _Adapter) -> str:
    """The name vLLM serves the adapter under: its own, else `<model>--<version>`."""
    return adapter.lora_name or f"{model}--{version}"


class Problem(ValueError):
    """What is wrong with an adapter version: the model and version, the key under its
    backend (`adapter.base`, `adapter.lora_name`, or `routing` of the model), and why."""

    def __init__(self, model: str, version: str | None, key: str, message: str) -> None:
        super().__init__(message)
        self.model, self.version, self.key, self.message = model, version, key, message

    def path(self) -> str:
        """As config.py names keys: `models[m].versions[v].backend.adapter.base`."""
        if self.version is None:
            return f"models[{self.model}].{self.key}"
        return f"models[{self.model}].versions[{self.version}].backend.{self.key}"


def check_adapters(
    models: Mapping[str, Iterable[tuple[str, Any]]], routing: Mapping[str, str]
) -> None:
    """Raise Problem for the first adapter version that cannot be: `models` maps each model
    to its (version name, backend) pairs, `routing` each model to its routing.

    An adapter's base must be another model that exists and has no adapter versions itself
    (its servers run the base weights); two adapters on one base need two lora names, and no
    lora name may be the base's own name (vLLM refuses it: the base is served under it); a
    model with adapter versions routes least_request (the endpoint picker does not know
    adapters yet)."""
    versions = {name: list(pairs) for name, pairs in models.items()}
    hosting: dict[str, set[str]] = {}  # models with adapter versions
    used: dict[tuple[str, str], str] = {}  # (base, lora name) -> model@version that has it
    for model, pairs in versions.items():
        for version, backend in pairs:
            adapter = backend.adapter
            if adapter is None:
                continue
            hosting.setdefault(model, set()).add(version)
            if adapter.lora_name is None and not LORA_NAME.match(lora_name(model, version,
                                                                         adapter)):  # fmt: skip
                raise Problem(model, version, "adapter.lora_name", (
                    f"the default lora name {lora_name(model, version, adapter)!r} uses "
                    f"characters a lora name may not ({LORA_NAME_RULE}): give lora_name"))
    for model in hosting:
        if routing.get(model, "least_request") == "prefix_aware":
            raise Problem(model, None, "routing", (
                "a model whose versions are LoRA adapters routes least_request: the "
                "endpoint picker does not know adapters yet"))
        for version, backend in versions[model]:
            adapter = backend.adapter
            if adapter is None:
                continue
            base = adapter.base
            if base == model:
                raise Problem(model, version, "adapter.base",
                              f"an adapter's base is another model, not {model!r} itself")
            if base not in versions:
                known = ", ".join(sorted(set(versions) - set(hosting))) or "none"
                raise Problem(model, version, "adapter.base",
                              f"no model {base!r} to host the adapter (models: {known})")
            if base in hosting:
                raise Problem(model, version, "adapter.base", (
                    f"{base!r} has LoRA adapter versions itself "
                    f"({', '.join(sorted(hosting[base]))}): a base serves its own weights"))
            name = lora_name(model, version, adapter)
            if name == base:
                raise Problem(model, version, "adapter.lora_name",
                              f"{name!r} is the base model's own name on its servers")
            other = used.setdefault((base, name), f"{model}@{version}")
            if other != f"{model}@{version}":
                raise Problem(model, version, "adapter.lora_name", (
                    f"{other} is loaded on {base!r} as {name!r} already: give another "
                    "lora_name"))


def bases(models: Mapping[str, Iterable[tuple[str, Any]]]) -> dict[str, set[str]]:
    """Each base model and the models whose adapter versions it hosts."""
    hosted: dict[str, set[str]] = {}
    for model, pairs in models.items():
        for _, backend in pairs:
            if backend.adapter is not None:
                hosted.setdefault(backend.adapter.base, set()).add(model)
    return hosted
