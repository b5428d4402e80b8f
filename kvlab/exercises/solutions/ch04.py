"""Solutions to chapter 04's exercises (notebooks/exercises/04_fragmentation.ipynb)."""

from __future__ import annotations


def slots_held(policy: str, num_tokens: int, final_len: int, max_seq_len: int, block_size: int) -> int:
    """Slots a request holds while it has num_tokens tokens (final_len at the end)."""
    if policy == "max-reserve":
        return max_seq_len                                            # the same region for everyone
    if policy == "pow2":
        return min(1 << (final_len - 1).bit_length(), max_seq_len)   # next power of two >= final_len, capped
    if policy == "oracle":
        return final_len                                              # exactly what it will need
    return -(-num_tokens // block_size) * block_size                  # paged: whole blocks, as it grows


def breakdown(policy: str, prompt_len: int, output_len: int, step: int, max_seq_len: int, block_size: int) -> dict:
    """The request's slots at a step (0 = admission: prompt + first output token)."""
    final_len = prompt_len + output_len
    tokens = prompt_len + 1 + step
    held = slots_held(policy, tokens, final_len, max_seq_len, block_size)
    will_fill = min(held, final_len)                                  # slots it fills before it finishes
    return {"token_states": tokens, "reservation": will_fill - tokens, "internal_fragmentation": held - will_fill}


def lifetime_shares(policy: str, prompt_len: int, output_len: int, max_seq_len: int, block_size: int) -> dict:
    """Each category's slot-steps over the request's life, as a share of all its slot-steps."""
    totals = dict.fromkeys(("token_states", "reservation", "internal_fragmentation"), 0)
    for step in range(output_len):                                    # it runs output_len steps
        for key, slots in breakdown(policy, prompt_len, output_len, step, max_seq_len, block_size).items():
            totals[key] += slots
    held = sum(totals.values())
    return {key: value / held for key, value in totals.items()}
