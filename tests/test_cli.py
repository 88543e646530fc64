"""The command line through typer's runner (in-process), fake NVML at the boundary."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from tests.conftest import H100, HOSTS, REPO
from tests.hosttree import HostTree, gpu_server

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_version() -> None:
    code, out, _ = invoke("--version")
    assert code == 0 and out.startswith("clusterctl 0.")


def test_help_lists_the_commands() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    assert "check" in out and "config" in out


# -- check ----------------------------------------------------------------------


def test_check_json_on_a_two_gpu_server(tmp_path: Path, conf: Path, fake_nvml: ModuleType
                                        ) -> None:
    fake_nvml.configure({"gpus": [H100, {**H100, "uuid": "GPU-b"}]})
    root = (gpu_server(tmp_path / "host").file("proc/sys/vm/swappiness", "60\n")
            .file("proc/sys/vm/vfs_cache_pressure", "100\n")).root
    code, out, err = invoke("check", "--json", "--root", str(root), "--config", str(conf))
    assert code == 0, err
    data = json.loads(out)
    for key in ("tier", "score", "cpu", "memory", "swap", "disks", "gpus", "findings",
                "recommendations"):
        assert key in data
    assert data["tier"] == "advanced"
    assert data["cpu"]["logical_cores"] == 64
    assert [g["name"] for g in data["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    assert data["gpu_reason"] is None
    assert data["swap_dir"]["device"] == "md0" and data["swap_dir"]["media"] == "ssd"
    assert [d["name"] for d in data["disks"]] == ["nvme0n1", "nvme1n1", "sda"]
    # what `optimize apply` would set there: neither Ollama nor Dask is installed
    assert [(r["key"], r["value"], r["file"]) for r in data["recommendations"]] == [
        ("vm.swappiness", "10", "/etc/sysctl.d/90-clusterctl.conf"),
        ("vm.vfs_cache_pressure", "50", "/etc/sysctl.d/90-clusterctl.conf")]
    assert data["recommendations_skipped"] == [
        "ollama: not installed (no ollama binary or ollama.service)",
        "dask: not installed (no distributed package found)"]
    assert 0 <= data["score"] <= 100
    assert sum(p["points"] for p in data["score_parts"]) == pytest.approx(data["score"], abs=0.5)


def test_check_json_without_a_gpu_says_why(conf: Path, fake_nvml: ModuleType) -> None:
    fake_nvml.configure({"init_error": 12})
    code, out, _ = invoke("check", "--json", "--root", str(HOSTS / "ci-vm"),
                          "--config", str(conf))
    data = json.loads(out)
    assert code == 0
    assert data["gpus"] == []
    assert data["gpu_reason"] == "no NVIDIA driver: libnvidia-ml.so.1 was not found"
    assert data["tier"] == "basic"  # 2 cores
    assert data["swap"]["areas"] == []


def test_check_human_report(conf: Path, fake_nvml: ModuleType) -> None:
    fake_nvml.configure({"init_error": 12})
    code, out, _ = invoke("check", "--root", str(HOSTS / "ci-vm-zram"), "--config", str(conf))
    assert code == 0
    assert out.startswith("ci-vm-zram: tier basic, score ")
    assert "/dev/zram0 1024M prio 100" in out
    assert ("Recommended for the basic tier: what `clusterctl optimize apply` would set "
            "(* differs from now)\n") in out
    # what `optimize` would set there: nothing (a tree without /proc/sys, no Ollama, no Dask)
    assert "skipped vm.swappiness: this kernel has no /proc/sys/vm/swappiness\n" in out
    assert "skipped dask: not installed (no distributed package found)\n" in out
    assert "WARN swap dir /var/lib/clusterctl/swap (ext4 on /) is on a rotating disk" in out
    assert "fix: set [swap] dir to a filesystem on an SSD or NVMe disk" in out


def test_check_exits_1_below_the_minimum(tmp_path: Path, conf: Path, fake_nvml: ModuleType
                                         ) -> None:
    root = (HostTree(tmp_path).system()
            .file("proc/cpuinfo", "processor\t: 0\nmodel name\t: tiny\n\n")
            .file("proc/meminfo", "MemTotal: 1000000 kB\nMemFree: 500000 kB\n"
                  "MemAvailable: 600000 kB\n")
            .mount("/", "tmpfs", "0:30", "tmpfs")).root
    code, out, _ = invoke("check", "--root", str(root), "--config", str(conf))
    assert code == 1
    assert "below the minimum" in out
    assert "FAIL 1 CPU core(s); at least 2 needed" in out
    assert "FAIL swap dir /var/lib/clusterctl/swap (tmpfs on /) cannot hold swap files" in out


def test_check_full_runs_the_write_test_on_the_swap_dir_filesystem(
        tmp_path: Path, fake_nvml: ModuleType) -> None:
    root = (HostTree(tmp_path / "host").system().sample("laptop")
            .disk("nvme0n1", "259:0", rotational=0, partitions={"nvme0n1p2": "259:2"})
            .mount("/", "ext4", "259:2", "/dev/nvme0n1p2")).root
    swap_dir = root / "var/lib/clusterctl/swap"
    swap_dir.mkdir(parents=True)
    conf = tmp_path / "c.toml"
    conf.write_text('[ollama]\nurl = "http://127.0.0.1:9"\n')
    code, out, err = invoke("check", "full", "--json", "--root", str(root), "--config", str(conf))
    assert code == 0, err
    data = json.loads(out)
    assert data["mode"] == "full"
    test = data["write_test"]
    assert test["size_bytes"] == 256 * 2**20 and test["bytes_per_s"] > 0
    assert test["directory"] == str(swap_dir)
    assert list(swap_dir.iterdir()) == []
    storage = next(p for p in data["score_parts"] if p["name"] == "storage")
    assert "measured" in storage["detail"]


def test_check_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[swap]\nmin_size = "64G"\n')
    code, out, err = invoke("check", "--config", str(bad))
    assert code == 2
    assert out == ""
    assert err == (f"clusterctl: {bad}:2: swap.min_size: min_size (64G) is larger than "
                   "max_size (16G); make min_size <= max_size\n")


def test_unknown_check_mode_is_a_usage_error() -> None:
    code, _, err = invoke("check", "fast")
    assert code == 2
    assert "fast" in err


# -- config ---------------------------------------------------------------------


def test_config_path_by_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = invoke("config", "path", "--json")
    assert code == 0 and json.loads(out)["source"] == "default"
    monkeypatch.setenv("CLUSTERCTL_CONFIG", str(tmp_path / "env.toml"))
    data = json.loads(invoke("config", "path", "--json")[1])
    assert data == {"path": str(tmp_path / "env.toml"), "source": "CLUSTERCTL_CONFIG",
                    "exists": False}
    _, out, _ = invoke("config", "path", "--config", str(REPO / "etc/clusterctl.toml"))
    assert out == f"{REPO / 'etc/clusterctl.toml'} (named by --config)\n"


def test_config_show_human_is_toml_with_its_source(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[swap]\nmax_size = "32G"\n')
    code, out, _ = invoke("config", "show", "--config", str(path))
    assert code == 0
    assert out.splitlines()[0] == f"# effective config: {path} (named by --config)"
    assert 'max_size = "32G"' in out
    assert 'min_size = "2G"' in out  # defaults fill in the rest
    assert "[heartbeat]" in out


def test_config_show_json(tmp_path: Path) -> None:
    code, out, _ = invoke("config", "show", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["exists"] is False
    assert data["config"]["swap"]["max_size"] == "16G"
    assert data["config"]["hibernate"]["action"] == "none"


def test_config_validate_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[swap]\ncheck_interval = -1\n[gpu]\nhistory_size = 0\n")
    code, out, err = invoke("config", "validate", "--config", str(path))
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"clusterctl: {path}:2: swap.check_interval: must be at least 1, got -1",
        f"clusterctl: {path}:4: gpu.history_size: must be at least 1, got 0",
    ]


def test_config_validate_json_and_success(tmp_path: Path) -> None:
    code, out, _ = invoke("config", "validate", "--json", "--config",
                          str(REPO / "etc/clusterctl.toml"))
    assert code == 0 and json.loads(out)["valid"] is True
    code, out, _ = invoke("config", "validate", "--config", str(REPO / "etc/clusterctl.toml"))
    assert out.endswith(": valid\n")


def test_config_set_and_dry_run(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("# operator notes\n[swap]\n")
    code, out, _ = invoke("config", "set", "swap.max_size", "8G", "--dry-run", "--config",
                          str(path))
    assert code == 0 and out == f'would set swap.max_size = "8G" in {path}\n'
    assert path.read_text() == "# operator notes\n[swap]\n"
    code, out, _ = invoke("config", "set", "swap.max_size", "8G", "--config", str(path))
    assert code == 0 and out == f'set swap.max_size = "8G" in {path}\n'
    assert path.read_text().startswith("# operator notes\n")
    code, _, err = invoke("config", "set", "swap.min_size", "9G", "--config", str(path))
    assert code == 2
    assert "min_size (9G) is larger than max_size (8G)" in err


def test_check_says_when_the_installed_swap_units_cannot_write_the_swap_dir(
        tmp_path: Path, fake_nvml: ModuleType) -> None:
    """[swap] dir outside /var/lib/clusterctl with the units installed and no drop-in:
    their steps would fail with a read-only filesystem; check names them and the fix,
    and says nothing once the drop-ins are there."""
    import shutil

    from clusterctl.system.systemd import sync_swap_dir_dropins

    root = (HostTree(tmp_path / "host").system().sample("laptop")
            .mount("/", "ext4", "259:2", "/dev/nvme0n1p2")).root
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in ("clusterctl-swap.service", "clusterctl-agent.service"):
        shutil.copy(REPO / "units" / unit, units / unit)
    conf = tmp_path / "clusterctl.toml"
    conf.write_text('[swap]\ndir = "/srv/swap"\n[ollama]\nurl = "http://127.0.0.1:9"\n')
    _, out, _ = invoke("check", "--json", "--root", str(root), "--config", str(conf))
    (blocked,) = [f for f in json.loads(out)["findings"] if f["code"] == "swap.units_blocked"]
    assert blocked["severity"] == "warn"
    assert blocked["message"].startswith("clusterctl-swap.service, clusterctl-agent.service "
                                         "cannot write the swap dir /srv/swap")
    assert blocked["fix"].startswith("clusterctl config dropins")
    sync_swap_dir_dropins(Path("/srv/swap"), root=root)
    _, out, _ = invoke("check", "--json", "--root", str(root), "--config", str(conf))
    assert "swap.units_blocked" not in [f["code"] for f in json.loads(out)["findings"]]
