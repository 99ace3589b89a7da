"""Kernel regularizers that penalize a layer's Lipschitz constant.

- `L1InfLipschitz`: the infinity-norm bound `max_o ||W_o||_1` (`larq_lipschitz.norms`).
- `SpectralNormLipschitz`: the top singular value of the reshaped kernel, by power
  iteration with a vector kept from one step to the next.

Both act on the kernel Keras hands them, which for a Larq layer is the **latent**
full-precision kernel. Whether that moves the deployed layer depends on the kernel
quantizer (`larq_lipschitz.quantization.quantizer_kind`): with an unscaled sign the
deployed row norms are a constant and `L1InfLipschitz` cannot change them;
`larq_lipschitz.scale_aware.check_lipschitz_controls(model)` reports such cases.

String forms, for layers built from strings or configs:

```python
tf.keras.layers.Dense(10, kernel_regularizer="l1inf_lipschitz")  # L1InfLipschitz()
```

(`tf.keras.regularizers.get` turns a *registered class name* into the class, not an
instance, and a layer holding a class crashes at its first `model.losses`; the alias
`"l1inf_lipschitz"` is therefore registered as a ready instance with the default
arguments. `SpectralNormLipschitz` keeps per-layer state and has no string form.)
"""

from __future__ import annotations

import logging

from larq_lipschitz import norms
from larq_lipschitz.quantization import _latent

import larq as lq
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 1e-4


@tf.keras.utils.register_keras_serializable(package="larq_lipschitz")
class L1InfLipschitz(tf.keras.regularizers.Regularizer):
    """Penalty on the L1,inf norm (largest row L1 norm) of a kernel.

    With `n_o = sum_i |W[o, i]|` the L1 norm of the kernel row of output unit `o`:

    - `mode="max"` (default): `strength * max_o n_o`
    - `mode="excess"`:        `strength * max(0, max_o n_o - target)`
    - `mode="excess_sum"`:    `strength * sum_o max(0, n_o - target)`

    `max_o n_o` is the layer's Lipschitz constant in the infinity norm (exact for dense
    and convolution layers). The excess modes leave a layer alone once its bound is at
    most `target`; `"excess"` then moves only the worst row per step, `"excess_sum"`
    every row above the target.

    The default strength, 1e-4, is an order of magnitude below the 1e-3 that, on a
    CIFAR-10 ResNet-20 with about 40 per layer, drove latent row norms to almost zero
    (`METHOD.md` §8); at 1e-4 the penalty of such a network starts near 0.07, a few per
    cent of the initial cross-entropy. Tune it per model.

    The gradient is `strength * sign(W_o)` on the row(s) attaining the maximum and zero
    elsewhere (shared equally between tied rows).

    On a Larq layer this penalizes the *latent* kernel. That controls the deployed
    binary layer exactly for `magnitude_aware_sign` (its row norms equal the latent
    ones), not at all for an unscaled sign (constant row norms), and not the bound of a
    conv+BatchNorm block in any case, since BatchNorm divides the kernel's scale back
    out: use `larq_lipschitz.scale_aware.add_scale_aware_penalty` for those.

    # Arguments
        strength: weight of the penalty, a finite number >= 0.
        mode: `"max"`, `"excess"` or `"excess_sum"`.
        target: the bound the excess modes tolerate, a finite number >= 0; required by
            them, not allowed with `"max"`.
        layout: how the kernel maps to rows (`"auto"`, `"dense"`, `"conv"`,
            `"depthwise"`); depthwise kernels need `"depthwise"`.

    # Raises
        ValueError: for a negative or non-finite strength or target, an unknown mode or
            layout, or a target that does not fit the mode.

    # Example
    ```python
    layer = tf.keras.layers.Dense(
        10, kernel_regularizer=L1InfLipschitz(1e-3, mode="excess", target=2.0)
    )
    ```
    """

    def __init__(
        self,
        strength: float = DEFAULT_STRENGTH,
        mode: str = "max",
        target: float | None = None,
        layout: str = "auto",
    ):
        owner = type(self).__name__
        self.strength = norms.check_number(strength, "strength", owner)
        self.target = norms.check_penalty(mode, target, owner)
        self.mode = mode
        self.layout = norms.check_layout(layout, owner)

    def __call__(self, x):
        row_norms = norms.row_l1_norms(_latent(x), self.layout)
        return norms.penalty_from_row_norms(
            row_norms, self.strength, self.mode, self.target
        )

    def get_config(self) -> dict:
        return {
            "strength": self.strength,
            "mode": self.mode,
            "target": self.target,
            "layout": self.layout,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@tf.keras.utils.register_keras_serializable(package="larq_lipschitz")
class SpectralNormLipschitz(
    tf.keras.regularizers.Regularizer, tf.__internal__.tracking.AutoTrackable
):
    """Penalty on the top singular value of the reshaped kernel, by power iteration.

        penalty = strength * sigma_max(M),   M = kernel as (rows x row_length)

    where `M` is the latent kernel (`on="latent"`) or `q(W)`, the kernel after
    `quantizer` (`on="effective"`). Like spectral normalization, each call runs
    `power_iterations` steps of power iteration starting from the left vector kept from
    the previous call, so one step per training step suffices once the vector has
    converged. The estimate `u^T M v` never exceeds the true value and its gradient is
    `strength * u v^T`.

    This is the spectral norm of the *reshaped* kernel, a cheap L2 proxy. It is not the
    L2 operator norm of a convolution, nor an infinity-norm bound; see
    `larq_lipschitz.norms`. Before an unscaled sign, the latent kernel's spectral norm
    says little about the deployed kernel's; `on="effective"` with the layer's
    quantizer measures the deployed kernel instead (its gradient reaches the latent
    kernel through the quantizer's straight-through estimator).

    When the vector is stored: only by calls inside a traced function (`tf.function`),
    which is how `model.fit`, `model.evaluate` and custom `tf.function` steps run. An
    eager call returns the estimate after `power_iterations` steps from the stored
    vector without storing the result: Keras reads `layer.losses` eagerly while it saves
    and loads a model, before the saved weights are in place, and those incidental
    reads must not pull the vector toward the initializer's kernel. Consequence: with
    `model.fit(..., run_eagerly=True)` the vector does not advance; raise
    `power_iterations` there.

    State and distribution: the vector is a non-trainable `tf.Variable` created at the
    first call, with `synchronization=ON_READ`, so each replica of a
    `tf.distribute.MirroredStrategy` updates its own copy inside the replica context
    (the copies stay equal: every replica iterates on the same mirrored kernel). Keras
    recreates regularizers from their config when it clones or loads a model, so
    `get_config` stores the current vector under `"vector"`: a saved, loaded or cloned
    model resumes with the converged estimate. The vector is not a weight of the layer
    and is not in weight-only checkpoints (`save_weights`); there it restarts and needs
    a few steps to converge again. One instance serves one kernel: passing the same
    instance to two layers raises an error.

    # Arguments
        strength: weight of the penalty, a finite number >= 0.
        power_iterations: iterations per call, an integer >= 1.
        on: `"latent"` or `"effective"`.
        quantizer: the layer's kernel quantizer (a Larq quantizer or its name); required
            by `on="effective"`, not allowed with `"latent"`.
        layout: how the kernel maps to rows (see `larq_lipschitz.norms`).
        vector: the starting left vector (one entry per row), or None for a fixed
            pseudo-random start.

    # Example
    ```python
    layer = lq.layers.QuantConv2D(
        32, 3, kernel_quantizer="magnitude_aware_sign", kernel_constraint="weight_clip",
        kernel_regularizer=SpectralNormLipschitz(
            1e-4, on="effective", quantizer="magnitude_aware_sign"
        ),
    )
    ```
    """

    def __init__(
        self,
        strength: float = DEFAULT_STRENGTH,
        power_iterations: int = 1,
        on: str = "latent",
        quantizer=None,
        layout: str = "auto",
        vector=None,
    ):
        owner = type(self).__name__
        self.strength = norms.check_number(strength, "strength", owner)
        if isinstance(power_iterations, bool) or not isinstance(
            power_iterations, int | np.integer
        ):
            raise ValueError(
                f"{owner}: power_iterations must be an integer >= 1, got {power_iterations!r}."
            )
        if power_iterations < 1:
            raise ValueError(
                f"{owner}: power_iterations must be an integer >= 1, got {power_iterations!r}."
            )
        self.power_iterations = int(power_iterations)
        if on not in ("latent", "effective"):
            raise ValueError(
                f"{owner}: on must be 'latent' or 'effective', got {on!r}."
            )
        self.on = on
        if on == "effective" and quantizer is None:
            raise ValueError(
                f"{owner}: on='effective' needs the layer's kernel quantizer, got quantizer=None."
            )
        if on == "latent" and quantizer is not None:
            raise ValueError(
                f"{owner}: quantizer is only used with on='effective'; on='latent' got "
                f"quantizer={quantizer!r}."
            )
        self.quantizer = lq.quantizers.get(quantizer)
        self.layout = norms.check_layout(layout, owner)
        if vector is not None:
            vector = np.asarray(vector, dtype=np.float32)
            if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
                raise ValueError(
                    f"{owner}: vector must be a non-empty 1-D list of finite numbers, "
                    f"got shape {vector.shape}."
                )
        self._initial_vector = vector
        self._vector = None
        self._owner = None

    @property
    def vector(self) -> tf.Variable | None:
        """The power-iteration variable, or None before the first call."""
        return self._vector

    def _matrix(self, x) -> tf.Tensor:
        kernel = tf.convert_to_tensor(_latent(x))
        if self.on == "effective":
            kernel = tf.convert_to_tensor(self.quantizer(kernel))
        return norms.kernel_to_rows(kernel, self.layout)

    def _claim(self, x) -> None:
        """Remember the first kernel variable; refuse a second one."""
        variable = _latent(x)
        if not isinstance(variable, tf.Variable):
            return
        if self._owner is None:
            self._owner = variable.ref()
        elif self._owner != variable.ref():
            raise ValueError(
                "SpectralNormLipschitz keeps one power-iteration vector per kernel; this "
                f"instance already serves another kernel and was now given {variable.name!r}. "
                "Create one instance per layer."
            )

    def _start_vector(self, n_rows: int) -> np.ndarray:
        if self._initial_vector is not None:
            if self._initial_vector.size != n_rows:
                raise ValueError(
                    f"SpectralNormLipschitz: vector has {self._initial_vector.size} entries "
                    f"but the kernel has {n_rows} rows."
                )
            return self._initial_vector
        start = np.random.default_rng(20240601).standard_normal(n_rows)
        return (start / np.linalg.norm(start)).astype(np.float32)

    def _get_vector(self, n_rows: int, dtype) -> tf.Variable:
        if self._vector is not None:
            if self._vector.shape[0] != n_rows:
                raise ValueError(
                    f"SpectralNormLipschitz: this instance iterates on a kernel with "
                    f"{self._vector.shape[0]} rows and was given one with {n_rows}. "
                    "Create one instance per layer."
                )
            return self._vector
        start = self._start_vector(n_rows)

        def create(*_):
            # Lift the creation out of any tf.function being traced; in cross-replica
            # context a strategy scope, if any, makes it a distributed variable.
            with tf.init_scope():
                if self._vector is None:
                    self._vector = tf.Variable(
                        tf.constant(start, dtype=dtype),
                        trainable=False,
                        name="power_iteration_u",
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.MEAN,
                    )
            return self._vector

        replica = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and replica is not None:
            replica.merge_call(create)  # variables are created in cross-replica context
        else:
            create()
        return self._vector

    def __call__(self, x):
        self._claim(x)
        matrix = self._matrix(x)
        n_rows = matrix.shape[0]
        if n_rows is None:
            raise ValueError(
                "SpectralNormLipschitz needs a kernel with a static shape."
            )
        vector = self._get_vector(int(n_rows), matrix.dtype)
        sigma, u, _ = norms.power_iteration(
            matrix, tf.cast(vector.read_value(), matrix.dtype), self.power_iterations
        )
        if not tf.executing_eagerly():
            # Store the step only inside a traced step function (see class docstring).
            vector.assign(tf.cast(u, vector.dtype))
        return tf.cast(self.strength, sigma.dtype) * sigma

    def current_vector(self) -> list[float] | None:
        """The vector as a list of floats (the replicas' mean), or the start vector."""
        if self._vector is not None and tf.executing_eagerly():
            with tf.init_scope():
                value = tf.convert_to_tensor(self._vector.read_value()).numpy()
            return [float(v) for v in value]
        if self._initial_vector is not None:
            return [float(v) for v in self._initial_vector]
        return None

    def _quantizer_config(self):
        if self.quantizer is None:
            return None
        config = lq.quantizers.serialize(self.quantizer)
        if isinstance(config, dict):
            # Whether Keras has built the quantizer layer yet is not configuration.
            config = {k: v for k, v in config.items() if k != "build_config"}
        return config

    def get_config(self) -> dict:
        return {
            "strength": self.strength,
            "power_iterations": self.power_iterations,
            "on": self.on,
            "quantizer": self._quantizer_config(),
            "layout": self.layout,
            "vector": self.current_vector(),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(strength={self.strength!r}, "
            f"power_iterations={self.power_iterations!r}, on={self.on!r}, "
            f"layout={self.layout!r})"
        )


# Keras' legacy deserializer (used to load .h5 files and SavedModel directories) looks
# classes up by their bare `class_name`, not by the "larq_lipschitz>Name" key that
# `register_keras_serializable` adds; register the bare names too.
for _cls in (L1InfLipschitz, SpectralNormLipschitz):
    tf.keras.utils.get_custom_objects()[_cls.__name__] = _cls

# The string form: an instance, because `tf.keras.regularizers.get` returns whatever
# is registered under a plain name, and a layer needs an instance (module docstring).
tf.keras.utils.get_custom_objects()["l1inf_lipschitz"] = L1InfLipschitz()
