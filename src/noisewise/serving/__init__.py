"""Serving: continuous batching of many requests into one network forward per tick."""

from .batcher import BatchEngine, Cancelled, ForwardBatcher, RequestHandle

__all__ = ["BatchEngine", "Cancelled", "ForwardBatcher", "RequestHandle"]
