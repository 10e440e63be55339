"""``unmask serve``: an OpenAI-compatible HTTP server over one diffusion model.

Needs the ``serve`` extra (FastAPI and uvicorn): ``pip install "unmask[serve]"``.
"""

from unmask.serve.config import ServeConfig

__all__ = ["BackgroundServer", "ServeConfig", "create_app", "serve"]


def __getattr__(name: str) -> object:
    """Import FastAPI and uvicorn only when the server is used, not on ``import``."""
    if name == "create_app":
        from unmask.serve.app import create_app

        return create_app
    if name in ("BackgroundServer", "serve"):
        from unmask.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'unmask.serve' has no attribute {name!r}")
