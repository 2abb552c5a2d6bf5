"""The table of fast rules: one rule per layer type, each in its rule family's module.

The table *is* the list of what fast clipping supports; a layer type not in it (or a subclass,
whose forward may differ) falls back to Opacus' grad samplers.
"""

from __future__ import annotations

from torch import nn

from lightning_privacy.dp.fast.conv import ConvRule
from lightning_privacy.dp.fast.embedding import EmbeddingRule
from lightning_privacy.dp.fast.linear import LinearRule
from lightning_privacy.dp.fast.norms import GroupNormRule, LayerNormRule
from lightning_privacy.dp.fast.records import Rule

#: The fast rules, by exact layer type (a subclass may change the forward, so it falls back).
FAST_RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
}
