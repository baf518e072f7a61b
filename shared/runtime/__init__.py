"""The actor runtime: a service is an actor that owns its SQLite state and receives its
messages from durable JetStream pull consumers, in batches, in stream order."""

from shared.runtime.actor import ConsumerSpec, Delivery, Step
from shared.runtime.service import Service, run_service

__all__ = ["ConsumerSpec", "Delivery", "Service", "Step", "run_service"]
