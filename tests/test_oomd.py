"""systemd-oomd next to clusterctl: what `check` reads of it (fixture trees laid out as
Debian 12's systemd-oomd 252 package installs it) and what it says about it.

systemd-oomd re-reads SwapTotal/SwapFree every 0.15 s, so clusterctl never restarts it;
what can go wrong is the order of the two thresholds, which the finding checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from clusterctl.check.report import Finding, findings
from clusterctl.cli import app
from clusterctl.config import Config
from clusterctl.host import OomdFacts, oomd
from tests.factories import machine
from tests.hosttree import HostTree, laptop

DPKG_STATUS = """\
Package: systemd
Status: install ok installed
Priority: important
Version: 252.39-1~deb12u2
Description: system and service manager
 systemd is a system and service manager for Linux.

Package: systemd-oomd
Status: install ok installed
Priority: optional
Version: 252.39-1~deb12u2
Description: userspace out-of-memory (OOM) killer
"""
OOMD_CONF = "[OOM]\n#SwapUsedLimit=90%\n#DefaultMemoryPressureLimit=60%\n"


def debian12_oomd(tree: HostTree, *, pid: int = 812) -> HostTree:
    """systemd-oomd 252 as Debian 12's package installs and runs it."""
    return (tree.file(f"proc/{pid}/comm", "systemd-oomd\n")
            .file("var/lib/dpkg/status", DPKG_STATUS)
            .file("etc/systemd/oomd.conf", OOMD_CONF)
            .file("usr/lib/systemd/oomd.conf.d/10-oomd-defaults.conf",
                  "[OOM]\nDefaultMemoryPressureDurationSec=20s\n")
            .file("usr/lib/systemd/system/-.slice.d/10-oomd-root-slice-defaults.conf",
                  "[Slice]\nManagedOOMSwap=kill\n")
            .file("usr/lib/systemd/system/user@.service.d/10-oomd-user-service-defaults.conf",
                  "[Service]\nManagedOOMMemoryPressure=kill\n"
                  "ManagedOOMMemoryPressureLimit=50%\n"))


# -- reading -----------------------------------------------------------------------------


def test_debian_12_with_the_package_defaults(tmp_path: Path) -> None:
    facts = oomd.read_oomd(debian12_oomd(HostTree(tmp_path).system()).root)
    assert (facts.running, facts.pid) == (True, 812)
    assert (facts.version, facts.version_text) == (252, "252.39-1~deb12u2")
    assert facts.name == "systemd-oomd 252"
    # the commented line in /etc/systemd/oomd.conf is the built-in default
    assert (facts.swap_used_limit_percent, facts.swap_used_limit_file) == (90.0, None)
    # user@.service asks for memory pressure only; the root slice for swap
    assert facts.swap_kill_units == ("-.slice",)
    assert facts.watches_swap


def test_not_running_means_no_version_and_no_units_read(tmp_path: Path) -> None:
    tree = debian12_oomd(HostTree(tmp_path).system())
    (tree.root / "proc/812/comm").write_text("systemd-logind\n")
    facts = oomd.read_oomd(tree.root, run=lambda argv: pytest.fail(f"ran {argv}"))
    assert (facts.running, facts.version, facts.swap_kill_units) == (False, None, ())
    assert not facts.watches_swap


def test_swap_used_limit_follows_systemds_file_precedence(tmp_path: Path) -> None:
    root = (debian12_oomd(HostTree(tmp_path).system())
            .file("etc/systemd/oomd.conf", "[OOM]\nSwapUsedLimit=80%\n")
            .file("usr/lib/systemd/oomd.conf.d/10-a.conf", "[OOM]\nSwapUsedLimit=60%\n")
            .file("usr/lib/systemd/oomd.conf.d/50-x.conf", "[OOM]\nSwapUsedLimit=70%\n")
            .file("etc/systemd/oomd.conf.d/50-x.conf", "[OOM]\nSwapUsedLimit = 875‰\n")
            .file("etc/systemd/oomd.conf.d/60-bad.conf",
                  "[OOM]\nSwapUsedLimit=lots\n[Other]\nSwapUsedLimit=10%\n")).root
    # /etc's 50-x.conf replaces /usr/lib's, and sorts after 10-a.conf; junk is ignored
    assert oomd.swap_used_limit(root) == (87.5, "/etc/systemd/oomd.conf.d/50-x.conf")
    masked = root / "etc/systemd/oomd.conf.d/50-x.conf"
    masked.unlink()
    masked.symlink_to("/dev/null")  # masks /usr/lib's 50-x.conf too
    assert oomd.swap_used_limit(root) == (60.0, "/usr/lib/systemd/oomd.conf.d/10-a.conf")
    (root / "etc/systemd/oomd.conf.d/70-reset.conf").write_text("[OOM]\nSwapUsedLimit=\n")
    assert oomd.swap_used_limit(root) == (90.0, None)


@pytest.mark.parametrize(("value", "percent"), [
    ("90%", 90.0), ("87.5%", 87.5), ("900‰", 90.0), ("9500‱", 95.0), ("0%", 0.0),
    ("101%", None), ("90", None), ("-5%", None), ("ninety%", None)])
def test_limit_values(value: str, percent: float | None) -> None:
    assert oomd.parse_limit(value) == percent


def test_managed_oom_swap_from_unit_files_dropins_and_set_property(tmp_path: Path) -> None:
    root = (debian12_oomd(HostTree(tmp_path).system())
            # an operator turned the root slice's rule off again
            .file("etc/systemd/system/-.slice.d/90-no-oomd.conf", "[Slice]\nManagedOOMSwap=auto\n")
            # `systemctl set-property batch.slice ManagedOOMSwap=kill`
            .file("etc/systemd/system.control/batch.slice.d/50-ManagedOOMSwap.conf",
                  "# This is a drop-in unit file extension, created via \"systemctl "
                  "set-property\"\n[Slice]\nManagedOOMSwap=kill\n")
            .file("usr/lib/systemd/system/jobs.service",
                  "[Unit]\nDescription=jobs\n[Service]\nExecStart=/bin/true\n"
                  "ManagedOOMSwap=kill\n")
            .file("usr/lib/systemd/system/masked.service", "[Service]\nManagedOOMSwap=kill\n")
            .file("etc/systemd/system/masked.service.d/oomd.conf",
                  "[Service]\nManagedOOMSwap=kill\n")  # masked: it never runs
            .file("usr/lib/systemd/system/notes.service",
                  "[Unit]\nManagedOOMSwap=kill\n[Service]\nExecStart=/bin/true\n")).root
    (root / "etc/systemd/system/masked.service").symlink_to("/dev/null")
    assert oomd.swap_kill_units(root) == ("batch.slice", "jobs.service")


def test_version_from_the_binary_when_dpkg_does_not_know_it(tmp_path: Path) -> None:
    tree = debian12_oomd(HostTree(tmp_path).system())
    (tree.root / "var/lib/dpkg/status").write_text("")  # an RPM distribution, say
    binary = tree.root / "usr/lib/systemd/systemd-oomd"
    tree.file("usr/lib/systemd/systemd-oomd",
              "#!/bin/sh\necho 'systemd 255 (255.4-1ubuntu8.17)'\necho '+PAM +AUDIT'\n")
    binary.chmod(0o755)
    (tree.root / "proc/812/exe").symlink_to("/usr/lib/systemd/systemd-oomd")
    facts = oomd.read_oomd(tree.root)  # runs the script for real
    assert (facts.version, facts.version_text) == (255, "255.4-1ubuntu8.17")
    binary.write_text("#!/bin/sh\nexit 3\n")
    facts = oomd.read_oomd(tree.root)
    assert facts.running and facts.version is None


def test_odd_files_read_as_absent(tmp_path: Path) -> None:
    root = (HostTree(tmp_path).system()
            .file("proc/812/comm", "systemd-oomd\n")
            .file("etc/systemd/oomd.conf.d", "not a directory\n")).root
    (root / "proc/900/comm").mkdir(parents=True)  # a directory where a file belongs
    (root / "etc/systemd/oomd.conf").write_bytes(b"[OOM]\n\xff\xfe\nSwapUsedLimit=95%\n")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").mkdir()
    facts = oomd.read_oomd(root, run=lambda argv: None)
    assert (facts.pid, facts.version, facts.swap_used_limit_percent) == (812, None, 95.0)


# -- the finding -------------------------------------------------------------------------

CONFIG = Config()


def watching(limit: float = 90.0, *, file: str | None = None,
             units: tuple[str, ...] = ("-.slice",), pid: int | None = 812) -> OomdFacts:
    return OomdFacts(pid, 252, "252.39-1~deb12u2", limit, file, units)


def oomd_findings(facts: OomdFacts | None, config: Config = CONFIG) -> list[Finding]:
    host = dataclasses.replace(machine(cores=8, memtotal_kib=32_000_000), oomd=facts)
    return [f for f in findings(host, config) if f.code.startswith("swap.oomd")]


def with_free_threshold(percent: int) -> Config:
    return dataclasses.replace(CONFIG, swap=dataclasses.replace(
        CONFIG.swap, free_threshold_percent=percent))


def test_default_thresholds_grow_before_oomd_kills() -> None:
    (finding,) = oomd_findings(watching())
    assert finding.severity == "info" and finding.code == "swap.oomd"
    assert finding.message.startswith(
        "systemd-oomd 252 kills the cgroup using the most swap in every cgroup (-.slice) "
        "once memory and swap are both more than 90% used; clusterctl grows swap before "
        "that (under 15% free)")
    assert "nothing needs restarting" in finding.message
    assert finding.fix and "ManagedOOMPreference=avoid" in finding.fix


def test_a_free_threshold_at_or_below_oomds_margin_is_a_warning_with_the_fix() -> None:
    (finding,) = oomd_findings(watching(), with_free_threshold(10))
    assert finding.severity == "warn" and finding.code == "swap.oomd_first"
    assert finding.message.endswith("clusterctl grows swap only once less than 10% of it is "
                                    "free, so systemd-oomd can kill first")
    assert finding.fix and finding.fix.startswith("clusterctl config set swap.free_threshold 15")
    # the fix it gives clears it
    assert [f.code for f in oomd_findings(watching(), with_free_threshold(15))] == ["swap.oomd"]


def test_a_lowered_swap_used_limit_is_named_with_its_file() -> None:
    (finding,) = oomd_findings(watching(80.0, file="/etc/systemd/oomd.conf.d/50-x.conf",
                                        units=("batch.slice", "jobs.service")))
    assert finding.code == "swap.oomd_first"  # 15 % free is after 80 % used
    assert ("in batch.slice, jobs.service once memory and swap are both more than 80% used "
            "(SwapUsedLimit= in /etc/systemd/oomd.conf.d/50-x.conf)") in finding.message
    assert finding.fix and finding.fix.startswith("clusterctl config set swap.free_threshold 25")


def test_no_finding_when_oomd_does_not_act_on_swap() -> None:
    assert oomd_findings(None) == []  # unreadable
    assert oomd_findings(watching(pid=None)) == []  # not running
    assert oomd_findings(watching(units=())) == []  # runs, but no ManagedOOMSwap=kill


# -- through `clusterctl check` ------------------------------------------------------------


def check_json(root: Path, conf: Path) -> dict[str, object]:
    result = CliRunner().invoke(app, ["check", "--json", "--root", str(root),
                                      "--config", str(conf)])
    assert result.exit_code in (0, 1), result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def codes_of(data: dict[str, object]) -> dict[str, str]:
    found = data["findings"]
    assert isinstance(found, list)
    return {f["code"]: f["message"] for f in found}


def test_check_on_a_node_running_oomd(tmp_path: Path, conf: Path, fake_nvml: ModuleType
                                      ) -> None:
    fake_nvml.configure({"init_error": 12})
    root = debian12_oomd(laptop(tmp_path / "host")).root
    found = codes_of(check_json(root, conf))
    assert found["swap.oomd"].startswith("systemd-oomd 252 kills the cgroup using the most swap")
    conf.write_text(conf.read_text() + "[swap]\nfree_threshold = 5\n")
    assert "swap.oomd_first" in codes_of(check_json(root, conf))


def test_check_goes_on_when_oomd_cannot_be_read(tmp_path: Path, conf: Path,
                                                fake_nvml: ModuleType,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml.configure({"init_error": 12})
    root = debian12_oomd(laptop(tmp_path / "host")).root

    def broken(root: Path) -> OomdFacts:
        raise OSError(5, os.strerror(5))

    monkeypatch.setattr("clusterctl.host.read_oomd", broken)
    data = check_json(root, conf)
    assert data["tier"] and not any(c.startswith("swap.oomd") for c in codes_of(data))
