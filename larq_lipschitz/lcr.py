"""A faithful port of LCR, Lipschitz Continuity Retained BNNs (Shang et al., ECCV 2022).

LCR does not bound any weight norm. It compares, sample by sample, a scalar computed
from the activations of consecutive residual stages of the binarized student with the
same scalar computed from a frozen full-precision teacher of the same stage layout, and
adds the squared differences to the training loss. This module reproduces what the
authors' public (PyTorch, ImageNet) code computes, with the differences listed in
`docs/lcr.md`.

For stage outputs F_k (batch, H_k, W_k, C_k) and F_{k+1} (batch, H_{k+1}, W_{k+1},
C_{k+1}):

    P    = H_{k+1} W_{k+1}
    RM_k = pool(F_k) F_{k+1}^T / P                     (C_k, C_{k+1}) per sample
    v_k  = sqrt(|| RM_k RM_k^T 1 ||_2)                 one power step from all ones
    L    = sum_{k=0}^{S-2} 2^-(S-1-k) mean_batch (|g_k g_{k+1}| v_k^BNN - v_k^FP)^2
    loss = CE + alpha L / (B 10^4)

where `pool` is adaptive average pooling to (H_{k+1}, W_{k+1}), S the number of stages,
g_k a learnable scalar per student stage and B the global batch size.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

#: Layer names the CIFAR models give the output of each residual stage.
STAGE_NAME_PATTERN = re.compile(r"^stage(\d+)_out$")

#: The constant the public code divides the LCR term by, together with the batch size.
LCR_NORMALIZER = 1e4

#: alpha of the public ImageNet code; its earlier README (probably CIFAR) shows 3.2.
DEFAULT_ALPHA = 8.0


def _compute_dtype(x: tf.Tensor) -> tf.Tensor:
    """Half-precision features are promoted to float32; float32/float64 are kept."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise TypeError(f"LCR: features must be floating point, got {x.dtype.name}.")
    if x.dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)
    return x


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) averaging matrix of adaptive average pooling along one axis.

    Output cell i averages the input cells floor(i n / m) .. ceil((i + 1) n / m) - 1,
    the windows of PyTorch's `adaptive_avg_pool2d` (overlapping when m does not divide
    n).
    """
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        start = (i * size_in) // size_out
        stop = -((-(i + 1) * size_in) // size_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def _adaptive_average_pool(x: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Adaptive average pooling of NHWC `x` to (height, width); exact for any sizes."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (height, width):
        return x
    if h % height == 0 and w % width == 0:
        window = (h // height, w // width)
        return tf.nn.avg_pool2d(x, ksize=window, strides=window, padding="VALID")
    rows = tf.constant(_adaptive_pool_matrix(h, height), dtype=x.dtype)
    cols = tf.constant(_adaptive_pool_matrix(w, width), dtype=x.dtype)
    x = tf.einsum("ih,bhwc->biwc", rows, x)
    return tf.einsum("jw,biwc->bijc", cols, x)


def retention_matrix(f_k: tf.Tensor, f_k1: tf.Tensor) -> tf.Tensor:
    """Per-sample retention matrix between the outputs of two consecutive stages.

    F_k is average-pooled (adaptively, as PyTorch's `adaptive_avg_pool2d` does) to the
    spatial size of F_{k+1}; both are flattened to (C, P) with P = H_{k+1} W_{k+1}, and

        RM = F_k F_{k+1}^T / P,      shape (C_k, C_{k+1}) per sample.

    Half-precision inputs are computed in float32; float64 inputs stay float64.

    # Arguments
        f_k: the earlier stage's output, (batch, H_k, W_k, C_k), channels last.
        f_k1: the next stage's output, (batch, H_{k+1}, W_{k+1}, C_{k+1}).

    # Returns
        A tensor of shape (batch, C_k, C_{k+1}).

    # Raises
        ValueError: if an input is not rank 4, its spatial size is not static, or F_k is
            smaller than F_{k+1} along height or width.

    # Example
    ```python
    rm = retention_matrix(tf.ones((2, 8, 8, 4)), tf.ones((2, 4, 4, 6)))
    assert rm.shape == (2, 4, 6)
    ```
    """
    f_k = _compute_dtype(f_k)
    f_k1 = tf.cast(_compute_dtype(f_k1), f_k.dtype)
    for name, f in (("f_k", f_k), ("f_k1", f_k1)):
        if f.shape.rank != 4:
            raise ValueError(
                f"retention_matrix: {name} must be (batch, height, width, channels), "
                f"got shape {f.shape}."
            )
        if f.shape[1] is None or f.shape[2] is None:
            raise ValueError(
                f"retention_matrix: the spatial size of {name} must be static, got {f.shape}."
            )
    (h, w), (ho, wo) = f_k.shape[1:3], f_k1.shape[1:3]
    if h < ho or w < wo:
        raise ValueError(
            "retention_matrix: f_k must be at least as large as f_k1 along height and "
            f"width (it is pooled down to it), got {h}x{w} and {ho}x{wo}."
        )
    pooled = _adaptive_average_pool(f_k, ho, wo)
    positions = ho * wo
    batch = tf.shape(f_k)[0]
    a = tf.reshape(pooled, tf.stack([batch, positions, tf.shape(f_k)[3]]))
    b = tf.reshape(f_k1, tf.stack([batch, positions, tf.shape(f_k1)[3]]))
    return tf.matmul(a, b, transpose_a=True) / tf.cast(positions, f_k.dtype)


def _safe_norm(m: tf.Tensor) -> tf.Tensor:
    """||m||_2 over the last axis, with gradient 0 (not NaN) where m is all zeros."""
    squares = tf.reduce_sum(tf.square(m), axis=-1)
    positive = squares > 0
    safe = tf.where(positive, squares, tf.ones_like(squares))
    return tf.where(positive, tf.sqrt(safe), tf.zeros_like(squares))


def top_eigen_estimate(rm: tf.Tensor, iterations: int = 1) -> tf.Tensor:
    """The "top eigenvalue" of the LCR code: power steps on K = RM RM^T from all ones.

    With v_0 = 1 (not normalized) and, for t = 1 .. iterations,

        m_t = K v_{t-1},   n_t = ||m_t||_2,   v_t = m_t / n_t,

    the value is sqrt(n_T). The public code takes a single step, so the default is

        value = sqrt(|| RM RM^T 1 ||_2).

    This only loosely approximates the top singular value sigma_1 of RM. With one step,
    ||K 1|| <= sigma_1^2 ||1|| = sigma_1^2 sqrt(C_k), so value / sigma_1 can lie
    anywhere in [0, C_k^(1/4)]. It nears the top of that range when RM is close to rank
    one with a flat left singular vector, as for nonnegative (ReLU) features: value ~
    C_k^(1/4) sigma_1, about 2.8 sigma_1 for 64 channels. It is near 0 when 1 is nearly
    orthogonal to the top singular vectors. More `iterations` converge to sigma_1
    (unless the top eigenvector of K is orthogonal to 1).

    K 1 is computed as RM (RM^T 1): the same number without forming K. The gradient is
    taken through every step, as in the public code, and is 0 (not NaN) for a sample
    whose RM is zero.

    # Arguments
        rm: retention matrices, (batch, C_k, C_{k+1}).
        iterations: number of power steps, >= 1.

    # Returns
        A tensor of shape (batch,).

    # Raises
        ValueError: if `rm` is not rank 3 or `iterations` < 1.

    # Example
    ```python
    value = top_eigen_estimate(tf.eye(3, batch_shape=[1]))  # K = I: 3^(1/4)
    ```
    """
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, int)
        or iterations < 1
    ):
        raise ValueError(
            f"top_eigen_estimate: iterations must be an integer >= 1, got {iterations!r}."
        )
    rm = _compute_dtype(rm)
    if rm.shape.rank != 3:
        raise ValueError(
            f"top_eigen_estimate: rm must be (batch, C_k, C_k1), got shape {rm.shape}."
        )
    v = tf.ones_like(rm[:, :, 0])
    norm = None
    for _ in range(iterations):
        m = tf.linalg.matvec(rm, tf.linalg.matvec(rm, v, transpose_a=True))
        norm = _safe_norm(m)
        v = tf.math.divide_no_nan(m, norm[:, None])
    return tf.sqrt(norm)


def _validate_features(student_features, teacher_features, scales):
    student_features = list(student_features)
    teacher_features = list(teacher_features)
    stages = len(student_features)
    if stages < 2:
        raise ValueError(
            f"lcr_loss: at least 2 stages are needed (one pair), got {stages} student "
            "feature maps."
        )
    if len(teacher_features) != stages:
        raise ValueError(
            f"lcr_loss: the student has {stages} stages and the teacher "
            f"{len(teacher_features)}; both need the same stage layout."
        )
    if scales is not None:
        scales = list(scales)
        if len(scales) != stages:
            raise ValueError(
                f"lcr_loss: one scale per student stage is needed ({stages}), got "
                f"{len(scales)}."
            )
    return student_features, teacher_features, scales


def lcr_loss(
    student_features: Sequence[tf.Tensor],
    teacher_features: Sequence[tf.Tensor],
    scales: Sequence[tf.Tensor | tf.Variable | float] | None = None,
    *,
    reduction: str = "mean",
    iterations: int = 1,
) -> tf.Tensor:
    """The LCR loss between consecutive stage pairs of a student and a teacher.

    With S stages, v_k = `top_eigen_estimate(retention_matrix(F_k, F_{k+1}))` per
    sample, and g_k the student's scale of stage k (it multiplies the stage's features,
    so v_k^BNN by |g_k g_{k+1}|):

        L = sum_{k=0}^{S-2} 2^-(S-1-k) mean_batch (|g_k g_{k+1}| v_k^BNN - v_k^FP)^2

    The deepest pair weighs most (S = 4, ResNet-18: 1/8, 1/4, 1/2; S = 3, ResNet-20:
    1/4, 1/2; S = 2: 1/2). The teacher side is computed under `tf.stop_gradient`. This
    is the quantity the public code returns; the training loss adds alpha L / (B 10^4)
    (see `LCRModel`).

    # Arguments
        student_features: S stage outputs of the student, each (batch, H, W, C), deepest
            last; spatial sizes must not grow from one stage to the next.
        teacher_features: S stage outputs of the teacher for the same inputs.
        scales: S scalars (e.g. trainable variables) multiplying the student's stage
            features inside the loss, or `None` for all ones.
        reduction: `"mean"` returns L; `"none"` returns the per-sample terms of shape
            (batch,), whose mean is L.
        iterations: power steps of `top_eigen_estimate` (the public code: 1).

    # Returns
        A scalar (`"mean"`) or a (batch,) tensor (`"none"`).

    # Raises
        ValueError: mismatched numbers of stages or scales, fewer than 2 stages, an
            unknown `reduction`, or feature maps `retention_matrix` rejects.

    # Example
    ```python
    s = [tf.random.normal((2, 8, 8, 4)), tf.random.normal((2, 4, 4, 8))]
    t = [tf.random.normal((2, 8, 8, 4)), tf.random.normal((2, 4, 4, 8))]
    loss = lcr_loss(s, t)  # 2^-1 mean_batch (v^BNN - v^FP)^2: one pair, S = 2
    ```
    """
    if reduction not in ("mean", "none"):
        raise ValueError(
            f"lcr_loss: reduction must be 'mean' or 'none', got {reduction!r}."
        )
    student_features, teacher_features, scales = _validate_features(
        student_features, teacher_features, scales
    )
    stages = len(student_features)
    per_sample = None
    for k in range(stages - 1):
        value_s = top_eigen_estimate(
            retention_matrix(student_features[k], student_features[k + 1]), iterations
        )
        if scales is not None:
            gain = tf.abs(
                tf.cast(scales[k], value_s.dtype)
                * tf.cast(scales[k + 1], value_s.dtype)
            )
            value_s = value_s * gain
        value_t = top_eigen_estimate(
            retention_matrix(
                tf.stop_gradient(teacher_features[k]),
                tf.stop_gradient(teacher_features[k + 1]),
            ),
            iterations,
        )
        value_t = tf.stop_gradient(tf.cast(value_t, value_s.dtype))
        term = tf.square(value_s - value_t) * (2.0 ** -(stages - 1 - k))
        per_sample = term if per_sample is None else per_sample + term
    if reduction == "none":
        return per_sample
    return tf.reduce_mean(per_sample)


def find_stage_names(model: tf.keras.Model) -> list[str]:
    """Names of the model's layers `stage1_out`, `stage2_out`, ..., in stage order.

    This is the naming convention of the package's CIFAR models (the output layer of
    each residual stage); only the model's top-level layers are searched.

    # Example
    ```python
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="stage1_out")(inputs)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stage2_out")(x)
    assert find_stage_names(tf.keras.Model(inputs, x)) == ["stage1_out", "stage2_out"]
    ```
    """
    found = []
    for layer in model.layers:
        match = STAGE_NAME_PATTERN.match(layer.name)
        if match:
            found.append((int(match.group(1)), layer.name))
    return [name for _, name in sorted(found)]


def _is_quantized(layer: tf.keras.layers.Layer) -> bool:
    return any(
        getattr(layer, attribute, None) is not None
        for attribute in ("kernel_quantizer", "input_quantizer", "depthwise_quantizer")
    )


def _feature_model(model: tf.keras.Model, names: Sequence[str], with_output: bool):
    role = "student" if with_output else "teacher"
    if not hasattr(model, "inputs") or not model.inputs:
        raise ValueError(
            f"LCRModel: the {role} must be a functional Keras model (its stage outputs are "
            f"read by layer name); {model.name!r} has no symbolic inputs."
        )
    outputs = []
    for name in names:
        try:
            outputs.append(model.get_layer(name).output)
        except ValueError:
            raise ValueError(
                f"LCRModel: the {role} {model.name!r} has no top-level layer named "
                f"{name!r}."
            ) from None
    for k in range(len(outputs) - 1):
        earlier, later = outputs[k], outputs[k + 1]
        if earlier.shape.rank != 4 or later.shape.rank != 4:
            raise ValueError(
                f"LCRModel: stage outputs of the {role} must be 4-D feature maps, got "
                f"{names[k]}: {earlier.shape}, {names[k + 1]}: {later.shape}."
            )
        if earlier.shape[1] < later.shape[1] or earlier.shape[2] < later.shape[2]:
            raise ValueError(
                f"LCRModel: the {role}'s stages must not grow spatially, got "
                f"{names[k]}: {earlier.shape} before {names[k + 1]}: {later.shape}."
            )
    if with_output:
        if len(model.outputs) != 1:
            raise ValueError(
                f"LCRModel: the student must have a single output, got {len(model.outputs)}."
            )
        outputs = [model.outputs[0], *outputs]
    return tf.keras.Model(model.inputs, outputs, name=f"{model.name}_lcr_features")


class _FeatureExtractors:
    """Holds the two feature models outside Keras tracking (their layers are the
    student's and teacher's own, which LCRModel already tracks)."""

    def __init__(self, student: tf.keras.Model, teacher: tf.keras.Model):
        self.student = student
        self.teacher = teacher


def _per_sample_loss(loss) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    if isinstance(loss, tf.keras.losses.Loss):
        return loss.call
    if isinstance(loss, str) or callable(loss):
        resolved = tf.keras.losses.get(loss)
        return resolved.call if isinstance(resolved, tf.keras.losses.Loss) else resolved
    raise ValueError(
        "LCRModel.compile: loss must be one Keras loss (a name, a function or a "
        f"tf.keras.losses.Loss) for the student's single output, got {loss!r}."
    )


@tf.keras.utils.register_keras_serializable(package="larq_lipschitz")
class LCRModel(tf.keras.Model):
    """Trains a binarized student with LCR against a frozen full-precision teacher.

    `call` returns the student's output, so `predict`, `evaluate` and the metrics behave
    as for the student alone; the student itself is `.student` and saves and loads as
    any Keras model (`lcr_model.student.save("bnn.keras")`). `train_step` minimizes, per
    global batch of B examples,

        loss = CE + alpha L / (B 10^4) + (student's regularization losses)

    with L from `lcr_loss` over the stage outputs (layers `stage1_out`, `stage2_out`,
    ..., or `stage_names`), one trainable scale per student stage (`.scales`,
    initialized to 1, weights of this model and not of the student), and CE the loss
    given to `compile`.

    Replicas (`tf.distribute`): B is the *global* batch size, the sum of the per-replica
    batch sizes, all-reduced at every step (so an uneven last batch counts right). The
    public code divides by the batch twice (in the MSE mean and in alpha L / B), so its
    term is alpha sum_b l_b / (B^2 10^4) with l_b the per-sample terms. Each replica
    contributes its own sum_b l_b / (B^2 10^4), its CE sum divided by B, and its
    regularization losses divided by the number of replicas
    (`tf.nn.scale_regularization_loss`). The all-reduced gradient is then that of the
    single-device loss on the whole batch, and 1 or N replicas of the same global batch
    make the same update (BatchNorm aside: plain BatchNorm normalizes each replica's
    slice; use `synchronized=True` BatchNorm for an identical update). Because of the
    1/B^2, the weight of the LCR term per example falls as 1/B: alpha is tied to the
    batch size (the public ImageNet command uses B = 128).

    The teacher is frozen (`trainable=False`) and run in inference mode, so its
    BatchNorm uses its moving statistics; the public code runs it in training mode
    (batch statistics). Evaluation reports `loss` = CE + regularization (what the
    student alone reports) and `ce`, not the LCR term; training reports `loss`, `ce` and
    `lcr` (the term as added, alpha L / (B 10^4)). `loss_weights` is not supported.

    # Arguments
        student: a functional (binarized) Keras model with one output and stage layers.
        teacher: a trained full-precision functional model with the same stage names,
            fed the same inputs (see `build_teacher`).
        alpha: weight of the LCR term, a finite number >= 0 (8 in the public ImageNet
            code, 3.2 in its earlier, probably CIFAR, README).
        stage_names: names of the stage output layers, earliest first; `None` finds the
            student's `stageK_out` layers.
        iterations: power steps of `top_eigen_estimate` (the public code: 1).

    # Raises
        ValueError: fewer than 2 stages, stages missing in either model, growing spatial
            sizes, more than one student output, or an invalid `alpha`.

    # Example
    ```python
    with strategy.scope():  # or none
        model = LCRModel(student, teacher, alpha=3.2)
        model.compile(
            tf.keras.optimizers.Adam(1e-3),
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(train_data, epochs=1)
    model.student.save("bnn.keras")
    ```
    """

    def __init__(
        self,
        student: tf.keras.Model,
        teacher: tf.keras.Model,
        alpha: float = DEFAULT_ALPHA,
        stage_names: Sequence[str] | None = None,
        iterations: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(student, tf.keras.Model) or not isinstance(
            teacher, tf.keras.Model
        ):
            raise ValueError(
                "LCRModel: student and teacher must be Keras models, got "
                f"{type(student).__name__} and {type(teacher).__name__}."
            )
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(
                f"LCRModel: alpha must be a finite number >= 0, got {alpha!r}."
            ) from None
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(
                f"LCRModel: alpha must be a finite number >= 0, got {alpha}."
            )
        if (
            isinstance(iterations, bool)
            or not isinstance(iterations, int)
            or iterations < 1
        ):
            raise ValueError(
                f"LCRModel: iterations must be an integer >= 1, got {iterations!r}."
            )
        if stage_names is None:
            names = find_stage_names(student)
            if len(names) < 2:
                raise ValueError(
                    f"LCRModel: the student {student.name!r} has {len(names)} layers named "
                    "stageK_out; LCR needs at least 2 stages (pass stage_names=...)."
                )
        else:
            names = [str(n) for n in stage_names]
            if len(names) < 2:
                raise ValueError(
                    f"LCRModel: at least 2 stage names are needed, got {names}."
                )
        self.alpha = alpha
        self._stage_names = tuple(names)
        self.iterations = iterations
        self.student = student
        teacher.trainable = False
        self.teacher = teacher
        quantized = [layer.name for layer in teacher.layers if _is_quantized(layer)]
        if quantized:
            log.warning(
                "LCRModel: the teacher %r has quantized layers (%s); LCR expects a "
                "full-precision teacher.",
                teacher.name,
                ", ".join(quantized[:5]) + (", ..." if len(quantized) > 5 else ""),
            )
        self._features = _FeatureExtractors(
            _feature_model(student, names, with_output=True),
            _feature_model(teacher, names, with_output=False),
        )
        self.scales = [
            self.add_weight(
                name=f"{name}_scale", shape=(), initializer="ones", trainable=True
            )
            for name in names
        ]
        self._loss_tracker = tf.keras.metrics.Mean(name="loss")
        self._ce_tracker = tf.keras.metrics.Mean(name="ce")
        self._lcr_tracker = tf.keras.metrics.Mean(name="lcr")
        self._task_loss = None
        # Every weight exists now (the student's, the teacher's and the scales).
        self.built = True

    @property
    def stage_names(self) -> list[str]:
        """Names of the stage output layers, earliest first."""
        return list(self._stage_names)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        if kwargs.get("loss_weights") is not None:
            raise ValueError("LCRModel.compile: loss_weights is not supported.")
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._task_loss = None if loss is None else _per_sample_loss(loss)

    @property
    def metrics(self):
        own = [self._loss_tracker, self._ce_tracker, self._lcr_tracker]
        skip = {id(m) for m in own}
        if self._is_compiled and self.compiled_loss is not None:
            skip |= {id(m) for m in self.compiled_loss.metrics}
        rest = [m for m in super().metrics if id(m) not in skip]
        return own + rest

    def _global_batch(self, local_batch: tf.Tensor) -> tf.Tensor:
        context = tf.distribute.get_replica_context()
        local = tf.cast(local_batch, tf.float32)
        if context is None:  # cross-replica context: no per-replica split
            return local
        return context.all_reduce(tf.distribute.ReduceOp.SUM, local)

    def _task_terms(self, y, y_pred, sample_weight, global_batch):
        if self._task_loss is None:
            raise ValueError(
                "LCRModel: compile the model with a loss (e.g. "
                "SparseCategoricalCrossentropy) before training or evaluating."
            )
        per_sample = tf.cast(self._task_loss(y, y_pred), tf.float32)
        if per_sample.shape.rank is not None and per_sample.shape.rank > 1:
            per_sample = tf.reduce_mean(
                per_sample, axis=list(range(1, per_sample.shape.rank))
            )
        if sample_weight is not None:
            sample_weight = tf.cast(sample_weight, tf.float32)
        ce = tf.nn.compute_average_loss(
            per_sample,
            sample_weight=sample_weight,
            global_batch_size=tf.cast(global_batch, tf.int64),
        )
        regularization = self.student.losses
        if regularization:
            reg = tf.nn.scale_regularization_loss(
                tf.add_n([tf.cast(r, tf.float32) for r in regularization])
            )
        else:
            reg = tf.constant(0.0)
        return ce, reg

    def _track(self, tracker, value, local_batch, global_batch):
        # `value` is this replica's share of a global quantity G (the shares sum to G).
        # A batch-weighted mean of share * B / b over the replicas is exactly G.
        weight = tf.cast(local_batch, tf.float32)
        tracker.update_state(
            tf.math.divide_no_nan(value * global_batch, weight), sample_weight=weight
        )

    def train_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        teacher_features = list(self._features.teacher(x, training=False))
        with tf.GradientTape() as tape:
            outputs = self._features.student(x, training=True)
            y_pred, student_features = outputs[0], list(outputs[1:])
            local_batch = tf.shape(y_pred)[0]
            global_batch = self._global_batch(local_batch)
            ce, reg = self._task_terms(y, y_pred, sample_weight, global_batch)
            per_sample = lcr_loss(
                student_features,
                teacher_features,
                self.scales,
                reduction="none",
                iterations=self.iterations,
            )
            lcr = tf.math.divide_no_nan(
                self.alpha * tf.reduce_sum(tf.cast(per_sample, tf.float32)),
                LCR_NORMALIZER * tf.square(global_batch),
            )
            loss = ce + lcr + reg
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        self._track(self._loss_tracker, loss, local_batch, global_batch)
        self._track(self._ce_tracker, ce, local_batch, global_batch)
        self._track(self._lcr_tracker, lcr, local_batch, global_batch)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.student(x, training=False)
        local_batch = tf.shape(y_pred)[0]
        global_batch = self._global_batch(local_batch)
        ce, reg = self._task_terms(y, y_pred, sample_weight, global_batch)
        self._track(self._loss_tracker, ce + reg, local_batch, global_batch)
        self._track(self._ce_tracker, ce, local_batch, global_batch)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return {m.name: m.result() for m in self.metrics if m is not self._lcr_tracker}

    def get_config(self):
        return {
            "name": self.name,
            "student": tf.keras.utils.serialize_keras_object(self.student),
            "teacher": tf.keras.utils.serialize_keras_object(self.teacher),
            "alpha": float(self.alpha),
            "stage_names": list(self.stage_names),
            "iterations": int(self.iterations),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("student", "teacher"):
            config[key] = tf.keras.layers.deserialize(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)


def build_teacher(
    model: str | Callable[..., tf.keras.Model],
    *,
    weights: str | os.PathLike | None = None,
    **kwargs,
) -> tf.keras.Model:
    """A frozen full-precision teacher for `LCRModel`.

    LCR needs a *trained* full-precision network with the student's stage layout. The
    package does not train one implicitly: train the same architecture at 32/32 bits
    like any other model (`larq-lipschitz train --weight-bits 32 --activation-bits 32
    --regularizer none`, or `model.fit`), save it, and either load the saved model with
    `tf.keras.models.load_model(path, compile=False)` or rebuild it here and load its
    weights.

    # Arguments
        model: a model name, built as `larq_lipschitz.models.get(model, weight_bits=32,
            activation_bits=32, **kwargs)`, or a function returning the (full-precision)
            model when called with `**kwargs`.
        weights: path of the trained weights (a `.keras` or `.h5` file, or a TensorFlow
            checkpoint), loaded with `load_weights`; `None` leaves the initial weights,
            which is only useful in tests.
        **kwargs: passed to the model builder (e.g. `num_classes`, `input_shape`).

    # Returns
        The model, with `trainable = False`.

    # Raises
        TypeError: `model` is neither a name nor a callable, or does not build a Keras
            model.

    # Example
    ```python
    teacher = build_teacher("resnet20", weights="runs/fp32/model.keras", num_classes=10)
    ```
    """
    if isinstance(model, str):
        from larq_lipschitz import models

        teacher = models.get(model, weight_bits=32, activation_bits=32, **kwargs)
    elif callable(model):
        teacher = model(**kwargs)
    else:
        raise TypeError(
            f"build_teacher: model must be a model name or a callable, got {model!r}."
        )
    if not isinstance(teacher, tf.keras.Model):
        raise TypeError(
            f"build_teacher: the builder returned {type(teacher).__name__}, not a Keras model."
        )
    if weights is not None:
        teacher.load_weights(os.fspath(weights))
    else:
        log.warning(
            "build_teacher: no weights given; the teacher %r keeps its initial weights.",
            teacher.name,
        )
    teacher.trainable = False
    return teacher
