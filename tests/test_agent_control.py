"""The control-plane client: URL policy, TLS verification, token rules, backoff."""

from __future__ import annotations

import random
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from clusterctl.agent.control import Backoff, ControlClient, check_url, read_token
from clusterctl.config import HeartbeatConfig
from clusterctl.errors import ConfigError, HostError, TemporaryError


def test_plain_http_only_to_loopback_unless_the_operator_opts_in() -> None:
    check_url("https://control.example", False)
    check_url("http://127.0.0.1:8080", False)
    check_url("http://[::1]:8080", False)
    check_url("http://localhost:8080", False)
    with pytest.raises(ConfigError) as err:
        check_url("http://10.0.0.5:8080", False)
    assert "would cross the network in clear" in err.value.message
    assert "allow_insecure_http = true" in (err.value.fix or "")
    check_url("http://10.0.0.5:8080", True)


def test_the_token_file_must_be_root_only(tmp_path: Path) -> None:
    token = tmp_path / "token"
    assert read_token(token) is None
    token.write_text("abc\n")
    token.chmod(0o640)
    with pytest.raises(HostError) as err:
        read_token(token)
    assert err.value.one_line() == (f"token file {token} can be read by group or others "
                                    f"(mode 0640); chmod 600 {token}")
    token.chmod(0o600)
    assert read_token(token) == "abc"


def test_backoff_grows_with_jitter_and_stays_near_a_minute() -> None:
    backoff = Backoff(rng=random.Random(7))
    waits = [backoff.failed() for _ in range(12)]
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0 and 2.0 <= waits[2] <= 4.0
    assert all(30.0 <= w <= 60.0 for w in waits[7:])
    backoff.succeeded()
    assert backoff.failed() <= 1.0


def test_an_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(key), "-out", str(cert), "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                          capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {made.stderr[-200:]!r}")

    class Ok(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ControlClient(HeartbeatConfig(
            control_url=f"https://127.0.0.1:{server.server_address[1]}",
            token_file=tmp_path / "none"))
        with pytest.raises(HostError) as err:
            client.post("/api/agent/status", {})
        assert "TLS certificate not trusted" in err.value.message
    finally:
        server.shutdown()
        server.server_close()


def test_a_closed_port_is_temporary() -> None:
    client = ControlClient(HeartbeatConfig(control_url="http://127.0.0.1:9",
                                           token_file=Path("/nonexistent")))
    with pytest.raises(TemporaryError) as err:
        client.post("/api/agent/status", {})
    assert err.value.message.startswith("control plane http://127.0.0.1:9 unreachable")
