"""Fast per-sample clipping (book-keeping): per-sample norms from stored activations and output
gradients, and the clipped sum as one contraction per layer.

- :class:`FastGradSampleHooks` attaches to an unmodified model (fast rules for Linear, Conv1d,
  Conv2d, Embedding, LayerNorm, GroupNorm; Opacus' grad samplers for the other layers).
- :func:`fast_clipping` makes an Opacus ``DPOptimizer`` clip from those records.
- :func:`fast_rule_coverage` says which layers have a fast rule and which would fall back.
"""

from lightning_privacy.dp.fast.clipping import fast_clipping
from lightning_privacy.dp.fast.hooks import FastGradSampleHooks, fast_rule_coverage
from lightning_privacy.dp.fast.rules import FAST_RULES

__all__ = ["FAST_RULES", "FastGradSampleHooks", "fast_clipping", "fast_rule_coverage"]
