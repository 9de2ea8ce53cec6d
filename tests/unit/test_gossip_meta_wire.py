"""Node metadata on the wire: the mesh address field, and room to grow."""

from __future__ import annotations

import msgpack
import pytest

from meshproxy.gossip import wire
from meshproxy.gossip.messages import Alive, NodeMeta, ServiceHealth

META = NodeMeta(
    "middle", "t", (ServiceHealth("mysql", 1, 2, ("10.0.0.9:3306",)),), 3, False, "10.0.0.2:7001"
)


def _alive_with(meta_fields: tuple[object, ...]) -> tuple[object, ...]:
    return (int(wire.Kind.ALIVE), "p2", 1, ("10.0.0.2", 7946), 4, meta_fields)


def test_mesh_address_round_trips() -> None:
    """An alive message's metadata, mesh address included, decodes to what was sent."""
    alive = Alive("p2", 1, ("10.0.0.2", 7946), 4, META)
    assert wire.from_wire(msgpack.unpackb(wire.packed(alive), use_list=False)) == alive


def test_older_and_newer_metadata_layouts_decode() -> None:
    """Metadata of five fields (before the mesh address) decodes with no mesh address, of
    six with no writers, and fields a newer peer appends are ignored."""
    old = wire.from_wire(_alive_with(("middle", "t", (), 0, False)))
    assert isinstance(old, Alive)
    assert old.meta.mesh == ""
    six = wire.from_wire(_alive_with(("middle", "t", (), 0, False, "h:1")))
    assert isinstance(six, Alive)
    assert six.meta.writers == ()
    fields = ("middle", "t", (), 0, False, "h:1", ("10.0.0.1:3306",), "future", 7)
    newer = wire.from_wire(_alive_with(fields))
    assert isinstance(newer, Alive)
    assert (newer.meta.mesh, newer.meta.writers) == ("h:1", ("10.0.0.1:3306",))


@pytest.mark.parametrize(
    "fields",
    [("middle", "t", (), 0, False, 7), ("middle", "t", (), 0), ("x",) * 17],
    ids=["mesh-not-a-string", "too-few", "too-many"],
)
def test_bad_metadata_is_a_wire_error(fields: tuple[object, ...]) -> None:
    """Metadata with a mistyped mesh address or the wrong number of fields is refused."""
    with pytest.raises(wire.WireError):
        wire.from_wire(_alive_with(fields))
