"""triogate: an API gateway on trio with the full API-key lifecycle built in."""

__version__ = "0.1.0"

__all__ = ["__version__"]
