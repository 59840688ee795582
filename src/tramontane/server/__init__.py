"""The OpenAI-compatible server: `create_app(engine, tokenizer, model_name)` and what `tramontane serve` runs.

Needs the `serve` extras (fastapi, uvicorn, pydantic, prometheus_client).
"""

from .app import create_app
from .errors import APIError
from .serve import default_model_name, load_engine, run

__all__ = ["APIError", "create_app", "default_model_name", "load_engine", "run"]
