"""The mesh's security: its PKI (a CA, node certificates naming node and role) and the TLS
contexts of mesh hops.

It also keeps the keys of a decoded peer certificate interned for the life of the process
(``CERTIFICATE_KEYS``), before any of its modules can read one.
"""

from __future__ import annotations

import sys

# ``SSLObject.getpeercert()`` builds its dict with ``PyDict_SetItemString``, which interns
# each key. A key nothing else holds is added to the interpreter's table of interned
# strings by every call and removed when the dict dies, leaving a dead slot each time; in
# a node ``serialNumber``, ``notBefore`` and ``notAfter`` are such keys, and every mesh hop
# reads its peer (``meshtls.peer_of``), so three dead slots per hop. CPython 3.11 rebuilds
# the table when its free slots run out, sized for the strings alive then, and a worker's
# 11,000-odd strings make the first rebuild double it, from 32768 slots to 65536: +532 KiB
# of RSS after a few thousand hops (the one step a 30-minute soak found in the middle
# workers), then a 940 KiB rebuild every 11,000 hops or so. Held here, every call finds its
# keys already interned and the table is left alone.
CERTIFICATE_KEYS = frozenset(
    sys.intern(key)
    for key in (
        "subject",
        "issuer",
        "version",
        "serialNumber",
        "notBefore",
        "notAfter",
        "subjectAltName",
        "OCSP",
        "caIssuers",
        "crlDistributionPoints",
    )
)
