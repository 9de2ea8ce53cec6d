"""Node configuration: TOML in, one tree of frozen dataclasses out, precise errors.

The loader is driven by the dataclass field types, so a key exists exactly when a field
does: unknown keys, wrong types and bad values are refused with the key path that holds
them (``listener[0].bind``). Cross-references (a listener naming a pool that does not
exist, duplicate names) are checked after the tree is built.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meshproxy.errors import ConfigError, MeshproxyError, describe

if TYPE_CHECKING:
    from meshproxy.gossip.settings import GossipSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    # The tier a middle serves in, as edges name it in [[tier]]: gossip tells them its members.
    tier: str = ""
    # The mesh address other nodes should dial, when node.mesh_bind is a wildcard address.
    mesh_advertise: Address | None = None
    # A CIDR: advertise this host's address in it wherever a bind address is a wildcard and
    # no advertise address is given (containers whose address is known only when they run).
    advertise_network: str = ""

    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers


@dataclass(frozen=True)
class AngelConfig:
    watchdog_s: float = 5.0
    fast_crash_s: float = 10.0
    max_fast_crashes: int = 5
    standby_workers: bool = True


# The kernel fast path for linked passthrough sessions (meshproxy/dataplane/sockmap.py).
Accel = Literal["none", "sockmap"]


@dataclass(frozen=True)
class DataplaneConfig:
    accel: Accel = "none"


@dataclass(frozen=True)
class TimeoutsConfig:
    connect_ms: int = 1000
    connect_budget_ms: int = 3000
    idle_s: int = 28800
    hop_header_s: int = 60


# How an entrance serves MySQL clients: pump their bytes to an upstream, or be their MySQL
# server and run their statements on pooled backend connections.
Mode = Literal["passthrough", "session"]


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    upstream: UpstreamRef
    service: str = "mysql"
    protocol: Literal["mysql", "tcp"] = "mysql"
    mode: Mode = "passthrough"
    max_connections: int = 10000
    backlog: int = 1024
    # Session mode: TLS offered to clients (certificate chain and key, PEM).
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    upstream: UpstreamRef
    protocol: Literal["mysql", "tcp"] = "mysql"
    mode: Mode = "passthrough"


@dataclass(frozen=True)
class UserConfig:
    """A login of session mode: who may connect, and how its statements reach the servers."""

    name: str
    # The clear password, or MySQL's stored hash ("*" + 40 hex digits, as in mysql.user).
    password: str = ""
    password_env: str = ""  # the password in an environment variable instead
    pool: str = ""  # default: the pool of the listener or service the client came in by
    default_schema: str = ""
    max_connections: int = 10000
    require_tls: bool = False
    # The auth plugin the user must log in with; "" accepts either, as the client chooses.
    auth_plugin: Literal["", "mysql_native_password", "caching_sha2_password"] = ""
    # Whom meshproxy logs in as on the servers; default: the same name and password.
    backend_user: str = ""
    backend_password: str = ""
    backend_password_env: str = ""

    def secret(self) -> str:
        return os.environ.get(self.password_env, "") if self.password_env else self.password

    def backend_secret(self) -> str:
        if self.backend_password_env:
            return os.environ.get(self.backend_password_env, "")
        return self.backend_password


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
class ConnectionsConfig:
    """Session mode's authenticated backend connections to each server of a pool."""

    idle: int = 4  # kept open and logged in, per server and backend login
    max_per_server: int = 64  # per process: clients beyond it wait for a connection
    checkout_timeout_ms: int = 3000  # then the client gets an ERR instead of waiting on
    max_age_s: int = 3600
    max_idle_s: int = 600
    ping_after_idle_ms: int = 1000  # a connection idle longer is pinged before reuse
    max_packet_mib: int = 64  # the largest client packet held for a statement
    # TLS to the servers: "off"; "on" (encrypted, the server's certificate not checked);
    # "verify" (against tls_ca, or the system's CAs, and the server's host name).
    tls: Literal["off", "on", "verify"] = "off"
    tls_ca: str = ""


@dataclass(frozen=True)
class ReplicationConfig:
    """A pool of one primary and its replicas, split by statement in session mode."""

    enabled: bool = False  # writer and readers by each server's read_only, as checks see it
    max_lag_s: float = 10.0  # a reader further behind (or not replicating) is SHUNNED
    # After a session writes, its reads wait for a reader to have applied that write
    # ("gtid"), go to the writer for writer_window_ms ("writer"), or go anywhere ("off").
    read_your_writes: Literal["gtid", "writer", "off"] = "gtid"
    gtid_wait_ms: int = 250  # how long a read waits on a reader before it takes the writer
    writer_window_ms: int = 2000
    # Reads on the writer: only when no reader is ONLINE, as well as on readers, or never.
    writer_reads: Literal["fallback", "always", "never"] = "fallback"


@dataclass(frozen=True)
class PoolConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    close_sessions_on_down: bool = False
    source_ip: str = ""
    check: CheckConfig = field(default_factory=CheckConfig)
    eject: EjectConfig = field(default_factory=EjectConfig)
    connections: ConnectionsConfig = field(default_factory=ConnectionsConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    # Session mode: the servers hold the same data (one cluster), so a session whose
    # server fails carries on on another, as an edge's sessions do across middles.
    interchangeable: bool = False


@dataclass(frozen=True)
class QueryRuleConfig:
    """One rule of session mode's ordered query rules: what it matches, then what it does.

    Every match key given must hold (regexes are searched, Python syntax); the first rule
    that matches applies its actions and ends the search unless ``then = "continue"``,
    which lets later rules add to (or override) its actions.
    """

    name: str = ""  # default "rule <index>"; names its counters and digest of matches
    active: bool = True
    match_digest: str = ""  # searched in the statement's digest text (literals as ?)
    match_pattern: str = ""  # searched in the statement's text
    negate: bool = False  # match the statements the two regexes do not
    user: str = ""
    schema: str = ""
    client: str = ""  # the client's address or network (CIDR)
    listener: str = ""  # the listener or service the client came in by
    pool: str = ""  # send the statement to this pool instead of the user's
    route: Literal["", "writer", "reader"] = ""  # force a side of a replication pool
    rewrite: str = ""  # replaces match_pattern's matches (re.sub syntax: \\1 for groups)
    cache_ttl_ms: int = 0  # answer repeats of the statement from the query cache this long
    mirror: str = ""  # also run it on this pool, answer dropped (shadow traffic)
    error: str = ""  # refuse the statement with this message (a firewall rule)
    statement_timeout_ms: int = 0  # kill the statement on its server after this long
    multiplex: bool = True  # false: the session keeps the backend connection it ran on
    then: Literal["stop", "continue"] = "stop"


@dataclass(frozen=True)
class QueryCacheConfig:
    max_mib: int = 64  # the cached answers' bytes, evicting least recently used beyond
    max_entry_kib: int = 1024  # an answer larger is passed on and not cached


@dataclass(frozen=True)
class DigestsConfig:
    # Unset: counted where statements run on servers. An edge whose session-mode entrances
    # all lead to tiers leaves them to its middles, which count every statement it sends.
    enabled: bool | None = None
    max_tracked: int = 1000  # digests kept apart; beyond, the least costly fold into "other"
    top_n: int = 50  # shown by the admin API's default and Prometheus


@dataclass(frozen=True)
class TierConfig:
    name: str
    # Required without [gossip]; with it, the tier's members come from gossip and these
    # entries only bootstrap routing and set weights and admin states (see the README).
    members: tuple[ServerConfig, ...] = ()
    warm_connections: int = 2
    warm_max_idle_s: int = 30
    close_sessions_on_down: bool = False
    source_ip: str = ""
    check: CheckConfig = field(default_factory=CheckConfig)
    eject: EjectConfig = field(default_factory=EjectConfig)
    # An edge in session mode: its logged-in connections to each middle (tls, tls_ca: unused,
    # mesh TLS protects the hop).
    connections: ConnectionsConfig = field(default_factory=ConnectionsConfig)


@dataclass(frozen=True)
class AdminConfig:
    bind: Address = Address("127.0.0.1", 6032)
    token: str = ""
    token_file: str = ""  # the token in a file (a mounted secret), instead of ``token``
    token_env: str = ""  # the name of an environment variable holding the token
    tls_cert: str = ""  # serve HTTPS with this certificate chain and key
    tls_key: str = ""

    def bearer_token(self) -> str:
        """The token, from wherever the config says it is (checked readable at load)."""
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        if self.token_env:
            return os.environ.get(self.token_env, "").strip()
        return self.token


@dataclass(frozen=True)
class MeshTlsConfig:
    """Mutual TLS on every mesh hop: this node's certificate and key, and the mesh CA."""

    ca: str
    cert: str
    key: str
    expiry_warning_days: int = 14
    # The node name the certificate carries, when it is not this node's own: pods of one
    # Kubernetes workload or swarm service share their workload's certificate.
    name: str = ""


@dataclass(frozen=True)
class GossipConfig:
    """SWIM membership over UDP (and TCP push-pull on the same port number)."""

    bind: Address
    advertise: Address | None = None  # default: bind
    seeds: tuple[Address, ...] = ()
    keys: tuple[str, ...] = ()  # base64 AES keys of 16, 24 or 32 bytes; the first encrypts
    keys_file: str = ""  # the same, one per line, in a file (a mounted secret)
    allow_plaintext: bool = False
    discovery: Literal["static", "mdns", "dns"] = "static"
    # discovery = "dns": names whose A and AAAA records are seeds, on this node's gossip
    # port, resolved again every dns_interval_s (a headless Service, swarm's tasks.NAME).
    dns_names: tuple[str, ...] = ()
    dns_interval_s: float = 10.0
    dns_timeout_ms: int = 2000
    dns_servers: tuple[Address, ...] = ()  # default: the system's resolvers
    probe_interval_ms: int = 200
    probe_timeout_ms: int = 80
    indirect_checks: int = 3
    suspicion_mult: float = 3.0
    suspicion_max_mult: float = 6.0
    gossip_interval_ms: int = 100
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    push_pull_interval_s: float = 15.0
    rejoin_interval_s: float = 10.0
    dead_gossip_s: float = 15.0
    reap_after_s: float = 300.0
    leave_timeout_s: float = 2.0
    meta_refresh_s: float = 2.0

    def advertised(self) -> Address:
        return self.advertise or self.bind

    def file_keys(self) -> tuple[str, ...]:
        """The base64 keys of ``keys_file``, one per line (none without one)."""
        return tuple(Path(self.keys_file).read_text().split()) if self.keys_file else ()

    def key_texts(self) -> tuple[str, ...]:
        """The base64 keys: ``keys``, then those of ``keys_file``."""
        return self.keys + self.file_keys()

    def key_bytes(self) -> tuple[bytes, ...]:
        """The keys, decoded (the config check has made sure they decode)."""
        return tuple(base64.b64decode(key, validate=True) for key in self.key_texts())

    def settings(self) -> GossipSettings:
        """The membership protocol's tuning; raises GossipError for inconsistent values."""
        from meshproxy.gossip.settings import GossipSettings  # keeps workers' imports light

        return GossipSettings(
            probe_interval_s=self.probe_interval_ms / 1000,
            probe_timeout_s=self.probe_timeout_ms / 1000,
            indirect_checks=self.indirect_checks,
            suspicion_mult=self.suspicion_mult,
            suspicion_max_mult=self.suspicion_max_mult,
            gossip_interval_s=self.gossip_interval_ms / 1000,
            gossip_fanout=self.gossip_fanout,
            retransmit_mult=self.retransmit_mult,
            push_pull_interval_s=self.push_pull_interval_s,
            rejoin_interval_s=self.rejoin_interval_s,
            gossip_to_dead_s=self.dead_gossip_s,
            reap_after_s=self.reap_after_s,
            leave_timeout_s=self.leave_timeout_s,
        )


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    admin: AdminConfig | None = None
    angel: AngelConfig = field(default_factory=AngelConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    listener: tuple[ListenerConfig, ...] = ()
    service: tuple[ServiceConfig, ...] = ()
    pool: tuple[PoolConfig, ...] = ()
    tier: tuple[TierConfig, ...] = ()
    user: tuple[UserConfig, ...] = ()
    query_rule: tuple[QueryRuleConfig, ...] = ()
    query_cache: QueryCacheConfig = field(default_factory=QueryCacheConfig)
    digests: DigestsConfig = field(default_factory=DigestsConfig)
    gossip: GossipConfig | None = None
    mesh_tls: MeshTlsConfig | None = None
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
    "probe_interval_ms": 10,
    "dns_interval_s": 1,
    "dns_timeout_ms": 10,
    "probe_timeout_ms": 1,
    "indirect_checks": 0,
    "suspicion_mult": 1,
    "suspicion_max_mult": 1,
    "gossip_interval_ms": 10,
    "gossip_fanout": 1,
    "retransmit_mult": 1,
    "push_pull_interval_s": 1,
    "rejoin_interval_s": 1,
    "dead_gossip_s": 0,
    "reap_after_s": 1,
    "leave_timeout_s": 0,
    "meta_refresh_s": 0,
    "expiry_warning_days": 0,
    "idle": 0,
    "max_per_server": 1,
    "checkout_timeout_ms": 1,
    "max_age_s": 1,
    "max_idle_s": 1,
    "ping_after_idle_ms": 0,
    "max_packet_mib": 1,
    "max_lag_s": 0,
    "gtid_wait_ms": 0,
    "writer_window_ms": 0,
    "cache_ttl_ms": 0,
    "max_mib": 0,
    "max_entry_kib": 1,
    "max_tracked": 1,
    "top_n": 1,
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
            if len(options) == 1:  # an optional section: its own errors name their keys
                return self.value(options[0], raw, key)
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


def parse(data: Mapping[str, object], source: str = "<memory>", files: bool = True) -> Config:
    """Build and cross-check a Config from already-decoded TOML data. Relative paths are
    taken from the config file's folder; with ``files`` every file it names is read and
    checked too (certificates load, keys decode), so a node never starts on a bad one."""
    loader = _Loader(source)
    config: Config = loader.build(Config, data, "")
    config = _absolute_paths(dataclasses.replace(config, source=source))
    if config.node.advertise_network:
        network = _network(config.node.advertise_network, "node.advertise_network", loader)
        if files:  # on the node itself: its interfaces say what to advertise
            config = _advertise_in(network, config, loader)
    _check_references(config, loader)
    if files:
        _check_files(config, loader)
    return config


def _absolute_paths(config: Config) -> Config:
    base = Path(config.source).parent if config.source != "<memory>" else Path.cwd()

    def fix(value: str) -> str:
        return str(base / value) if value and not Path(value).is_absolute() else value

    replace = dataclasses.replace
    if config.admin is not None:
        a = config.admin
        admin = replace(
            a, token_file=fix(a.token_file), tls_cert=fix(a.tls_cert), tls_key=fix(a.tls_key)
        )
        config = replace(config, admin=admin)
    if config.gossip is not None:
        config = replace(
            config, gossip=replace(config.gossip, keys_file=fix(config.gossip.keys_file))
        )
    if config.mesh_tls is not None:
        t = config.mesh_tls
        config = replace(
            config, mesh_tls=replace(t, ca=fix(t.ca), cert=fix(t.cert), key=fix(t.key))
        )
    listeners = tuple(
        replace(item, tls_cert=fix(item.tls_cert), tls_key=fix(item.tls_key))
        for item in config.listener
    )
    pools = tuple(
        replace(p, connections=replace(p.connections, tls_ca=fix(p.connections.tls_ca)))
        for p in config.pool
    )
    return replace(config, listener=listeners, pool=pools)


def _network(text: str, key: str, loader: _Loader) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise loader.fail(key, f"not a network in CIDR notation: {exc}") from None


def _advertise_in(network: IPNetwork, config: Config, loader: _Loader) -> Config:
    """The config with this host's address in ``network`` advertised wherever a bind
    address is a wildcard and no advertise address is given."""
    import ifaddr  # only here: most nodes are told their addresses

    found = sorted(
        {
            ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
        }
    )
    host = next((ip for ip in found if ipaddress.ip_address(ip) in network), None)
    if host is None:
        raise loader.fail(
            "node.advertise_network",
            f"no interface of this host has an address in {network} (it has {', '.join(found)})",
        )
    node, gossip = config.node, config.gossip
    if (
        node.mesh_bind is not None
        and node.mesh_advertise is None
        and _wildcard(node.mesh_bind.host)
    ):
        node = dataclasses.replace(node, mesh_advertise=Address(host, node.mesh_bind.port))
    if gossip is not None and gossip.advertise is None and _wildcard(gossip.bind.host):
        gossip = dataclasses.replace(gossip, advertise=Address(host, gossip.bind.port))
    return dataclasses.replace(config, node=node, gossip=gossip)


def _check_files(config: Config, loader: _Loader) -> None:
    """Read every file the config names, as the node will: a problem names its key."""
    import ssl  # only here: a config without files never needs it

    def readable(key: str, path: str) -> str:
        try:
            return Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise loader.fail(key, f"cannot read {path}: {describe(exc)}") from None

    def tls_files(keys: tuple[str, str, str], cert: str, key: str, ca: str = "") -> None:
        cert_key, key_key, ca_key = keys
        for name, path in ((cert_key, cert), (key_key, key), (ca_key, ca)):
            if path:
                readable(name, path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            reason = f"does not load with {cert_key}: {describe(exc)}"
            raise loader.fail(key_key, reason) from None
        if ca:
            try:
                context.load_verify_locations(ca)
            except (ssl.SSLError, OSError) as exc:
                raise loader.fail(ca_key, f"not a PEM CA bundle: {describe(exc)}") from None

    admin = config.admin
    if admin is not None:
        if admin.token_file:
            readable("admin.token_file", admin.token_file)
        if (admin.token_file or admin.token_env) and len(admin.bearer_token()) < 16:
            key = "admin.token_file" if admin.token_file else "admin.token_env"
            raise loader.fail(key, "the token it holds must have at least 16 characters")
    gossip = config.gossip
    if gossip is not None and gossip.keys_file:
        readable("gossip.keys_file", gossip.keys_file)
        _check_keys(gossip.file_keys(), "gossip.keys_file", loader)
    if admin is not None and admin.tls_cert:
        tls_files(("admin.tls_cert", "admin.tls_key", ""), admin.tls_cert, admin.tls_key)
    if config.mesh_tls is not None:
        t = config.mesh_tls
        tls_files(("mesh_tls.cert", "mesh_tls.key", "mesh_tls.ca"), t.cert, t.key, t.ca)
    for i, listener in enumerate(config.listener):
        if listener.tls_cert:
            keys = (f"listener[{i}].tls_cert", f"listener[{i}].tls_key", "")
            tls_files(keys, listener.tls_cert, listener.tls_key)
    for i, pool in enumerate(config.pool):
        ca = pool.connections.tls_ca
        if ca:
            key = f"pool[{i}].connections.tls_ca"
            readable(key, ca)
            try:
                ssl.create_default_context(cafile=ca)
            except (ssl.SSLError, OSError) as exc:
                raise loader.fail(key, f"not a PEM CA bundle: {describe(exc)}") from None
    for i, user in enumerate(config.user):
        # A login whose password is missing must not become a login without one.
        for key, name in (
            ("password_env", user.password_env),
            ("backend_password_env", user.backend_password_env),
        ):
            if name and not os.environ.get(name):
                raise loader.fail(f"user[{i}].{key}", f"environment variable {name} is not set")


_DNS_NAME = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")
_ENV_REFERENCE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_environment(data: Any, source: str, key: str = "") -> Any:
    """Every ``${NAME}`` in the strings of decoded config data replaced by that environment
    variable (``$${NAME}`` stays a literal ``${NAME}``): what differs between the pods or
    tasks that share one config file, such as their name and address. An unset variable
    is a ConfigError naming the key."""
    if isinstance(data, str):

        def value(match: re.Match[str]) -> str:
            escaped, name = match.groups()
            if escaped:
                return "${" + name + "}"
            if name not in os.environ:
                raise ConfigError(source, key, f"environment variable {name} is not set")
            return os.environ[name]

        return _ENV_REFERENCE.sub(value, data) if "${" in data else data
    if isinstance(data, Mapping):
        return {k: expand_environment(v, source, _join(key, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_environment(v, source, f"{key}[{i}]") for i, v in enumerate(data)]
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    """Decode a TOML file; unreadable, non-UTF-8 or invalid TOML is a ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "file is not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None


def load(path: str | Path, files: bool = True) -> Config:
    """Read a TOML file into a Config; every problem is a ConfigError naming the key.
    ``files=False`` skips reading the files it names (for a config meant for elsewhere,
    such as a container's, whose secrets are mounted there)."""
    return parse(expand_environment(read_toml(path), str(path)), str(path), files)


def _check_references(config: Config, loader: _Loader) -> None:
    node = config.node
    for section in ("listener", "service", "pool", "tier", "user"):
        seen: set[str] = set()
        for i, item in enumerate(getattr(config, section)):
            if item.name in seen:
                raise loader.fail(f"{section}[{i}].name", f"duplicate name {item.name!r}")
            seen.add(item.name)
    for i, pool in enumerate(config.pool):
        _check_group(loader, f"pool[{i}]", pool.servers, "servers", pool.check, pool.source_ip)
    for i, tier in enumerate(config.tier):
        # With gossip a tier's members come from gossip: an empty static list is fine.
        allow_empty = config.gossip is not None
        _check_group(
            loader, f"tier[{i}]", tier.members, "members", tier.check, tier.source_ip, allow_empty
        )
        if tier.check.type == "mysql":
            raise loader.fail(
                f"tier[{i}].check.type", "tier members speak the mesh protocol: use 'tcp'"
            )
    binds: dict[Address, str] = {}
    if node.mesh_bind is not None:
        binds[node.mesh_bind] = "node.mesh_bind"
    if config.admin is not None:
        admin = config.admin
        given = [k for k in ("token", "token_file", "token_env") if getattr(admin, k)]
        if len(given) != 1:
            raise loader.fail("admin.token", "give exactly one of token, token_file and token_env")
        if admin.token and len(admin.token) < 16:
            raise loader.fail("admin.token", "at least 16 characters")
        if bool(admin.tls_cert) != bool(admin.tls_key):
            raise loader.fail("admin.tls_key", "admin.tls_cert and admin.tls_key go together")
        if config.admin.bind in binds:
            raise loader.fail(
                "admin.bind", f"{config.admin.bind} is already bound by node.mesh_bind"
            )
        binds[config.admin.bind] = "admin.bind"
    if config.gossip is not None:
        if config.gossip.bind in binds:
            raise loader.fail(
                "gossip.bind",
                f"{config.gossip.bind} is already bound by {binds[config.gossip.bind]}",
            )
        binds[config.gossip.bind] = "gossip.bind"
        _check_gossip(config, loader)
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
    _check_session_mode(config, loader)
    _check_routing(config, loader)
    if config.timeouts.connect_budget_ms < config.timeouts.connect_ms:
        raise loader.fail(
            "timeouts.connect_budget_ms",
            f"must be at least timeouts.connect_ms ({config.timeouts.connect_ms})",
        )
    # With gossip, a node that serves nothing is a gossip-only member (a seed, a witness).
    gossip_only = config.gossip is not None and not config.service and not config.listener
    if node.role == "middle":
        if node.mesh_bind is None and not gossip_only:
            raise loader.fail("node.mesh_bind", "a middle needs a mesh port to accept hops on")
        if not config.service and not gossip_only:
            raise loader.fail("service", "a middle needs at least one [[service]]")
    elif not config.listener and not gossip_only:
        raise loader.fail("listener", "an edge needs at least one [[listener]]")


def _check_session_mode(config: Config, loader: _Loader) -> None:
    entrances: list[tuple[str, ListenerConfig | ServiceConfig]]
    entrances = [(f"listener[{i}]", e) for i, e in enumerate(config.listener)]
    entrances += [(f"service[{i}]", e) for i, e in enumerate(config.service)]
    sessions = [(key, e) for key, e in entrances if e.mode == "session"]
    for key, entrance in sessions:
        upstream = entrance.upstream
        if upstream.kind is UpstreamKind.TIER and upstream.name in config.pools():
            # Session mode keeps its connections by group name: the two would be one.
            raise loader.fail(
                f"{key}.upstream", "a session-mode tier cannot share its name with a pool"
            )
        if entrance.protocol != "mysql":
            raise loader.fail(f"{key}.mode", "session mode needs protocol = 'mysql'")
    for i, listener in enumerate(config.listener):
        if bool(listener.tls_cert) != bool(listener.tls_key):
            raise loader.fail(f"listener[{i}].tls_key", "tls_cert and tls_key go together")
        if listener.tls_cert and listener.mode != "session":
            raise loader.fail(f"listener[{i}].tls_cert", "TLS to clients needs mode = 'session'")
    if sessions and not config.user:
        raise loader.fail("user", "session mode needs at least one [[user]] to log clients in")
    pools = config.pools()
    for i, user in enumerate(config.user):
        key = f"user[{i}]"
        if not user.name:
            raise loader.fail(f"{key}.name", "must not be empty")
        if user.pool and user.pool not in pools:
            defined = ", ".join(sorted(pools)) or "none"
            raise loader.fail(f"{key}.pool", f"no pool named {user.pool!r} (defined: {defined})")
        if user.password and user.password_env:
            raise loader.fail(f"{key}.password_env", "give password or password_env, not both")
        if user.backend_password and user.backend_password_env:
            raise loader.fail(
                f"{key}.backend_password_env",
                "give backend_password or backend_password_env, not both",
            )
        stored = user.password.startswith("*")
        if stored and user.auth_plugin == "caching_sha2_password":
            raise loader.fail(
                f"{key}.auth_plugin",
                "caching_sha2_password needs the clear password, not a stored native hash",
            )
        if stored and (len(user.password) != 41 or not _is_hex(user.password[1:])):
            raise loader.fail(
                f"{key}.password", "a stored hash is '*' followed by 40 hexadecimal digits"
            )


def _check_routing(config: Config, loader: _Loader) -> None:
    """Replication pools need mysql checks; rules name what exists and compile."""
    pools = config.pools()
    defined = ", ".join(sorted(pools)) or "none"
    for i, pool in enumerate(config.pool):
        if pool.replication.enabled and pool.check.type != "mysql":
            raise loader.fail(
                f"pool[{i}].replication.enabled",
                "writer and readers come from each server's read_only: set check.type = 'mysql'",
            )
    entrances = {e.name for e in config.listener} | {s.name for s in config.service}
    names: set[str] = set()
    for i, rule in enumerate(config.query_rule):
        key = f"query_rule[{i}]"
        if rule.name and rule.name in names:
            raise loader.fail(f"{key}.name", f"{rule.name!r} is used twice (names are ids)")
        names.add(rule.name)
        for name in ("match_digest", "match_pattern"):
            try:
                re.compile(getattr(rule, name))
            except re.error as exc:
                raise loader.fail(f"{key}.{name}", f"not a regular expression: {exc}") from None
        if rule.client:
            try:
                ipaddress.ip_network(rule.client, strict=False)
            except ValueError:
                raise loader.fail(
                    f"{key}.client", f"{rule.client!r} is not an address or a network"
                ) from None
        for name in ("pool", "mirror"):
            value = getattr(rule, name)
            if value and value not in pools:
                raise loader.fail(f"{key}.{name}", f"no pool named {value!r} (defined: {defined})")
        if rule.listener and rule.listener not in entrances:
            raise loader.fail(f"{key}.listener", f"no listener or service named {rule.listener!r}")
        if rule.rewrite and not rule.match_pattern:
            raise loader.fail(f"{key}.rewrite", "a rewrite replaces what match_pattern matches")
        if rule.route and rule.pool and not pools[rule.pool].replication.enabled:
            raise loader.fail(
                f"{key}.route", f"pool {rule.pool!r} has no writer and readers (replication)"
            )


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _check_gossip(config: Config, loader: _Loader) -> None:
    gossip = config.gossip
    assert gossip is not None
    _check_keys(gossip.keys, "gossip.keys", loader, indexed=True)
    if not gossip.keys and not gossip.keys_file and not gossip.allow_plaintext:
        raise loader.fail(
            "gossip.keys",
            "gossip needs at least one key (base64 of 16, 24 or 32 random bytes) in keys or"
            " keys_file, or allow_plaintext = true to run unauthenticated",
        )
    # With advertise_network, the node finds its address when it loads its own config.
    later = bool(config.node.advertise_network)
    if gossip.advertise is None and _wildcard(gossip.bind.host) and not later:
        raise loader.fail(
            "gossip.advertise",
            f"required when gossip.bind is a wildcard address ({gossip.bind}),"
            " unless node.advertise_network is set",
        )
    if _wildcard(gossip.advertised().host) and not later:
        raise loader.fail("gossip.advertise", "must be an address other nodes can reach")
    if gossip.probe_timeout_ms >= gossip.probe_interval_ms:
        raise loader.fail("gossip.probe_timeout_ms", "must be shorter than probe_interval_ms")
    if gossip.reap_after_s < gossip.dead_gossip_s:
        raise loader.fail("gossip.reap_after_s", "must be at least gossip.dead_gossip_s")
    try:
        gossip.settings()
    except MeshproxyError as exc:  # GossipError, for a combination not caught above
        raise loader.fail("gossip", str(exc)) from None
    node = config.node
    if node.role == "middle" and config.service:
        if not node.tier:
            raise loader.fail(
                "node.tier",
                "a middle in a gossip mesh names the tier it serves in "
                "(edges take the members of their [[tier]] of that name from gossip)",
            )
        mesh = node.mesh_advertise or node.mesh_bind
        if mesh is not None and _wildcard(mesh.host) and not later:
            raise loader.fail(
                "node.mesh_advertise",
                f"required when node.mesh_bind is a wildcard address ({node.mesh_bind}),"
                " unless node.advertise_network is set",
            )
    if gossip.discovery == "dns" and not gossip.dns_names:
        raise loader.fail("gossip.dns_names", 'discovery = "dns" needs at least one name')
    for i, name in enumerate(gossip.dns_names):
        if not _DNS_NAME.match(name):
            raise loader.fail(f"gossip.dns_names[{i}]", f"not a DNS name: {name!r}")


def _check_keys(keys: Sequence[str], key: str, loader: _Loader, indexed: bool = False) -> None:
    for i, text in enumerate(keys):
        where = f"{key}[{i}]" if indexed else f"{key} (key {i + 1})"
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise loader.fail(where, "not valid base64") from None
        if len(raw) not in (16, 24, 32):
            raise loader.fail(
                where,
                f"decodes to {len(raw)} bytes; an AES key is 16, 24 or 32 bytes "
                "(make one with: head -c 32 /dev/urandom | base64)",
            )


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


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
    allow_empty: bool = False,
) -> None:
    if source_ip:
        try:
            ipaddress.ip_address(source_ip)
        except ValueError:
            raise loader.fail(f"{key}.source_ip", f"not an IP address: {source_ip!r}") from None
    if not servers and not allow_empty:
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
