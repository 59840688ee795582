"""Continuous batching: one thread owns the model and serves many requests at once."""

from .engine import Engine, QueueFullError
from .request import EngineEvent, Request

__all__ = ["Engine", "EngineEvent", "QueueFullError", "Request"]
