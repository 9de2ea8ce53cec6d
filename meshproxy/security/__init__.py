"""The mesh's security: its PKI (a CA, node certificates naming node and role) and the TLS
contexts of mesh hops."""
