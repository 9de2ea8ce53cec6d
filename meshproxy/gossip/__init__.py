"""Gossip: SWIM membership with Lifeguard, as a pure core plus codec, shared by every node."""
