"""Build: the modules every statement and every connection passes through are compiled
with mypyc (they are already mypy --strict typed). The C extensions take the place of the
pure-Python modules at import; the sources stay the reference and run as they are where
nothing was compiled. MESHPROXY_PURE=1 builds without compiling (a pure wheel that any
Python 3.11+ can install, as the container images do).
"""

import os

from setuptools import setup

# The per-statement path of session mode, the per-connection path of the byte pump, and
# the protocol core they share. (Mesh TLS's record layer gained nothing measurable from it:
# its cost is OpenSSL's.)
NATIVE = [
    "meshproxy/counters.py",
    "meshproxy/mysql/auth.py",
    "meshproxy/mysql/constants.py",
    "meshproxy/mysql/digest.py",
    "meshproxy/mysql/handshake.py",
    "meshproxy/mysql/login.py",
    "meshproxy/mysql/packets.py",
    "meshproxy/mysql/response.py",
    "meshproxy/mysql/state.py",
    "meshproxy/mysql/statements.py",
    "meshproxy/dataplane/backend.py",
    "meshproxy/dataplane/backendpool.py",
    "meshproxy/dataplane/continuity.py",
    "meshproxy/dataplane/hop.py",
    "meshproxy/dataplane/listener.py",
    "meshproxy/dataplane/mirror.py",
    "meshproxy/dataplane/moving.py",
    "meshproxy/dataplane/plane.py",
    "meshproxy/dataplane/pump.py",
    "meshproxy/dataplane/router.py",
    "meshproxy/dataplane/routing.py",
    "meshproxy/dataplane/session.py",
    "meshproxy/dataplane/sessionmode.py",
    "meshproxy/dataplane/upstream.py",
    "meshproxy/routing/digests.py",
    "meshproxy/routing/querycache.py",
    "meshproxy/routing/rules.py",
]


def native_extensions() -> list[object]:
    if os.environ.get("MESHPROXY_PURE"):
        return []
    from mypyc.build import mypycify

    # Checking the types is `just check`'s job. The build only needs them, and may run where
    # the dependencies are not installed (pip's isolated build environment): the modules it
    # cannot find are taken as untyped.
    flags = ["--config-file=", "--ignore-missing-imports"]
    return list(mypycify([*flags, *NATIVE], opt_level="3"))


setup(ext_modules=native_extensions())
