"""Models: their shapes (ModelSpec), loading real weights offline, and kvlab's own forward pass."""

from kvlab.model.spec import ModelSpec
from kvlab.model.attention import AttentionFn, causal_attention

__all__ = ["ModelSpec", "AttentionFn", "causal_attention"]
