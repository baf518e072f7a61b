"""Operator tooling: the `cdp` CLI, the supervisor, the nats-server launcher and the
permission table. Services never import it; it may import services."""
