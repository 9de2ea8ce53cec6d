"""A node's control plane: upstream health, runtime changes, gossip wiring, routing views.

Data flows one way: health checks, gossip and the admin API change state here, and the
control plane publishes immutable member tuples to the data planes, which only read them.
"""
