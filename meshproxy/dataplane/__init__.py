"""The data plane: listeners, the byte pump, the hop header, upstream choice and pools."""
