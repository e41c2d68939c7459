"""Integrations with other frameworks that need the operator package (its CLI), not only the
worker side: they belong in an operations shell, not in a worker image."""
