"""marketstream: stream live market data from Redis pub/sub to WebSocket clients."""

__version__ = "0.1.0"
