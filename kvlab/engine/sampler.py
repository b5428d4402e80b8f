"""The sampler: one token per sampling row of the step's logits, each row with its own params.

For a row with logits z (vocab wide):

    temperature == 0      argmax z                                    (greedy)
    otherwise             z / T -> keep top-k -> keep top-p -> p = softmax
                          token = argmax_i p_i / e_i,  e_i ~ Exponential(1)

The last line draws from p without a cumulative sum or a search: for independent
exponentials, argmax p_i / e_i lands on i with probability exactly p_i (the
"exponential race": min_i e_i / p_i is won by i with probability p_i / sum p). vLLM's
sampler does the same. Rows of seeded requests draw their e from their own
torch.Generator, one vocab-wide draw per token, so their text does not depend on what
else is in the batch; the other rows share one draw from the engine's generator.

top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2019) keeps the
smallest set of most likely tokens whose probability reaches p (always at least one).
Both are applied as a mask of -inf on one sorted copy of the logits. `exact_probs` gives
the distribution the sampler draws from, written the slow and obvious way: the tests
compare empirical frequencies with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device (copied with the
    step's other inputs by the runner; every row of the logits samples)."""
    temperature: torch.Tensor            # float32 (R,); 0 = greedy
    top_k: torch.Tensor                  # int (R,); >= vocab means no limit
    top_p: torch.Tensor                  # float32 (R,); 1 = no limit
    generators: list                     # (row, torch.Generator) for seeded rows
    all_greedy: bool
    needs_filter: bool                   # some row has top-k or top-p
    num_logprobs: int                    # largest `logprobs` asked by any row (-1: none)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) the logits outside each row's top-k and top-p set. logits (R, V), already
    divided by the temperature. One sort per step, for all rows."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)                 # (R, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]        # (1, V)
    drop = rank >= top_k[:, None]                                               # outside the top k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                                  # mass of the better tokens
    drop |= mass_before >= top_p[:, None]                                       # already reached p: drop
    drop[:, 0] = False                                                          # the best token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (R, V) float -> token ids int64 (R,). `generator` drives the unseeded rows."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    temp = batch.temperature.clamp(min=1e-6)[:, None]
    scaled = logits.float() / temp
    if batch.needs_filter:
        scaled = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
    probs = scaled.softmax(dim=-1)
    e = torch.empty_like(probs).exponential_(generator=generator)  # the engine's generator
    for row, gen in batch.generators:                              # seeded rows: their own stream
        e[row].exponential_(generator=gen)
    drawn = (probs / e).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy, drawn)


def sample_generator(params, index: int, device) -> torch.Generator | None:
    """Sample i of a seeded request draws from its own generator, seeded with (seed + i) mod 2**64."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed((params.seed + index) % 2**64)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (before temperature and filters, as
    vLLM reports by default): of the chosen tokens (R,), and the top k ids and values (R, k)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    top_vals, top_ids = logp.topk(max(k, 0), dim=-1)
    return chosen, top_ids, top_vals


def exact_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution one row is sampled from, written out literally (a reference for tests):
    softmax(z / T) restricted to the top-k tokens, then to the smallest most-likely set whose
    mass reaches top_p, renormalized. logits (V,) -> probabilities (V,) in float64."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(p, descending=True, stable=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    k = len(p) if top_k <= 0 else min(top_k, len(p))
    kept = p[order[:k]] / p[order[:k]].sum()
    mass = 0.0
    for i in range(k):
        keep[order[i]] = True
        mass += float(kept[i])
        if mass >= top_p:
            break
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()
