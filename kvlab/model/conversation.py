"""A multi-turn chat, turn by turn: what each turn must prefill, and the KV it leaves behind.

A chat API is stateless: every turn sends the whole conversation again, rendered by the
model's chat template, and the engine prefills it. Turn n's prompt therefore starts with
everything turn n-1 already computed (its prompt and its reply), so without help the
prefill work grows with the length of the conversation, and over n turns as n².

Prefix caching keeps the K/V of finished requests, indexed by their tokens, and reuses it
when a new prompt starts with the same tokens. vLLM (and kvlab.paged) cache whole blocks
only: a block's K/V is reused when every one of its `block_size` tokens, and every token
before it, matches. So turn n prefills only what is new since turn n-1 (the end of the last
reply that did not fill a block, and the new user message), and the cached blocks stay
in memory between turns (until something needs the space and evicts them).

Counted from the real tokenizer and chat template; no model is run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    """One user message and the model's reply, as an engine sees them."""
    prompt_tokens: int        # the whole conversation so far + the generation prompt, as the template renders it
    reply_tokens: int         # tokens the model generates (its reply and the end-of-turn token)
    shared_tokens: int        # leading prompt tokens equal to what the previous turn computed K/V for
    cached_tokens: int        # of those, the ones in whole blocks: what prefix caching reuses

    @property
    def prefill_without_cache(self) -> int:
        return self.prompt_tokens

    @property
    def prefill_with_cache(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def kv_tokens(self) -> int:
        """Tokens with K/V in the cache at the end of the turn: the prompt and every generated
        token but the last (sampled, never fed back through the model)."""
        return self.prompt_tokens + self.reply_tokens - 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` as the model's chat template renders them (the template adds the
    special tokens itself, so the tokenizer adds none)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_turns(tokenizer, messages: list[dict], block_size: int = 16) -> list[Turn]:
    """Split a finished conversation (user and assistant messages alternating, after an optional
    system message) into turns, each with its prompt, reply and what prefix caching reuses.

    The reply's tokens are read off the template: the rendered conversation including the reply,
    from the end of the prompt up to and including the first end-of-turn token (the tokenizer's
    eos_token_id).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    roles = [m.get("role") for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if not body or body != ["user", "assistant"] * (len(body) // 2):
        raise ValueError("messages must alternate user, assistant, user, assistant, ... (after an optional "
                         f"system message) and end with an assistant reply; got roles {roles}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, so a reply's end cannot be found")
    turns, held = [], []                          # held: token ids whose K/V the previous turn computed
    for i, role in enumerate(roles):
        if role != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError(f"turn {len(turns) + 1}: the template renders the reply's prompt differently "
                             "with and without the reply")
        rest = full[len(prompt):]
        if eos not in rest:
            raise ValueError(f"turn {len(turns) + 1}: no end-of-turn token (id {eos}) after the reply")
        reply = rest[: rest.index(eos) + 1]
        shared = _common_prefix(held, prompt)
        # whole blocks only; and the last prompt token is always computed (its logits give the first reply token)
        cached = min(shared, len(prompt) - 1) // block_size * block_size
        turns.append(Turn(prompt_tokens=len(prompt), reply_tokens=len(reply), shared_tokens=shared,
                          cached_tokens=cached))
        held = prompt + reply[:-1]
    return turns
