"""Errors the gossip package raises on purpose, rooted in the package-wide error tree.

Hostile or broken input from the network never raises: the codec returns a rejection the
caller counts. These errors are for local mistakes (bad settings, a key of the wrong size,
metadata too large to gossip), found when a node is configured.
"""

from __future__ import annotations

from meshproxy.errors import MeshproxyError


class GossipError(MeshproxyError):
    """A local gossip setting, key or metadata value cannot be used."""
