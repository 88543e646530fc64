"""The README's GPU example, run as written, against the fake NVML."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.gpu import manager
from tests.conftest import H100, REPO


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### `clusterctl gpu`"):text.index("## Configuration")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_readme_example_runs(fake_nvml: ModuleType, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f'[gpu]\nmonitor_interval = 0.1\n[paths]\nstate_dir = "{tmp_path}/state"\n'
                    f'run_dir = "{tmp_path}/run"\n')
    monkeypatch.setenv("CLUSTERCTL_CONFIG", str(conf))
    monkeypatch.setattr(manager, "_manager", None)
    fake_nvml.configure({"gpus": [{**H100, "temperature": 78}]})
    exec(compile(readme_example(), "README.md", "exec"), {})  # the docs run as written
    out = capsys.readouterr().out
    assert "GPU: NVIDIA H100 80GB HBM3\nTemperature: 78°C\n" in out
    assert "State: throttled" in out
    assert "GPU throttling! Temp: 78°C" in out
    assert "Process at 50% speed" in out
    assert re.search(r"Available: \d+MB", out)
