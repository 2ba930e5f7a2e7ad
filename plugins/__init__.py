"""triogate plugins: the contract (``triogate.plugins.contract``, re-exported
here) and the built-in plugins, which are registered through the
``triogate.plugins`` entry-point group like any third-party plugin."""

from .contract import (
    PHASES,
    Body,
    CallNext,
    Context,
    GatewayError,
    Headers,
    NoConfig,
    Plugin,
    PluginEnv,
    Request,
    Response,
)

__all__ = [
    "PHASES",
    "Body",
    "CallNext",
    "Context",
    "GatewayError",
    "Headers",
    "NoConfig",
    "Plugin",
    "PluginEnv",
    "Request",
    "Response",
]
