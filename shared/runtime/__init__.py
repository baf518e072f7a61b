"""The actor runtime: a service is an actor that owns its SQLite state and receives its
messages from durable JetStream pull consumers, in batches, in stream order."""

from shared.runtime.actor import Batch, ConsumerSpec, Delivery
from shared.runtime.service import Service, run_service

__all__ = ["Batch", "ConsumerSpec", "Delivery", "Service", "run_service"]
