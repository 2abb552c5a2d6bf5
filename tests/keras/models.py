"""Small Keras models covering the layer kinds of issue 12, and an explicit per-sample reference."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


class Scale(keras.layers.Layer):
    """A custom layer with weights of its own: ``x * w + b``, elementwise."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="w")
        self.b = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="b")

    def call(self, x):
        return x * self.w + self.b


def build(kind: str, seed: int = 0) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A model of ``kind`` and 12 examples ``(x, y)`` for it (3 classes, logits out)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    n = 12
    if kind == "dense":
        layers = [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
        x = rng.normal(size=(n, 6)).astype("float32")
    elif kind == "dense_rows":  # the textbook model's shape: Dense on each row of an image
        layers = [
            keras.Input((4, 6)),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="tanh"),
        ]
        x = rng.normal(size=(n, 4, 6)).astype("float32")
    elif kind == "conv":
        layers = [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    elif kind == "conv_wide":  # C_in/groups >= 4: channels-last patches; few positions: the Gram identity
        layers = [
            keras.Input((3, 3, 8)),
            keras.layers.Conv2D(16, 2, activation="relu"),
            keras.layers.Conv2D(6, 2, padding="same", groups=2, data_format="channels_last"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 3, 3, 8)).astype("float32")
    elif kind == "conv1d":
        layers = [keras.Input((7, 2)), keras.layers.Conv1D(4, 3), keras.layers.Flatten(), keras.layers.Dense(3)]
        x = rng.normal(size=(n, 7, 2)).astype("float32")
    elif kind == "embedding":
        layers = [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(11, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
        x = rng.integers(0, 11, size=(n, 5)).astype("int32")
    elif kind == "layernorm":
        layers = [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 6)).astype("float32")
    elif kind == "groupnorm":
        layers = [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.GroupNormalization(groups=2),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 6)).astype("float32")
    elif kind == "conv_same_stride":  # asymmetric "same" padding, stride 2, an activation recomputed
        layers = [
            keras.Input((7, 6, 2)),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="elu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 7, 6, 2)).astype("float32")
    elif kind == "conv_dilated_groups":
        layers = [
            keras.Input((7, 7, 4)),
            keras.layers.Conv2D(6, (3, 2), dilation_rate=2, groups=2, use_bias=False, activation="sigmoid"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 7, 7, 4)).astype("float32")
    elif kind == "conv_channels_first":
        layers = [
            keras.Input((2, 6, 5)),
            keras.layers.Conv2D(3, 3, strides=2, padding="same", data_format="channels_first", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 2, 6, 5)).astype("float32")
    elif kind == "conv1d_causal":
        layers = [
            keras.Input((7, 2)),
            keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu"),
            keras.layers.Conv1D(3, 4, padding="same", strides=2, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 7, 2)).astype("float32")
    elif kind == "embedding_mask_zero":  # index 0 is masked downstream, its row still learns
        layers = [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(11, 4, mask_zero=True),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
        x = rng.integers(0, 11, size=(n, 5)).astype("int32")
        x[:, -1] = 0
    elif kind == "layernorm_axes":
        layers = [
            keras.Input((3, 4)),
            keras.layers.Dense(4),
            keras.layers.LayerNormalization(axis=[1, 2], center=False),
            keras.layers.LayerNormalization(scale=False),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 3, 4)).astype("float32")
    elif kind == "groupnorm_conv":
        layers = [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.GroupNormalization(groups=2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 5, 5, 2)).astype("float32")
    elif kind == "conv3d":  # strided, "same" padding (uneven: 5 -> 3 with kernel 2), two groups
        layers = [
            keras.Input((5, 4, 3, 2)),
            keras.layers.Conv3D(4, (2, 3, 2), strides=(2, 1, 1), padding="same", groups=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.normal(size=(n, 5, 4, 3, 2)).astype("float32")
    elif kind == "einsum_dense":  # a kernel over two output axes, a bias on one of them, an activation
        layers = [
            keras.Input((4, 5)),
            keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3), bias_axes="e", activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c"),
        ]
        x = rng.normal(size=(n, 4, 5)).astype("float32")
    elif kind == "attention":  # self-attention: four EinsumDense projections inside the layer
        inputs = keras.Input((4, 6))
        h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
        h = keras.layers.GlobalAveragePooling1D()(h)
        x = rng.normal(size=(n, 4, 6)).astype("float32")
        return keras.Model(inputs, keras.layers.Dense(3)(h)), x, rng.integers(0, 3, size=n)
    elif kind == "mixed":  # rule layers around a custom layer with weights of its own
        layers = [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(11, 4),
            keras.layers.Conv1D(4, 2, activation="relu"),
            keras.layers.LayerNormalization(),
            Scale(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
        x = rng.integers(0, 11, size=(n, 5)).astype("int32")
    elif kind == "dense_twice":  # one Dense layer called twice in the forward: one example, one summed gradient
        inputs = keras.Input((6,))
        shared = keras.layers.Dense(6, activation="tanh")
        x = rng.normal(size=(n, 6)).astype("float32")
        y = rng.integers(0, 3, size=n)
        return keras.Model(inputs, keras.layers.Dense(3)(shared(shared(inputs)))), x, y
    elif kind == "custom":
        layers = [keras.Input((6,)), Scale(), keras.layers.Dense(3)]
        x = rng.normal(size=(n, 6)).astype("float32")
    else:
        raise ValueError(kind)
    y = rng.integers(0, 3, size=n)
    return keras.Sequential(layers), x, y


KINDS = (
    "dense",
    "dense_rows",
    "dense_twice",
    "conv",
    "conv_wide",
    "conv1d",
    "conv_same_stride",
    "conv_dilated_groups",
    "conv_channels_first",
    "conv1d_causal",
    "conv3d",
    "einsum_dense",
    "attention",
    "embedding",
    "embedding_mask_zero",
    "layernorm",
    "layernorm_axes",
    "groupnorm",
    "groupnorm_conv",
    "mixed",
    "custom",
)

#: The layers of each kind that no book-keeping rule covers (computed by the exact vmap path).
EXACT_LAYERS = {"mixed": {"Scale"}, "custom": {"Scale"}}


def reference_clipped_mean(
    model: keras.Model, x: np.ndarray, y: np.ndarray, max_grad_norm: float, expected_batch: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each example's gradient by its own backward pass (Keras' ordinary call), clipped flat to C,
    summed and divided by the expected batch size; also the per-example gradient norms."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    params = [v.value for v in model.trainable_variables]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(x)):
        for p in params:
            p.grad = None
        loss = loss_fn(torch.as_tensor(y[i : i + 1]), model(torch.as_tensor(x[i : i + 1]), training=True))
        loss.backward()
        grads = [p.grad.double() for p in params]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    for p in params:
        p.grad = None
    return [t / expected_batch for t in total], torch.stack(norms)
