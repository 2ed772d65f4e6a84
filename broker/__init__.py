"""The broker: places runtimes on daemons and routes messages by runtime id (``python -m broker``)."""

from broker.broker import Broker

__all__ = ["Broker"]
