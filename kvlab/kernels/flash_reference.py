"""How FlashAttention makes prefill attention cheap, as a tiled torch reference.

Plain attention over a T-token prompt (notebook 01) builds the (T, T) score matrix of every
head: softmax(Q K^T * scale) V. At T = 8192 and 9 heads that is 604 million scores, 2.4 GB in
fp32 for one layer, written to memory and read back, most of it masked away by the causal mask.

FlashAttention (Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", NeurIPS 2022; FlashAttention-2, 2023) never builds it. Queries are cut into tiles
of `block_m` rows and keys/values into tiles of `block_n` rows; one query tile visits the key
tiles one at a time, keeping per row a running max `m`, a running sum `l` and an output
accumulator `acc` (the online softmax of notebook 06, section 4). Only a (block_m, block_n) tile
of scores exists at any moment, in fast on-chip memory, and the result is the exact softmax.
With a causal mask, a key tile that lies wholly after the query tile is skipped without being
read (about half of them), and only tiles on the diagonal need the mask at all.

This module is the algorithm written in torch, with loops where the GPU kernel has programs:
`flash_attention_reference` and `tile_map` (which tiles are computed, masked or skipped),
checked against `naive_attention` (the T x T way) in tests/test_flash_reference.py. It is for
reading, not for speed: the Triton tutorial 06-fused-attention is a real kernel of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SKIPPED, FULL, DIAGONAL = 0, 1, 2     # tile_map codes: not computed; computed unmasked; computed with the mask


def _check(q, k, v, block_m: int, block_n: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (batch, heads, tokens, head_dim) tensor, "
                             f"got shape {tuple(t.shape)} {t.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, "
                         f"heads and head_dim, and k must equal v in shape")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive integer, got {b!r}")


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(Q K^T * scale) V with the whole (T_q, T_k) score matrix built (notebook 01's way).

    q: (B, H, T_q, D); k, v: (B, H, T_k, D). Causal: query i (the last T_q of T_k positions) sees
    keys 0 .. i + T_k - T_q."""
    _check(q, k, v, 1, 1)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys as queries (the queries are the last "
                         f"positions), got {q.shape[2]} queries and {k.shape[2]} keys")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale            # (B, H, T_q, T_k): the big one
    if causal:
        t_q, t_k = q.shape[2], k.shape[2]
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)                  # (B, H, T_q, D)


def tile_map(t_q: int, t_k: int, block_m: int, block_n: int, causal: bool = True) -> torch.Tensor:
    """(query tiles, key tiles) int8 codes: SKIPPED (wholly masked, never read), DIAGONAL (needs
    the mask) or FULL. Query row i sits at position i + t_k - t_q (the prompt ends the sequence)."""
    offset = t_k - t_q
    rows = torch.arange(0, t_q, block_m)                 # first query row of each tile
    cols = torch.arange(0, t_k, block_n)                 # first key of each tile
    last_row_pos = torch.clamp(rows + block_m, max=t_q) - 1 + offset      # (m,) latest position in the tile
    first_row_pos = rows + offset                                         # (m,) earliest
    last_col = torch.clamp(cols + block_n, max=t_k) - 1                   # (n,)
    codes = torch.full((len(rows), len(cols)), FULL, dtype=torch.int8)
    if causal:
        codes[cols[None, :] > last_row_pos[:, None]] = SKIPPED           # every key after every query
        crosses = (last_col[None, :] > first_row_pos[:, None]) & (cols[None, :] <= last_row_pos[:, None])
        codes[crosses] = DIAGONAL                                          # some keys after some queries
    return codes


@dataclass(frozen=True)
class FlashStats:
    """What the tiled pass did, against the naive one."""
    tiles_computed: int        # (query tile, key tile) pairs whose scores were computed
    tiles_skipped: int         # pairs skipped by the causal mask: never read, never computed
    tiles_masked: int          # computed pairs on the diagonal, where the mask applies
    scores_computed: int       # scores computed per (batch, head): tiles_computed tiles' worth
    scores_naive: int          # T_q * T_k: what plain attention computes and stores
    largest_score_tile: int    # scores held at once per (batch, head): block_m * block_n


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              scale: float | None = None, block_m: int = 64, block_n: int = 64,
                              return_stats: bool = False):
    """Exact attention, tile by tile, never building the (T_q, T_k) score matrix.

    q: (B, H, T_q, D); k, v: (B, H, T_k, D); the same causal convention as `naive_attention`.
    Computes in fp32 and returns q's dtype; with return_stats, also a FlashStats."""
    _check(q, k, v, block_m, block_n)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys as queries (the queries are the last "
                         f"positions), got {q.shape[2]} queries and {k.shape[2]} keys")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H, t_q, D = q.shape
    t_k = k.shape[2]
    codes = tile_map(t_q, t_k, block_m, block_n, causal)
    out = torch.empty(B, H, t_q, D, dtype=torch.float32, device=q.device)
    scores_computed = 0
    for i, r0 in enumerate(range(0, t_q, block_m)):              # one query tile: one GPU program
        q_tile = q[:, :, r0:r0 + block_m].float() * scale        # (B, H, bm, D)
        bm = q_tile.shape[2]
        m = torch.full((B, H, bm), float("-inf"), device=q.device)   # running max per query row
        l = torch.zeros(B, H, bm, device=q.device)                   # running sum of exp(score - m)
        acc = torch.zeros(B, H, bm, D, device=q.device)              # running sum of exp(score - m) * v
        for j, c0 in enumerate(range(0, t_k, block_n)):
            if codes[i, j] == SKIPPED:
                continue                                         # wholly in the future: never read
            k_tile = k[:, :, c0:c0 + block_n].float()            # (B, H, bn, D)
            v_tile = v[:, :, c0:c0 + block_n].float()
            s = q_tile @ k_tile.transpose(-1, -2)                # (B, H, bm, bn): the only scores that exist
            scores_computed += bm * s.shape[-1]
            if codes[i, j] == DIAGONAL:
                pos_q = torch.arange(r0, r0 + bm, device=q.device) + (t_k - t_q)
                pos_k = torch.arange(c0, c0 + s.shape[-1], device=q.device)
                s = s.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))                 # every row has a visible key in its first tile
            alpha = torch.exp(m - m_new)                         # rescale what was summed under the old max
            p = torch.exp(s - m_new[..., None])                  # (B, H, bm, bn)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v_tile
            m = m_new
        out[:, :, r0:r0 + bm] = acc / l[..., None]
    out = out.to(q.dtype)
    if not return_stats:
        return out
    stats = FlashStats(tiles_computed=int((codes != SKIPPED).sum()), tiles_skipped=int((codes == SKIPPED).sum()),
                       tiles_masked=int((codes == DIAGONAL).sum()), scores_computed=scores_computed,
                       scores_naive=t_q * t_k, largest_score_tile=block_m * block_n)
    return out, stats
