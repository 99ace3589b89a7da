"""A kernel constraint that bounds a layer's L1,inf norm (largest row L1 norm).

After every optimizer step Keras replaces the kernel `W` by `constraint(W)`. With
`L1InfConstraint(max_norm)` every row then satisfies `||W_o||_1 <= max_norm`, so the
layer's infinity-norm Lipschitz constant is at most `max_norm` (see
`larq_lipschitz.norms`).

**How it relates to Larq's `weight_clip`.** A layer has a single `kernel_constraint`,
so `L1InfConstraint` *replaces* the `kernel_constraint="weight_clip"` that binary Larq
layers usually carry. On its own it implies only `|w| <= max_norm` per entry (each entry
is at most its row's L1 norm), which is weaker than the clip to `[-1, 1]` whenever
`max_norm > 1`, the usual case (`n = 3 * 3 * 64` entries per row): entries then drift
beyond 1, where the straight-through estimator passes no gradient, and starve. Pass
`clip_value=1.0` to keep both bounds: the constraint then returns the exact Euclidean
projection onto the intersection `{|w_i| <= 1} ∩ {||w||_1 <= max_norm}`, which is
*not* a clip followed by the plain L1 projection (that composition can leave entries
further from the input than needed). Conversely, `weight_clip` alone bounds each row
by `n * clip_value`, the bound of an unscaled sign layer anyway.

String form: `kernel_constraint="l1inf_constraint"` gives `L1InfConstraint()` with
its defaults (`max_norm=1.0`: a non-expansive layer, `mode="project"`, no clip).
"""

from __future__ import annotations

from larq_lipschitz import norms
from larq_lipschitz.quantization import _latent

import tensorflow as tf

CONSTRAINT_MODES = ("project", "rescale")


@tf.keras.utils.register_keras_serializable(package="larq_lipschitz")
class L1InfConstraint(tf.keras.constraints.Constraint):
    """Keep every kernel row in the L1 ball of radius `max_norm`.

    - `mode="project"` (default): `W_o <- argmin_{||w||_1 <= max_norm} ||w - W_o||_2`,
      the closest feasible row: a soft threshold
      `sign(W_o) * max(|W_o| - theta_o, 0)` with `theta_o >= 0` chosen per row.
    - `mode="rescale"`: `W_o <- W_o * min(1, max_norm / ||W_o||_1)`, cheaper (no sort)
      but further from the unconstrained kernel; it keeps the sign pattern and the
      ratios within a row.

    Rows already inside the ball are left unchanged. With `clip_value`, entries are
    also kept in `[-clip_value, clip_value]` (the exact projection onto both sets in
    project mode; clip then rescale in rescale mode): use `clip_value=1.0` in place of
    Larq's `weight_clip`.

    On a Larq layer this constrains the *latent* kernel. For `magnitude_aware_sign` the
    deployed row norms equal the latent ones, so the deployed layer obeys the same
    bound; for an unscaled sign the deployed row norms stay the constant `n` whatever
    the latent kernel is, and the constraint cannot lower them (it still changes the
    latent weights, and the soft threshold sets small entries to 0, which Larq's sign
    maps to +1). A BatchNorm after the layer rescales its output and undoes the bound
    for the block: see `larq_lipschitz.scale_aware`.

    # Arguments
        max_norm: the row L1 radius, a finite number > 0.
        mode: `"project"` or `"rescale"`.
        layout: how the kernel maps to rows (`"auto"`, `"dense"`, `"conv"`,
            `"depthwise"`); depthwise kernels need `"depthwise"`.
        clip_value: optional bound on every entry's magnitude, a finite number > 0.

    # Raises
        ValueError: for a bad `max_norm`, `mode`, `layout` or `clip_value`.

    # Example
    ```python
    layer = lq.layers.QuantConv2D(
        64, 3, kernel_quantizer="magnitude_aware_sign",
        kernel_constraint=L1InfConstraint(max_norm=20.0, clip_value=1.0),
    )
    ```
    """

    def __init__(
        self,
        max_norm: float = 1.0,
        mode: str = "project",
        layout: str = "auto",
        clip_value: float | None = None,
    ):
        owner = type(self).__name__
        self.max_norm = norms.check_number(max_norm, "max_norm", owner, positive=True)
        if mode not in CONSTRAINT_MODES:
            raise ValueError(
                f"{owner}: mode must be one of {CONSTRAINT_MODES}, got {mode!r}."
            )
        self.mode = mode
        self.layout = norms.check_layout(layout, owner)
        self.clip_value = (
            None
            if clip_value is None
            else norms.check_number(clip_value, "clip_value", owner, positive=True)
        )

    def __call__(self, w):
        return norms.constrain_kernel(
            _latent(w), self.max_norm, self.mode, self.layout, self.clip_value
        )

    def get_config(self) -> dict:
        return {
            "max_norm": self.max_norm,
            "mode": self.mode,
            "layout": self.layout,
            "clip_value": self.clip_value,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


# Keras' legacy deserializer (.h5 files, SavedModel directories) looks classes up by
# their bare `class_name`; register it next to the "larq_lipschitz>" key.
tf.keras.utils.get_custom_objects()["L1InfConstraint"] = L1InfConstraint
# String form: `tf.keras.constraints.get(name)` builds `{"class_name": name, "config":
# {}}` and instantiates the class it finds under `name`.
tf.keras.utils.get_custom_objects()["l1inf_constraint"] = L1InfConstraint
