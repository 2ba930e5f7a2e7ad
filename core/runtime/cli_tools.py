"""The CLI's tools and its shape: ``triogate bench`` (without a name: the
benchmarks, a sentence each), ``triogate echo [PORT]`` (the bundled echo
upstream), and the global options accepted after a subcommand as well as
before it (``triogate serve --log-level DEBUG``).

``cli`` calls these; nothing here imports it back."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "add_echo_command",
    "benchmark_lines",
    "global_options_everywhere",
    "run_bench",
    "subparsers_of",
    "walk",
]


def subparsers_of(parser: argparse.ArgumentParser) -> Any:
    """``parser``'s subcommands action, or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it, depth first."""
    yield parser
    sub = subparsers_of(parser)
    if sub is not None:
        for child in dict.fromkeys(sub.choices.values()):  # aliases: once
            yield from walk(child)


def global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """Add the top level's ``--log-level`` to every subcommand, so it may
    come after the subcommand too. Its default there is SUPPRESS: a
    subcommand that is not given it leaves the top level's value alone."""
    top = next(a for a in parser._actions if "--log-level" in a.option_strings)
    for child in walk(parser):
        if child is parser or subparsers_of(child) is not None:
            continue
        if any("--log-level" in a.option_strings for a in child._actions):
            continue
        child.add_argument(
            "--log-level",
            choices=top.choices,
            default=argparse.SUPPRESS,
            help=top.help,
        )


def benchmark_lines() -> list[str]:
    """Each benchmark's name and its module's first sentence."""
    from triogate.benchmarks.__main__ import BENCHMARKS

    lines = []
    width = max(len(name) for name in BENCHMARKS)
    for name, main in BENCHMARKS.items():
        doc = (sys.modules[main.__module__].__doc__ or "").strip()
        paragraph = " ".join(doc.split("\n\n")[0].split())
        sentence = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0].rstrip(".")
        lines.append(f"  {name.ljust(width)}  {sentence.replace('``', '')}")
    return lines


def run_bench(args: list[str]) -> int:
    """``triogate bench NAME [options]``; without a name (or ``--help``,
    ``list``), the benchmarks, a sentence each."""
    from triogate.benchmarks.__main__ import BENCHMARKS
    from triogate.benchmarks.__main__ import main as bench_main

    if not args or args[0] in ("-h", "--help", "list"):
        print("usage: triogate bench NAME [options]   (NAME --help: its options)")
        print("benchmarks:")
        print("\n".join(benchmark_lines()))
        return 0
    if args[0] not in BENCHMARKS:
        print(f"triogate bench: no benchmark {args[0]!r}; they are:", file=sys.stderr)
        print("\n".join(benchmark_lines()), file=sys.stderr)
        return 2
    status: int = bench_main(args)
    return status


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


def add_echo_command(sub: Any) -> None:
    """``triogate echo [PORT]``: the bundled echo upstream (``runtime.echo``)."""

    def echo(args: argparse.Namespace) -> int:
        from triogate.runtime.echo import main as echo_main

        return echo_main([str(args.port)])

    p = sub.add_parser(
        "echo",
        help="run the bundled echo upstream (answers every request with what it received)",
        description="Run the bundled echo upstream on 127.0.0.1:PORT: every request is "
        "answered 200 with a JSON description of what arrived (method, path, headers, "
        "body size). The demo and the example configs proxy to it. Ctrl-C stops it.",
    )
    p.add_argument(
        "port",
        metavar="PORT",
        type=_port,
        nargs="?",
        default=9000,
        help="the port to listen on, on 127.0.0.1 (default 9000; 0 picks a free one)",
    )
    p.set_defaults(func=echo)
