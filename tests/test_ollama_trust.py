"""Whatever listens on Ollama's port, clusterctl's probes end in a result or one clear error
(issue 12): a hostile peer on 127.0.0.1 answers raw bytes, and the real functions and the
CLI (`optimize free-memory --dry-run`) are asked."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import HostError
from clusterctl.host.software import read_loaded_models, read_ollama
from clusterctl.system.memory import unload_model

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def answer(body: bytes) -> bytes:
    return OK + b"Content-Length: %d\r\n\r\n" % len(body) + body


HOSTILE = {  # what a peer that is not Ollama may send back, and what the error says
    "bad status line": (b"HELLO\r\n\r\n", "broken HTTP"),
    "header line over 64 KiB": (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                                "broken HTTP"),
    "a thousand headers": (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 1000 + b"\r\n",
                           "broken HTTP"),
    "bad chunk size": (OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "broken HTTP"),
    "size 1e400": (answer(b'{"models":[{"name":"a","size":1e400}]}'), "a size of inf"),
    "negative size": (answer(b'{"models":[{"name":"a","size_vram":-1}]}'), "a size of"),
    "deeply nested JSON": (OK + b"Connection: close\r\n\r\n" + b"[" * 100000,
                           "JSON nested too deeply"),
    "a list, not an object": (answer(b"[]"), "a list from /api/"),
    "not JSON": (answer(b"<html>hello</html>"), "not JSON from /api/"),
    "not UTF-8": (answer(b'{"models": "\xff\xfe"}'), "not JSON from /api/"),
    "over the size cap": (answer(b" " * (2 << 20) + b"{}"), "more than 1 MiB"),
    "models not a list": (answer(b'{"models": {"a": 1}}'), "models as an object"),
    "a model without a name": (answer(b'{"models": [{"size": 1}]}'), "where a model belongs"),
}


@contextlib.contextmanager
def hostile(raw: bytes) -> Iterator[str]:
    """A peer on 127.0.0.1 that reads each request and sends ``raw`` back; its URL."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                head, _, body = request.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(raw)
                conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("case", HOSTILE)
def test_loaded_models_from_a_hostile_peer_is_one_clear_error(case: str) -> None:
    raw, expected = HOSTILE[case]
    with hostile(raw) as url, pytest.raises(HostError) as caught:
        read_loaded_models(url)
    message = caught.value.one_line()
    assert message.startswith(f"Ollama at {url} answered something that is not its API: ")
    assert expected in message
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("case", HOSTILE)
def test_unloading_on_a_hostile_peer_is_one_clear_error(case: str) -> None:
    raw, _expected = HOSTILE[case]
    with hostile(raw) as url, pytest.raises(HostError) as caught:
        unload_model(url, "llama3.1:8b", timeout_s=5)
    message = caught.value.one_line()
    assert message.startswith(("llama3.1:8b not unloaded: ",
                               "Ollama did not confirm unloading llama3.1:8b"))
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("case", ["bad status line", "header line over 64 KiB",
                                  "deeply nested JSON", "a list, not an object"])
def test_the_version_probe_on_a_hostile_peer_says_not_ollama(tmp_path: Path, case: str) -> None:
    with hostile(HOSTILE[case][0]) as url:
        facts = read_ollama(tmp_path, url)
    assert not facts.running
    assert facts.api_error == f"{url} answered, but not like Ollama"


def test_an_unload_that_is_not_confirmed_is_a_clear_error() -> None:
    with hostile(answer(b'{"done": 1e400}')) as url, pytest.raises(HostError) as caught:
        unload_model(url, "m", timeout_s=5)
    assert caught.value.one_line() == "Ollama did not confirm unloading m: {'done': inf}"


def test_a_valid_answer_is_still_read() -> None:
    body = b'{"models":[{"name":"a","size":5,"size_vram":3},{"name":"b"}]}'
    with hostile(answer(body)) as url:
        models = read_loaded_models(url)
    assert [(m.name, m.size_bytes, m.vram_bytes) for m in models] == [("a", 5, 3), ("b", 0, 0)]


@pytest.mark.parametrize("case", ["bad status line", "header line over 64 KiB", "size 1e400",
                                  "deeply nested JSON", "a list, not an object"])
def test_free_memory_dry_run_with_a_hostile_peer_is_a_note_not_a_crash(tmp_path: Path,
                                                                       case: str) -> None:
    raw, expected = HOSTILE[case]
    with hostile(raw) as url:
        conf = tmp_path / "clusterctl.toml"
        conf.write_text(f'[ollama]\nurl = "{url}"\n[paths]\nstate_dir = "{tmp_path}/state"\n'
                        f'run_dir = "{tmp_path}/run"\n[swap]\ndir = "{tmp_path}/swap"\n')
        result = CliRunner().invoke(app, ["optimize", "free-memory", "--dry-run",
                                          "--config", str(conf)])
    assert result.exit_code == 0, result.stderr
    assert "internal error" not in result.stderr + result.stdout
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, result.stdout
    assert notes[0].startswith(f"note: Ollama's models not unloaded: Ollama at {url} answered "
                               "something that is not its API: ")
    assert expected in notes[0]
    assert not (tmp_path / "state").exists()
