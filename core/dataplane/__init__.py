"""The request path: the pipeline (``pipeline``, decided by ``plan``,
``plugin_loader``), the front doors (``listener`` and ``connection`` on
sockets via ``sockio``, ``asgi``), the upstream client (``upstream``,
``health``) and the per-key actors that own rate-limit, credit and usage
state (``actors``, ``keyactor``)."""
