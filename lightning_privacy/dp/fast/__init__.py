"""Fast per-sample clipping (book-keeping): per-sample norms from stored activations and output
gradients, and the clipped sum as one contraction per layer. Being built for issue 6."""
