"""Trio mode for these tests, whatever config file pytest found.

``from pytest_trio.enable_trio_mode import *`` is pytest-trio's documented
alternative to ``trio_mode = true`` in the ini file: every ``async def`` test
(and async fixture) here runs under trio. It lives in this conftest rather
than in this package's ``[tool.pytest.ini_options]`` so it also holds when
pytest is started from a parent project (whose config file then wins).
"""

from pytest_trio.enable_trio_mode import *  # noqa: F403
