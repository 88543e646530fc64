"""optimize free-memory on this machine: the page cache really dropped, Ollama's models
unloaded through its API (a stand-in on 127.0.0.1), nothing deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterctl.config import Config, OllamaConfig, PathsConfig
from clusterctl.optimize.emergency import free_memory
from tests.fakes.ollama import FakeOllama, running

pytestmark = pytest.mark.integration
GIB = 2**30


def model(name: str, size: int, vram: int) -> dict[str, object]:
    return {"name": name, "model": name, "size": size, "size_vram": vram,
            "digest": "0" * 64, "expires_at": "2026-11-23T01:00:00Z"}


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping the page cache needs root")


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_free_memory_drops_the_page_cache_and_unloads_without_deleting(
        root_only: None, tmp_path: Path) -> None:
    cached = tmp_path / "cached.bin"  # 256 MiB of page cache that is clean after sync
    with cached.open("wb") as handle:
        for _ in range(256):
            handle.write(os.urandom(2**20))
    subprocess.run(["cat", str(cached)], stdout=subprocess.DEVNULL, check=True)
    server = FakeOllama()
    server.loaded = [model("llama3.1:8b", 6 * GIB, 6 * GIB), model("nomic-embed-text", GIB, 0)]
    with running(server):
        config = Config(ollama=OllamaConfig(url=server.url),
                        paths=PathsConfig(state_dir=tmp_path / "state"))
        before_cache = meminfo_kib("Cached")
        result = free_memory(config)
    assert meminfo_kib("Cached") < before_cache - 200 * 1024  # our 256 MiB went
    assert [m.name for m in result.unloaded] == ["llama3.1:8b", "nomic-embed-text"]
    unloads = [body for method, path, body in server.calls if method == "POST"]
    assert unloads == [{"model": "llama3.1:8b", "keep_alive": 0},
                       {"model": "nomic-embed-text", "keep_alive": 0}]
    assert not [c for c in server.calls if c[0] == "DELETE" or "delete" in c[1]]
    assert server.loaded == []
    assert result.steps[-2:] == ("dropped the page cache", "compacted memory")
    event = json.loads((tmp_path / "state/events.jsonl").read_text().splitlines()[-1])
    assert event["event_type"] == "memory_freed"
    assert event["unloaded"] == ["llama3.1:8b", "nomic-embed-text"]


def test_ollama_down_is_a_note_and_the_rest_still_happens(root_only: None, tmp_path: Path
                                                          ) -> None:
    config = Config(ollama=OllamaConfig(url="http://127.0.0.1:9"),
                    paths=PathsConfig(state_dir=tmp_path / "state"))
    result = free_memory(config)
    assert result.unloaded == ()
    assert result.notes[0].startswith("Ollama's models not unloaded: no answer from Ollama at "
                                      "http://127.0.0.1:9")
    assert "dropped the page cache" in result.steps


def test_the_cli_reports_mib_freed(root_only: None, tmp_path: Path) -> None:
    server = FakeOllama()
    server.loaded = [model("qwen2.5:7b", 5 * GIB, 5 * GIB)]
    conf = tmp_path / "clusterctl.toml"
    with running(server):
        conf.write_text(f'[ollama]\nurl = "{server.url}"\n[paths]\n'
                        f'state_dir = "{tmp_path / "state"}"\n')
        dry = subprocess.run([sys.executable, "-m", "clusterctl", "optimize", "free-memory",
                              "--dry-run", "--config", str(conf)], capture_output=True,
                             text=True, check=True)
        assert "would unload qwen2.5:7b" in dry.stdout
        assert server.loaded  # a dry run unloads nothing
        out = subprocess.run([sys.executable, "-m", "clusterctl", "optimize", "free-memory",
                              "--json", "--config", str(conf)], capture_output=True, text=True,
                             check=True)
    data = json.loads(out.stdout)
    assert data["unloaded"] == [{"name": "qwen2.5:7b", "size_bytes": 5 * GIB,
                                 "vram_bytes": 5 * GIB}]
    assert data["freed_mib"] == data["available_after_mib"] - data["available_before_mib"]
