"""Attention kernels on a paged KV cache: torch references and Triton kernels.

    paged_attention_reference  plain torch: gather K/V through the block table, then softmax
    paged_attention            the Triton decode kernel (GQA, online softmax, split-K), every
                               argument checked (values too: one device-to-host copy)
    prefill_attention (kvlab.kernels.prefill_attention)  prompt chunks after a context, causal,
                               read through the block table (the engine's prefill rows on a GPU);
                               its loop calls the decode kernel's two @triton.jit steps,
                               load_kv_tile and online_softmax_step
    store_kv / store_kv_reference  write new K/V into the paged cache through a slot mapping
    paged_attention_launch, store_kv_launch  the same kernels with no checks and no host sync,
                               for callers that built the metadata themselves (the engine)

One source runs everywhere: compiled on a CUDA GPU, and on a machine without
one through Triton's interpreter. The interpreter is chosen by the environment
variable TRITON_INTERPRET=1, which Triton reads when it is *imported*, so
`import kvlab` sets it (when no CUDA GPU is present) before anything imports triton.
"""

from __future__ import annotations

import os
import warnings


def _choose_triton_mode() -> bool:
    """True when Triton runs interpreted. `import kvlab` has already set TRITON_INTERPRET=1
    where there is no CUDA GPU, unless triton had been imported before kvlab."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if not torch.cuda.is_available():
        warnings.warn(
            "kvlab.kernels: no CUDA GPU, and triton was imported before TRITON_INTERPRET=1 "
            "could be set, so Triton kernels cannot run here. Set TRITON_INTERPRET=1 in the "
            "environment (or import kvlab before transformers and triton).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


INTERPRET = _choose_triton_mode()

# Imported eagerly (after the line above), so that `kvlab.kernels.paged_attention` is the
# function, not the submodule of the same name.
from kvlab.kernels.paged_attention import (  # noqa: E402
    DEFAULT_CONFIG, KernelConfig, choose_num_splits, paged_attention, paged_attention_launch,
    paged_attention_reference,
)
from kvlab.kernels.store_kv import store_kv, store_kv_launch, store_kv_reference  # noqa: E402

__all__ = ["DEFAULT_CONFIG", "INTERPRET", "KernelConfig", "choose_num_splits", "paged_attention",
           "paged_attention_launch", "paged_attention_reference", "store_kv", "store_kv_launch",
           "store_kv_reference"]
