"""kvlab's model decoding from the paged cache, against Hugging Face `generate`.

Greedy tokens are compared exactly: prompts of different lengths decoded together,
block sizes 1, 16 and 32, blocks scattered over the pool on purpose; a prefix-cache
hit that skips three blocks of prefill; forked continuations after copy-on-write.
"""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.model.generate import greedy_generate
from kvlab.paged import decode_step, gather_decode_attention, greedy_generate_paged, make_paged, prefill

PROMPTS = [
    "The factory production line optimization requires",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
NEW_TOKENS = 20


def hf_greedy(lm, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """HF generate, greedy, stopping at EOS: the independent reference."""
    x = torch.tensor([ids])
    return lm.hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def model(smollm2):
    return kvlab.Transformer.from_hf(smollm2.hf_model)


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [smollm2.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_outputs(smollm2, prompts):
    return [hf_greedy(smollm2, p) for p in prompts]


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_greedy_from_scattered_pages_equals_hf_generate(smollm2, model, prompts, hf_outputs, block_size):
    num_blocks = sum(-(-(len(p) + NEW_TOKENS) // block_size) for p in prompts) + 5
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(block_size)).tolist()
    paged = make_paged(model, num_blocks, block_size, free_order=order)
    out = greedy_generate_paged(model, prompts, NEW_TOKENS, eos_token_id=smollm2.tokenizer.eos_token_id,
                                paged=paged, free_finished=False)
    assert out == hf_outputs
    alloc = paged[0]
    tables = [alloc.block_table(s) for s in alloc.seq_ids()]
    if block_size < 32:           # logically contiguous, physically scattered
        assert all(t != list(range(t[0], t[0] + len(t))) for t in tables)


def test_prefix_cache_hit_skips_three_blocks_and_changes_nothing(smollm2, model):
    """Two prompts share a 48-token prefix (block size 16): the second reuses three full
    blocks, prefills only its own tokens, and generates what it generates without the cache."""
    system = (smollm2.encode("You are a helpful assistant that answers questions about "
                             "inference engines, KV caches and GPUs, briefly and accurately. " * 3))[:48]
    assert len(system) == 48
    first = system + smollm2.encode(" Question: what is a block table?")
    second = system + smollm2.encode(" Question: why page the KV cache?")
    seen_lengths = []

    def recording_model(ids, positions=None, attn=None):
        seen_lengths.append(ids.shape[1])
        return model(ids, positions=positions, attn=attn)

    alloc, cache, attn = make_paged(model, num_blocks=16, block_size=16, enable_prefix_caching=True)
    alloc.allocate_sequence("first", first)
    prefill(recording_model, attn, alloc, ["first"])
    table = alloc.allocate_sequence("second", second)
    assert alloc.num_cached_tokens("second") == 48
    assert table[:3] == alloc.block_table("first")[:3]
    assert [alloc.ref_count(b) for b in table[:3]] == [2, 2, 2]
    logits = prefill(recording_model, attn, alloc, ["second"])
    assert seen_lengths == [len(first), len(second) - 48]
    out = []
    for _ in range(16):
        out.append(int(logits[0].argmax()))
        logits = decode_step(model, attn, alloc, ["second"], [out[-1]])
    assert out == greedy_generate_paged(model, [second], 16, block_size=16)[0]   # no prefix cache


def test_forked_continuations_share_the_prompt_then_copy_on_write(smollm2, model):
    """Parallel sampling: the prompt is prefilled once, two continuations share its blocks;
    each starts with a different token, which forces copy-on-write of the shared partly
    filled last block; each then decodes exactly like an unshared run (HF) of its own."""
    prompt = smollm2.encode(PROMPTS[0] + " careful planning, because")
    assert len(prompt) % 16 != 0                       # the last block is partly filled
    alloc, cache, attn = make_paged(model, num_blocks=12, block_size=16)
    alloc.allocate_sequence("a", prompt)
    logits = prefill(model, attn, alloc, ["a"])
    first_tokens = logits[0].topk(2).indices.tolist()   # the two most likely next tokens
    alloc.fork("a", "b")
    assert alloc.block_table("a") == alloc.block_table("b")
    before = alloc.block_table("a")
    used = alloc.num_used_blocks
    logits = decode_step(model, attn, alloc, ["a", "b"], first_tokens)
    ta, tb = alloc.block_table("a"), alloc.block_table("b")
    assert ta[:-1] == tb[:-1] == before[:-1]            # full prompt blocks stay shared
    assert ta[-1] != tb[-1] and before[-1] in (ta[-1], tb[-1])   # one writer moved
    assert alloc.num_used_blocks == used + 1
    outs = [[t] for t in first_tokens]
    for _ in range(11):
        nxt = logits.argmax(dim=-1).tolist()
        for o, t in zip(outs, nxt):
            o.append(t)
        logits = decode_step(model, attn, alloc, ["a", "b"], nxt)
    for o, t in zip(outs, first_tokens):
        assert o[1:] == hf_greedy(smollm2, prompt + [t], 11)


@pytest.mark.parametrize("decode", ["reference", "gather"])
@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gpt2-random"])
def test_paged_equals_contiguous_cache_tiny(name, decode):
    """MHA with learned positions (GPT-2) and GQA with RoPE: paged == contiguous, token for token,
    with either decode attention function."""
    lm = kvlab.load_model(name)
    model = kvlab.Transformer.from_hf(lm.hf_model)
    prompts = [torch.randint(0, lm.spec.vocab_size, (n,)).tolist() for n in (5, 13, 1)]
    fn = gather_decode_attention if decode == "gather" else None
    paged = greedy_generate_paged(model, prompts, 12, block_size=4, seed=3, decode_attention=fn)
    assert paged == [greedy_generate(model, [p], 12).token_ids[0] for p in prompts]


def test_blocks_are_reused_the_moment_a_request_ends(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    alloc, cache, attn = make_paged(model, num_blocks=4, block_size=4)
    alloc.allocate_sequence("a", list(range(8)))
    prefill(model, attn, alloc, ["a"])
    old = alloc.block_table("a")
    assert not alloc.can_allocate(list(range(16)))     # 4 blocks needed, 2 free
    alloc.free_sequence("a")
    assert alloc.can_allocate(list(range(16)))
    assert set(old) <= set(alloc.allocate_sequence("b", list(range(16))))


def test_decode_step_out_of_blocks_appends_to_no_sequence(tiny_llama):
    """Pool of 3 blocks of 4; "a" and "b" hold 4 tokens each (one full block apiece), so one
    block is free and a decode step of both needs two. The step must raise OutOfBlocksError
    saying needed vs free and leave both sequences as they were: appending to "a" first and
    then failing on "b" would leave "a" a token whose K/V was never written."""
    from kvlab.paged import OutOfBlocksError
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    alloc, cache, attn = make_paged(model, num_blocks=3, block_size=4)
    for s in ("a", "b"):
        alloc.allocate_sequence(s, list(range(4)))
    prefill(model, attn, alloc, ["a", "b"])
    with pytest.raises(OutOfBlocksError, match="needs 2 free blocks, only 1 are free"):
        decode_step(model, attn, alloc, ["a", "b"], [7, 7])
    assert [alloc.num_tokens(s) for s in ("a", "b")] == [4, 4]
    assert [alloc.block_table(s) for s in ("a", "b")] == [[0], [1]] and alloc.num_free_blocks == 1
    decode_step(model, attn, alloc, ["a"], [7])                   # one of them still fits
    assert alloc.num_tokens("a") == 5 and alloc.num_free_blocks == 0


def test_greedy_generate_paged_out_of_blocks_allocates_no_prompt(tiny_llama):
    """Pool of 3 blocks of 4, two prompts of 8 tokens (2 blocks each, 4 in all): greedy_generate_paged
    must raise OutOfBlocksError before allocating either, not allocate the first and fail on the second."""
    from kvlab.paged import OutOfBlocksError
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    paged = make_paged(model, num_blocks=3, block_size=4)
    with pytest.raises(OutOfBlocksError, match="2 prompts need 4 free blocks, only 3 are free"):
        greedy_generate_paged(model, [list(range(8)), list(range(8))], 2, paged=paged)
    assert paged[0].seq_ids() == [] and paged[0].num_free_blocks == 3
