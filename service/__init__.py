"""FastAPI inference service for the EfficientNet family: dynamic batching, /predict, /features,
health probes and Prometheus metrics. Start it with ``efficientnet-serve`` or ``python -m service``."""

from service.app import create_app
from service.settings import Settings

__all__ = ["Settings", "create_app"]
