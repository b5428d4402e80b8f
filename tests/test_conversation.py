"""kvlab.model.conversation: per-turn prompt, reply and prefix-cache hits, against a brute-force
re-rendering of the conversation with the real tokenizer, and on a toy template that rewrites
its history (where prefix caching must stop matching)."""

import pytest

from kvlab.model.conversation import conversation_turns, render

CHAT = [
    {"role": "user", "content": "What is a KV cache?"},
    {"role": "assistant", "content": "It keeps every earlier token's keys and values so decode need not recompute them."},
    {"role": "user", "content": "How big is it for Llama-3-8B?"},
    {"role": "assistant", "content": "128 KiB a token in bf16: 32 layers, K and V, 8 heads of 128."},
    {"role": "user", "content": "And with fp8?"},
    {"role": "assistant", "content": "Half: 64 KiB a token."},
]


def brute_force_shared(previous_prompt, previous_reply, prompt):
    """Longest n with prompt[:n] == (what the previous turn computed K/V for)[:n], tried from the longest down."""
    held = previous_prompt + previous_reply[:-1]
    for n in range(min(len(held), len(prompt)), -1, -1):
        if held[:n] == prompt[:n]:
            return n


@pytest.mark.parametrize("block_size", [1, 16])
def test_turns_match_a_brute_force_rerendering(smollm2, block_size):
    tok = smollm2.tokenizer
    turns = conversation_turns(tok, CHAT, block_size=block_size)
    assert len(turns) == 3
    previous = None
    for n, turn in enumerate(turns):
        prompt = tok.apply_chat_template(CHAT[: 2 * n + 1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok.apply_chat_template(CHAT[: 2 * n + 2], tokenize=False)
        reply_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        reply_ids = reply_ids[: reply_ids.index(tok.eos_token_id) + 1]
        assert turn.prompt_tokens == len(prompt_ids) and turn.reply_tokens == len(reply_ids)
        shared = 0 if previous is None else brute_force_shared(*previous, prompt_ids)
        assert turn.shared_tokens == shared
        assert turn.cached_tokens == shared // block_size * block_size
        assert turn.prefill_with_cache + turn.cached_tokens == turn.prefill_without_cache == len(prompt_ids)
        assert turn.kv_tokens == len(prompt_ids) + len(reply_ids) - 1
        previous = (prompt_ids, reply_ids)
    # SmolLM2's template re-renders history unchanged: each turn shares everything the last one computed
    for before, after in zip(turns, turns[1:]):
        assert after.shared_tokens == before.kv_tokens


class ToyTokenizer:
    """One token per character. Its template shows assistant replies after the last user message
    in full and shortens earlier ones to '...' (as templates that drop past reasoning do)."""
    eos_token_id = ord("$")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        text = "".join(f"<{m['role'][0]}>{m['content'] if m['role'] == 'user' or i > last_user else '...'}$"
                       for i, m in enumerate(messages))
        return text + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_a_template_that_rewrites_history_breaks_the_prefix():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a long first answer"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    first, second = conversation_turns(ToyTokenizer(), chat, block_size=1)
    assert render(ToyTokenizer(), chat[:1], True) == [ord(c) for c in "<u>hi$<a>"]
    assert (first.prompt_tokens, first.reply_tokens, first.shared_tokens) == (9, 20, 0)
    # turn 2's prompt is "<u>hi$<a>...$<u>more$<a>": it matches turn 1's tokens only up to "<u>hi$<a>"
    assert second.shared_tokens == 9 and second.prefill_with_cache == second.prompt_tokens - 9


def test_bad_input_says_what_is_wrong(smollm2):
    with pytest.raises(ValueError, match="must alternate user, assistant"):
        conversation_turns(smollm2.tokenizer, CHAT[:3])
    with pytest.raises(ValueError, match="must alternate user, assistant"):
        conversation_turns(smollm2.tokenizer, [CHAT[1], CHAT[0]])
    with pytest.raises(ValueError, match="block_size must be positive"):
        conversation_turns(smollm2.tokenizer, CHAT, block_size=0)
