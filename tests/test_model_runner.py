"""The model runner alone, driven by hand-built SchedulerOutputs (issue 16): new sequences, decodes,
a fork with copy-on-write, a preemption and its re-admission, finished sequences, and a step launched
before the previous step's tokens were collected (asynchronous scheduling). Every sampled token is
compared with Hugging Face's greedy continuation of the same prompt, so the runner's persistent rows,
block tables, slot mapping and device-side token feed are each checked by the model's own output.
"""

from __future__ import annotations

import pytest
import torch

from kvlab.engine import EngineArgs, SamplingParams
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.scheduler import NewSequenceData, SchedulerOutput
from kvlab.model.transformer import Transformer

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
BS = 4


def hf_greedy(lm, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    return lm.hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                pad_token_id=0)[0, len(ids):].tolist()


def step(new=(), tokens=None, computed=None, updates=None, copies=(), finished=(), preempted=()) -> SchedulerOutput:
    return SchedulerOutput(list(new), dict(tokens or {}), dict(computed or {}), dict(updates or {}), list(copies),
                           list(finished), list(preempted))


@pytest.fixture
def runner(tiny_llama):
    args = EngineArgs(model=tiny_llama, block_size=BS, num_kv_blocks=32, max_num_seqs=8, max_num_batched_tokens=64)
    return ModelRunner(Transformer.from_hf(tiny_llama.hf_model), args, max_model_len=128)


def test_new_decode_fork_copy_on_write_preempt_readmit_finish(runner, tiny_llama):
    p, q = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25]
    ref_p, ref_q = hf_greedy(tiny_llama, p, 4), hf_greedy(tiny_llama, q, 3)
    A, C, C1 = ("a", 0), ("c", 0), ("c", 1)

    # 1. A joins: prefill of 6 tokens in blocks 0, 1; it samples its first token
    out = runner.execute_model(step([NewSequenceData(A, p, GREEDY)], {A: 6}, {A: 0}, {A: (0, [0, 1])})).get_output()
    assert out.sampled == {A: ref_p[0]} and set(runner.batch.row_of) == {A}

    # 2. A decodes (position 6, block 1); C joins with a sample C1 forked from it in the same step:
    #    both share C's blocks 2, 3 and sample from C's logits row
    fork = [NewSequenceData(C, q, GREEDY), NewSequenceData(C1, q, GREEDY, sample_from=C)]
    out = runner.execute_model(step(fork, {A: 1, C: 5}, {A: 6, C: 0}, {C: (0, [2, 3]), C1: (0, [2, 3])})).get_output()
    assert out.seq_ids == [A, C, C1] and out.sampled_token_ids == [ref_p[1], ref_q[0], ref_q[0]]

    # 3. all three decode; C1's first append into the shared last block moved it to block 4
    #    (copy-on-write): without the copy its position-4 key would be zeros and its token wrong
    out = runner.execute_model(step((), {A: 1, C: 1, C1: 1}, {A: 7, C: 5, C1: 5}, {C1: (1, [4])},
                                    copies=[(3, 4)])).get_output()
    assert out.sampled == {A: ref_p[2], C: ref_q[1], C1: ref_q[1]}
    assert torch.equal(runner.cache.kv[:, :, 4, :2], runner.cache.kv[:, :, 3, :2])   # positions 4, 5 copied

    # 4. A is preempted, then re-admitted with its generated tokens, in fresh blocks 5, 6: recomputed,
    #    it samples the same next token
    runner.execute_model(step(preempted=[A]))
    assert A not in runner.batch.row_of
    again = p + ref_p[:3]
    out = runner.execute_model(step([NewSequenceData(A, again, GREEDY)], {A: 9}, {A: 0},
                                    {A: (0, [5, 6, 7])})).get_output()
    assert out.sampled == {A: ref_p[3]}

    # 5. everyone finishes: the rows are free again
    runner.execute_model(step(finished=[A, C, C1]))
    assert not runner.batch.row_of and sorted(runner.batch._free_rows) == list(range(8))


def test_a_step_launched_before_the_last_steps_tokens_are_collected(runner, tiny_llama):
    """Asynchronous scheduling: step 2 is launched while step 1's sampled token is still on its way
    to the host; the runner feeds it to step 2 from the device, and the tokens equal HF's."""
    p = [31, 32, 33]
    ref = hf_greedy(tiny_llama, p, 4)
    A = ("a", 0)
    first = runner.execute_model(step([NewSequenceData(A, p, GREEDY)], {A: 3}, {A: 0}, {A: (0, [0])}))
    second = runner.execute_model(step((), {A: 1}, {A: 3}, {A: (1, [1])}))      # token 3 is not on the host yet
    third = runner.execute_model(step((), {A: 1}, {A: 4}))
    assert [first.get_output().sampled_token_ids, second.get_output().sampled_token_ids,
            third.get_output().sampled_token_ids] == [[ref[0]], [ref[1]], [ref[2]]]


def test_a_sequence_the_runner_cannot_take_fails_alone(runner, tiny_llama):
    """A new sequence whose sampling state cannot be built (here: its generator raises) is reported
    in ModelRunnerOutput.failed; the other sequence of the step runs and samples HF's token."""
    p, q = [41, 42, 43], [51, 52]

    def make_generator(params, index):
        if params.seed == 13:
            raise RuntimeError("no generator for you")
        return None

    runner.batch.make_generator = make_generator
    A, B = ("a", 0), ("b", 0)
    bad = SamplingParams(temperature=1.0, seed=13)
    out = runner.execute_model(step([NewSequenceData(A, p, bad), NewSequenceData(B, q, GREEDY)], {A: 3, B: 2},
                                    {A: 0, B: 0}, {A: (0, [0]), B: (0, [1])})).get_output()
    assert out.failed == {A: "RuntimeError: no generator for you"} and A not in runner.batch.row_of
    assert out.sampled == {B: hf_greedy(tiny_llama, q, 1)[0]}


def test_a_dropped_engine_frees_its_kv_cache_at_once(tiny_llama):
    """No reference cycle holds the runner: dropping an LLM frees its KV cache when the last
    reference goes, not when the garbage collector next runs (on a GPU the next LLM in the same
    process would otherwise find the memory still in use, as a probe of several engines did)."""
    import gc
    import weakref

    from kvlab import LLM

    gc.disable()
    try:
        for mode in (False, True):
            llm = LLM(model=tiny_llama, async_scheduling=mode, skip_tokenizer_init=True)
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
            cache = weakref.ref(llm.engine.runner.cache)
            del llm
            assert cache() is None, mode
    finally:
        gc.enable()
