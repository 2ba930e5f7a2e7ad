"""TLS test material: a private CA (trustme) and its certificates as PEM files,
client contexts that trust it, and a real https upstream (stdlib ``ssl`` in
threads) that counts its connections and handshakes."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import trustme
except ImportError as exc:  # pragma: no cover - a setup problem, named
    raise ImportError("the TLS tests need trustme: pip install 'triogate[test]'") from exc

__all__ = ["Certs", "TLSUpstream", "make_certs", "tls_upstream"]


@dataclass(frozen=True)
class Certs:
    """A CA and what it signed, written under one directory."""

    ca: trustme.CA
    ca_file: Path  # the CA's certificate (trust it to verify the others)
    cert_file: Path  # a server certificate for 127.0.0.1 and localhost (chain)
    key_file: Path
    client_cert_file: Path  # a client certificate: CN=alice, OU=Dev, O=Example
    client_key_file: Path

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            context.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return context


def make_certs(directory: Path, *, ca: trustme.CA | None = None) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca = ca or trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    server.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client = ca.issue_cert(
        "alice@example.com",
        common_name="alice",
        organization_name="Example",
        organization_unit_name="Dev",
    )
    client_cert_file = directory / "client.pem"
    client_key_file = directory / "client.key"
    client.private_key_pem.write_to_path(str(client_key_file))
    client_cert_file.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    return Certs(ca, ca_file, cert_file, key_file, client_cert_file, client_key_file)


@dataclass
class TLSUpstream:
    url: str
    connections: list[str] = field(default_factory=list)  # one entry per accepted connection
    seen: list[dict[str, str]] = field(default_factory=list)  # each request's headers


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    upstream: TLSUpstream

    def do_GET(self) -> None:
        self.upstream.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = f"tls {self.path}".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def tls_upstream(cert_file: Path, key_file: Path) -> Iterator[TLSUpstream]:
    """An https upstream on 127.0.0.1 with the given certificate, served by
    threads; yields its URL and what it saw."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_file), str(key_file))
    state = TLSUpstream(url="")
    handler = type("Echo", (_Echo,), {"upstream": state})

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[Any, Any]:
            sock, addr = self.socket.accept()
            state.connections.append(f"{addr[0]}:{addr[1]}")
            # The handshake in the handler's thread (a failed one must not
            # stop the accept loop).
            return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that refused our certificate: expected in these tests

    server = Server(("127.0.0.1", 0), handler)
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
