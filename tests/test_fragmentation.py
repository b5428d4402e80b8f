"""kvlab.fragmentation: hand-worked traces, conservation, the event-driven engine against the stepper."""

import subprocess
import sys

import numpy as np
import pytest

from kvlab import workloads as W
from kvlab.fragmentation import (CATEGORIES, INTERNAL, POLICIES, RESERVED, TOKEN, AllocationConfig,
                                 simulate_allocation, simulate_allocation_reference)

ENGINES = [simulate_allocation, simulate_allocation_reference]


def assert_same(fast, ref):
    """Two results agree exactly: integer slot-steps per category, schedule, batch sizes."""
    assert fast.slot_steps == ref.slot_steps
    for name in ("num_steps", "busy_steps", "running_steps", "peak_batch_size", "num_preemptions"):
        assert getattr(fast, name) == getattr(ref, name), name
    assert np.array_equal(fast.admit_step, ref.admit_step)
    assert np.array_equal(fast.finish_step, ref.finish_step)
    assert fast.fractions() == ref.fractions()


# ---- traces worked out by hand ------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_hand_max_reserve_two_requests(engine):
    """C=10, regions of 8. r0 (2+3) runs steps 0-2 holding 3,4,5 of 8 slots while r1 (1+1) waits:
    its 8 slots do not fit in the 2 left, which are external fragmentation. r1 runs at step 3."""
    wl = W.from_lengths([2, 1], [3, 1])
    r = engine(wl, "max-reserve", capacity_tokens=10, max_seq_len=8, block_size=4)
    assert r.slot_steps == {"token_states": 3 + 4 + 5 + 2, "reservation": 2 + 1 + 0,
                            "internal_fragmentation": 3 * 3 + 6, "external_fragmentation": 3 * 2, "free": 2}
    assert r.num_steps == 4 and r.admit_step.tolist() == [0, 3] and r.finish_step.tolist() == [2, 3]
    assert r.token_states == 14 / 38 and r.internal_fragmentation == 15 / 38
    assert r.external_fragmentation == 6 / 38 and r.reservation == 3 / 38
    assert r.mean_batch_size == 1.0 and r.mean_queue_delay == 1.5 and r.throughput == 2 / 4
    assert r.capacity_fractions()["free"] == 2 / 40


@pytest.mark.parametrize("engine", ENGINES)
def test_hand_paged_one_request(engine):
    """B=4, prompt 3, output 4 (F=7): lengths 4,5,6,7 in 1,2,2,2 blocks. min(held, F) = 4,7,7,7:
    reservation (slots it will still fill) 0+2+1+0, internal (the last block's overhang past F) 0+1+1+1."""
    r = engine(W.from_lengths([3], [4]), "paged", capacity_tokens=8, max_seq_len=16, block_size=4)
    assert r.slot_steps == {"token_states": 22, "reservation": 3, "internal_fragmentation": 3,
                            "external_fragmentation": 0, "free": 4 * 8 - 28}
    assert r.token_states == 22 / 28


@pytest.mark.parametrize("fit", ["first", "best"])
@pytest.mark.parametrize("engine", ENGINES)
def test_hand_oracle_external_fragmentation(engine, fit):
    """C=10, oracle. r0 (F=3) at [0,3), r1 (F=5) at [3,8); r2 (F=5) waits. Steps 0-1: one hole of 2.
    r0 ends after step 1: steps 2-3 have 5 free slots in holes of 3 and 2, none fits 5: all external.
    r1 ends after step 3; r2 runs steps 4-7."""
    wl = W.from_lengths([1, 1, 1], [2, 4, 4])
    r = engine(wl, "oracle", capacity_tokens=10, max_seq_len=16, fit=fit)
    assert r.slot_steps == {"token_states": 5 + 14 + 14, "reservation": 1 + 6 + 6, "internal_fragmentation": 0,
                            "external_fragmentation": 2 * 2 + 2 * 5, "free": 4 * 5}
    assert r.admit_step.tolist() == [0, 0, 4] and r.finish_step.tolist() == [1, 3, 7]


@pytest.mark.parametrize("engine", ENGINES)
def test_hand_paged_preemption(engine):
    """4 blocks of 2. r0 (1+6) and r1 (1+4) start at step 0 with a block each, take a second at step 1.
    Step 3: r0 needs its third block, none is free: r1 (newest) is preempted, keeping its 3 tokens.
    Step 4: r1 needs 3 blocks for 1+3+1 tokens, 1 is free: it waits. r0 takes the last block at step 5
    and finishes; at step 6 r1 is re-admitted (prefill of 5 tokens, its last) and finishes."""
    wl = W.from_lengths([1, 1], [6, 4])
    r = engine(wl, "paged", capacity_tokens=8, max_seq_len=16, block_size=2, watermark=0.0)
    assert r.num_preemptions == 1
    assert r.admit_step.tolist() == [0, 0] and r.finish_step.tolist() == [5, 6]
    assert r.running_steps == 6 + 3 + 1 and r.busy_steps == 7 and r.peak_batch_size == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_hand_paged_watermark_holds_back_admission(engine):
    """100 blocks of 1 slot, watermark 5%: with r0 (10 slots) running, r1 needs 88 blocks at admission
    and only 90 are free, 85 after the watermark: it waits for r0 to finish (an empty GPU ignores it)."""
    wl = W.from_lengths([9, 87], [1, 1])
    r = engine(wl, "paged", capacity_tokens=100, max_seq_len=100, block_size=1, watermark=0.05)
    assert r.admit_step.tolist() == [0, 1]
    r = engine(wl, "paged", capacity_tokens=100, max_seq_len=100, block_size=1, watermark=0.0)
    assert r.admit_step.tolist() == [0, 0]


# ---- conservation, paging bounds, rejection -----------------------------------------------------

def small_trace(seed=0, n=30):
    wl = W.sharegpt_like(n, seed=seed, rate=0.3, max_len=128)
    return wl


@pytest.mark.parametrize("policy", POLICIES)
def test_slots_conserved_at_every_step(policy):
    """Per step, from the map: token slots == the running requests' lengths, held slots == their
    allocations (worked out here from the schedule), and the five categories fill the capacity."""
    wl, B = small_trace(), 8
    C = 2500 if policy == "paged" else 700  # paged: enough that nobody is preempted (then a request's length
    r = simulate_allocation(wl, policy, C, 128, B, record_map=True)  # is its prompt + steps since admission)
    assert r.num_preemptions == 0
    assert r.external_fragmentation > 0 or policy == "paged"     # the queue did wait on holes
    m = r.memory_map                   # (C, steps)
    assert m.shape == (C, r.num_steps) and m.max() < len(CATEGORIES)
    counts = np.stack([(m == c).sum(axis=0) for c in range(len(CATEGORIES))])  # (5, steps)
    assert np.array_equal(counts.sum(axis=0), np.full(r.num_steps, C))
    tokens, held = np.zeros(r.num_steps, int), np.zeros(r.num_steps, int)
    for p, o, a, f in zip(wl.prompt_len, wl.output_len, r.admit_step, r.finish_step):
        steps = np.arange(a, f + 1)
        length = p + steps - a + 1
        tokens[steps] += length
        F = p + o
        if policy == "paged":
            held[steps] += -(-length // B) * B
        else:
            held[steps] += {"max-reserve": 128, "pow2": min(1 << int(F - 1).bit_length(), 128), "oracle": F}[policy]
    assert np.array_equal(counts[TOKEN], tokens)
    assert np.array_equal(counts[TOKEN] + counts[RESERVED] + counts[INTERNAL], held)
    assert sum(r.slot_steps.values()) == C * r.num_steps and r.slot_steps["free"] >= 0
    assert r.slot_steps == {c: int(counts[i].sum()) for i, c in enumerate(CATEGORIES)}


def test_paged_waste_below_one_block_per_running_request():
    wl = small_trace(seed=2, n=60)
    for B in (1, 4, 16, 32):
        r = simulate_allocation(wl, "paged", 1500, 128, B, record_map=True)
        unfilled = ((r.memory_map == RESERVED) | (r.memory_map == INTERNAL)).sum(axis=0)  # (steps,)
        assert np.all(unfilled <= (B - 1) * r.batch_size)
        assert r.slot_steps["internal_fragmentation"] <= (B - 1) * r.running_steps
        assert r.external_fragmentation == 0
    assert r.slot_steps["internal_fragmentation"] > 0   # B=32: the last block does overhang


@pytest.mark.parametrize("engine", ENGINES)
def test_rejected_requests_are_reported_not_retried(engine):
    wl = W.from_lengths([10, 3, 40], [10, 3, 1])   # 20 and 41 tokens do not fit max_seq_len 16
    for policy in POLICIES:
        r = engine(wl, policy, capacity_tokens=64, max_seq_len=16, block_size=4)
        assert r.finish_step.tolist() == [-1, 2, -1]
        assert r.num_rejected == 2 and r.num_completed == 1 and r.admit_step[1] == 0
    r = engine(wl, "max-reserve", capacity_tokens=8, max_seq_len=16)   # a region of 16 never fits in 8
    assert r.num_rejected == 3 and r.num_steps == 0 and r.token_states == 0.0
    r = engine(W.from_lengths([5], [4]), "paged", capacity_tokens=8, max_seq_len=16, block_size=4)
    assert r.num_rejected == 1                                          # 9 tokens need 3 blocks of 2


# ---- the fast engine against the reference ------------------------------------------------------

def random_case(rng):
    n = int(rng.integers(1, 20))
    max_len = int(rng.integers(4, 64))
    p = rng.integers(1, max_len, n)
    o = np.maximum(1, rng.integers(1, max_len + 4, n) - p)   # a few exceed max_len: rejected
    rate = None if rng.random() < 0.3 else float(rng.uniform(0.1, 2.0))
    wl = W.from_lengths(p, o, W.poisson_arrivals(n, rate, int(rng.integers(1 << 30))))
    return wl, int(rng.integers(1, 250)), max_len, int(rng.integers(1, 12))


def test_event_driven_engine_equals_the_stepper_on_random_traces():
    rng = np.random.default_rng(1234)
    seen = dict(preempted=0, rejected=0, external=0, internal=0, idle=0)
    for _ in range(150):
        wl, C, max_len, B = random_case(rng)
        for policy in POLICIES:
            for fit, wm in ([("first", 0.0), ("first", 0.01), ("first", 0.1)] if policy == "paged"
                            else [("first", 0.01), ("best", 0.01)]):
                args = (wl, policy, C, max_len, B, fit, wm)
                fast, ref = simulate_allocation(*args), simulate_allocation_reference(*args)
                assert_same(fast, ref)
                seen["preempted"] += fast.num_preemptions > 0
                seen["rejected"] += fast.num_rejected > 0
                seen["external"] += fast.slot_steps["external_fragmentation"] > 0
                seen["internal"] += fast.slot_steps["internal_fragmentation"] > 0
                seen["idle"] += fast.busy_steps < fast.num_steps
    assert all(v >= 10 for v in seen.values()), seen    # the traces exercised every path


# ---- the paper's setting ------------------------------------------------------------------------

def test_policy_order_on_sharegpt_like_trace():
    """OPT-13B (819,200 B/token), 12 GiB of KV, max length 2048, block 16: the paper's order."""
    wl = W.sharegpt_like(3000, seed=0, rate=0.1)
    r = {p: simulate_allocation(wl, p, 15_728, 2048, 16) for p in POLICIES}
    tokens = [r[p].token_states for p in ("max-reserve", "pow2", "oracle", "paged")]
    batch = [r[p].mean_batch_size for p in ("max-reserve", "pow2", "oracle", "paged")]
    assert tokens == sorted(tokens) and batch == sorted(batch)
    assert r["paged"].token_states > 0.95 and r["max-reserve"].token_states < 0.3
    assert r["max-reserve"].internal_fragmentation > 0.4 and r["oracle"].internal_fragmentation == 0
    assert r["max-reserve"].peak_batch_size == 15_728 // 2048
    for res in r.values():
        assert sum(res.fractions().values()) == pytest.approx(1.0, abs=1e-12)
        assert sum(res.capacity_fractions().values()) == pytest.approx(1.0, abs=1e-12)


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity_tokens=0), "capacity_tokens"),
    (dict(capacity_tokens=-100), "capacity_tokens"),
    (dict(capacity_tokens=10.5), "capacity_tokens"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=-16), "block_size"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(policy="buddy"), "max-reserve, pow2, oracle, paged"),
    (dict(fit="worst"), "first, best"),
    (dict(watermark=1.0), "watermark"),
])
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_input(engine, kwargs, match):
    args = dict(policy="paged", capacity_tokens=100, max_seq_len=32, block_size=4) | kwargs
    with pytest.raises(ValueError, match=match):
        engine(W.from_lengths([1], [1]), **args)


def test_workload_must_be_a_workload():
    with pytest.raises(ValueError, match="Workload"):
        simulate_allocation([(1, 1, 0.0)], "paged", 100, 32, 4)


def test_reference_refuses_huge_maps():
    wl = W.from_lengths([1], [100])
    with pytest.raises(ValueError, match="small traces"):
        simulate_allocation(wl, "paged", 10_000_000, 2048, 16, record_map=True)


# ---- the explorer of notebook 04 ------------------------------------------------------------------

def test_explorer_recomputes_when_a_control_changes():
    import matplotlib
    matplotlib.use("Agg")
    from kvlab.fragmentation import opt13b_capacity_tokens
    from kvlab.ui.fragmentation import FragmentationExplorer

    ex = FragmentationExplorer(n=300, seed=0)
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n" and "max-reserve" in ex.readout.value
    before = ex.image.value
    ex.block_size.value = 256
    assert ex.results["paged"].config.block_size == 256 and ex.image.value != before
    ex.kv_gib.value = 20
    assert ex.results["oracle"].config.capacity_tokens == opt13b_capacity_tokens(20) == 26_214
    ex.rate.value = None                     # all 300 at once: the queue is full
    assert ex.results["paged"].arrival_time.max() == 0
    ex.max_seq_len.value = 512
    assert ex.results["max-reserve"].peak_batch_size == 26_214 // 512
    ex.workload.value = "alpaca-like"
    assert ex.results["paged"].num_completed == 300 and f"{ex.results['paged'].token_states:.1%}" in ex.readout.value


@pytest.mark.parametrize("policy", POLICIES)
def test_region_sizes_and_never_fits_by_brute_force(policy):
    cfg = AllocationConfig(policy, capacity_tokens=60, max_seq_len=80, block_size=16)  # paged: 3 whole blocks
    final = np.arange(1, 100)
    for f, size, never in zip(final.tolist(), cfg.region_sizes(final), cfg.never_fits(final)):
        pow2 = 1
        while pow2 < f:
            pow2 *= 2
        if policy == "paged":
            expected_never = f > 80 or -(-f // 16) > 3
        else:
            expected = {"max-reserve": 80, "pow2": min(pow2, 80), "oracle": f}[policy]
            assert size == expected, (f, size)
            expected_never = f > 80 or expected > 60
        assert never == expected_never, f


def test_simulator_and_benchmark_need_no_widgets():
    """kvlab.fragmentation and its benchmark run without ipywidgets (the course extra)."""
    code = ("import sys; sys.modules['ipywidgets'] = None\n"   # any `import ipywidgets` now raises ImportError
            "import kvlab.bench.fragmentation as b, kvlab.fragmentation as f\n"
            "assert 'kvlab.ui.fragmentation' not in sys.modules and f.opt13b_capacity_tokens(12.0) == 15_728\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_block_size_sweep_against_single_runs():
    from kvlab.fragmentation import block_size_sweep
    wl = small_trace(seed=1, n=40)
    sweep = block_size_sweep(wl, 400, max_seq_len=128, block_sizes=(1, 16))
    assert sweep["unfilled_share"][0] == 0.0             # blocks of one token: never an unfilled tail
    r = simulate_allocation(wl, "paged", 400, 128, 16)
    s = r.slot_steps
    held = s["token_states"] + s["reservation"] + s["internal_fragmentation"]
    assert sweep["unfilled_share"][1] == (held - s["token_states"]) / held > 0
    assert sweep["table_entries"][1] == held / 16 / r.running_steps
    assert sweep["mean_batch_size"][1] == r.mean_batch_size
