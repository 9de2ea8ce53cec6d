"""The admin API: runtime views and changes of a node's config, status and metrics."""
