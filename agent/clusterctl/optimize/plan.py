"""The one planner for what clusterctl tunes: host facts + config -> each setting's
value, the file that carries it, and why (pure).

`clusterctl optimize plan` prints this plan, `optimize apply` writes it, and
`clusterctl check` shows the same plan as its recommendations: no other module
chooses these values.

The hardware table (``TIERS``) picks a row by cores and RAM (basic,
intermediate, advanced). The row is the **floor** the planner starts from:
DASK_NWORKERS, DASK_NTHREADS, DASK_MEMORY_LIMIT, OLLAMA_MAX_LOADED_MODELS (the
row's count per GPU) and num_gpu each start at the row's value, kept in
``Setting.floor``. From there:

- a value goes **below** its floor only when the node cannot hold the floor,
  and its reason says "lowered" and names what bound it: at most one worker
  per core; no more threads per worker than the cores over the workers,
  rounded up; a memory limit no larger than ``dask_memory_fraction`` of RAM
  (less Ollama's models on a node without a GPU) over the workers, in 0.5GB
  steps and never under 0.5GB; no more models than fit in VRAM (or in half
  the RAM without a GPU); no GPU layers without a GPU;
- a value goes **above** its floor ("raised") only where it is a share of
  what the node has: the memory limit is the RAM share per worker (so a node
  with more RAM than its row assumes gives each worker more), and the model
  count grows with the GPUs. More cores never add workers or threads beyond
  the row.

The other settings have no floor: the sysctls follow the disk under the swap
dir, OLLAMA_NUM_PARALLEL and OLLAMA_KEEP_ALIVE the VRAM, the Dask thresholds
the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from clusterctl.config import Config
from clusterctl.units import GIB, format_size

Group = Literal["sysctl", "dask", "ollama"]
Tier = Literal["basic", "intermediate", "advanced"]

SYSCTL_FILE = "/etc/sysctl.d/90-clusterctl.conf"
DASK_ENV_FILE = "/etc/clusterctl/dask-worker.env"
DASK_YAML_FILE = "/etc/dask/clusterctl.yaml"
OLLAMA_DROPIN = "/etc/systemd/system/ollama.service.d/50-clusterctl.conf"
DASK_UNIT = "clusterctl-dask-worker.service"
OLLAMA_UNIT = "ollama.service"
SYSCTL_KEYS = ("vm.swappiness", "vm.vfs_cache_pressure")
GB = 1000**3  # Dask reads "3GB" as 3 * 10**9 bytes
HEADER = "# Written by `clusterctl optimize apply`; `clusterctl optimize revert` removes it.\n"

# A "16 GB" machine shows about 15.5 GiB of MemTotal (firmware and kernel
# reservations): RAM counts as N GiB when MemTotal reaches 90 % of it.
RAM_TOLERANCE = 0.9


@dataclass(frozen=True)
class TierProfile:
    """One row of the hardware table: where the planner starts (the floor)."""

    tier: Tier
    min_cores: int
    min_ram_gib: int
    dask_workers: int
    dask_threads: int
    memory_limit_gb: float  # per Dask worker, in Dask's decimal GB
    ollama_layers: int  # num_gpu: a model's layers on the GPU
    ollama_models: int  # loaded at once, per GPU

    @property
    def memory_limit(self) -> str:
        return f"{self.memory_limit_gb:g}GB"


TIERS: tuple[TierProfile, ...] = (
    TierProfile("advanced", 8, 16, 6, 2, 4, 35, 3),
    TierProfile("intermediate", 4, 8, 4, 2, 3, 20, 2),
    TierProfile("basic", 0, 0, 2, 1, 1.5, 10, 1),
)


def ram_counts_as(total_bytes: int, gib: float) -> bool:
    return total_bytes >= RAM_TOLERANCE * gib * GIB


def tier_profile(logical_cores: int, ram_bytes: int) -> TierProfile:
    """Basic (2-4 cores, 4-8 GB), intermediate (4-8, 8-16), advanced (8+, 16+)."""
    for profile in TIERS:
        if logical_cores >= profile.min_cores and ram_counts_as(ram_bytes, profile.min_ram_gib):
            return profile
    return TIERS[-1]


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
    floor: str | None = None  # the tier row's value it starts from; None: not in the table

    @property
    def changes(self) -> bool:
        return self.applied_by is not None and self.current != self.value


def setting_dict(s: Setting) -> dict[str, Any]:
    """One setting as `optimize plan --json` and `check --json` both print it."""
    return {"group": s.group, "key": s.key, "value": s.value, "current": s.current,
            "changes": s.changes, "file": s.applied_by, "floor": s.floor, "reason": s.reason}


@dataclass(frozen=True)
class PlannedFile:
    path: str
    content: str
    restarts: str | None  # the unit to restart (if active) when this file changes


@dataclass(frozen=True)
class OptimizePlan:
    tier: Tier
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


def _from_floor(profile: TierProfile, floor: str, value: float, floor_value: float,
                bound: str) -> str:
    """"basic tier floor 2", and why the value left it (``bound``) when it did."""
    start = f"{profile.tier} tier floor {floor}"
    if value < floor_value:
        return f"{start}, lowered: {bound}"
    if value > floor_value:
        return f"{start}, raised: {bound}"
    return start


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
    floor_models = profile.ollama_models * max(1, len(vram))
    models = max(1, min(floor_models, fit))
    per_gpu = (f"{profile.ollama_models} per GPU x {len(vram)}" if len(vram) > 1
               else _count(profile.ollama_models, "model"))
    fits = f"{fit} of {format_size(model)} fit ({where})"
    smallest = min(vram) if vram else 0
    parallel = 4 if smallest >= 48 * GIB else 2 if smallest >= 16 * GIB else 1
    tight = not vram and facts.ram_bytes < 16 * GIB
    keep_alive = "30m" if smallest >= 24 * GIB else "2m" if tight else "5m"
    layers = profile.ollama_layers if vram else 0
    return [
        Setting("ollama", "OLLAMA_MAX_LOADED_MODELS", str(models),
                env.get("OLLAMA_MAX_LOADED_MODELS"),
                _from_floor(profile, per_gpu, models, floor_models, f"only {fits}")
                if models < floor_models else f"{profile.tier} tier floor {per_gpu}; {fits}",
                OLLAMA_DROPIN, floor=str(floor_models)),
        Setting("ollama", "OLLAMA_NUM_PARALLEL", str(parallel), env.get("OLLAMA_NUM_PARALLEL"),
                "each parallel request needs its own context memory: 1 below 16G of VRAM, "
                "2 from 16G, 4 from 48G", OLLAMA_DROPIN),
        Setting("ollama", "OLLAMA_KEEP_ALIVE", keep_alive, env.get("OLLAMA_KEEP_ALIVE"),
                "memory is tight: unload idle models sooner" if tight else
                "VRAM to spare: keep models warm" if keep_alive == "30m" else
                "Ollama's default", OLLAMA_DROPIN),
        Setting("ollama", "num_gpu", str(layers), None,
                f"{profile.tier} tier floor {layers} layers on the GPU (a model parameter: "
                "set it in a Modelfile or per request)" if vram else
                _from_floor(profile, f"{profile.ollama_layers} layers", 0, profile.ollama_layers,
                            "no GPU, every layer on the CPU"),
                None, floor=str(profile.ollama_layers)),
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
    share_why = (f"{opt.dask_memory_fraction:.0%} of RAM ({format_size(facts.ram_bytes)}"
                 + (f" less {format_size(reserve)} for Ollama's models" if reserve else "")
                 + f") / {workers} workers, in 0.5GB steps")
    floor_gb = profile.memory_limit_gb
    why_limit = (f"{profile.tier} tier floor {profile.memory_limit} = {share_why}"
                 if limit_gb == floor_gb else
                 _from_floor(profile, profile.memory_limit, limit_gb, floor_gb, share_why))
    return [
        Setting("dask", "DASK_SCHEDULER_ADDRESS", opt.dask_scheduler,
                env.get("DASK_SCHEDULER_ADDRESS"), "[optimize] dask_scheduler", DASK_ENV_FILE),
        Setting("dask", "DASK_NWORKERS", str(workers), env.get("DASK_NWORKERS"),
                _from_floor(profile, f"{profile.dask_workers} workers", workers,
                            profile.dask_workers, f"at most one per core ({cores})"),
                DASK_ENV_FILE, floor=str(profile.dask_workers)),
        Setting("dask", "DASK_NTHREADS", str(threads), env.get("DASK_NTHREADS"),
                _from_floor(profile, f"{_count(profile.dask_threads, 'thread')} per worker",
                            threads, profile.dask_threads, f"{cores} cores for {workers} workers"),
                DASK_ENV_FILE, floor=str(profile.dask_threads)),
        Setting("dask", "DASK_MEMORY_LIMIT", f"{limit_gb:g}GB", env.get("DASK_MEMORY_LIMIT"),
                why_limit, DASK_ENV_FILE, floor=profile.memory_limit),
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
