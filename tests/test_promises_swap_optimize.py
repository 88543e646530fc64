"""README promises of the swap policy and the optimize planner, pinned at their boundaries.

Each test sits exactly on the documented line and one page (or one MiB) past it, so a
flipped comparison, a shifted constant or a dropped step fails it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from clusterctl.config import Config, OptimizeConfig
from clusterctl.optimize.plan import plan
from clusterctl.swap.policy import SwapFacts, plan_auto, plan_clean
from clusterctl.units import GIB
from tests.test_optimize_plan import facts
from tests.test_swap_policy import AT_MIN, CONFIG, NOW, THREE, F, kinds, snapshot

PAGE = 4096
RAM = 40 * GIB  # 60 % of it is 24G, 85 % is 34G: whole numbers, no rounding in the way


def in_use(node: SwapFacts, used_bytes: int) -> SwapFacts:
    """``node`` with exactly ``used_bytes`` of its RAM in use (MemTotal - MemAvailable)."""
    assert node.memory.total_bytes == RAM
    return replace(node, memory=replace(node.memory, available_bytes=RAM - used_bytes))


# -- swap: "shrink ... only after 10 minutes of use 20 points below the threshold" ---------


def test_shrink_waits_for_use_20_points_below_the_threshold() -> None:
    calm_for_an_hour = snapshot(total_gib=40, files=THREE, low_since=NOW - 3600)
    at_60 = plan_auto(in_use(calm_for_an_hour, 24 * GIB), CONFIG, NOW)  # threshold 80 %
    assert at_60.actions == ()
    assert at_60.ledger.low_since is None  # not low: the cooldown starts again later
    below_60 = plan_auto(in_use(calm_for_an_hour, 24 * GIB - PAGE), CONFIG, NOW)
    assert kinds(below_60) == [("remove", "swap-0003", GIB)]


# -- swap: "grow by increment ... twice as fast above 85 %" ---------------------------------


def test_growth_doubles_only_above_85_percent() -> None:
    at_min = snapshot(total_gib=40, files=AT_MIN)
    at_85 = plan_auto(in_use(at_min, 34 * GIB), CONFIG, NOW)
    assert kinds(at_85) == [("create", "swap-0003", GIB)]
    above_85 = plan_auto(in_use(at_min, 34 * GIB + PAGE), CONFIG, NOW)
    assert kinds(above_85) == [("create", "swap-0003", GIB), ("create", "swap-0004", GIB)]
    assert "emergency" in above_85.actions[0].reason


# -- swap: "`clean` refuses any file whose pages would not fit in free memory" --------------


def test_clean_counts_the_pages_of_every_file_it_takes_back() -> None:
    # 32G available; each file's 16G of pages would fit alone, both together would not
    files = [F("swap-0001", created=1, used_gib=16), F("swap-0002", created=2, used_gib=16)]
    cleaned = plan_clean(snapshot(used_percent=20, total_gib=40, files=files), CONFIG, NOW)
    assert kinds(cleaned) == [("remove", "swap-0002", GIB)]  # the newest first
    assert len(cleaned.refused) == 1
    assert cleaned.refused[0].startswith("/var/lib/clusterctl/swap/swap-0001 holds 16G")


# -- optimize: OLLAMA_MAX_LOADED_MODELS "never more than fit in VRAM, or half the RAM" ------


def test_ollama_never_keeps_more_models_loaded_than_fit_in_vram_or_half_the_ram() -> None:
    # 16 cores and 32G: the advanced tier, which allows 3 models per GPU
    one_8g_gpu = plan(facts(cores=16, memtotal_kib=33_554_432, vram_mib=(8192,)), Config())
    assert one_8g_gpu.tier == "advanced"
    assert one_8g_gpu.setting("OLLAMA_MAX_LOADED_MODELS").value == "2"  # 8G holds two of 3G
    big_models = Config(optimize=OptimizeConfig(ollama_model_size_bytes=8 * GIB))
    no_gpu = plan(facts(cores=16, memtotal_kib=33_554_432), big_models)
    assert no_gpu.setting("OLLAMA_MAX_LOADED_MODELS").value == "2"  # 16G of 32G: two of 8G


# -- optimize: OLLAMA_NUM_PARALLEL "1, or 2 from 16G and 4 from 48G of VRAM per GPU" --------


@pytest.mark.parametrize(("vram_mib", "parallel"), [
    ((16 * 1024 - 1,), "1"),
    ((16 * 1024,), "2"),
    ((48 * 1024 - 1,), "2"),
    ((48 * 1024,), "4"),
    ((48 * 1024, 16 * 1024), "2"),  # per GPU: the smallest one decides
])
def test_ollama_serves_more_requests_in_parallel_from_16g_and_48g_per_gpu(
        vram_mib: tuple[int, ...], parallel: str) -> None:
    p = plan(facts(cores=16, memtotal_kib=67_108_864, vram_mib=vram_mib), Config())
    assert p.setting("OLLAMA_NUM_PARALLEL").value == parallel
