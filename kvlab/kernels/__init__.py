"""Attention kernels on a paged KV cache: torch references and Triton kernels.

    paged_attention_reference  plain torch: gather K/V through the block table, then softmax
    paged_attention            the Triton decode kernel (GQA, online softmax, split-K)
    store_kv / store_kv_reference  write new K/V into the paged cache through a slot mapping

One source runs everywhere: compiled on a CUDA GPU, and on a machine without
one through Triton's interpreter. The interpreter is chosen by the environment
variable TRITON_INTERPRET=1, which Triton reads when it is *imported*, so this
package sets it (when no CUDA GPU is present) before anything imports triton.
"""

from __future__ import annotations

import os
import sys
import warnings


def _choose_triton_mode() -> bool:
    """Set TRITON_INTERPRET=1 when no CUDA GPU is present; return True if interpreting."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if torch.cuda.is_available():
        return False
    if "triton" in sys.modules:
        # e.g. `from transformers import LlamaForCausalLM` imports triton. Triton's own
        # @triton.jit helpers (tl.zeros, tl.sum, ...) were then made for a GPU, and the
        # interpreter cannot run kernels that call them.
        warnings.warn(
            "kvlab.kernels: no CUDA GPU, and triton was imported (by transformers, say) before "
            "TRITON_INTERPRET=1 could be set, so kvlab's Triton kernels cannot run in this process. "
            "Export TRITON_INTERPRET=1, or import kvlab.kernels before transformers/triton.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


INTERPRET = _choose_triton_mode()

# Imported eagerly (after the line above), so that `kvlab.kernels.paged_attention` is the
# function, not the submodule of the same name.
from kvlab.kernels.paged_attention import (  # noqa: E402
    KernelConfig, choose_num_splits, paged_attention, paged_attention_reference,
)
from kvlab.kernels.store_kv import store_kv, store_kv_reference  # noqa: E402

__all__ = ["INTERPRET", "KernelConfig", "choose_num_splits", "paged_attention",
           "paged_attention_reference", "store_kv", "store_kv_reference"]
