"""MQTT topic names, built from configurable templates.

Topics are resolved once at start-up from a small set of templates so that
every other module talks in message *kinds* ("telemetry", "anomaly", ...)
and never formats topic strings itself.  The "origin" preset keeps the
default tree but sends the twin's reported state where the origin platform
expects its named shadow update.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "devices/{device_id}"

# kind -> template; "{prefix}" is the resolved prefix, "{device_id}" the device id.
DEFAULT_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "status": "{prefix}/status",
    "twin": "{prefix}/twin/reported",
    "telemetry": "{prefix}/telemetry",
    "anomaly": "{prefix}/anomalies",
    "forecast": "{prefix}/forecasts",
    "model": "{prefix}/model-events",
    "command_response": "{prefix}/commands/response",
    "commands": "{prefix}/commands",
    "models": "{prefix}/models",
    "group_models": "fleet/{group}/models",
})

PRESETS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "default": MappingProxyType({}),
    "origin": MappingProxyType({
        "twin": "$iot/device/{device_id}/shadow/name/device-state/update",
    }),
})

# Kinds whose latest value is state, not an event: the broker keeps the last one.
RETAINED_KINDS = frozenset({"twin", "status"})
FLEET_GROUP = "all"
_FORBIDDEN = ("+", "#", "/", "\x00")


class TopicError(ValueError):
    """A template or an identifier cannot make a valid MQTT topic."""


@dataclass(frozen=True)
class TopicParams:
    prefix: str = DEFAULT_PREFIX
    preset: str = "default"
    # Per-kind template overrides, e.g. (("telemetry", "{prefix}/metrics"),).
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _check_segment(name: str, value: str) -> None:
    if not value or any(ch in value for ch in _FORBIDDEN):
        raise TopicError(f"{name} {value!r} must be non-empty and contain none of + # / NUL")


@dataclass(frozen=True)
class Topics:
    """Resolved topic names for one device."""

    device_id: str
    by_kind: Mapping[str, str]
    inbound_models: tuple[str, ...]

    @property
    def status(self) -> str:
        return self.by_kind["status"]

    @property
    def commands(self) -> str:
        return self.by_kind["commands"]

    @property
    def command_response(self) -> str:
        return self.by_kind["command_response"]

    def for_kind(self, kind: str) -> str:
        """Outbound topic for a message kind; unknown kinds get `{prefix}/events/{kind}`
        so a new component can emit without a change here."""
        topic = self.by_kind.get(kind)
        if topic is not None:
            return topic
        _check_segment("kind", kind)
        return f"{self.by_kind['_prefix']}/events/{kind}"

    @staticmethod
    def retained(kind: str) -> bool:
        return kind in RETAINED_KINDS


def resolve(device_id: str, groups: tuple[str, ...] | list[str] = (),
            params: TopicParams = TopicParams()) -> Topics:
    """Resolve every template for `device_id`; raises TopicError early (at start-up)
    rather than publishing to a topic nobody listens to."""
    _check_segment("device_id", device_id)
    if params.preset not in PRESETS:
        raise TopicError(f"unknown topic preset {params.preset!r}; known: {sorted(PRESETS)}")
    templates = dict(DEFAULT_TEMPLATES)
    templates.update(PRESETS[params.preset])
    templates.update(dict(params.overrides))
    try:
        prefix = params.prefix.format(device_id=device_id).rstrip("/")
        by_kind = {kind: tpl.format(prefix=prefix, device_id=device_id, group="{group}")
                   for kind, tpl in templates.items()}
    except (KeyError, IndexError) as exc:
        raise TopicError(f"bad topic template placeholder: {exc}") from exc
    for kind, topic in by_kind.items():
        if not topic or "+" in topic or "#" in topic:
            raise TopicError(f"topic for {kind!r} is empty or has a wildcard: {topic!r}")
    group_tpl = by_kind.pop("group_models")
    inbound = [by_kind["models"]]
    for group in list(groups) + [FLEET_GROUP]:
        _check_segment("group", group)
        topic = group_tpl.replace("{group}", group)
        if topic not in inbound:
            inbound.append(topic)
    by_kind["_prefix"] = prefix
    return Topics(device_id=device_id, by_kind=MappingProxyType(by_kind),
                  inbound_models=tuple(inbound))
