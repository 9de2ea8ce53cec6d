"""Node configuration: TOML in, one tree of frozen dataclasses out, precise errors.

The loader is driven by the dataclass field types, so a key exists exactly when a field
does: unknown keys, wrong types and bad values are refused with the key path that holds
them (``listener[0].bind``). Cross-references (a listener naming a pool that does not
exist, duplicate names) are checked after the tree is built.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshproxy.errors import ConfigError


@dataclass(frozen=True, order=True)
class Address:
    """A ``host:port`` endpoint; IPv6 literals are written ``[::1]:3306``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {text!r}")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"unbalanced brackets in {text!r}")
            host = str(ipaddress.IPv6Address(host[1:-1]))  # one spelling per address
        elif ":" in host:
            raise ValueError(f"IPv6 addresses must be bracketed, got {text!r}")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"port must be 1-65535, got {port_text!r}")
        if any(c.isspace() for c in host):
            raise ValueError(f"host contains white space: {host!r}")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class UpstreamKind(enum.StrEnum):
    POOL = "pool"
    TIER = "tier"


@dataclass(frozen=True)
class UpstreamRef:
    """Where a listener or service sends its connections: ``pool:<name>`` or ``tier:<name>``."""

    kind: UpstreamKind
    name: str

    @classmethod
    def parse(cls, text: str) -> UpstreamRef:
        kind, sep, name = text.partition(":")
        if not sep or not name or kind not in UpstreamKind.__members__.values():
            raise ValueError(f"expected 'pool:<name>' or 'tier:<name>', got {text!r}")
        return cls(UpstreamKind(kind), name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


class AdminState(enum.StrEnum):
    """What an operator allows for a server; health decides the rest."""

    ONLINE = "ONLINE"
    OFFLINE_SOFT = "OFFLINE_SOFT"
    OFFLINE_HARD = "OFFLINE_HARD"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    role: Literal["edge", "middle"]
    mesh_bind: Address | None = None
    max_hops: int = 4
    mesh_max_connections: int = 20000
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int | Literal["auto"] = 1
    drain_timeout_s: float = 30.0

    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers


@dataclass(frozen=True)
class AngelConfig:
    watchdog_s: float = 3.0
    fast_crash_s: float = 10.0
    max_fast_crashes: int = 5


@dataclass(frozen=True)
class TimeoutsConfig:
    connect_ms: int = 1000
    connect_budget_ms: int = 3000
    idle_s: int = 28800
    hop_header_s: int = 60


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    upstream: UpstreamRef
    service: str = "mysql"
    protocol: Literal["mysql", "tcp"] = "mysql"
    max_connections: int = 10000
    backlog: int = 1024


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    upstream: UpstreamRef
    protocol: Literal["mysql", "tcp"] = "mysql"


@dataclass(frozen=True)
class CheckConfig:
    type: Literal["none", "tcp", "mysql"] = "none"
    user: str = ""
    password: str = ""
    interval_ms: int = 1000
    timeout_ms: int = 500
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True)
class EjectConfig:
    consecutive_failures: int = 3
    backoff_s: float = 10.0


@dataclass(frozen=True)
class ServerConfig:
    address: Address
    weight: int = 1
    state: AdminState = AdminState.ONLINE


@dataclass(frozen=True)
class PoolConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    close_sessions_on_down: bool = False
    source_ip: str = ""
    check: CheckConfig = field(default_factory=CheckConfig)
    eject: EjectConfig = field(default_factory=EjectConfig)


@dataclass(frozen=True)
class TierConfig:
    name: str
    members: tuple[ServerConfig, ...]
    warm_connections: int = 2
    warm_max_idle_s: int = 30
    source_ip: str = ""
    check: CheckConfig = field(default_factory=CheckConfig)
    eject: EjectConfig = field(default_factory=EjectConfig)


@dataclass(frozen=True)
class AdminConfig:
    bind: Address = Address("127.0.0.1", 6032)
    token: str = ""


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    admin: AdminConfig | None = None
    angel: AngelConfig = field(default_factory=AngelConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    listener: tuple[ListenerConfig, ...] = ()
    service: tuple[ServiceConfig, ...] = ()
    pool: tuple[PoolConfig, ...] = ()
    tier: tuple[TierConfig, ...] = ()
    source: str = field(default="<memory>", compare=False)

    def pools(self) -> dict[str, PoolConfig]:
        return {p.name: p for p in self.pool}

    def tiers(self) -> dict[str, TierConfig]:
        return {t.name: t for t in self.tier}


# Lower bounds for numeric keys, by field name; a value below is refused with the bound.
_MINIMUM: dict[str, int] = {
    "max_hops": 1,
    "workers": 1,
    "drain_timeout_s": 0,
    "watchdog_s": 1,
    "fast_crash_s": 0,
    "max_fast_crashes": 1,
    "connect_ms": 1,
    "connect_budget_ms": 1,
    "idle_s": 1,
    "hop_header_s": 1,
    "max_connections": 1,
    "mesh_max_connections": 1,
    "backlog": 1,
    "interval_ms": 10,
    "timeout_ms": 1,
    "rise": 1,
    "fall": 1,
    "consecutive_failures": 1,
    "backoff_s": 0,
    "weight": 1,
    "warm_connections": 0,
    "warm_max_idle_s": 1,
}

# Key paths whose value may be a bare string standing for the table's first field.
_SHORTHAND = {ServerConfig: "address"}


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def build(self, cls: type[Any], data: object, path: str) -> Any:
        if isinstance(data, str) and cls in _SHORTHAND:
            data = {_SHORTHAND[cls]: data}
        if not isinstance(data, Mapping):
            raise self.fail(path, f"expected a table, got {_type_name(data)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = _join(path, unknown[0])
            raise self.fail(where, f"unknown key (known keys: {', '.join(sorted(fields))})")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            key = _join(path, name)
            if name in data:
                values[name] = self.value(hints[name], data[name], key)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.fail(key, "required key is missing")
        return cls(**values)

    def value(self, tp: Any, raw: object, key: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            reasons = []
            for option in options:
                try:
                    return self.value(option, raw, key)
                except ConfigError as exc:
                    reasons.append(exc.reason)
            raise self.fail(key, " or ".join(reasons))
        if origin is Literal:
            allowed = typing.get_args(tp)
            if raw not in allowed:
                choices = ", ".join(repr(a) for a in allowed)
                raise self.fail(key, f"must be one of {choices}, got {raw!r}")
            return raw
        if origin is tuple:
            item_type = typing.get_args(tp)[0]
            if not isinstance(raw, list):
                raise self.fail(key, f"expected an array, got {_type_name(raw)}")
            return tuple(self.value(item_type, item, f"{key}[{i}]") for i, item in enumerate(raw))
        if dataclasses.is_dataclass(tp) and tp not in (Address, UpstreamRef):
            return self.build(typing.cast(type[Any], tp), raw, key)
        if tp in (Address, UpstreamRef):
            if not isinstance(raw, str):
                raise self.fail(key, f"expected a string, got {_type_name(raw)}")
            try:
                return tp.parse(raw)
            except ValueError as exc:
                raise self.fail(key, str(exc)) from None
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            allowed_values = [m.value for m in tp]
            if raw not in allowed_values:
                raise self.fail(key, f"must be one of {', '.join(allowed_values)}, got {raw!r}")
            return tp(raw)
        if tp is bool:
            if not isinstance(raw, bool):
                raise self.fail(key, f"expected true or false, got {_type_name(raw)}")
            return raw
        if tp in (int, float):
            ok = isinstance(raw, int) or (tp is float and isinstance(raw, float))
            if not ok or isinstance(raw, bool):
                raise self.fail(key, f"expected {_type_name(tp())}, got {_type_name(raw)}")
            if isinstance(raw, float) and not math.isfinite(raw):
                raise self.fail(key, f"must be a finite number, got {raw}")
            leaf = key.rsplit(".", 1)[-1]
            minimum = _MINIMUM.get(leaf)
            if minimum is not None and typing.cast(float, raw) < minimum:
                raise self.fail(key, f"must be at least {minimum}, got {raw}")
            return tp(raw)
        if tp is str:
            if not isinstance(raw, str):
                raise self.fail(key, f"expected a string, got {_type_name(raw)}")
            return raw
        raise AssertionError(f"config field type {tp!r} is not supported")  # pragma: no cover


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {
        str: "a string",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def parse(data: Mapping[str, object], source: str = "<memory>") -> Config:
    """Build and cross-check a Config from already-decoded TOML data."""
    loader = _Loader(source)
    config: Config = loader.build(Config, data, "")
    config = dataclasses.replace(config, source=source)
    _check_references(config, loader)
    return config


def load(path: str | Path) -> Config:
    """Read a TOML file into a Config; every problem is a ConfigError naming the key."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "file is not valid UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None
    return parse(data, source)


def _check_references(config: Config, loader: _Loader) -> None:
    node = config.node
    for section in ("listener", "service", "pool", "tier"):
        seen: set[str] = set()
        for i, item in enumerate(getattr(config, section)):
            if item.name in seen:
                raise loader.fail(f"{section}[{i}].name", f"duplicate name {item.name!r}")
            seen.add(item.name)
    for i, pool in enumerate(config.pool):
        _check_group(loader, f"pool[{i}]", pool.servers, "servers", pool.check, pool.source_ip)
    for i, tier in enumerate(config.tier):
        _check_group(loader, f"tier[{i}]", tier.members, "members", tier.check, tier.source_ip)
        if tier.check.type == "mysql":
            raise loader.fail(
                f"tier[{i}].check.type", "tier members speak the mesh protocol: use 'tcp'"
            )
    binds: dict[Address, str] = {}
    if node.mesh_bind is not None:
        binds[node.mesh_bind] = "node.mesh_bind"
    if config.admin is not None:
        if len(config.admin.token) < 16:
            raise loader.fail("admin.token", "required, at least 16 characters")
        if config.admin.bind in binds:
            raise loader.fail(
                "admin.bind", f"{config.admin.bind} is already bound by node.mesh_bind"
            )
        binds[config.admin.bind] = "admin.bind"
    for i, listener in enumerate(config.listener):
        key = f"listener[{i}]"
        _check_upstream(config, loader, f"{key}.upstream", listener.upstream)
        if listener.bind in binds:
            raise loader.fail(
                f"{key}.bind", f"{listener.bind} is already bound by {binds[listener.bind]}"
            )
        binds[listener.bind] = f"{key}.bind"
    for i, service in enumerate(config.service):
        _check_upstream(config, loader, f"service[{i}].upstream", service.upstream)
    if config.timeouts.connect_budget_ms < config.timeouts.connect_ms:
        raise loader.fail(
            "timeouts.connect_budget_ms",
            f"must be at least timeouts.connect_ms ({config.timeouts.connect_ms})",
        )
    if node.role == "middle":
        if node.mesh_bind is None:
            raise loader.fail("node.mesh_bind", "a middle needs a mesh port to accept hops on")
        if not config.service:
            raise loader.fail("service", "a middle needs at least one [[service]]")
    elif not config.listener:
        raise loader.fail("listener", "an edge needs at least one [[listener]]")


def to_dict(value: Any) -> Any:
    """The TOML-shaped plain data a config was (or could have been) parsed from."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Address | UpstreamRef):
            return str(value)
        return {
            f.name: to_dict(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "source" and getattr(value, f.name) is not None
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [to_dict(item) for item in value]
    return value


def _check_group(
    loader: _Loader,
    key: str,
    servers: tuple[ServerConfig, ...],
    what: str,
    check: CheckConfig,
    source_ip: str,
) -> None:
    if source_ip:
        try:
            ipaddress.ip_address(source_ip)
        except ValueError:
            raise loader.fail(f"{key}.source_ip", f"not an IP address: {source_ip!r}") from None
    if not servers:
        raise loader.fail(f"{key}.{what}", "needs at least one server")
    seen: set[Address] = set()
    for j, server in enumerate(servers):
        if server.address in seen:
            raise loader.fail(f"{key}.{what}[{j}]", f"duplicate server {server.address}")
        seen.add(server.address)
    if check.type == "mysql" and not check.user:
        raise loader.fail(f"{key}.check.user", "a mysql check needs a monitor user")
    if check.timeout_ms >= check.interval_ms and check.type != "none":
        raise loader.fail(f"{key}.check.timeout_ms", "must be shorter than interval_ms")


def _check_upstream(config: Config, loader: _Loader, key: str, ref: UpstreamRef) -> None:
    names = config.pools() if ref.kind is UpstreamKind.POOL else config.tiers()
    if ref.name not in names:
        defined = ", ".join(sorted(names)) or "none"
        raise loader.fail(key, f"no {ref.kind} named {ref.name!r} (defined: {defined})")
