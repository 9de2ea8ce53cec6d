"""How a node runs as processes: the angel, its children, process modes, the control channel.

Kept import-free: ``python -m meshproxy.runtime.child`` must start light.
"""
