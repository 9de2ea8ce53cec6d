"""Query routing: digests, rules, the query cache and replication roles."""
