"""meshproxy: a cascading proxy mesh for MySQL traffic."""

__version__ = "0.1.0"
