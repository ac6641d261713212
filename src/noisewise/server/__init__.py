"""HTTP serving: FastAPI app with continuous batching, a web page, metrics (``pip install 'noisewise[server]'``).

    noisewise serve --host 127.0.0.1 --port 8000

Imports FastAPI only when :func:`create_app` / :func:`serve` are used.
"""

from __future__ import annotations

from typing import Any

from .service import PRESETS, GenerationService, ServerConfig, ServiceError


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`noisewise.server.app.create_app`."""
    from .app import create_app as _create

    return _create(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """See :func:`noisewise.server.app.serve`."""
    from .app import serve as _serve

    _serve(*args, **kwargs)


__all__ = ["create_app", "serve", "ServerConfig", "GenerationService", "ServiceError", "PRESETS"]
