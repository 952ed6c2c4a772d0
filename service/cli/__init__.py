"""``efficientnet-batch``: classify or embed whole folders of images, in-process or against a running service.

In-process it drives the transport-free core (``service.core``: the same settings, preprocessing, engine
and dynamic batcher as the server); with ``--server`` it is an HTTP client of one or more replicas. It
never imports the HTTP front-end.
"""
