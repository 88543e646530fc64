from __future__ import annotations

import socket
from pathlib import Path

from clusterctl.host import software
from tests.conftest import HOSTS
from tests.fakes.ollama import FakeOllama, running
from tests.hosttree import HostTree, gpu_server, old_kernel


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_ci_vm_system_facts() -> None:
    facts = software.read_system(HOSTS / "ci-vm")
    assert facts.hostname == "ci-vm"
    assert facts.kernel == "6.18.44-fc-v595"
    assert (facts.systemd_booted, facts.init, facts.cgroup) == (False, "process_api", "hybrid")


def test_systemd_host_with_cgroup_v2(tmp_path: Path) -> None:
    facts = software.read_system(gpu_server(tmp_path).root)
    assert (facts.systemd_booted, facts.init, facts.cgroup) == (True, "systemd", "v2")


def test_old_kernel_has_cgroup_v1(tmp_path: Path) -> None:
    assert software.read_system(old_kernel(tmp_path).root).cgroup == "v1"


def test_ollama_answering_on_loopback(tmp_path: Path) -> None:
    tree = HostTree(tmp_path).file("usr/local/bin/ollama", "").file(
        "etc/systemd/system/ollama.service", "[Service]\n")
    with running(FakeOllama("0.5.7")) as server:
        facts = software.read_ollama(tree.root, server.url)
    assert facts.api_version == "0.5.7"
    assert facts.running and facts.installed
    assert (facts.binary, facts.unit) == ("/usr/local/bin/ollama",
                                          "/etc/systemd/system/ollama.service")
    assert server.requests == ["/api/version"]


def test_ollama_installed_but_down(tmp_path: Path) -> None:
    tree = HostTree(tmp_path).file("usr/lib/systemd/system/ollama.service", "")
    url = closed_port_url()
    facts = software.read_ollama(tree.root, url)
    assert facts.installed and not facts.running
    assert facts.unit == "/usr/lib/systemd/system/ollama.service"
    assert facts.api_error is not None and facts.api_error.startswith(f"no answer from {url}")


def test_something_else_on_the_ollama_port(tmp_path: Path) -> None:
    with running(FakeOllama(body=b"<html>hello</html>")) as server:
        facts = software.read_ollama(tmp_path, server.url)
    assert not facts.running
    assert facts.api_error == f"{server.url} answered, but not like Ollama"


def test_http_error_from_the_ollama_port(tmp_path: Path) -> None:
    with running(FakeOllama()) as server:
        facts = software.read_ollama(tmp_path, server.url + "/prefix")
    assert facts.api_error == f"HTTP 404 from {server.url}/prefix"


def test_dask_in_the_system_python(tmp_path: Path) -> None:
    tree = (HostTree(tmp_path)
            .file("usr/lib/python3/dist-packages/dask-2024.1.0.dist-info/METADATA", "")
            .file("usr/lib/python3/dist-packages/distributed-2024.1.0.dist-info/METADATA", "")
            .file("usr/bin/dask", ""))
    facts = software.read_dask(tree.root)
    assert (facts.version, facts.distributed_version) == ("2024.1.0", "2024.1.0")
    assert facts.location == "/usr/lib/python3/dist-packages"
    assert facts.worker_binary == "/usr/bin/dask"


def test_dask_in_a_venv_under_opt(tmp_path: Path) -> None:
    tree = HostTree(tmp_path).file(
        "opt/dask/venv/lib/python3.11/site-packages/dask-2025.3.0.dist-info/RECORD", "")
    facts = software.read_dask(tree.root)
    assert facts.version == "2025.3.0" and facts.distributed_version is None
    assert facts.location == "/opt/dask/venv/lib/python3.11/site-packages"


def test_no_dask(tmp_path: Path) -> None:
    assert software.read_dask(tmp_path) == software.DaskFacts(None, None, None, None)
