"""The MySQL ERR packet a listener sends in place of a greeting."""

from __future__ import annotations

import struct

from meshproxy.dataplane.mysql import ER_CON_COUNT_ERROR, error_packet


def test_error_packet_has_header_marker_code_and_message() -> None:
    """The packet is length-prefixed with sequence 0, then 0xff, the code and the message."""
    packet = error_packet(ER_CON_COUNT_ERROR, "Too many connections")
    length = int.from_bytes(packet[:3], "little")
    assert length == len(packet) - 4
    assert packet[3] == 0
    assert packet[4] == 0xFF
    assert struct.unpack("<H", packet[5:7])[0] == 1040
    assert packet[7:] == b"Too many connections"


def test_error_packet_message_is_bounded() -> None:
    """A huge message is cut so the packet stays small."""
    packet = error_packet(9001, "x" * 100_000)
    assert len(packet) <= 4 + 3 + 1024
