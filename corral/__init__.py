"""corral: call OpenAI-compatible APIs at scale, within limits, without losing work."""

__version__ = "0.1.0"

from corral.client import Client, MapResult, SyncClient, default_middleware
from corral.core import *  # noqa: F403 - the core API is corral's API
from corral.core import __all__ as _core_names

__all__ = ["Client", "__version__", "MapResult", "SyncClient", "default_middleware", *_core_names]
