"""The MySQL client/server protocol, sans I/O: bytes in, events and bytes out, no sockets.

``packets`` frames and builds packets, ``handshake`` and ``auth`` cover the login,
``response`` finds where a server's answer to a command ends (forwarding rows untouched),
``statements`` classifies SQL for pins and tracked state, and ``state`` is the session state
a client expects to find on whichever backend connection serves it.
"""
