"""Envoy's side of LoRA adapter versions: the request body's `model` rewritten per version.

Clients send the public name (`"model": "support-bot"`); the base model's vLLM serves each
adapter under its lora name. So, for a model with adapter versions (docs/lora.md):

- the listener has the `transform` filter before the router, with nothing to do by default;
- the version the weighted split chose (and a pinned one) carries a per-route `transform`
  config that merges `{"model": "<its lora name>"}` into the JSON body (Envoy re-encodes the
  body: compact, keys sorted), and a per-route `header_mutation` that says the body is JSON
  (the transform filter skips bodies of other content types; `json_to_metadata` read the
  body as JSON whatever its content type, so it is);
- every cluster of the model runs, as upstream filters (per attempt, once Envoy chose the
  host), `header_mutation`, which reads the chosen host's version from its EDS metadata,
  and a Lua filter that turns another version's `"model":"<served name>"` into that
  version's. The transform runs once per request, before the router picks a host, so
  without this a request that fails over to stable's hosts, is retried there, or is
  mirrored to another version would still name the first version's adapter. After the
  transform the body holds exactly that token (a token inside a JSON string would have its
  quotes escaped), so a plain search finds it. (Neither the transform nor Lua can see the
  chosen host by itself: the first is not an upstream filter, the second has no accessor.)

A version that is not an adapter, in a model that has some, is served under the model's
own name: the same rewrite keeps every body in one form.
"""

from __future__ import annotations

import functools

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2, substitution_format_string_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.transform.v3 import transform_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, struct_pb2

from controlplane.adapters import lora_name
from controlplane.state import Model

TRANSFORM = "envoy.filters.http.transform"
HEADER_MUTATION = "envoy.filters.http.header_mutation"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# The version of the host Envoy chose for this attempt, from its EDS metadata (resources.py
# `_version_metadata`), for the Lua filter only: removed before the request leaves.
HOST_VERSION_HEADER = "x-switchyard-host-version"
HOST_VERSION = "%UPSTREAM_METADATA(switchyard:version)%"


def served_names(model: Model) -> dict[str, str] | None:
    """Each version's name on its servers (an adapter's lora name, else the model's own),
    or None for a model without adapter versions (nothing to rewrite)."""
    if all(v.backend.adapter is None for v in model.versions.values()):
        return None
    return {
        name: lora_name(model.name, name, v.backend.adapter) if v.backend.adapter else model.name
        for name, v in model.versions.items()
    }


def listener_filter() -> hcm_pb2.HttpFilter:
    """The transform filter, idle unless a route's own config asks (placed before the
    router)."""
    return hcm_pb2.HttpFilter(name=TRANSFORM, typed_config=_pack(transform_pb2.TransformConfig()))


def rewrite_on(per_filter_config, served: str) -> None:
    """A route's or a weighted cluster's `typed_per_filter_config`: the body's `model` becomes
    `served`, and the body is declared JSON so that the transform reads it."""
    per_filter_config[TRANSFORM].CopyFrom(_rewrite(served))
    per_filter_config[HEADER_MUTATION].CopyFrom(_json_body())


@functools.cache
def _rewrite(served: str) -> any_pb2.Any:
    body = struct_pb2.Struct()
    body.update({"model": served})
    config = transform_pb2.TransformConfig(
        request_transformation=transform_pb2.Transformation(
            body_transformation=transform_pb2.BodyTransformation(
                body_format=substitution_format_string_pb2.SubstitutionFormatString(
                    json_format=body
                ),
                action=transform_pb2.BodyTransformation.MERGE,
            )
        )
    )  # never clear_route_cache: the weighted choice must not be drawn again
    return _pack(config)


@functools.cache
def _json_body() -> any_pb2.Any:
    content_type = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="content-type", value="application/json"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    mutations = header_mutation_pb2.Mutations(
        request_mutations=[mutation_rules_pb2.HeaderMutation(append=content_type)]
    )
    return _pack(header_mutation_pb2.HeaderMutationPerRoute(mutations=mutations))


def upstream_rewrite(cluster, served: dict[str, str]) -> None:
    """Every cluster of a model with adapter versions (its split clusters and its hosts
    clusters): just before a request goes to the host Envoy chose, a body that names another
    version's served name is made to name the chosen host's version's (the host's version
    is in its EDS metadata, which `header_mutation` reads there, as an upstream filter, into
    a header the Lua filter reads and removes). Upstream filters end with the codec; the
    protocol stays HTTP/1.1."""
    version = header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(
            request_mutations=[
                mutation_rules_pb2.HeaderMutation(
                    append=base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(
                            key=HOST_VERSION_HEADER, value=HOST_VERSION
                        ),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                )
            ]
        )
    )
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name=HEADER_MUTATION, typed_config=_pack(version)),
            hcm_pb2.HttpFilter(name="envoy.filters.http.lua", typed_config=_lua_config(served)),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.upstream_codec",
                typed_config=_pack(upstream_codec_pb2.UpstreamCodec()),
            ),
        ],
    )
    cluster.typed_extension_protocol_options[PROTOCOL_OPTIONS].CopyFrom(_pack(options))


def _lua_config(served: dict[str, str]) -> any_pb2.Any:
    source = base_pb2.DataSource(inline_string=_lua(tuple(served.items())))
    return _pack(lua_pb2.Lua(default_source_code=source))


@functools.cache
def _lua(served: tuple[tuple[str, str], ...]) -> str:
    table = ", ".join(f"[{_lua_string(version)}] = {_lua_string(_token(name))}"
                      for version, name in served)  # fmt: skip
    return (
        f"local served = {{{table}}}\n"
        "function envoy_on_request(handle)\n"
        "  local headers = handle:headers()\n"
        f"  local version = headers:get({_lua_string(HOST_VERSION_HEADER)})\n"
        f"  headers:remove({_lua_string(HOST_VERSION_HEADER)})\n"
        "  local own = version and served[version]\n"
        "  if own == nil then return end\n"
        "  local body = handle:body()\n"
        "  if body == nil then return end\n"
        "  local text = body:getBytes(0, body:length())\n"
        "  if string.find(text, own, 1, true) then return end\n"
        "  for _, token in pairs(served) do\n"
        "    local first, last = string.find(text, token, 1, true)\n"
        "    if first then\n"
        "      body:setBytes(string.sub(text, 1, first - 1) .. own .. string.sub(text, last + 1))\n"
        "      return\n"
        "    end\n"
        "  end\n"
        "end\n"
    )


def _token(served: str) -> str:
    """How the rewritten body names `served` (Envoy's compact JSON; lora names need no
    escaping: adapters.LORA_NAME)."""
    return f'"model":"{served}"'


def _lua_string(text: str) -> str:
    """A Lua string literal: every byte outside a safe set as a decimal escape."""
    safe = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/+-@ ")
    return '"' + "".join(chr(b) if b in safe else f"\\{b:03d}" for b in text.encode()) + '"'


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
