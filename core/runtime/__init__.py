"""Wiring and processes: the gateway object that builds every service
(``gateway``), hot reload (``reload``), the server and its signals
(``server``), the standalone ASGI app (``standalone``), several workers
(``supervisor``), the CLI (``cli``, ``demo``, ``doctor``) and the bundled
echo upstream (``echo``). Only this package imports everything."""
