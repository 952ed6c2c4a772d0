"""The transport-free core: settings, imaging, batching, engines, model loading, the running service and
its lifecycle, metrics and error types. Front-ends (``service.http`` and the others) build on it; it
imports none of them."""
