"""The DICOMweb client against small real servers on loopback: TLS is verified (a configured CA
bundle is trusted, an unknown certificate is refused), 5xx answers are retried, and a multipart
stream is parsed part by part."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

import pytest

from gateway.web.client import DicomwebClient, DicomwebError

STUDY = [{"0020000D": {"vr": "UI", "Value": ["2.25.1"]}}]


class _Server(ThreadingHTTPServer):
    failures = 0  # requests answered 503 so far


class _Handler(BaseHTTPRequestHandler):
    fail_first = 0  # answer 503 to this many requests first

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = cast(_Server, self.server)
        if server.failures < self.fail_first:
            server.failures += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/dicom-web/studies/2.25.1/series/2.25.2"):
            body = (
                b"".join(
                    b"--B\r\nContent-Type: application/dicom\r\n\r\n" + bytes([i]) * 300 + b"\r\n"
                    for i in range(3)
                )
                + b"--B--\r\n"
            )
            ctype = 'multipart/related; type="application/dicom"; boundary=B'
        else:
            body, ctype = json.dumps(STUDY).encode(), "application/dicom+json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(handler: type, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def test_tls_is_verified_against_the_configured_bundle(certificate):
    ctx, cert = certificate
    server = serve(_Handler, ctx)
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        trusted = DicomwebClient(url, ca_bundle=str(cert), retries=0)
        assert trusted.search("studies") == STUDY
        stranger = DicomwebClient(url, retries=0)  # the system's CAs do not know this one
        with pytest.raises(DicomwebError, match="cannot be reached") as e:
            stranger.search("studies")
        assert "SSL" in str(e.value)
    finally:
        server.shutdown()


def test_5xx_is_retried_and_a_series_streams_part_by_part():
    handler = type("Flaky", (_Handler,), {"fail_first": 2})
    server = serve(handler)
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        client = DicomwebClient(url, retries=3, backoff_s=0.01)
        assert client.search("studies") == STUDY  # after two 503s
        parts = list(client.series_instances("2.25.1", "2.25.2"))
        assert [p[:1] for p in parts] == [b"\x00", b"\x01", b"\x02"] and len(parts[0]) == 300
        server.failures = -(10**9)  # from now on it always fails...
        handler.fail_first = 10**9
        with pytest.raises(DicomwebError, match="HTTP 503"):
            DicomwebClient(url, retries=1, backoff_s=0.01).search("studies")
    finally:
        server.shutdown()
