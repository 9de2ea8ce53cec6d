"""Chaos suite: load, fault injection and timelines for topologies run in Docker."""
