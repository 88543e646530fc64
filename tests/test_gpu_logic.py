"""GPU states with hysteresis, the temperature trend, and the throttle controller (pure)."""

from __future__ import annotations

from dataclasses import replace

from clusterctl.config import GpuConfig
from clusterctl.gpu.history import History, Point
from clusterctl.gpu.states import GpuState, next_state, raw_state
from clusterctl.gpu.throttle import Throttled, decide, floor_w
from clusterctl.host.nvml import GpuSample

CFG = GpuConfig(throttle_enabled=True)
O, N, T, C = GpuState.OPTIMAL, GpuState.NORMAL, GpuState.THROTTLED, GpuState.CRITICAL  # noqa: E741


def test_the_state_table() -> None:
    assert [raw_state(t, 10, CFG) for t in (40, 64, 65, 74, 75, 89, 90, 101)] == [
        O, O, N, N, T, T, C, C]
    assert [raw_state(40, m, CFG) for m in (69.9, 70, 84.9, 85, 94.9, 95)] == [O, N, N, T, T, C]
    assert raw_state(80, 96, CFG) is C  # the worse of the two decides
    assert raw_state(None, 50, CFG) is O and raw_state(None, None, CFG) is O
    assert [s.speed_multiplier for s in (O, N, T, C)] == [1.0, 0.8, 0.5, 0.0]
    assert [s.should_throttle for s in (O, N, T, C)] == [False, False, True, True]


def test_hysteresis_keeps_a_gpu_on_the_edge_from_flapping() -> None:
    state = None
    seen = []
    for temp in (74, 75, 74, 75, 74, 73.5, 72.9, 74, 75):
        state = next_state(state, temp, 10, CFG)
        seen.append(state)
    # in at 75 at once; out only below 73 (75 - 2); in again at 75
    assert seen == [N, T, T, T, T, T, N, N, T]
    assert next_state(C, 88.5, 10, CFG) is C  # 90 - 2 not yet reached
    assert next_state(C, 87.9, 10, CFG) is T
    assert next_state(C, 40, 10, CFG) is O  # far below every edge: straight down
    assert next_state(T, 60, 84, CFG) is T  # memory 84 + 2 is still past 85
    assert next_state(T, 60, 82.9, CFG) is N


def test_trend_rising_falling_stable() -> None:
    history = History(size=200)
    for i in range(20):  # one sample every 3 s, +1 C every 6 s: +10 C/min
        history.add(Point(1000 + 3 * i, 60 + i // 2, 50, 10.0))
    trend = history.trend(minutes=5, now=1060)
    assert trend is not None
    assert (trend.current_c, trend.min_c, trend.max_c, trend.samples) == (69, 60, 69, 20)
    assert trend.average_c == 64.5
    assert trend.trend == "rising" and 9 < trend.slope_c_per_min < 11
    cooling = History(size=200)
    for i in range(10):
        cooling.add(Point(1000 + 6 * i, 80 - i, 0, 10.0))
    assert cooling.trend(5, 1054).trend == "falling"  # type: ignore[union-attr]
    steady = History(size=3)
    for i in range(10):
        steady.add(Point(1000 + i, 70 + i % 2, 0, 10.0))
    assert len(steady) == 3  # a ring
    assert steady.trend(5, 1010).trend == "stable"  # type: ignore[union-attr]
    assert History(5).trend(5, 0) is None
    assert cooling.trend(minutes=0.1, now=1054).samples == 2  # type: ignore[union-attr]


H100 = GpuSample(0, "NVIDIA H100 80GB HBM3", "GPU-h100", "00000000:19:00.0", lost=False,
                 error=None, temperature_c=60, power_limit_w=700.0,
                 power_default_limit_w=700.0, power_min_limit_w=200.0,
                 power_max_limit_w=700.0, memory_total_mib=81559, memory_used_mib=1000)


def at(temp: int, limit: float) -> GpuSample:
    return replace(H100, temperature_c=temp, power_limit_w=limit)


def test_hot_steps_down_critical_drops_to_the_floor_cool_steps_back_up() -> None:
    assert floor_w(H100, CFG) == 350.0  # 50 % of the default, above the 200 W minimum
    d = decide(at(86, 700), T, None, CFG, now=0)
    assert (d.move, d.limit_w) == ("lower", 630.0)
    assert d.record == Throttled("GPU-h100", 700.0, 630.0, 0)
    held = decide(at(86, 630), T, d.record, CFG, now=10)
    assert held.move == "hold" and held.record == d.record  # next step after 15 s
    d = decide(at(87, 630), T, held.record, CFG, now=15)
    assert (d.move, d.limit_w) == ("lower", 560.0)
    d = decide(at(91, 560), C, d.record, CFG, now=16)
    assert (d.move, d.limit_w) == ("floor", 350.0)
    assert d.record is not None and d.record.original_limit_w == 700.0  # never our own value
    assert decide(at(92, 350), C, d.record, CFG, now=17).move == "hold"
    rec = d.record
    d = decide(at(70, 350), T, rec, CFG, now=20)
    assert d.move == "hold" and d.record is not None and d.record.cool_since == 20
    assert decide(at(70, 350), T, d.record, CFG, now=79).move == "hold"
    d = decide(at(70, 350), T, d.record, CFG, now=80)
    assert (d.move, d.limit_w) == ("raise", 420.0)
    for limit, now in ((420.0, 140), (490.0, 200), (560.0, 260)):
        d = decide(at(60, limit), N, d.record, CFG, now=now)
        assert d.move == "raise"
    d = decide(at(60, 630), O, d.record, CFG, now=320)
    assert (d.move, d.limit_w, d.record) == ("restore", 700.0, None)
    assert decide(at(60, 700), O, None, CFG, now=400).move == "hold"


def test_the_floor_never_goes_below_the_gpus_minimum() -> None:
    small = replace(H100, power_default_limit_w=300.0, power_min_limit_w=200.0)
    assert floor_w(small, CFG) == 200.0
    assert floor_w(replace(H100, power_default_limit_w=None, power_max_limit_w=None), CFG) is None
    blind = decide(replace(H100, power_limit_w=None, temperature_c=95), C, None, CFG, 0)
    assert blind.move == "hold" and "no power limit" in blind.reason
    lost = decide(replace(H100, lost=True, temperature_c=95), C, None, CFG, 0)
    assert lost.move == "hold"


def test_memory_pressure_alone_does_not_lower_power() -> None:
    full = replace(H100, temperature_c=50, memory_used_mib=81000)
    assert decide(full, C, None, CFG, 0).move == "hold"


def test_a_trend_read_while_samples_arrive_never_fails() -> None:
    """The API reads a trend in its own thread while the GPU loop appends."""
    import threading

    from clusterctl.gpu.history import History, Point

    history = History(5000)
    stop = threading.Event()

    def sample() -> None:
        at = 0.0
        while not stop.is_set():
            at += 1
            history.add(Point(at, 50 + int(at) % 7, 10, 20.0))

    writer = threading.Thread(target=sample, daemon=True)
    writer.start()
    try:
        for _ in range(3000):
            history.trend(1440, 1e9)
    finally:
        stop.set()
        writer.join(5)
