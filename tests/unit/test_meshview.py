"""What gossip means for routing: tier members and verdicts, published metadata, the table."""

from __future__ import annotations

from meshproxy import config
from meshproxy.config import Address, AdminState, ServerConfig, TierConfig
from meshproxy.control import meshview
from meshproxy.gossip import wire
from meshproxy.gossip.commands import Member
from meshproxy.gossip.messages import NodeMeta, ServiceHealth, State
from meshproxy.health.state import ServerState

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
TIER = TierConfig("middle")


def middle(
    name: str,
    port: int,
    state: State = State.ALIVE,
    healthy: int = 1,
    *,
    draining: bool = False,
    tier: str = "middle",
    incarnation: int = 0,
) -> Member:
    meta = NodeMeta(
        role="middle",
        tier=tier,
        services=(ServiceHealth("mysql", healthy, 2),),
        draining=draining,
        mesh=f"127.0.0.1:{port}",
    )
    return Member(name, ("127.0.0.1", 7900 + port % 100), state, incarnation, 1, meta, 0.0)


def a(port: int) -> Address:
    return Address("127.0.0.1", port)


def every_kind() -> list[Member]:
    """One middle in each state gossip can report: fine, suspect, draining, backendless,
    dead and left."""
    return [
        middle("p2", 7002),
        middle("p3", 7003, State.SUSPECT),
        middle("p4", 7004, draining=True),
        middle("p5", 7005, healthy=0),
        middle("p6", 7006, State.DEAD),
        middle("p7", 7007, State.LEFT),
    ]


def test_alive_middles_of_the_tier_are_members_and_eligible() -> None:
    """Middles of this tier that are alive and have a healthy backend become members, none
    ruled out; edges, middles of other tiers and this node itself are not members."""
    members = [
        middle("p2", 7002),
        middle("p3", 7003),
        middle("x9", 7009, tier="other"),
        Member("p1", ("127.0.0.1", 7901), State.ALIVE, 0, 0, NodeMeta(role="edge"), 0.0),
    ]
    routing = meshview.tier_routing(TIER, members, {"mysql"}, "p1")
    assert routing.mode == "gossip"
    assert [s.address for s in routing.servers] == [a(7002), a(7003)]
    assert routing.blocked == {}
    assert routing.names == {a(7002): "p2", a(7003): "p3"}


def test_suspect_draining_and_backendless_middles_are_ruled_out_with_a_reason() -> None:
    """A suspect middle, a draining one and one without a healthy backend for the service
    stay members (health history kept) but are ruled out, each with its reason; a dead one
    and one that left are dropped."""
    routing = meshview.tier_routing(TIER, every_kind(), {"mysql"}, "p1")
    assert [s.address for s in routing.servers] == [a(7002), a(7003), a(7004), a(7005)]
    assert routing.blocked == {
        a(7003): "gossip: p3 suspect",
        a(7004): "gossip: p4 draining",
        a(7005): "gossip: p5 has no healthy backend for mysql",
    }
    assert routing.gone == {a(7006): "gossip: p6 dead", a(7007): "gossip: p7 left"}


def test_failing_middles_are_told_apart_from_suspect_draining_and_departed_ones() -> None:
    """Dead and backendless middles are failing (nothing on their side ends their sessions);
    a suspect one (it may refute), a draining one and one that left are not."""
    routing = meshview.tier_routing(TIER, every_kind(), {"mysql"}, "p1")
    assert routing.failed == {a(7005), a(7006)}


def test_nothing_is_failing_when_routing_fails_open() -> None:
    """When gossip rules out every member (fail open), no member counts as failing, so no
    session is ended on this node's possibly broken view alone."""
    members = [middle("p2", 7002, State.SUSPECT), middle("p3", 7003, healthy=0)]
    routing = meshview.tier_routing(TIER, members, {"mysql"}, "p1")
    assert routing.mode == "fail-open"
    assert routing.failed == frozenset()


def test_a_service_the_middle_does_not_offer_rules_it_out() -> None:
    """A middle that does not offer every service this node routes through the tier is
    ruled out, naming the service."""
    both = middle("p3", 7003)
    both = Member(
        both.name,
        both.addr,
        both.state,
        0,
        1,
        NodeMeta(
            role="middle",
            tier="middle",
            services=(ServiceHealth("mysql", 1, 1), ServiceHealth("ro", 1, 1)),
            mesh="127.0.0.1:7003",
        ),
        0.0,
    )
    routing = meshview.tier_routing(TIER, [middle("p2", 7002), both], {"mysql", "ro"}, "p1")
    assert routing.blocked == {a(7002): "gossip: p2 does not offer service ro"}


def test_static_members_bootstrap_and_lend_weight_and_state() -> None:
    """Until gossip knows a middle of the tier the static members route; after that, a
    static entry at a gossip member's address lends it its weight and admin state, and
    static entries gossip does not know are dropped."""
    tier = TierConfig(
        "middle",
        (
            ServerConfig(a(7002), weight=3, state=AdminState.OFFLINE_SOFT),
            ServerConfig(a(7008)),
        ),
    )
    assert meshview.tier_routing(tier, [], {"mysql"}, "p1").servers == tier.members
    routing = meshview.tier_routing(tier, [middle("p2", 7002)], {"mysql"}, "p1")
    assert routing.servers == (ServerConfig(a(7002), weight=3, state=AdminState.OFFLINE_SOFT),)


def test_when_gossip_rules_out_everyone_routing_fails_open() -> None:
    """If gossip rules out every middle (this node's gossip is cut off, say), none is ruled
    out and dead ones come back as candidates: the node's own passive view decides."""
    members = [middle("p2", 7002, State.SUSPECT), middle("p3", 7003, State.DEAD)]
    routing = meshview.tier_routing(TIER, members, {"mysql"}, "p1")
    assert routing.mode == "fail-open"
    assert routing.blocked == {}
    assert [s.address for s in routing.servers] == [a(7002), a(7003)]


def test_a_restarted_node_at_the_same_address_wins_over_its_dead_predecessor() -> None:
    """Two gossip names at one mesh address: the live one is the member."""
    members = [middle("old", 7002, State.DEAD, incarnation=5), middle("new", 7002)]
    routing = meshview.tier_routing(TIER, members, {"mysql"}, "p1")
    assert routing.names == {a(7002): "new"}
    assert routing.blocked == {}


def _config(**node: object) -> config.Config:
    doc = {
        "node": {"name": "p2", "role": "middle", "mesh_bind": "127.0.0.1:7002", "tier": "mid"}
        | node,
        "service": [
            {"name": "mysql", "upstream": "pool:main"},
            {"name": "ro", "upstream": "pool:ro"},
        ],
        "pool": [
            {"name": "main", "servers": ["127.0.0.1:3306", "127.0.0.1:3307"]},
            {"name": "ro", "servers": ["127.0.0.1:3308"]},
        ],
        "gossip": {"bind": "127.0.0.1:7946", "keys": [KEY]},
    }
    return config.parse(doc)


def test_local_meta_reports_each_services_backends() -> None:
    """A middle publishes its role, tier, mesh address and, per service, its healthy and
    total backends and the ones that are down (not those an operator took offline)."""
    cfg = _config()
    main = config.UpstreamRef.parse("pool:main")
    ro = config.UpstreamRef.parse("pool:ro")
    states = {
        main: [("127.0.0.1:3306", ServerState.ONLINE), ("127.0.0.1:3307", ServerState.SHUNNED)],
        ro: [("127.0.0.1:3308", ServerState.OFFLINE_SOFT)],
    }
    meta = meshview.local_meta(cfg, states, draining=True, active_connections=12)
    assert meta == NodeMeta(
        role="middle",
        tier="mid",
        services=(
            ServiceHealth("mysql", 1, 2, ("127.0.0.1:3307",)),
            ServiceHealth("ro", 0, 1, ()),
        ),
        active_connections=12,
        draining=True,
        mesh="127.0.0.1:7002",
    )


def test_metadata_is_trimmed_to_fit_an_alive_message() -> None:
    """However many backends are down, the published metadata fits the alive message limit;
    names of down backends go first, counts stay."""
    down = tuple(f"backend-{i:03d}.db.example.internal:3306" for i in range(32))
    meta = NodeMeta(
        role="middle",
        tier="mid",
        services=(ServiceHealth("mysql", 0, 40, down), ServiceHealth("ro", 1, 2, down[:3])),
        mesh="10.0.0.2:7002",
    )
    fitted = meshview.fit(meta, "p2")
    assert meshview._alive_size(fitted, "p2") <= wire.MAX_ALIVE_BYTES
    assert [(s.name, s.healthy, s.total) for s in fitted.services] == [
        ("mysql", 0, 40),
        ("ro", 1, 2),
    ]
    assert 0 < len(fitted.services[0].down) < 32


def test_mesh_address_prefers_the_advertised_one() -> None:
    """The published mesh address is node.mesh_advertise when set, else node.mesh_bind."""
    assert meshview.mesh_address(_config()) == "127.0.0.1:7002"
    cfg = _config(mesh_bind="0.0.0.0:7002", mesh_advertise="10.1.2.3:7002")
    assert meshview.mesh_address(cfg) == "10.1.2.3:7002"


def test_members_table_looks_like_serf_members() -> None:
    """The members table has one aligned row per member with its backends per service."""
    row = meshview.member_row(middle("p2", 7002), changed_at=1000.0)
    text = meshview.format_members([row], now=1012.5)
    header, line = text.splitlines()
    assert header.split() == [
        "NAME",
        "ADDRESS",
        "ROLE",
        "TIER",
        "STATE",
        "INC",
        "BACKENDS",
        "CHANGED",
    ]
    assert line.split() == [
        "p2",
        "127.0.0.1:7902",
        "middle",
        "middle",
        "alive",
        "0",
        "mysql=1/2",
        "12.5s",
        "ago",
    ]
