"""MinIO bucket notifications from RabbitMQ: the consumer (``consumer``), the topology it
declares (``topology``), batched acks (``acks``) and the broker connection (``connection``).
"""

from watcher.adapters.amqp.acks import AckWindow
from watcher.adapters.amqp.connection import JitteredRobustConnection
from watcher.adapters.amqp.consumer import BucketEventConsumer, MessageHandler

__all__ = ["AckWindow", "BucketEventConsumer", "JitteredRobustConnection", "MessageHandler"]
