"""The idle state machine with a fake clock and scripted utilization."""

from __future__ import annotations

from clusterctl.hibernate.idle import IdleRules, IdleState, Observation, finished, step

RULES = IdleRules(enabled=True, gpu_usage_threshold_percent=5.0, pause_after_minutes=3)


def run(samples: list[tuple[float, tuple[float | None, ...]]], rules: IdleRules = RULES,
        **obs: object) -> tuple[IdleState, list[str], list[float]]:
    state = IdleState()
    events: list[str] = []
    acted: list[float] = []
    for at, util in samples:
        state, new, act = step(state, Observation(at, util, **obs), rules)  # type: ignore[arg-type]
        events += [e.event_type for e in new]
        if act:
            acted.append(at)
    return state, events, acted


def test_idle_for_the_pause_then_the_action_once() -> None:
    samples = [(t, (2.0, 0.0)) for t in range(0, 200, 10)]
    state, events, acted = run(samples)
    assert events == ["idle_detected", "hibernate_started"]
    assert acted == [180]  # exactly 3 minutes after idle_since (t=0)
    assert state.status == "hibernating" and state.idle_since == 0


def test_a_short_burst_resets_the_idle_clock() -> None:
    samples = [(0, (1.0,)), (100, (1.0,)), (110, (60.0,)), (120, (1.0,)), (290, (1.0,)),
               (300, (1.0,))]
    _, events, acted = run(samples)
    assert events == ["idle_detected", "active_again", "idle_detected", "hibernate_started"]
    assert acted == [300]  # 180 s after the burst ended, not after t=0


def test_exactly_at_the_threshold_is_activity() -> None:
    _, events, acted = run([(t, (5.0,)) for t in range(0, 400, 10)])
    assert events == [] and acted == []
    _, events, _ = run([(0, (4.99,))])
    assert events == ["idle_detected"]


def test_what_cannot_be_read_counts_as_activity() -> None:
    _, events, acted = run([(t, (0.0, None)) for t in range(0, 400, 10)])
    assert events == [] and acted == []
    _, events, acted = run([(t, ()) for t in range(0, 400, 10)])  # no GPU visible
    assert acted == []
    cpu_rule = IdleRules(True, 5.0, 3, cpu_threshold_percent=20)
    _, _, acted = run([(t, (0.0,)) for t in range(0, 400, 10)], cpu_rule, cpu_percent=None)
    assert acted == []


def test_extra_conditions_ssh_cpu_and_processes() -> None:
    rules = IdleRules(True, 5.0, 3, cpu_threshold_percent=20, require_no_ssh=True)
    idle = [(t, (0.0,)) for t in range(0, 400, 10)]
    assert run(idle, rules, cpu_percent=50.0, ssh_sessions=0)[2] == []
    assert run(idle, rules, cpu_percent=5.0, ssh_sessions=1)[2] == []
    assert run(idle, rules, cpu_percent=5.0, ssh_sessions=0)[2] == [180]
    assert run(idle, RULES, busy_processes=("rsync",))[2] == []


def test_disabled_or_inhibited_reports_but_never_acts() -> None:
    idle = [(t, (0.0,)) for t in range(0, 400, 10)]
    off = IdleRules(False, 5.0, 3)
    state, events, acted = run(idle, off)
    assert (state.status, events, acted) == ("idle", ["idle_detected"], [])
    state, events, acted = run(idle, RULES, inhibited_by="inhibit until 12:00: training")
    assert (state.status, acted) == ("idle", [])


def test_after_the_action_hibernated_then_woke_on_activity() -> None:
    state, _, _ = run([(t, (0.0,)) for t in range(0, 190, 10)])
    state = finished(state, True, 190)
    assert state.status == "hibernated"
    state, events, act = step(state, Observation(200, (0.0,)), RULES)
    assert (state.status, events, act) == ("hibernated", (), False)
    state, events, _ = step(state, Observation(5000, (80.0,)), RULES)
    assert state.status == "running" and [e.event_type for e in events] == ["woke"]


def test_a_failed_action_starts_the_idle_clock_again() -> None:
    state, _, _ = run([(t, (0.0,)) for t in range(0, 190, 10)])
    state = finished(state, False, 190)
    assert state.status == "running"
    state, events, act = step(state, Observation(200, (0.0,)), RULES)
    assert [e.event_type for e in events] == ["idle_detected"] and not act
    assert step(state, Observation(379, (0.0,)), RULES)[2] is False
    assert step(state, Observation(380, (0.0,)), RULES)[2] is True
