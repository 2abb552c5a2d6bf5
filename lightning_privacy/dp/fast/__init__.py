"""Fast per-sample clipping (book-keeping): per-sample norms from stored activations and output
gradients, and the clipped sum as one contraction per layer.

- :class:`FastGradSampleHooks` attaches to an unmodified model (fast rules for Linear, Conv1d,
  Conv2d, Embedding, LayerNorm, GroupNorm; Opacus' grad samplers for the other layers).
- :class:`FastClipping` (mixed in before an Opacus optimizer class) clips from those records;
  :func:`fast_clipping` does the same to an Opacus optimizer built elsewhere.
- :func:`fast_rule_coverage` says which layers have a fast rule and which would fall back.

Layout: ``records`` (what a recording forward leaves, shared state, workspace, the rule
interfaces), one module per rule family (``grouped`` core, ``linear``, ``conv``, ``embedding``,
``norms``), and the table ``rules.FAST_RULES``.
"""

from lightning_privacy.dp.fast.clipping import FastClipping, fast_clipping
from lightning_privacy.dp.fast.hooks import FastGradSampleHooks, fast_rule_coverage
from lightning_privacy.dp.fast.rules import FAST_RULES

__all__ = ["FAST_RULES", "FastClipping", "FastGradSampleHooks", "fast_clipping", "fast_rule_coverage"]
