"""The CLI's shape: every command and argument has help text; the global
options work after the subcommand too; ``triogate bench`` lists the
benchmarks; ``triogate echo PORT`` runs the bundled echo upstream; every
admin API endpoint has its command."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers_process import clean_env, free_ports, run_cli, triogate_command
from triogate.admin.endpoints import ENDPOINTS
from triogate.runtime.cli import build_parser, main
from triogate.runtime.cli_tools import subparsers_of, walk

#: Hidden on purpose: set by the supervisor for each worker it starts.
INTERNAL = {("triogate serve", "--worker")}


def _problems() -> list[str]:
    problems = []
    for parser in walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {c.dest: c.help for c in action._choices_actions}
                # An alias (`admins` for `admin`) shares its command's parser
                # and its help line.
                by_parser = {id(action.choices[n]): helped.get(n) for n in helped}
                problems += [
                    f"{parser.prog} {name}: a command without help"
                    for name, sub in action.choices.items()
                    if not (by_parser.get(id(sub)) or "").strip()
                ]
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            if (parser.prog, name) in INTERNAL:
                continue
            text = action.help or ""
            if not text.strip() or text == argparse.SUPPRESS:
                problems.append(f"{parser.prog} {name}: an argument without help")
    return problems


def test_every_command_and_argument_has_help() -> None:
    assert _problems() == []


def test_the_walk_sees_every_command() -> None:
    """The check above looks at every level (a walk that stopped at the
    top would pass anything)."""
    progs = {p.prog for p in walk(build_parser())}
    for prog in (
        "triogate keys export",
        "triogate keys import",
        "triogate identities credits",
        "triogate admin revoke",
        "triogate config history",
        "triogate events retry",
    ):
        assert prog in progs
    leaves = [p for p in walk(build_parser()) if subparsers_of(p) is None]
    assert len(leaves) > 50


def test_a_missing_help_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = build_parser

    def with_a_bare_argument() -> argparse.ArgumentParser:
        parser = real()
        keys = subparsers_of(parser).choices["keys"]
        subparsers_of(keys).choices["get"].add_argument("--bare")
        return parser

    monkeypatch.setattr("tests.test_cli.build_parser", with_a_bare_argument)
    assert _problems() == ["triogate keys get --bare: an argument without help"]


def test_the_help_prints_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = list(walk(build_parser()))
    assert len(parsers) > 1  # the loop below checks something: the root and its commands
    for parser in parsers:
        argv = [*parser.prog.split()[1:], "--help"]
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: " + parser.prog), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "serve"],
        ["serve", "--log-level", "DEBUG"],
        ["keys", "list", "--log-level", "DEBUG"],
        ["--log-level", "DEBUG", "keys", "list"],
    ],
)
def test_the_log_level_goes_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).log_level == "DEBUG"


def test_the_log_level_after_the_subcommand_does_not_clear_the_one_before() -> None:
    args = build_parser().parse_args(["--log-level", "ERROR", "keys", "list"])
    assert args.log_level == "ERROR"
    assert build_parser().parse_args(["keys", "list"]).log_level is None


def test_a_bad_log_level_after_the_subcommand_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--log-level", "LOUD"])
    assert done.value.code == 2
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def _serve_log(tmp_path: Path, *args: str) -> str:
    """stderr of a ``triogate serve ARGS`` started and stopped again."""
    from tests.helpers_process import write_config

    cfg = write_config(tmp_path / "gw.toml", tmp_path / "data")
    err = tmp_path / f"err-{len(args)}.log"
    with err.open("wb") as sink:
        proc = subprocess.Popen(
            [*triogate_command(), "serve", "-c", str(cfg), *args],
            stdout=subprocess.PIPE,
            stderr=sink,
            env=clean_env(),
        )
    try:
        assert proc.stdout is not None
        line = ""
        for _ in range(50):  # bounded: the readiness line comes within a few lines
            line = proc.stdout.readline().decode()
            if "admin listening" in line or not line:
                break
        assert "admin listening" in line, err.read_text()
    finally:
        proc.terminate()
        proc.wait(15)
    return err.read_text()


def test_the_log_level_after_serve_reaches_the_server(tmp_path: Path) -> None:
    """``triogate serve --log-level WARNING``: the served gateway's INFO
    lines (there are some by default) are gone."""
    assert " INFO " in _serve_log(tmp_path)
    quiet = _serve_log(tmp_path, "--log-level", "WARNING")
    assert " INFO " not in quiet, quiet


def test_bench_without_a_name_lists_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    from triogate.benchmarks.__main__ import BENCHMARKS

    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert len(line.split()) > 3, line  # a sentence, not just the name
    assert "``" not in out


def test_bench_with_an_unknown_name_lists_them_and_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'nope'" in err and "validate" in err


def test_echo_serves_the_bundled_echo_upstream(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [*triogate_command(), "echo", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert f"127.0.0.1:{port}" in line, (line, proc.stderr and proc.stderr.read())
        r = httpx.get(f"http://127.0.0.1:{port}/hello?name=demo", timeout=10)
        assert r.status_code == 200
        assert r.json()["path"] == "/hello" and r.json()["query"] == "name=demo"
    finally:
        proc.terminate()
        proc.wait(15)


def test_echo_refuses_a_port_out_of_range() -> None:
    done = run_cli("echo", "70000")
    assert done.returncode == 2 and "70000" in done.stderr
    assert "Traceback" not in done.stderr


# ---- every admin action has its command ------------------------------------------

#: The admin API's endpoints and the CLI command doing the same thing.
COMMANDS = {
    "POST /setup": "admin create",  # the CLI is root on the data directory
    "POST /keys": "keys create",
    "GET /keys": "keys list",
    "POST /keys/validate": "keys validate",
    "GET /keys/{id}": "keys get",
    "PATCH /keys/{id}": "keys patch",
    "DELETE /keys/{id}": "keys revoke",
    "POST /keys/{id}/rotate": "keys rotate",
    "GET /keys/{id}/usage": "keys usage",
    "POST /admins": "admin create",
    "GET /admins": "admin list",
    "DELETE /admins/{id}": "admin revoke",
    "GET /audit": "audit list",
    "POST /maintenance/cleanup": "maintenance cleanup",
    "POST /config/reload": "config reload",
    "GET /config": "config show",
    "GET /upstreams": "upstreams",
    "GET /routes": "routes",
    "GET /health": "health",
    "GET /metrics": "metrics",
    "POST /roles": "roles create",
    "GET /roles": "roles list",
    "GET /roles/{id}": "roles get",
    "PATCH /roles/{id}": "roles patch",
    "DELETE /roles/{id}": "roles delete",
    "POST /identities": "identities create",
    "GET /identities": "identities list",
    "GET /identities/{id}": "identities get",
    "PATCH /identities/{id}": "identities patch",
    "DELETE /identities/{id}": "identities delete",
    "GET /identities/{id}/usage": "identities usage",
    "POST /plans": "plans create",
    "GET /plans": "plans list",
    "GET /plans/{id}": "plans get",
    "PATCH /plans/{id}": "plans patch",
    "DELETE /plans/{id}": "plans delete",
    "GET /keys/{id}/usage/history": "keys usage-history",
    "GET /identities/{id}/usage/history": "identities usage-history",
    "GET /cluster": "cluster",
    "POST /keys/{id}/credits": "keys credits",
    "POST /identities/{id}/credits": "identities credits",
    "GET /events/deliveries": "events list",
    "GET /events/deliveries/{id}": "events get",
    "POST /events/deliveries/{id}/retry": "events retry",
    "POST /keys/import": "keys import",
}


def test_every_admin_endpoint_has_a_command() -> None:
    """An endpoint added to the API without a command (or without a line
    here) fails: the CLI is the API's equal."""
    endpoints = {f"{e.method} {e.path}" for e in ENDPOINTS}
    # Endpoints of features other work adds (the console) name their
    # command here when they come; an unknown one is reported.
    missing = sorted(endpoints - set(COMMANDS))
    assert missing == [], f"endpoints without a CLI command: {missing}"
    progs = {p.prog for p in walk(build_parser())}
    for endpoint, command in COMMANDS.items():
        if endpoint in endpoints:
            assert f"triogate {command}" in progs, (endpoint, command)


def test_the_docs_list_every_command() -> None:
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    documented: set[str] = set()
    # `triogate roles create\|list\|get` documents roles create, list and get.
    for found in re.findall(r"`triogate ([a-z][a-z -]*[a-z](?:\\\|[a-z-]+)*)", text):
        first, *others = found.split("\\|")
        base = first.rsplit(" ", 1)[0]
        documented.update([first, *(f"{base} {other}" for other in others)])
    leaves = [p for p in walk(build_parser()) if subparsers_of(p) is None]
    assert leaves and documented  # the loop below checks something
    for parser in walk(build_parser()):
        if subparsers_of(parser) is None:
            command = parser.prog.removeprefix("triogate ")
            assert any(d == command or d.startswith(command + " ") for d in documented), command
