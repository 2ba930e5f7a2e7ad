"""TLS config errors: a missing, broken or mismatched certificate or key, a CA
file that is not one, settings that cannot work together. Each is a field
error naming the file, from ``parse_config`` (start, reload) and from
``triogate check-config`` / ``triogate serve`` (the real executable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers_process import run_cli, write_config
from tests.helpers_tls import Certs, make_certs
from triogate.config import parse_config
from triogate.dataplane.tls import peer_subject
from triogate.errors import ConfigError


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def errors_of(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    return {e.path: e.message for e in info.value.errors}


def server(tls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"server": {"tls": tls, **extra}}


def test_a_good_tls_table_loads(certs: Certs) -> None:
    config = parse_config(
        server({"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}), environ={}
    )
    assert config.server.tls is not None
    assert config.server.tls.handshake_timeout_seconds == 10.0
    assert config.server.tls.client_cert == "none"
    assert parse_config({}, environ={}).server.tls is None


def test_a_missing_certificate_file_is_named(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    errors = errors_of(server({"cert_file": str(missing), "key_file": str(certs.key_file)}))
    assert str(missing) in errors["server.tls.cert_file"]
    assert "no such file" in errors["server.tls.cert_file"]


def test_a_missing_key_file_is_named(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    errors = errors_of(server({"cert_file": str(certs.cert_file), "key_file": str(missing)}))
    assert str(missing) in errors["server.tls.key_file"]


def test_a_file_that_is_no_certificate(certs: Certs, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    errors = errors_of(server({"cert_file": str(junk), "key_file": str(certs.key_file)}))
    assert str(junk) in errors["server.tls.cert_file"]
    assert "not a PEM certificate" in errors["server.tls.cert_file"]


def test_a_key_that_does_not_match_the_certificate(certs: Certs, tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other")
    errors = errors_of(server({"cert_file": str(certs.cert_file), "key_file": str(other.key_file)}))
    message = errors["server.tls.key_file"]
    assert str(other.key_file) in message
    assert "does not match" in message and str(certs.cert_file) in message


def test_client_certificates_need_a_ca(certs: Certs, tmp_path: Path) -> None:
    base = {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}
    errors = errors_of(server({**base, "client_cert": "required"}))
    assert "client_ca_file" in errors["server.tls.client_ca_file"]
    missing = tmp_path / "ca-missing.pem"
    errors = errors_of(server({**base, "client_cert": "optional", "client_ca_file": str(missing)}))
    assert str(missing) in errors["server.tls.client_ca_file"]
    errors = errors_of(server({**base, "client_cert": "sometimes"}))
    assert "server.tls.client_cert" in errors


def test_tls_is_the_native_listeners(certs: Certs) -> None:
    tls = {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}
    errors = errors_of(server(tls, proxy_server="hypercorn"))
    assert "native" in errors["server.tls"]


def upstream(**table: Any) -> dict[str, Any]:
    return {
        "upstreams": {"secure": table},
        "routes": [{"name": "r", "path": "/", "upstream": "secure"}],
    }


def test_https_upstreams_load(certs: Certs) -> None:
    config = parse_config(
        upstream(targets=["https://127.0.0.1:8443"], ca_file=str(certs.ca_file)), environ={}
    )
    assert config.upstreams["secure"].verify is True
    parse_config(upstream(targets=["https://example.com/base"]), environ={})
    parse_config(upstream(targets=["https://127.0.0.1:1"], verify=False), environ={})


def test_upstream_tls_errors(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    errors = errors_of(upstream(targets=["https://127.0.0.1:8443"], ca_file=str(missing)))
    assert str(missing) in errors["upstreams.secure.ca_file"]
    errors = errors_of(upstream(targets=["https://127.0.0.1:8443"], ca_file=str(certs.key_file)))
    assert str(certs.key_file) in errors["upstreams.secure.ca_file"]
    # TLS settings on an upstream without an https target are a mistake.
    errors = errors_of(upstream(targets=["http://127.0.0.1:8080"], verify=False))
    assert "https" in errors["upstreams.secure"]
    errors = errors_of(upstream(targets=["ftp://127.0.0.1:21"]))
    assert any(path.startswith("upstreams.secure.targets") for path in errors)


def test_check_config_and_serve_name_the_bad_file(certs: Certs, tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other")
    path = write_config(tmp_path / "tls.toml", tmp_path / "data")
    path.write_text(
        path.read_text()
        + f'\n[server.tls]\ncert_file = "{certs.cert_file}"\nkey_file = "{other.key_file}"\n'
    )
    checked = run_cli("check-config", str(path))
    assert checked.returncode != 0
    assert "server.tls.key_file" in checked.stderr + checked.stdout
    assert str(other.key_file) in checked.stderr + checked.stdout
    served = run_cli("serve", "-c", str(path), timeout=60)
    assert served.returncode != 0
    assert str(other.key_file) in served.stderr + served.stdout
    assert "Traceback" not in served.stderr


class _FakeTLS:
    def __init__(self, cert: dict[str, Any] | None) -> None:
        self.cert = cert

    def getpeercert(self) -> dict[str, Any] | None:
        return self.cert


def test_peer_subject_is_rfc4514() -> None:
    subject = (
        (("countryName", "FR"),),
        (("organizationName", "Acme, Inc."),),
        (("commonName", "#bob"), ("userId", "b=1")),
    )
    assert peer_subject(_FakeTLS({"subject": subject})) == (  # type: ignore[arg-type]
        "CN=\\#bob+UID=b\\=1,O=Acme\\, Inc.,C=FR"
    )
    assert peer_subject(_FakeTLS({})) is None  # type: ignore[arg-type]
    assert peer_subject(_FakeTLS(None)) is None  # type: ignore[arg-type]


def test_serve_with_hypercorn_refuses_a_tls_config(certs: Certs, tmp_path: Path) -> None:
    """``serve --server hypercorn`` over a config with ``[server.tls]`` must
    not serve plain HTTP where HTTPS was asked for."""
    path = write_config(tmp_path / "tls.toml", tmp_path / "data")
    path.write_text(
        path.read_text()
        + f'\n[server.tls]\ncert_file = "{certs.cert_file}"\nkey_file = "{certs.key_file}"\n'
    )
    served = run_cli("serve", "-c", str(path), "--server", "hypercorn", timeout=60)
    assert served.returncode != 0
    assert "server.tls" in served.stderr + served.stdout
    assert "Traceback" not in served.stderr
