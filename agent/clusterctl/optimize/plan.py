"""The optimize planner: host facts + config -> the settings, the files, and why (pure).

Dask and Ollama follow the seed's hardware table (check.report.TIERS) with the
seed's rule for Dask memory (80 % of RAM divided by the workers), bounded by what
the node really has: threads never exceed its cores, Ollama never keeps more
models loaded than fit in VRAM (or in RAM without a GPU), and on a node without a
GPU the RAM Ollama's models take is kept out of Dask's share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from clusterctl.check.report import TierProfile, tier_profile
from clusterctl.config import Config
from clusterctl.units import GIB, format_size

Group = Literal["sysctl", "dask", "ollama"]

SYSCTL_FILE = "/etc/sysctl.d/90-clusterctl.conf"
DASK_ENV_FILE = "/etc/clusterctl/dask-worker.env"
DASK_YAML_FILE = "/etc/dask/clusterctl.yaml"
OLLAMA_DROPIN = "/etc/systemd/system/ollama.service.d/50-clusterctl.conf"
DASK_UNIT = "clusterctl-dask-worker.service"
OLLAMA_UNIT = "ollama.service"
SYSCTL_KEYS = ("vm.swappiness", "vm.vfs_cache_pressure")
GB = 1000**3  # Dask reads "3GB" as 3 * 10**9 bytes
HEADER = "# Written by `clusterctl optimize apply`; `clusterctl optimize revert` removes it.\n"


@dataclass(frozen=True)
class SysctlOverride:
    """A file that systemd-sysctl reads after ours and that sets the same key."""

    key: str
    path: str
    value: str


@dataclass(frozen=True)
class OptimizeFacts:
    logical_cores: int
    ram_bytes: int
    swap_media: Literal["ssd", "hdd"] | None  # the disk under the swap dir
    gpu_vram_bytes: tuple[int, ...]  # per GPU that NVML reports (lost ones left out)
    ollama_installed: bool
    dask_installed: bool
    sysctl_live: dict[str, str | None]  # /proc/sys now; None where the kernel lacks it
    sysctl_overrides: tuple[SysctlOverride, ...]
    ollama_env: dict[str, str]  # OLLAMA_* in ollama.service's drop-ins now
    files_now: dict[str, str | None]  # our files' content now; None: absent


@dataclass(frozen=True)
class Setting:
    group: Group
    key: str
    value: str
    current: str | None  # in effect now; None: not set (the program's default)
    reason: str
    applied_by: str | None  # the file that carries it; None: advice only

    @property
    def changes(self) -> bool:
        return self.applied_by is not None and self.current != self.value


@dataclass(frozen=True)
class PlannedFile:
    path: str
    content: str
    restarts: str | None  # the unit to restart (if active) when this file changes


@dataclass(frozen=True)
class OptimizePlan:
    tier: str
    settings: tuple[Setting, ...]
    files: tuple[PlannedFile, ...]
    sysctl: dict[str, str]  # live values to set
    skipped: tuple[str, ...]  # parts left out, and why
    overridden: tuple[SysctlOverride, ...]

    def setting(self, key: str) -> Setting:
        return next(s for s in self.settings if s.key == key)


def plan(facts: OptimizeFacts, config: Config) -> OptimizePlan:
    profile = tier_profile(facts.logical_cores, facts.ram_bytes)
    settings: list[Setting] = []
    files: list[PlannedFile] = []
    skipped: list[str] = []
    sysctl = _sysctl(facts, config, settings, skipped)
    if sysctl:
        body = "".join(f"{k} = {v}\n" for k, v in sysctl.items())
        files.append(PlannedFile(SYSCTL_FILE, HEADER + body, None))
    ollama = _ollama(facts, config, profile)
    if facts.ollama_installed:
        settings += ollama
        env = "".join(f'Environment="{s.key}={s.value}"\n' for s in ollama if s.applied_by)
        files.append(PlannedFile(OLLAMA_DROPIN, HEADER + "[Service]\n" + env, OLLAMA_UNIT))
    else:
        skipped.append("ollama: not installed (no ollama binary or ollama.service)")
    if facts.dask_installed:
        dask = _dask(facts, config, profile, ollama)
        settings += dask
        env = "".join(f"{s.key}={s.value}\n" for s in dask if s.applied_by == DASK_ENV_FILE)
        files.append(PlannedFile(DASK_ENV_FILE, HEADER + env, DASK_UNIT))
        files.append(PlannedFile(DASK_YAML_FILE, HEADER + _dask_yaml(config), DASK_UNIT))
    else:
        skipped.append("dask: not installed (no distributed package found)")
    return OptimizePlan(profile.tier, tuple(settings), tuple(files), sysctl, tuple(skipped),
                        facts.sysctl_overrides)


# -- sysctl ------------------------------------------------------------------------


def _sysctl(facts: OptimizeFacts, config: Config, settings: list[Setting],
            skipped: list[str]) -> dict[str, str]:
    opt = config.optimize
    ssd = facts.swap_media == "ssd"
    disk = {"ssd": "an SSD", "hdd": "a rotating disk"}.get(facts.swap_media or "",
                                                          "a disk of unknown type (as HDD)")
    wanted = {"vm.swappiness": opt.swappiness_ssd if ssd else opt.swappiness_hdd,
              "vm.vfs_cache_pressure": opt.cache_pressure_ssd if ssd else opt.cache_pressure_hdd}
    overrides = {o.key: o for o in facts.sysctl_overrides}
    out = {}
    for key, value in wanted.items():
        current = facts.sysctl_live.get(key)
        if current is None:
            skipped.append(f"{key}: this kernel has no /proc/sys/{key.replace('.', '/')}")
            continue
        if key in overrides:
            o = overrides[key]
            settings.append(Setting("sysctl", key, str(value), current,
                                    f"left alone: {o.path} sets {o.value} and wins at boot",
                                    None))
            continue
        out[key] = str(value)
        settings.append(Setting("sysctl", key, str(value), current,
                                f"swap dir on {disk}", SYSCTL_FILE))
    return out


# -- Ollama ------------------------------------------------------------------------


def _ollama(facts: OptimizeFacts, config: Config, profile: TierProfile) -> list[Setting]:
    vram = facts.gpu_vram_bytes
    model = config.optimize.ollama_model_size_bytes
    env = facts.ollama_env
    if vram:
        fit = sum(v // model for v in vram)
        where = f"{len(vram)} GPU(s), {format_size(min(vram))} VRAM each"
    else:
        fit = int(facts.ram_bytes // 2 // model)  # CPU inference: models in RAM, half of it
        where = f"no GPU: models in RAM ({format_size(facts.ram_bytes)})"
    per_gpu = max(1, len(vram))
    models = max(1, min(profile.ollama_models * per_gpu, fit))
    smallest = min(vram) if vram else 0
    parallel = 4 if smallest >= 48 * GIB else 2 if smallest >= 16 * GIB else 1
    tight = not vram and facts.ram_bytes < 16 * GIB
    keep_alive = "30m" if smallest >= 24 * GIB else "2m" if tight else "5m"
    layers = profile.ollama_layers if vram else 0
    return [
        Setting("ollama", "OLLAMA_MAX_LOADED_MODELS", str(models),
                env.get("OLLAMA_MAX_LOADED_MODELS"),
                f"{profile.tier} tier: {profile.ollama_models} per GPU; "
                f"{fit} of {format_size(model)} fit ({where})", OLLAMA_DROPIN),
        Setting("ollama", "OLLAMA_NUM_PARALLEL", str(parallel), env.get("OLLAMA_NUM_PARALLEL"),
                "each parallel request needs its own context memory: 1 below 16G of VRAM, "
                "2 from 16G, 4 from 48G", OLLAMA_DROPIN),
        Setting("ollama", "OLLAMA_KEEP_ALIVE", keep_alive, env.get("OLLAMA_KEEP_ALIVE"),
                "memory is tight: unload idle models sooner" if tight else
                "VRAM to spare: keep models warm" if keep_alive == "30m" else
                "Ollama's default", OLLAMA_DROPIN),
        Setting("ollama", "num_gpu", str(layers), None,
                f"{profile.tier} tier: {layers} layers on the GPU (a model parameter: "
                "set it in a Modelfile or per request)" if vram else
                "no GPU: every layer on the CPU", None),
    ]


# -- Dask --------------------------------------------------------------------------


def _dask(facts: OptimizeFacts, config: Config, profile: TierProfile,
          ollama: list[Setting]) -> list[Setting]:
    opt = config.optimize
    env = parse_env(facts.files_now.get(DASK_ENV_FILE) or "")
    yaml_now = facts.files_now.get(DASK_YAML_FILE) == HEADER + _dask_yaml(config)
    cores = max(1, facts.logical_cores)
    workers = max(1, min(profile.dask_workers, cores))
    threads = max(1, min(profile.dask_threads, math.ceil(cores / workers)))
    reserve = 0
    if facts.ollama_installed and not facts.gpu_vram_bytes:
        models = int(next(s for s in ollama if s.key == "OLLAMA_MAX_LOADED_MODELS").value)
        reserve = models * opt.ollama_model_size_bytes
    share = opt.dask_memory_fraction * max(0, facts.ram_bytes - reserve)
    # in steps of 0.5 GB (Dask's decimal units), never below 0.5 GB
    limit_gb = max(0.5, math.floor(share / workers / GB * 2) / 2)
    limit = f"{limit_gb:g}GB"
    why_limit = (f"{opt.dask_memory_fraction:.0%} of RAM ({format_size(facts.ram_bytes)}"
                 + (f" less {format_size(reserve)} for Ollama's models" if reserve else "")
                 + f") / {workers} workers, in 0.5GB steps")
    return [
        Setting("dask", "DASK_SCHEDULER_ADDRESS", opt.dask_scheduler,
                env.get("DASK_SCHEDULER_ADDRESS"), "[optimize] dask_scheduler", DASK_ENV_FILE),
        Setting("dask", "DASK_NWORKERS", str(workers), env.get("DASK_NWORKERS"),
                f"{profile.tier} tier: {profile.dask_workers} workers"
                + (f", at most one per core ({cores})" if workers < profile.dask_workers else ""),
                DASK_ENV_FILE),
        Setting("dask", "DASK_NTHREADS", str(threads), env.get("DASK_NTHREADS"),
                f"{profile.tier} tier: {profile.dask_threads} threads per worker"
                + (f", {cores} cores for {workers} workers" if threads < profile.dask_threads
                   else ""),
                DASK_ENV_FILE),
        Setting("dask", "DASK_MEMORY_LIMIT", limit, env.get("DASK_MEMORY_LIMIT"), why_limit,
                DASK_ENV_FILE),
        *(Setting("dask", f"distributed.worker.memory.{name}", f"{value:g}",
                  f"{value:g}" if yaml_now else None,
                  f"[optimize] dask_{name}", DASK_YAML_FILE)
          for name, value in (("target", opt.dask_target), ("spill", opt.dask_spill),
                              ("pause", opt.dask_pause), ("terminate", opt.dask_terminate))),
    ]


def _dask_yaml(config: Config) -> str:
    opt = config.optimize
    return ("distributed:\n  worker:\n    memory:\n"
            f"      target: {opt.dask_target:g}\n      spill: {opt.dask_spill:g}\n"
            f"      pause: {opt.dask_pause:g}\n      terminate: {opt.dask_terminate:g}\n")


def parse_env(text: str) -> dict[str, str]:
    """KEY=value lines (an EnvironmentFile); comments and blank lines skipped."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip().strip('"')
    return out
