"""What the gateway tells operators: one record per request (``records``),
Prometheus metrics (``metrics``), the JSON access log (``accesslog``) and
the application log's setup (``logs``)."""
