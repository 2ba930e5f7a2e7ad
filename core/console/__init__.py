"""The admin console: web pages under ``/ui`` on the admin listener, built
on the admin API's endpoint table (docs/console.md)."""

from triogate.console.web import Console, install_console

__all__ = ["Console", "install_console"]
