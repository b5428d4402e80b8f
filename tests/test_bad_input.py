"""Bad input, thrown at random (issue 12): every public function answers with a valid result or
a ValueError / TypeError whose message is not empty, never another exception, a crash or a
silently wrong answer; a widget never raises out of a callback and keeps its inputs, readout
and drawing in step.

The random arguments mix valid values with wrong types (None, str, bytes, lists, dicts,
tuples), NaN and infinities, negatives, huge numbers, numpy scalars and bools. A valid
result is checked for what makes it valid (positive integer byte counts, a plan whose parts
add up, lengths within max_len, a finite kernel output), so "no exception" is not enough.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import kvlab.kernels  # first: sets TRITON_INTERPRET=1 before anything imports triton (no GPU)
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvlab  # noqa: E402
from kvlab import memory, workloads  # noqa: E402
from kvlab.kernels import (  # noqa: E402
    paged_attention, paged_attention_reference, store_kv, store_kv_reference,
)
from kvlab.model import loading  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
REFUSED = object()      # the outcome "a clear ValueError or TypeError"


def outcome(call):
    """call() or REFUSED; any exception other than ValueError / TypeError fails the test."""
    try:
        result = call()
    except (ValueError, TypeError) as err:
        assert str(err).strip(), f"{type(err).__name__} with an empty message"
        event(f"refused: {type(err).__name__}")   # --hypothesis-show-statistics: how often each outcome came
        return REFUSED
    event("valid result")
    return result


# ---------------------------------------------------------------------------- random arguments

numpy_scalars = st.one_of(
    st.integers(-2**63, 2**63 - 1).map(np.int64), st.integers(0, 255).map(np.uint8),
    st.floats(width=32, allow_nan=True, allow_infinity=True).map(np.float32),
    st.floats(allow_nan=True, allow_infinity=True).map(np.float64), st.booleans().map(np.bool_))
junk = st.one_of(
    st.none(), st.booleans(), st.text(max_size=6), st.binary(max_size=3), st.just([]), st.just({}), st.just(()),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -1, 0, -1.5, 0.5, 10**30, -10**30, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40), numpy_scalars)


def bad_or(valid):
    """Mostly the valid strategy, often junk."""
    return st.one_of(valid, valid, junk)


@st.composite
def arguments(draw, **valid):
    """Keyword arguments, each drawn from its valid strategy; then none, one or two of them
    (chosen at random) replaced by junk, so that valid results are common too."""
    kwargs = {name: draw(strategy) for name, strategy in valid.items()}
    spoil = draw(st.sampled_from([0, 0, 1, 1, 2]))             # how many arguments go bad
    for name in draw(st.lists(st.sampled_from(sorted(valid)), min_size=spoil, max_size=spoil, unique=True)):
        kwargs[name] = draw(junk)
    return kwargs


SPEC_FIELDS = dict(
    num_layers=st.integers(1, 96), hidden_size=st.integers(1, 16384), num_heads=st.sampled_from([1, 2, 4, 8, 32]),
    num_kv_heads=st.sampled_from([1, 2, 4, 8]), head_dim=st.sampled_from([16, 64, 128]),
    intermediate_size=st.integers(1, 10**5), vocab_size=st.integers(1, 10**6),
    max_position_embeddings=st.one_of(st.none(), st.integers(1, 10**6)),
    sliding_window=st.one_of(st.none(), st.integers(1, 10**5)),
    num_params=st.one_of(st.none(), st.integers(1, 10**13)),
)


specs = arguments(name=st.just("random"), **SPEC_FIELDS)      # a ModelSpec's keyword arguments


def assert_valid_spec(spec: kvlab.ModelSpec) -> None:
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size"):
        value = getattr(spec, field)
        assert type(value) is int and 0 < value < 2**63, (field, value)
    for field in ("max_position_embeddings", "sliding_window", "num_params", "kv_lora_rank", "qk_rope_head_dim"):
        value = getattr(spec, field)
        assert value is None or (type(value) is int and value > 0), (field, value)
    assert spec.num_heads % spec.num_kv_heads == 0 and spec.attention in ("mha", "gqa", "mqa", "mla")


def valid_spec() -> kvlab.ModelSpec:
    return kvlab.ModelSpec.preset("llama-3-8b")


presets = st.sampled_from(["llama-3-8b", "mistral-7b", "deepseek-v3", "falcon-7b", "smollm2-135m"]).map(
    kvlab.ModelSpec.preset)
dtypes = st.sampled_from(["float16", "bf16", "fp8", "int4", torch.float32, "float12", torch.int64])
counts = st.integers(1, 10**6)


# ---------------------------------------------------------------------------- model specs and memory

@settings(max_examples=300, **SETTINGS)
@given(kwargs=specs)
def test_model_spec(kwargs):
    spec = outcome(lambda: kvlab.ModelSpec(**kwargs))
    if spec is not REFUSED:
        assert_valid_spec(spec)


@settings(max_examples=200, **SETTINGS)
@given(kwargs=arguments(spec=st.one_of(presets, specs.map(lambda kw: outcome(lambda: kvlab.ModelSpec(**kw)))),
                        kv_dtype=dtypes, tensor_parallel=st.sampled_from([1, 2, 8, 16, 3]),
                        seq_len=counts, batch_size=counts))
def test_kv_bytes(kwargs):
    per_token = outcome(lambda: kvlab.kv_bytes_per_token(kwargs["spec"], kwargs["kv_dtype"], kwargs["tensor_parallel"]))
    if per_token is not REFUSED:
        assert type(per_token) is int and per_token > 0
    total = outcome(lambda: kvlab.kv_cache_bytes(**kwargs))
    if total is not REFUSED:
        assert type(total) is int and total > 0 and total % per_token == 0


@settings(max_examples=300, **SETTINGS)
@given(kwargs=arguments(spec=presets, gpu=st.one_of(st.sampled_from(list(memory.GPUS)), st.integers(1, 2**50)),
                        weight_dtype=dtypes, kv_dtype=dtypes, context_len=st.integers(1, 10**6),
                        gpu_memory_utilization=st.floats(0.01, 1.0), tensor_parallel=st.sampled_from([1, 2, 8]),
                        reserve_bytes=st.integers(0, 2**40)))
def test_memory_plan(kwargs):
    plan = outcome(lambda: kvlab.memory_plan(**kwargs))
    if plan is REFUSED:
        return
    # the parts add up: no negative budget, no plan that "fits" more than the card holds
    assert 0 <= plan.kv_budget_bytes <= plan.usable_bytes <= plan.gpu_bytes
    assert plan.weight_bytes > 0 and plan.kv_bytes_per_token > 0 and plan.max_concurrent_requests >= 0
    assert plan.fits == (plan.max_concurrent_requests > 0)
    if plan.fits:
        assert (plan.weight_bytes + plan.reserve_bytes + plan.max_concurrent_requests * plan.kv_bytes_per_request
                <= plan.usable_bytes)
    assert all(type(getattr(plan, f)) is int for f in ("context_len", "tensor_parallel", "gpu_bytes", "reserve_bytes"))


@settings(max_examples=150, **SETTINGS)
@given(config=arguments(
    model_type=st.sampled_from(["llama", "gpt2", "opt", "falcon", "mistral"]),
    hidden_size=st.sampled_from([64, 100, 4096]), n_embd=st.sampled_from([64, 100]),
    num_attention_heads=st.sampled_from([3, 4, 32]), n_head=st.sampled_from([3, 4]), num_hidden_layers=counts,
    n_layer=counts, intermediate_size=counts, ffn_dim=counts, vocab_size=counts,
    head_dim=st.sampled_from([None, 16, 64]), n_positions=st.sampled_from([None, 1024])))
def test_spec_from_hf_config(config):
    spec = outcome(lambda: kvlab.ModelSpec.from_hf_config(config))
    if spec is not REFUSED:
        assert_valid_spec(spec)
        if config.get("head_dim") is None and spec.architecture in ("llama", "mistral", "gpt2", "opt"):
            assert spec.head_dim * spec.num_heads == spec.hidden_size      # derived exactly, never floored


# ---------------------------------------------------------------------------- workloads

def assert_valid_workload(wl, max_len=None):
    assert wl.prompt_len.dtype == np.int64 and wl.output_len.dtype == np.int64
    if len(wl):
        assert wl.prompt_len.min() >= 1 and wl.output_len.min() >= 1
        assert np.isfinite(wl.arrival_time).all() and wl.arrival_time.min() >= 0
        if max_len is not None:
            assert wl.total_len.max() <= max_len


@settings(max_examples=200, **SETTINGS)
@given(make=st.sampled_from([workloads.sharegpt_like, workloads.alpaca_like, workloads.uniform]),
       kwargs=arguments(n=st.integers(0, 40), seed=st.integers(0, 2**64), rate=st.one_of(st.none(), st.floats(1e-3, 10)),
                        max_len=st.integers(2, 10**6), prompt_range=st.tuples(st.integers(1, 50), st.integers(50, 99)),
                        output_range=st.tuples(st.integers(1, 9), st.integers(10, 20))))
@example(make=workloads.uniform, kwargs=dict(n=5, seed=0, rate=None, max_len=30, prompt_range=(40, 60),
                                             output_range=(1, 10)))    # issue 19: every prompt became 29 tokens
def test_workload_generators(make, kwargs):
    if make is not workloads.uniform:
        del kwargs["prompt_range"], kwargs["output_range"]
    n = kwargs["n"]
    if isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and 40 < n <= workloads.MAX_REQUESTS:
        kwargs["n"] = n = 40                     # valid but slow: millions of requests teach nothing here
    wl = outcome(lambda: make(**kwargs))
    if wl is not REFUSED:
        assert len(wl) == n
        assert_valid_workload(wl, kwargs["max_len"])
        if make is workloads.uniform and n:       # issue 19: no prompt clipped outside its range without a word
            lo, hi = kwargs["prompt_range"]
            assert lo <= wl.prompt_len.min() and wl.prompt_len.max() <= hi


@st.composite
def length_columns(draw):
    """prompt_len, output_len, arrival_time of n requests (arrival None: all at 0), valid, then
    none or one column replaced by junk, or one element of one column."""
    n = draw(st.integers(0, 4))
    cols = [draw(st.lists(st.integers(1, 100), min_size=n, max_size=n)),
            draw(st.lists(st.integers(1, 100).map(float), min_size=n, max_size=n)),
            draw(st.one_of(st.none(), st.lists(st.floats(0, 100), min_size=n, max_size=n)))]
    how = draw(st.sampled_from(["none", "none", "column", "element"]))
    i = draw(st.integers(0, 2))
    if how == "column":
        cols[i] = draw(junk)
    elif how == "element" and n and cols[i] is not None:
        cols[i][draw(st.integers(0, n - 1))] = draw(junk)
    return cols


@settings(max_examples=150, **SETTINGS)
@given(columns=length_columns())
def test_workload_from_lengths(columns):
    prompt, output, arrival = columns
    wl = outcome(lambda: workloads.from_lengths(prompt, output, arrival))
    if wl is not REFUSED:
        assert_valid_workload(wl)
        assert wl.prompt_len.tolist() == [int(p) for p in prompt]         # never rounded: equal as given
        assert wl.output_len.tolist() == list(output)


valid_length = st.one_of(st.integers(1, 100), st.integers(1, 100).map(float))
valid_record = st.fixed_dictionaries({"prompt_len": valid_length, "output_len": valid_length},
                                     optional={"arrival_time": st.floats(0, 1e6), "extra": st.integers()})


@st.composite
def trace_records(draw):
    """Up to 4 valid records, then none or one field of one record replaced by junk (or dropped)."""
    rows = draw(st.lists(valid_record, max_size=4))
    if rows and draw(st.booleans()):
        row = draw(st.sampled_from(rows))
        field = draw(st.sampled_from(["prompt_len", "output_len", "arrival_time"]))
        if draw(st.booleans()):
            row[field] = draw(junk)
        else:
            row.pop(field, None)
    return rows


@settings(max_examples=120, **SETTINGS)
@given(suffix=st.sampled_from([".csv", ".jsonl"]), raw=st.one_of(
    st.text(max_size=60), trace_records()))
def test_workload_load(suffix, raw):
    import json
    if isinstance(raw, list):      # records: as JSON lines, or a CSV with their columns
        if suffix == ".jsonl":
            raw = "\n".join(json.dumps(r, default=repr) for r in raw)
        else:
            cols = sorted({k for r in raw for k in r})
            raw = "\n".join([",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in raw])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trace{suffix}"
        path.write_text(raw, encoding="utf-8")
        wl = outcome(lambda: workloads.load(path))
    if wl is not REFUSED:
        assert_valid_workload(wl)


# ---------------------------------------------------------------------------- kernels (small: the interpreter is slow)

def small_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(6, 4, 1, 16, generator=g)                 # 6 blocks of 4 tokens, 1 KV head, head_dim 16
    return dict(q=torch.randn(2, 2, 16, generator=g), k_cache=k_cache, v_cache=torch.randn_like(k_cache),
                block_tables=torch.tensor([[3, 0, -1], [5, -1, -1]], dtype=torch.int32),
                seq_lens=torch.tensor([7, 2], dtype=torch.int32))


TENSOR_DAMAGE = ("int", "float64", "flat", "wide", "empty")


def damage(value: torch.Tensor, how: str) -> torch.Tensor:
    """A tensor gone wrong in one way: dtype, rank, width, or no rows."""
    return {"int": lambda: value.int(), "float64": lambda: value.double(), "flat": lambda: value.flatten(),
            "wide": lambda: torch.cat([value, value], dim=-1), "empty": lambda: value[:0]}[how]()


@st.composite
def spoiled(draw, args: dict, values: dict):
    """args with nothing wrong, or one thing wrong: a tensor damaged, an argument replaced by
    junk, or the values of an index tensor redrawn (from `values`: mostly near the valid range)."""
    kind = draw(st.sampled_from(["none", "values", "values", "tensor", "junk"]))
    name = draw(st.sampled_from(sorted(values if kind == "values" else args)))
    if kind == "values":
        args[name] = torch.tensor(draw(values[name]), dtype=args[name].dtype).view(args[name].shape)
    elif kind == "tensor" and isinstance(args[name], torch.Tensor):
        args[name] = damage(args[name], draw(st.sampled_from(TENSOR_DAMAGE)))
    elif kind == "junk":
        args[name] = draw(junk)
    return args


def near_or_huge(lo, hi, size):
    """size ints, mostly in lo..hi (around the valid range), sometimes anywhere in int32."""
    return st.one_of(st.lists(st.integers(lo, hi), min_size=size, max_size=size),
                     st.lists(st.integers(-2**31, 2**31 - 1), min_size=size, max_size=size))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), reference=st.booleans())
def test_paged_attention(data, reference):
    """6 blocks of 4 tokens, tables of 3 blocks: lengths 0..12 and block ids 0..5 are valid."""
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(6, 4, 1, 16, generator=g)                 # (blocks, block_size, KV heads, head_dim)
    args = dict(q=torch.randn(2, 2, 16, generator=g), k_cache=k_cache, v_cache=torch.randn_like(k_cache),
                block_tables=torch.tensor([[3, 0, -1], [5, -1, -1]], dtype=torch.int32),
                seq_lens=torch.tensor([7, 2], dtype=torch.int32),
                scale=data.draw(st.one_of(st.none(), st.floats(0.01, 2))))
    args = data.draw(spoiled(args, dict(seq_lens=near_or_huge(-1, 13, 2), block_tables=near_or_huge(-1, 6, 6))))
    fn = paged_attention_reference if reference else paged_attention
    out = outcome(lambda: fn(**args))
    if out is REFUSED:
        return
    q = args["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    # a valid answer is the right answer: the other implementation agrees on the same input
    other = (paged_attention if reference else paged_attention_reference)(**args)
    torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), reference=st.booleans())
def test_store_kv(data, reference):
    """6 blocks of 4 slots: slots -1 (skip) and 0..23 are valid, each at most once."""
    args = dict(key=torch.randn(3, 1, 16), value=torch.randn(3, 1, 16), k_cache=torch.zeros(6, 4, 1, 16),
                v_cache=torch.zeros(6, 4, 1, 16), slot_mapping=torch.tensor([0, 9, -1]))
    args = data.draw(spoiled(args, dict(slot_mapping=st.one_of(
        st.lists(st.integers(-1, 23), min_size=3, max_size=3, unique=True), near_or_huge(-3, 26, 3)))))
    caches = [args[c].clone() if isinstance(args[c], torch.Tensor) else None for c in ("k_cache", "v_cache")]
    result = outcome(lambda: (store_kv_reference if reference else store_kv)(**args))
    if result is REFUSED:     # nothing half-written
        for was, name in zip(caches, ("k_cache", "v_cache")):
            if was is not None:
                assert torch.equal(was, args[name])
        return
    slots = args["slot_mapping"].tolist()
    for i, slot in enumerate(slots):              # exactly the named slots hold exactly their tokens
        if slot >= 0:
            assert torch.equal(args["k_cache"].flatten(0, 1)[slot], args["key"][i])
    assert int((args["k_cache"] != 0).any(-1).any(-1).sum()) == sum(s >= 0 for s in slots)


# ---------------------------------------------------------------------------- load_model (nothing is loaded)

class _WouldLoad(Exception):
    """Raised by the stubbed loaders: the arguments passed every check."""


@pytest.fixture
def stub_loaders(monkeypatch):
    def would_load(*args, **kwargs):
        raise _WouldLoad
    for loader in ("_load_pretrained", "_tiny_model", "_load_from_hub_or_dir", "smollm2_path"):
        monkeypatch.setattr(loading, loader, would_load)


ANY_NAME = st.one_of(st.sampled_from(["smollm2-135m", "tiny-llama-random", "tiny-gpt2-random", "gpt2", "org/model",
                                       "/nonexistent/path/model", "./x", "", "a b", "~/m", "~0", "x/y/z", "C:\\m"]),
                     st.text(max_size=12), junk)
ANY_DEVICE = st.one_of(st.sampled_from([None, "cpu", "cpu:0", "cuda", "cuda:7", "gpu", "meta", "cuda:-1"]), junk)
ANY_DTYPE = st.one_of(st.sampled_from([None, "float32", "bfloat16", torch.float16, "fp8", torch.int8, "float"]), junk)


@settings(max_examples=150, **SETTINGS)
@given(random=st.sampled_from(["name", "device", "dtype", "none"]), data=st.data())
def test_load_model_arguments(stub_loaders, random, data):
    """One argument random (or none), the others valid."""
    kwargs = dict(name="tiny-llama-random", device="cpu", dtype="float32")
    if random != "none":
        kwargs[random] = data.draw({"name": ANY_NAME, "device": ANY_DEVICE, "dtype": ANY_DTYPE}[random])
    try:
        outcome(lambda: kvlab.load_model(**kwargs))
    except _WouldLoad:                       # it got as far as loading: every check passed
        event("valid result (would load)")
        assert isinstance(kwargs["name"], str) and kwargs["name"].strip()
        assert kwargs["device"] in (None, "cpu", "cpu:0") or torch.cuda.is_available()
        assert kwargs["dtype"] in (None, "float32", "bfloat16", torch.float16)


# ---------------------------------------------------------------------------- widgets: never raise, stay in step

@settings(max_examples=80, **SETTINGS)
@given(field=st.sampled_from(["gpu_gib", "c_params_b", "c_layers", "c_heads", "c_kv_heads", "c_head_dim",
                              "c_latent", "c_rope"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20)),
       attention=st.sampled_from(["mha", "gqa", "mqa", "mla"]))
def test_memory_calculator_never_raises(calculator, field, value, attention):
    widget = getattr(calculator, field)
    if field in ("gpu_gib", "c_params_b"):
        value = float(value)
    elif not isinstance(value, int) or not -2**63 <= value < 2**63:
        value = 7
    calculator.c_attention.value = attention
    widget.value = value                       # a callback that raised would raise here
    assert (calculator.plan is None) == (calculator.error is not None)
    if calculator.plan is None:
        assert "kvlab-error" in calculator.results.value and ">n/a<" in calculator.results.value
    else:
        assert f">{calculator.plan.max_concurrent_requests}</span>" in calculator.results.value


@pytest.fixture(scope="module")
def calculator():
    from kvlab.ui.memory_calculator import MemoryCalculator
    calc = MemoryCalculator(plot=False)
    calc.model.value, calc.gpu.value = "custom", "custom"
    return calc


def test_allocator_stepper_stays_in_step_after_a_failed_operation():
    """Issue 12: given an invalid op the stepper raised, and its slider moved while the drawing
    still showed the old state. Now the slider goes back to the last step that worked, that
    step is drawn, and the message says what failed."""
    from kvlab.ui.paged import AllocatorStepper
    ops = [("allocate", "A", 6), ("free", "B"), ("allocate", "C", 3)]
    st_ = AllocatorStepper(ops, num_blocks=8, block_size=4)
    st_.next.click()
    assert st_.slider.value == st_.shown_step == 1 and st_.error is None
    st_.next.click()                                      # ("free", "B"): B does not exist
    assert st_.slider.value == st_.shown_step == 1
    assert "step 2, ('free', 'B'), failed: ValueError: sequence 'B' is not allocated" in st_.error
    assert "kvlab-error" in st_.log.value and "the pool stays at step 1" in st_.log.value
    st_.slider.value = 3                                  # jumping past it: stopped at the same place
    assert st_.slider.value == st_.shown_step == 1 and "step 2" in st_.error
    st_.reset.click()
    assert st_.slider.value == st_.shown_step == 0 and st_.error is None and "kvlab-error" not in st_.log.value


def test_allocator_stepper_draws_no_half_done_operation():
    """An append that runs out of blocks part-way is not drawn half-appended: step 1 is drawn."""
    from kvlab.ui.paged import AllocatorStepper
    st_ = AllocatorStepper([("allocate", "A", 6), ("append", "A", 100)], num_blocks=4, block_size=4)
    st_.slider.value = 2
    assert st_.slider.value == st_.shown_step == 1 and "OutOfBlocksError" in st_.error
    alloc, lines = st_.state(1)
    assert alloc.num_tokens("A") == 6 and alloc.num_free_blocks == 2


@pytest.mark.parametrize("ops, error, message", [
    ([("allocate", "A")], ValueError, "ops[0] = ('allocate', 'A'): 'allocate' takes 2 arguments"),
    ([("bogus", 1)], ValueError, "unknown operation 'bogus'; use allocate, append, fork or free"),
    ("allocate", TypeError, "ops must be a list of operations such as ('allocate', 'A', 6), got str"),
    ([5], TypeError, "ops[0] must be a tuple such as ('allocate', 'A', 6), got 5"),
])
def test_allocator_stepper_refuses_malformed_operations_when_built(ops, error, message):
    from kvlab.ui.paged import AllocatorStepper
    with pytest.raises(error) as info:
        AllocatorStepper(ops)
    assert message in str(info.value)


op_strategy = st.one_of(
    st.tuples(st.just("allocate"), st.sampled_from("ABC"), st.integers(1, 12)),
    st.tuples(st.just("append"), st.sampled_from("ABC"), st.integers(1, 6)),
    st.tuples(st.just("fork"), st.sampled_from("ABC"), st.sampled_from("ABCD")),
    st.tuples(st.just("free"), st.sampled_from("ABCD")))


@settings(max_examples=12, **SETTINGS)
@given(ops=st.lists(op_strategy, min_size=1, max_size=6), steps=st.lists(st.integers(-1, 7), min_size=1, max_size=4))
def test_allocator_stepper_random_operations(ops, steps):
    from kvlab.ui.paged import AllocatorStepper
    import matplotlib.pyplot as plt
    st_ = AllocatorStepper(ops, num_blocks=6, block_size=4)
    for k in steps:
        st_._go(k)                                       # what the buttons do
        assert st_.slider.value == st_.shown_step
        st_.state(st_.shown_step)                        # the step on screen replays without an error
        assert (st_.error is None) == (st_.shown_step == max(0, min(len(ops), k)))
    plt.close("all")


# ---------------------------------------------------------------------------- older layers, round 2 (issue 19)

def test_uniform_refuses_a_prompt_range_that_does_not_fit_max_len():
    """uniform(prompt_range=(3000, 4000)) with max_len 2048 made every prompt 2047 tokens, silently."""
    with pytest.raises(ValueError, match=r"prompt_range \(3000, 4000\) does not fit max_len=2048: a prompt may have "
                                         r"at most max_len - 1 = 2047 tokens"):
        workloads.uniform(10, prompt_range=(3000, 4000))
    with pytest.raises(ValueError, match="so every prompt would have 2047"):
        workloads.uniform(10, prompt_range=(2048, 2048))
    wl = workloads.uniform(200, prompt_range=(2000, 2047), output_range=(1, 100))
    assert wl.prompt_len.min() >= 2000 and wl.prompt_len.max() <= 2047 and wl.total_len.max() <= 2048
    wl = workloads.uniform(2000, prompt_range=(1000, 3000))      # partly above: clipped there, as documented
    assert wl.prompt_len.min() >= 1000 and wl.prompt_len.max() == 2047 and wl.total_len.max() <= 2048


def test_a_memory_map_too_large_names_the_parameter_that_was_passed():
    """simulate_allocation(..., record_map=True) suggested keep_map, a parameter it does not have."""
    from kvlab.fragmentation import MAX_MAP_CELLS
    wl = workloads.uniform(20, prompt_range=(100, 200), output_range=(100, 200), max_len=512)
    with pytest.raises(ValueError) as info:
        kvlab.simulate_allocation(wl, "paged", capacity_tokens=MAX_MAP_CELLS // 10, max_seq_len=512, record_map=True)
    assert "simulate_allocation(..., record_map=False)" in str(info.value)
    assert "use simulate_allocation, or" not in str(info.value)


def _widget_apps():
    from kvlab.ui.forward import FlopSplit
    from kvlab.ui.fragmentation import FragmentationExplorer
    from kvlab.ui.kernels import SplitKExplorer
    from kvlab.ui.memory_calculator import ComparisonView, MemoryCalculator
    from kvlab.ui.roofline import DecodeRoofline
    return MemoryCalculator, ComparisonView, FragmentationExplorer, SplitKExplorer, FlopSplit, DecodeRoofline


@pytest.mark.parametrize("app, kwargs, name, bad, allowed", [
    (0, dict(model="nope"), "MemoryCalculator model", "'nope'", "'llama-3-8b'"),
    (0, dict(tensor_parallel=3), "MemoryCalculator tensor_parallel", "3", "1, 2, 4, 8, 16"),
    (0, dict(kv_dtype="fp7"), "MemoryCalculator kv_dtype", "'fp7'", "'fp8'"),
    (0, dict(weight_dtype="fp7"), "MemoryCalculator weight_dtype", "'fp7'", "'bfloat16'"),
    (0, dict(gpu="bogus"), "MemoryCalculator gpu", "'bogus'", "'H100-80GB'"),
    (1, dict(models=("llama-3-8b", "nope")), "ComparisonView models", "'nope' is not one", "'mistral-7b'"),
    (1, dict(gpu="bogus"), "ComparisonView gpu", "'bogus'", "'A100-80GB'"),
    (1, dict(kv_dtype="fp7"), "ComparisonView kv_dtype", "'fp7'", "'int8'"),
    (2, dict(block_size=3), "FragmentationExplorer block_size", "3", "1, 2, 4, 8, 16, 32, 64, 128, 256"),
    (2, dict(rate=0.3), "FragmentationExplorer rate", "0.3", "None, 0.02, 0.05, 0.1, 0.2"),
    (2, dict(max_seq_len=3000), "FragmentationExplorer max_seq_len", "3000", "512, 1024, 2048, 4096"),
    (2, dict(workload="x"), "FragmentationExplorer workload", "'x'", "'sharegpt-like'"),
    (3, dict(block_size=3), "SplitKExplorer block_size", "3", "1, 2, 4"),
    (3, dict(batch=3), "SplitKExplorer batch", "3", "1, 2, 4"),
    (3, dict(context=1000), "SplitKExplorer context", "1000", "1024"),
    (3, dict(num_kv_heads=3), "SplitKExplorer num_kv_heads", "3", "1, 2, 4, 8, 16"),
    (3, dict(gpu="x"), "SplitKExplorer gpu", "'x'", "'A100 (108 SMs)'"),
    (4, dict(model="x", plot=False), "FlopSplit model", "'x'", "'smollm2-135m'"),
    (4, dict(prompt_len=3, plot=False), "FlopSplit prompt_len", "3", "1024"),
    (4, dict(logits="x", plot=False), "FlopSplit logits", "'x'", "'all', 'last'"),
    (5, dict(model="x", plot=False), "DecodeRoofline model", "'x'", "'smollm2-135m'"),
])
def test_a_widget_value_outside_its_options_names_the_widget_and_its_options(app, kwargs, name, bad, allowed):
    """Each raised `TraitError: Invalid selection: value not found` (issue 19): no widget, no options."""
    from traitlets import TraitError
    with pytest.raises(ValueError) as info:
        _widget_apps()[app](**kwargs)
    message = str(info.value)
    assert isinstance(info.value, TraitError)                     # what ipywidgets raised before: still caught
    assert message.startswith(name + " must be ") and bad in message and allowed in message, message


def test_setting_a_widget_to_a_value_it_does_not_offer_names_it(calculator):
    """calc.gpu.value = "bogus" and calc.kv_dtype.value = "fp7" said only "Invalid selection"; the
    calculator's state is left as it was."""
    before = calculator.gpu.value, calculator.kv_dtype.value, calculator.c_attention.value
    for widget, value, name in ((calculator.gpu, "bogus", "MemoryCalculator gpu"),
                                (calculator.kv_dtype, "fp7", "MemoryCalculator kv_dtype"),
                                (calculator.c_attention, "gqa2", "MemoryCalculator custom attention")):
        with pytest.raises(ValueError, match=f"^{name} must be one of .*; got '{value}'$"):
            widget.value = value
    assert (calculator.gpu.value, calculator.kv_dtype.value, calculator.c_attention.value) == before


def test_memory_calculator_refuses_what_its_widgets_would_change_silently():
    """context_len=0 became 128 and gpu_memory_utilization=1.5 became 1.0 (the sliders clamp);
    custom layers 2.5 were computed as 2 (IntText truncates)."""
    from kvlab.ui.memory_calculator import ComparisonView, MemoryCalculator
    from kvlab.ui.fragmentation import FragmentationExplorer
    for kwargs, words in ((dict(context_len=0), "context_len must be an integer in 128..163,840 (the slider's "
                                                "range), got 0"),
                          (dict(context_len=10**6), "context_len must be"),
                          (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be a number in [0.5, 1] "
                                                             "(the slider's range), got 1.5"),
                          (dict(gpu_memory_utilization=0.2), "gpu_memory_utilization must be"),
                          (dict(num_requests=0), "num_requests must be an integer in 1..1024")):
        with pytest.raises(ValueError) as info:
            MemoryCalculator(plot=False, **kwargs)
        assert words in str(info.value)
    with pytest.raises(ValueError, match="kv_gib must be a number of GiB in \\[2, 40\\]"):
        FragmentationExplorer(n=10, kv_gib=100)
    with pytest.raises(ValueError, match="context_len must be an integer in 128..32,768"):
        ComparisonView(context_len=10**5)
    calc = MemoryCalculator(context_len=8192, gpu_memory_utilization=0.8, plot=False)
    assert (calc.context.value, calc.utilization.value) == (8192, 0.8) and calc.plan.context_len == 8192

    custom = MemoryCalculator(plot=False)
    custom.model.value = "custom"
    custom.c_layers.value = 4
    kv4 = custom.plan.kv_bytes_per_token
    with pytest.raises(ValueError, match="^MemoryCalculator custom layers must be a whole number, got float 2.5$"):
        custom.c_layers.value = 2.5
    with pytest.raises(ValueError, match="the bool True"):
        custom.c_layers.value = True
    assert custom.c_layers.value == 4 and custom.plan.kv_bytes_per_token == kv4
    custom.c_layers.value = 8.0                                     # a whole float is the integer
    assert custom.c_layers.value == 8 and custom.plan.kv_bytes_per_token == 2 * kv4


def test_plot_comparison_of_nothing_says_so():
    """plot_comparison([]) raised "max() arg is an empty sequence"."""
    from kvlab.ui.memory_calculator import plot_comparison
    with pytest.raises(ValueError, match="models is empty: plot_comparison needs at least one preset name"):
        plot_comparison([])
    with pytest.raises(TypeError, match="models must be a list of preset names or ModelSpecs, got str"):
        plot_comparison("llama-3-8b")
    import matplotlib.pyplot as plt
    fig = plot_comparison(["llama-3-8b"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["llama-3-8b"]
    plt.close(fig)


@pytest.mark.parametrize("call, error, words", [
    # numpy integers are integers everywhere in kvlab (kvlab.checks); the allocator refused them
    (lambda A: A(4, np.int64(4)).block_size, None, 4),
    (lambda A: A(np.int64(4), 4).num_blocks, None, 4),
    (lambda A: A(4, 4).ref_count(np.int64(0)), None, 0),
    (lambda A: A(4, 4, free_order=np.array([3, 2, 1, 0])).allocate_sequence("s", [1]), None, [3]),
    # a bool is not a count, nor a token id (Python lets True pass for 1)
    (lambda A: A(True, 16), TypeError, "num_blocks must be a positive integer, got the bool True"),
    (lambda A: A(4, True), TypeError, "block_size must be a positive integer, got the bool True"),
    (lambda A: A(4, 4).allocate_sequence("s", [True, False]), ValueError, "token_ids must be a sequence of ints, "
                                                                          "got [True, False]"),
    (lambda A: _allocated(A).append_token("s", True), ValueError, "a token id must be an int, got the bool True"),
    # messages of the allocator's own, not Python's
    (lambda A: A(4, 4, free_order=["a"]), TypeError, "free_order[0] must be a block id in 0..3, got str 'a'"),
    (lambda A: A(2, 4, free_order=[0.0, 1.0]), TypeError, "free_order[0] must be a block id in 0..1, got float 0.0"),
    (lambda A: A(4, 4, free_order=5), TypeError, "free_order must be a permutation of range(4) (a list of block "
                                                 "ids), got int 5"),
    (lambda A: A(3, 4, free_order=[0, 1, 1]), ValueError, "free_order must be a permutation of range(3), got 3 ids"),
    (lambda A: A(4, 4).allocate_sequence(["x"], [1, 2]), TypeError, "seq_id must be hashable (a str or an int, "
                                                                     "e.g. 'A'), got list ['x']"),
    (lambda A: _allocated(A).fork("s", {"t": 1}), TypeError, "child_id must be hashable"),
    (lambda A: _allocated(A).block_table(["s"]), TypeError, "seq_id must be hashable"),
    (lambda A: _allocated(A).slot("s", 1.5), TypeError, "position must be an integer, got float 1.5"),
    (lambda A: _allocated(A).slot("s", 3), ValueError, "position 3 out of range for sequence 's'"),
    (lambda A: A(4, 4).ref_count(4), ValueError, "block_id must be a block id in 0..3, got 4"),
    (lambda A: A(4, 4).ref_count(1.0), TypeError, "block_id must be a block id in 0..3, got float 1.0"),
])
def test_block_allocator_arguments_read_as_kvlab_checks_do(call, error, words):
    """Issue 19: BlockAllocator(4, np.int64(4)) and ref_count(np.int64(0)) were refused, True was
    taken for 1 block or token 1, and free_order=['a'], a list as sequence id and slot('s', 1.5)
    answered with Python's own messages (int(), unhashable, list indices)."""
    A = kvlab.BlockAllocator
    if error is None:
        assert call(A) == words
        return
    with pytest.raises(error) as info:
        call(A)
    assert words in str(info.value), str(info.value)


def _allocated(A):
    alloc = A(4, 4)
    alloc.allocate_sequence("s", [5, 6, 7])
    return alloc
