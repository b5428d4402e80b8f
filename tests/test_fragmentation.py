"""kvlab.fragmentation: hand-worked traces, conservation, the event-driven engine against the stepper,
the cost model, and bad input (each refused with the argument named and what is allowed)."""

import subprocess
import sys

import numpy as np
import pytest

import kvlab
from kvlab import workloads as W
from kvlab.fragmentation import (CATEGORIES, INTERNAL, POLICIES, RESERVED, TOKEN, AllocationConfig,
                                 serving_cost, simulate_allocation, simulate_allocation_reference)
from kvlab.model.flops import H100_SXM

ENGINES = [simulate_allocation, simulate_allocation_reference]


def assert_same(fast, ref):
    """Two results agree exactly: integer slot-steps per category, schedule, batch sizes."""
    assert fast.slot_steps == ref.slot_steps
    for name in ("num_steps", "busy_steps", "running_steps", "peak_batch_size", "num_preemptions",
                 "prefill_tokens", "median_batch_size", "normalized_latency"):
        assert getattr(fast, name) == getattr(ref, name), name
    assert np.array_equal(fast.admit_step, ref.admit_step)
    assert np.array_equal(fast.finish_step, ref.finish_step)
    assert np.array_equal(fast.batch_histogram, ref.batch_histogram)
    if ref.batch_size is not None:                  # the stepper's per-step batch sizes
        assert np.array_equal(ref.batch_histogram, np.bincount(ref.batch_size))
        assert ref.median_batch_size == np.median(ref.batch_size[ref.batch_size > 0])
    assert fast.fractions() == ref.fractions()
    assert sum(fast.fractions().values()) == pytest.approx(1.0, abs=1e-12)


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
    assert r.prefill_tokens == 2 + 1 and r.batch_histogram.tolist() == [0, 4] and r.median_batch_size == 1.0
    assert r.latency.tolist() == [3, 4] and r.normalized_latency == (3 / 3 + 4 / 1) / 2   # r1 waited 3 steps
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
    assert r.prefill_tokens == 1 + 1 + (1 + 3)          # two prompts, then r1's prompt and 3 generated again
    assert r.batch_histogram.tolist() == [0, 4, 3]      # steps 0-2 run both; 3-6 one (r0 to 5, then r1)
    assert r.median_batch_size == 1.0 and r.mean_batch_size == 10 / 7
    assert r.latency.tolist() == [6, 7] and r.normalized_latency == (6 / 6 + 7 / 4) / 2


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
    r = engine(W.from_lengths([5, 1], [4, 1]), "paged", capacity_tokens=8, max_seq_len=16, block_size=4)
    assert r.num_rejected == 1 and r.finish_step.tolist() == [-1, 0]   # 9 tokens need 3 blocks of 4, 2 exist


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
    seen = dict(preempted=0, rejected=0, external=0, internal=0, idle=0, refused=0)
    for _ in range(150):
        wl, C, max_len, B = random_case(rng)
        for policy in POLICIES:
            for fit, wm in ([("first", 0.0), ("first", 0.01), ("first", 0.1)] if policy == "paged"
                            else [("first", 0.01), ("best", 0.01)]):
                args = (wl, policy, C, max_len, B, fit, wm)
                try:
                    fast = simulate_allocation(*args)
                except ValueError as err:          # nothing could run: the reference refuses it the same way
                    with pytest.raises(ValueError) as ref_err:
                        simulate_allocation_reference(*args)
                    assert str(ref_err.value) == str(err) and "can ever run" in str(err)
                    seen["refused"] += 1
                    continue
                ref = simulate_allocation_reference(*args)
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

BAD_SETTINGS = [   # (keyword arguments, exception, what the message must say: the argument and what is allowed)
    (dict(capacity_tokens=0), ValueError, "capacity_tokens must be a positive integer below 2**63, got 0"),
    (dict(capacity_tokens=-100), ValueError, "capacity_tokens must be a positive integer below 2**63, got -100"),
    (dict(capacity_tokens=10.5), TypeError, "capacity_tokens must be a positive integer below 2**63, got float 10.5"),
    (dict(capacity_tokens=None), TypeError, "capacity_tokens must be a positive integer below 2**63, got None"),
    (dict(capacity_tokens="100"), TypeError, "capacity_tokens must be a positive integer below 2**63, got str '100'"),
    (dict(capacity_tokens=2**63), ValueError, "capacity_tokens must be a positive integer below 2**63, got 9223372036854775808"),
    (dict(capacity_tokens=True), TypeError, "capacity_tokens must be a positive integer below 2**63, got the bool True"),
    (dict(block_size=0), ValueError, "block_size must be a positive integer below 2**63, got 0"),
    (dict(block_size=-16), ValueError, "block_size must be a positive integer below 2**63, got -16"),
    (dict(block_size=np.bool_(True)), TypeError, "block_size must be a positive integer below 2**63, got the bool True"),
    (dict(max_seq_len=1), ValueError, "max_seq_len must be an integer >= 2 (one prompt and one output token) below 2**63, got 1"),
    (dict(max_seq_len={}), TypeError, "max_seq_len must be an integer >= 2 (one prompt and one output token) below 2**63, got dict {}"),
    (dict(policy="buddy"), ValueError, "unknown policy 'buddy'; allowed: max-reserve, pow2, oracle, paged"),
    (dict(policy=None), TypeError, "policy must be one of max-reserve, pow2, oracle, paged (a str), got None"),
    (dict(fit="worst"), ValueError, "unknown fit 'worst'; allowed: first, best"),
    (dict(fit=1), TypeError, "fit must be one of first, best (a str), got int 1"),
    (dict(watermark=1.0), ValueError, "watermark must be a fraction in [0, 1), got 1.0"),
    (dict(watermark=float("nan")), ValueError, "watermark must be a fraction in [0, 1), got nan"),
    (dict(watermark=True), TypeError, "watermark must be a fraction in [0, 1), got the bool True"),
    (dict(watermark="0.01"), TypeError, "watermark must be a fraction in [0, 1), got str '0.01'"),
    # settings under which nothing can ever run: every fraction would be 0/0
    (dict(capacity_tokens=10, block_size=16), ValueError, "0 whole block(s) of 16 slots fit in the capacity"),
    (dict(capacity_tokens=10, block_size=16), ValueError, "need capacity_tokens >= 16"),
    (dict(capacity_tokens=1, block_size=1), ValueError, "need capacity_tokens >= 2"),
    (dict(policy="max-reserve", capacity_tokens=16, max_seq_len=32), ValueError,
     "need max_seq_len <= capacity_tokens"),
    (dict(policy="pow2", capacity_tokens=1), ValueError, "need capacity_tokens >= 2"),
    (dict(policy="oracle", capacity_tokens=1), ValueError, "nothing can ever run under oracle"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_SETTINGS)
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_settings_are_refused_with_what_is_allowed(engine, kwargs, error, message):
    args = dict(policy="paged", capacity_tokens=100, max_seq_len=32, block_size=4) | kwargs
    with pytest.raises(error) as err:
        engine(W.from_lengths([1], [1]), **args)
    assert message in str(err.value)


@pytest.mark.parametrize("workload", [None, {"prompt_len": [1]}, "sharegpt-like", [(1, 1, 0.0)]])
@pytest.mark.parametrize("engine", ENGINES)
def test_workload_must_be_a_workload(engine, workload):
    with pytest.raises(TypeError, match=r"workload must be a kvlab.workloads.Workload .*got "):
        engine(workload, "paged", 100, 32, 4)


@pytest.mark.parametrize("engine", ENGINES)
def test_numpy_scalars_are_accepted_as_numbers(engine):
    wl = small_trace(seed=3)
    plain = engine(wl, "paged", 700, 128, 8, "first", 0.01)
    numpy = engine(wl, np.str_("paged"), np.int64(700), np.int32(128), np.uint8(8), "first", np.float64(0.01))
    assert_same(plain, numpy)
    assert numpy.config == plain.config and type(numpy.config.capacity_tokens) is int
    assert type(numpy.config.watermark) is float and type(numpy.config.policy) is str


@pytest.mark.parametrize("engine", ENGINES)
def test_a_workload_nothing_can_serve_is_an_error(engine):
    """Empty, or every request longer than the setting allows: fractions would be 0/0, not shares summing to 1."""
    with pytest.raises(ValueError, match="workload has no requests: nothing to simulate"):
        engine(W.from_lengths([], []), "paged", 100, 32, 4)
    with pytest.raises(ValueError, match=r"none of the 2 requests can ever run: the shortest is 33 tokens .* "
                                         r"at most 32 tokens long"):
        engine(W.from_lengths([30, 40], [3, 3]), "paged", 100, 32, 4)
    with pytest.raises(ValueError, match=r"none of the 1 requests .* at most 8 tokens long"):
        engine(W.from_lengths([5], [5]), "paged", 10, 32, 4)        # 2 blocks of 4 slots


@pytest.mark.parametrize("engine", ENGINES)
def test_arrivals_past_int64_steps_are_an_error_not_a_rejection(engine):
    """Regression (issue 12): an arrival at 1e300 steps, or a tiny rate, overflowed int64 with only a
    RuntimeWarning, and the request was counted as rejected."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no RuntimeWarning on the way to the error
        with pytest.raises(ValueError, match=r"arrival_time reaches 1e\+300 steps.*up to 2\*\*53"):
            engine(W.from_lengths([1, 1], [1, 1], [0.0, 1e300]), "paged", 100, 32, 4)
        with pytest.raises(ValueError, match="tiny arrival rate"):
            engine(W.sharegpt_like(5, seed=0, rate=1e-300, max_len=32), "paged", 100, 32, 4)
    r = simulate_allocation(                     # the largest allowed (the stepper would walk 2**53 steps)
        W.from_lengths([1, 1], [1, 1], [0.0, 2.0**53]), "paged", 100, 32, 4)
    assert r.num_completed == 2 and r.finish_step[1] == 2**53


@pytest.mark.parametrize("policy", POLICIES)
def test_longest_runnable_by_brute_force(policy):
    for C, M, B in [(60, 80, 16), (100, 64, 16), (5, 64, 4), (2, 2, 1), (1000, 3000, 7)]:
        cfg = AllocationConfig(policy, C, M, B) if not (policy == "max-reserve" and M > C) else None
        if cfg is None:
            with pytest.raises(ValueError, match="need max_seq_len <= capacity_tokens"):
                AllocationConfig(policy, C, M, B)
            continue
        final = np.arange(1, M + 5)
        runnable = final[~cfg.never_fits(final)]
        assert cfg.longest_runnable == runnable.max(), (C, M, B)
        assert np.array_equal(runnable, np.arange(1, runnable.max() + 1))   # and everything shorter runs


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


# ---- the cost model -----------------------------------------------------------------------------

def test_serving_cost_by_hand():
    """OPT-13B on a toy GPU of 1 TB/s and 1 TFLOP/s: 12,853,473,280 parameters, 2 bytes each;
    819,200 KV bytes per token; a prefilled token costs 2 FLOPs per parameter."""
    toy = kvlab.model.flops.GpuPeak("toy", bf16_tflops=1.0, memory_tb_per_s=1.0, source="round numbers")
    c = serving_cost(kvlab.ModelSpec.preset("opt-13b"), steps=10, kv_tokens_read=1000, prefill_tokens=100,
                     requests=5, gpu=toy)
    assert c.weight_seconds == pytest.approx(10 * 25_706_946_560 / 1e12, rel=1e-12)
    assert c.kv_seconds == pytest.approx(1000 * 819_200 / 1e12, rel=1e-12)
    assert c.prefill_seconds == pytest.approx(100 * 25_706_946_560 / 1e12, rel=1e-12)
    assert c.seconds == pytest.approx(c.weight_seconds + c.kv_seconds + c.prefill_seconds)
    assert c.requests_per_second == pytest.approx(5 / c.seconds)


def test_result_cost_charges_busy_steps_held_tokens_and_recompute():
    spec = kvlab.ModelSpec.preset("opt-13b")
    r = simulate_allocation(W.from_lengths([2, 1], [3, 1]), "max-reserve", 10, 8, 4)   # the hand trace above
    assert r.cost(spec) == serving_cost(spec, steps=4, kv_tokens_read=14, prefill_tokens=3, requests=2)
    wl = small_trace(seed=4, n=60)
    r = simulate_allocation(wl, "paged", 400, 128, 8)
    assert r.num_preemptions > 0 and r.prefill_tokens > int(wl.prompt_len.sum())   # recomputation is charged
    assert r.cost(spec).prefill_seconds == pytest.approx(r.prefill_tokens * 2 * spec.num_params / 989.4e12)
    assert r.cost(spec, gpu=H100_SXM).kv_seconds == pytest.approx(r.slot_steps["token_states"] * 819_200 / 3.35e12)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(spec="opt-13b"), TypeError, "spec must be a kvlab.ModelSpec"),
    (dict(gpu="H100"), TypeError, "gpu must be a kvlab.model.flops.GpuPeak"),
    (dict(steps=-1), ValueError, "steps must be an integer >= 0, got -1"),
    (dict(steps=1.5), TypeError, "steps must be an integer >= 0, got float"),
    (dict(prefill_tokens=None), TypeError, "prefill_tokens must be an integer >= 0, got None"),
    (dict(kv_tokens_read=True), TypeError, "kv_tokens_read must be an integer >= 0, got the bool True"),
    (dict(dtype="float12"), ValueError, "unknown dtype 'float12'; allowed:"),
])
def test_serving_cost_bad_input(kwargs, error, message):
    args = dict(spec=kvlab.ModelSpec.preset("opt-13b"), steps=1, kv_tokens_read=1, prefill_tokens=1) | kwargs
    with pytest.raises(error) as err:
        serving_cost(args.pop("spec"), **args)
    assert message in str(err.value)


@pytest.mark.parametrize("kv_gib, error, message", [
    (None, TypeError, "kv_gib must be a finite number of GiB that holds at least one OPT-13B token (0.000763 GiB), got None"),
    (True, TypeError, "kv_gib must be a finite number of GiB that holds at least one OPT-13B token (0.000763 GiB), got the bool True"),
    (float("inf"), ValueError, "kv_gib must be a finite number of GiB"),
    (float("nan"), ValueError, "kv_gib must be a finite number of GiB"),
    (-1, ValueError, "holds at least one OPT-13B token"),
    (1e-9, ValueError, "holds at least one OPT-13B token"),
])
def test_opt13b_capacity_bad_input(kv_gib, error, message):
    from kvlab.fragmentation import opt13b_capacity_tokens
    with pytest.raises(error) as err:
        opt13b_capacity_tokens(kv_gib)
    assert message in str(err.value)
    assert opt13b_capacity_tokens(np.float32(12.0)) == opt13b_capacity_tokens(12) == 15_728


def test_run_policies_and_sweep_refuse_a_bare_name():
    from kvlab.fragmentation import block_size_sweep, run_policies
    with pytest.raises(TypeError, match="policies must be a sequence of policy names"):
        run_policies(small_trace(), 700, 128, 8, policies="paged")
    with pytest.raises(TypeError, match="block_sizes must be a sequence of integers"):
        block_size_sweep(small_trace(), 700, 128, block_sizes=16)


def test_explorer_shows_what_cannot_run_and_stays_in_step():
    """Regression (issue 12): a setting no policy can run under must not raise out of the callback or leave
    the old drawing. max-reserve with 4096-slot regions does not fit 3 GiB of OPT-13B KV (3,932 slots)."""
    import matplotlib
    matplotlib.use("Agg")
    from kvlab.ui.fragmentation import FragmentationExplorer

    ex = FragmentationExplorer(n=200, seed=0)
    assert ex.message.value == "" and set(ex.results) == set(POLICIES)
    before = ex.image.value
    ex.kv_gib.value = 3
    ex.max_seq_len.value = 4096                       # the callback runs; it must not raise
    assert set(ex.results) == {"pow2", "oracle", "paged"} and list(ex.errors) == ["max-reserve"]
    assert "need max_seq_len &lt;= capacity_tokens" in ex.message.value and "max-reserve" in ex.message.value
    assert "cannot run" in ex.readout.value and "3,932" in ex.readout.value
    assert ex.results["paged"].config.max_seq_len == 4096 and ex.image.value != before   # drawn for these inputs
    ex.max_seq_len.value = 2048
    assert ex.message.value == "" and set(ex.results) == set(POLICIES)

    ex.n = 0                                          # through the Python API: an empty workload
    ex.update()
    assert ex.results == {} and "workload has no requests" in ex.message.value
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"   # a figure that says nothing could be drawn
    ex.n = 200
    ex.block_size.value = 32
    assert ex.message.value == "" and ex.results["paged"].config.block_size == 32


@pytest.mark.parametrize("kwargs, error", [(dict(n=0), ValueError), (dict(n="5000"), TypeError),
                                           (dict(seed=-1), ValueError), (dict(n=True), TypeError)])
def test_explorer_constructor_bad_input(kwargs, error):
    from kvlab.ui.fragmentation import FragmentationExplorer
    name = next(iter(kwargs))
    with pytest.raises(error, match=f"{name} must be a"):
        FragmentationExplorer(**kwargs)


@pytest.mark.parametrize("policy", POLICIES)
def test_region_sizes_and_never_fits_by_brute_force(policy):
    M = 48 if policy == "max-reserve" else 80      # max-reserve with regions larger than the capacity is refused
    cfg = AllocationConfig(policy, capacity_tokens=60, max_seq_len=M, block_size=16)  # paged: 3 whole blocks
    final = np.arange(1, 100)
    for f, size, never in zip(final.tolist(), cfg.region_sizes(final), cfg.never_fits(final)):
        pow2 = 1
        while pow2 < f:
            pow2 *= 2
        if policy == "paged":
            expected_never = f > M or -(-f // 16) > 3
        else:
            expected = {"max-reserve": M, "pow2": min(pow2, M), "oracle": f}[policy]
            assert size == expected, (f, size)
            expected_never = f > M or expected > 60
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


# ---- latency against request rate, and the figures of notebook 04 --------------------------------

def test_rate_sweep_equals_single_runs_and_latency_rises_with_the_rate():
    from kvlab.fragmentation import rate_sweep
    wl = small_trace(seed=5, n=40)
    rates = [0.02, 0.3, 3.0]
    sweep = rate_sweep(wl, rates, 700, 128, 8, policies=("oracle", "paged"))
    for p in ("oracle", "paged"):
        for i, rate in enumerate(rates):
            r = simulate_allocation(wl.with_arrivals(rate, 0), p, 700, 128, 8)
            assert sweep[p]["normalized_latency"][i] == r.normalized_latency
            assert sweep[p]["throughput"][i] == r.throughput
        lat = sweep[p]["normalized_latency"]
        assert 1.0 <= lat[0] < 1.5 and lat[2] > 2 * lat[0]   # unloaded: ~1 step per token (+ < 1 step to the next step)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(rates=[0.1, -1.0]), ValueError, "rates must be a 1-D sequence of positive finite requests per step"),
    (dict(rates=[]), ValueError, "rates must be a 1-D sequence"),
    (dict(rates=[float("inf")]), ValueError, "rates must be"),
    (dict(policies="paged"), TypeError, "policies must be a sequence of policy names"),
    (dict(workload=None), TypeError, "workload must be a kvlab.workloads.Workload"),
])
def test_rate_sweep_bad_input(kwargs, error, message):
    from kvlab.fragmentation import rate_sweep
    args = dict(workload=small_trace(), rates=[0.1], capacity_tokens=700, max_seq_len=128) | kwargs
    with pytest.raises(error) as err:
        rate_sweep(**args)
    assert message in str(err.value)


def test_notebook_04_figures_draw_the_numbers_given():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from kvlab.fragmentation import ServingCost
    from kvlab.ui.fragmentation import plot_latency_vs_rate, plot_serving_cost

    sweep = {"rate": np.array([0.1, 0.2]), "paged": {"normalized_latency": np.array([1.0, 3.0])},
             "oracle": {"normalized_latency": np.array([2.0, 9.0])}}
    ax = plot_latency_vs_rate(sweep, {"paged": 0.15, "oracle": 0.12}, plt.figure().gca())
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert np.array_equal(lines["paged"].get_ydata(), [1.0, 3.0]) and np.array_equal(lines["oracle"].get_xdata(), [0.1, 0.2])
    verticals = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("_"))
    assert verticals == [0.12, 0.15]
    costs = {"a": ServingCost(1.0, 2.0, 3.0, 1), "b": ServingCost(4.0, 0.5, 0.25, 1)}
    ax = plot_serving_cost(costs, plt.figure().gca())
    heights = [[bar.get_height() for bar in c] for c in ax.containers]     # one container per part
    assert heights == [[1.0, 4.0], [2.0, 0.5], [3.0, 0.25]]
    assert [bar.get_y() for bar in ax.containers[2]] == [3.0, 4.5]        # stacked on the parts below
    plt.close("all")
