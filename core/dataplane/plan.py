"""Decide, then act: one config's data plane as a plan, applied in one step.

Theory of operation
-------------------
Building a config's data plane has two halves, the way httpcore's pool
separates deciding from doing:

* ``plan_pipeline`` decides. It compiles the router, validates and makes
  every route's plugin chain, and runs every plugin's ``bind`` against an
  ``UpstreamBinder``: a stand-in for the route's upstream that records what
  the plugin asks for (a breaker with these settings) and is not the live
  upstream. It sorts the config's upstreams into *kept* (a live one whose
  settings did not change: pools, health, breakers and retry budget carry
  over), *created* (new objects nothing uses yet) and *retired* (live ones
  the config no longer has in that form). It reads live objects and writes
  none, so a config refused half-way (a bad route, a plugin's ``bind``
  raising) leaves the running system exactly as it was. Problems are
  collected and raised together as one ``ConfigError``.
* ``UpstreamsPlan.install`` acts (``Pipeline(plan)`` calls it). It puts the
  planned breakers on the targets, keeping a breaker, state and all, whose
  settings did not change (``breaker_for``), and cannot fail. The caller then
  swaps one reference and closes the retired upstreams once the old
  pipeline has no request in flight.

The first route of a config to ask for a breaker on an upstream sets its
settings; the targets of an upstream no route asks for lose their breaker.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from triogate.config import Config, UpstreamConfig
from triogate.dataplane.plugin_loader import Chain, build_chain
from triogate.dataplane.upstream import Upstream
from triogate.errors import ConfigError, FieldError, PluginLoadError
from triogate.plugins.contract import Plugin, PluginEnv, RouteView
from triogate.policy.breaker import BreakerSettings, FailurePolicy, breaker_for
from triogate.policy.router import Router

__all__ = ["BreakerBinding", "PipelinePlan", "UpstreamBinder", "UpstreamsPlan", "plan_pipeline"]

log = logging.getLogger("triogate.dataplane.plan")


@dataclass(frozen=True, slots=True)
class BreakerBinding:
    """The breaker every target of an upstream gets, and what fails it."""

    settings: BreakerSettings
    failure_policy: FailurePolicy


class UpstreamBinder:
    """What a plugin's ``bind`` is given for its route's upstream while a
    config is planned: the upstream's name and settings to read, and
    ``use_breaker`` to ask for breakers. Never the live upstream."""

    __slots__ = ("breaker", "config", "name")

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.breaker: BreakerBinding | None = None

    def __repr__(self) -> str:
        return f"<UpstreamBinder {self.name} breaker={self.breaker is not None}>"

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config.targets)

    def use_breaker(self, settings: BreakerSettings, failures: FailurePolicy) -> None:
        """Give every target of this upstream a breaker with ``settings``.
        The first route of the config to ask sets them; later asks change
        nothing. Takes effect when the whole config is applied."""
        if self.breaker is None:
            self.breaker = BreakerBinding(settings, failures)

    # The retry budget is per request; a config being planned has none.
    def begin_retry(self, ratio: float, minimum: int) -> bool:
        raise RuntimeError(
            "the retry budget is not available in bind: this stand-in is only valid "
            "during bind; at request time use ctx.upstream"
        )

    def end_retry(self) -> None:
        raise RuntimeError(
            "the retry budget is not available in bind: this stand-in is only valid "
            "during bind; at request time use ctx.upstream"
        )


@dataclass(frozen=True, repr=False)
class UpstreamsPlan:
    """What becomes of the upstreams, by name, in the config's order."""

    keep: Mapping[str, Upstream]
    create: Mapping[str, Upstream]
    retire: tuple[Upstream, ...]
    breakers: Mapping[str, BreakerBinding | None]
    names: tuple[str, ...]

    def __repr__(self) -> str:
        return (
            f"<UpstreamsPlan keep={sorted(self.keep)} create={sorted(self.create)} "
            f"retire={sorted(u.name for u in self.retire)}>"
        )

    def install(self) -> dict[str, Upstream]:
        """Act: put the planned breakers on the targets and return the
        upstreams by name. Attribute writes only: cannot fail half-way."""
        upstreams: dict[str, Upstream] = {}
        for name in self.names:
            upstream = self.keep.get(name) or self.create[name]
            binding = self.breakers.get(name)
            settings = binding.settings if binding is not None else None
            for pool in upstream.pools:
                pool.breaker = breaker_for(pool.breaker, settings)
                if binding is not None:
                    pool.failure_policy = binding.failure_policy
            upstreams[name] = upstream
        return upstreams


@dataclass(frozen=True, repr=False)
class PipelinePlan:
    """Everything a ``Pipeline`` for ``config`` is made of, decided."""

    config: Config
    router: Router
    chains: Mapping[int, Chain]
    global_chain: Chain
    upstreams: UpstreamsPlan

    def __repr__(self) -> str:
        return f"<PipelinePlan {len(self.chains)} routes, {self.upstreams!r}>"


def _plan_upstreams(
    config: Config, live: Mapping[str, Upstream], binders: Mapping[str, UpstreamBinder]
) -> UpstreamsPlan:
    keep: dict[str, Upstream] = {}
    create: dict[str, Upstream] = {}
    for name, cfg in config.upstreams.items():
        current = live.get(name)
        if current is not None and current.config == cfg:
            keep[name] = current
        else:
            create[name] = Upstream(name, cfg)  # a new object: nothing uses it yet
    kept = {id(u) for u in keep.values()}
    return UpstreamsPlan(
        keep=keep,
        create=create,
        retire=tuple(u for u in live.values() if id(u) not in kept),
        breakers={name: b.breaker for name, b in binders.items()},
        names=tuple(config.upstreams),
    )


def _fuse_access(chain: Chain) -> None:
    """Let a plugin take over the access phase of the one right after it
    (its ``fuse_access(following)`` says whether it did): key-auth admits
    ``rate-limit`` by key with the key's own limits in one step
    (``triogate.dataplane.keyroute``). After ``bind``: the route's limit is
    known then. The plugins are this plan's own, so nothing live changes."""
    plugins = [p for p in chain.plugins if "access" in p.phases()]
    for first, following in itertools.pairwise(plugins):
        fuse = getattr(first, "fuse_access", None)
        if fuse is not None and fuse(following):
            chain.access = tuple(p.phase("access") for p in plugins if p is not following)
            return


def plan_pipeline(
    config: Config,
    registry: Mapping[str, type[Plugin[Any]]],
    env: PluginEnv,
    *,
    live: Mapping[str, Upstream] | None = None,
) -> PipelinePlan:
    """Decide ``config``'s data plane next to the ``live`` upstreams (the
    running pipeline's), changing nothing live. Raises ConfigError listing
    every route and plugin problem."""
    errors: list[FieldError] = []
    router: Router | None = None
    try:
        router = Router.compile(config.routes, config.api_versions)
    except ConfigError as exc:
        errors.extend(exc.errors)  # reported with the plugin errors below
    chains: dict[int, Chain] = {}
    for i, route in enumerate(config.routes):
        try:
            chains[i] = build_chain(
                registry, config.plugins, route.plugins, env, route_path=f"routes[{i}]"
            )
        except PluginLoadError as exc:
            errors.extend(exc.errors)
    global_chain = Chain(())
    try:
        # Requests that match no route still meet the global plugins'
        # response phase (request-id, CORS headers on the 404).
        global_chain = build_chain(registry, config.plugins, {}, env, route_path="plugins")
    except PluginLoadError as exc:
        errors.extend(e for e in exc.errors if e not in errors)
    binders = {name: UpstreamBinder(name, cfg) for name, cfg in config.upstreams.items()}
    if not errors:
        for i, route in enumerate(config.routes):
            binder = binders[route.upstream]
            view = RouteView.of(route, i)
            for plugin in chains[i].plugins:
                try:
                    plugin.bind(view, binder)
                except ValueError as exc:
                    errors.append(FieldError(f"routes[{i}].plugins.{plugin.name}", str(exc)))
                except Exception as exc:
                    # A plugin's bug, not the operator's: still a load error
                    # naming the plugin (never a 500 from /config/reload or a
                    # traceback at start), with the traceback in the log.
                    log.exception("plugin %r failed in bind for routes[%d]", plugin.name, i)
                    errors.append(
                        FieldError(
                            f"routes[{i}].plugins.{plugin.name}",
                            f"bind failed: {type(exc).__name__}: {exc}",
                        )
                    )
    if errors or router is None:
        raise ConfigError(errors, "config")
    for chain in chains.values():
        _fuse_access(chain)
    return PipelinePlan(
        config=config,
        router=router,
        chains=chains,
        global_chain=global_chain,
        upstreams=_plan_upstreams(config, live or {}, binders),
    )
