"""The native HTTP API (a door): ``/predict`` and ``/features`` (inference), ``/healthz``, ``/readyz``,
``/info`` and ``/metrics`` (operations), the upload parsing, its pydantic schemas, its error body and
the local Swagger UI. Routers only: the server (``service.server``) assembles them with the other doors.
"""
