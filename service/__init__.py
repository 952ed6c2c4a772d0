"""The EfficientNet inference service.

``service.core`` holds what every way in shares (settings, decoding, batching, engines, the running
service) and imports no front-end; ``service.http`` is the FastAPI front-end (``efficientnet-serve``).
"""
