"""LCR baseline: retention matrices, the power estimate, the loss and LCRModel.

Every value is checked against an independent NumPy reference written from the
definitions (explicit pooling windows, K formed explicitly, float64).
"""

import logging
import sys
import types

import larq_lipschitz.lcr as lcr  # noqa: I001  (selects Keras 2 before tensorflow)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HYPOTHESIS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- NumPy references ---------------------------------------------------------------


def np_adaptive_pool(x, out_h, out_w):
    """Adaptive average pooling with PyTorch's windows, one output cell at a time."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        r0, r1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
        for j in range(out_w):
            c0, c1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
            out[:, i, j, :] = x[:, r0:r1, c0:c1, :].mean(axis=(1, 2))
    return out


def np_retention(fk, fk1):
    _, h1, w1, _ = fk1.shape
    pooled = np_adaptive_pool(np.asarray(fk, np.float64), h1, w1)
    out = []
    for a, b in zip(pooled, np.asarray(fk1, np.float64), strict=True):
        a = a.reshape(h1 * w1, -1).T  # (C_k, P)
        b = b.reshape(h1 * w1, -1).T  # (C_k1, P)
        out.append(a @ b.T / (h1 * w1))
    return np.stack(out)


def np_top_eigen(rm):
    values = []
    for r in np.asarray(rm, np.float64):
        k = r @ r.T
        values.append(np.sqrt(np.linalg.norm(k @ np.ones(k.shape[0]))))
    return np.array(values)


def np_lcr_per_sample(student, teacher, scales=None):
    stages = len(student)
    scales = np.ones(stages) if scales is None else np.asarray(scales, np.float64)
    total = 0.0
    for k in range(stages - 1):
        fs = [
            scales[k] * np.asarray(student[k], np.float64),
            scales[k + 1] * student[k + 1],
        ]
        vs = np_top_eigen(np_retention(*fs))
        vt = np_top_eigen(np_retention(teacher[k], teacher[k + 1]))
        total = total + (vs - vt) ** 2 / 2 ** (stages - 1 - k)
    return total


# --- feature maps and tiny models -----------------------------------------------------


@st.composite
def stage_pairs(draw):
    batch = draw(st.integers(1, 3))
    out_h, out_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    # integer factors (the avg_pool path) and odd sizes (overlapping adaptive windows)
    h = draw(st.one_of(st.sampled_from([out_h, 2 * out_h]), st.integers(out_h, 9)))
    w = draw(st.one_of(st.sampled_from([out_w, 2 * out_w]), st.integers(out_w, 9)))
    ck, ck1 = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, h, w, ck)), rng.normal(
        size=(batch, out_h, out_w, ck1)
    )


def random_stages(rng, batch, sizes, channels, positive=False):
    maps = [
        rng.normal(size=(batch, s, s, c)) for s, c in zip(sizes, channels, strict=True)
    ]
    return [np.abs(m) if positive else m for m in maps]


def tiny_net(binary: bool, name: str, regularizer=None, stages=3):
    """A functional Larq classifier on 8x8x3 images, layers stage1_out .. stageN_out."""
    quant = (
        {
            "input_quantizer": "ste_sign",
            "kernel_quantizer": "ste_sign",
            "kernel_constraint": "weight_clip",
        }
        if binary
        else {}
    )
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    for k in range(stages):
        x = lq.layers.QuantConv2D(
            4 + 2 * k,
            3,
            strides=1 if k == 0 else 2,
            padding="same",
            use_bias=False,
            kernel_regularizer=regularizer,
            name=f"stage{k + 1}_out",
            **quant,
        )(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(3, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=name)


def ce_loss():
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


# --- retention matrix -----------------------------------------------------------------


@HYPOTHESIS
@given(stage_pairs())
def test_retention_matrix_matches_numpy(pair):
    fk, fk1 = pair
    got = lcr.retention_matrix(tf.constant(fk), tf.constant(fk1)).numpy()
    assert got.shape == (fk.shape[0], fk.shape[3], fk1.shape[3])
    np.testing.assert_allclose(got, np_retention(fk, fk1), rtol=1e-10, atol=1e-12)


def test_retention_matrix_float32_and_half_inputs():
    rng = np.random.default_rng(1)
    fk, fk1 = rng.normal(size=(2, 8, 8, 5)), rng.normal(size=(2, 4, 4, 7))
    want = np_retention(fk, fk1)
    got32 = lcr.retention_matrix(
        tf.constant(fk, tf.float32), tf.constant(fk1, tf.float32)
    )
    assert got32.dtype == tf.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5, atol=1e-6)
    got16 = lcr.retention_matrix(
        tf.constant(fk, tf.float16), tf.constant(fk1, tf.float16)
    )
    assert got16.dtype == tf.float32  # computed in float32, not in half precision
    np.testing.assert_allclose(got16.numpy(), want, rtol=1e-2, atol=1e-2)


def test_adaptive_pool_windows_by_hand():
    # 5 -> 3 cells: windows [0, 2), [1, 4), [3, 5), overlapping as in PyTorch
    x = np.arange(5, dtype=np.float64)
    rows = x[None, :, None, None] * np.ones((1, 5, 1, 1))
    got = lcr._adaptive_average_pool(tf.constant(rows), 3, 1).numpy().ravel()
    np.testing.assert_allclose(got, [0.5, 2.0, 3.5])
    # 4 -> 2 cells, both axes: plain 2x2 average pooling
    grid = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1)
    got = lcr._adaptive_average_pool(tf.constant(grid), 2, 2).numpy()[0, :, :, 0]
    np.testing.assert_allclose(got, [[2.5, 4.5], [10.5, 12.5]])


def test_retention_matrix_by_hand():
    # F_k: 2x2, one channel, values 1..4 -> pooled to 1x1 = 2.5; F_k1 = [[2, -1]]
    fk = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    fk1 = np.array([2.0, -1.0]).reshape(1, 1, 1, 2)
    got = lcr.retention_matrix(tf.constant(fk), tf.constant(fk1)).numpy()
    np.testing.assert_allclose(got, [[[5.0, -2.5]]])


def test_retention_matrix_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least as large"):
        lcr.retention_matrix(tf.ones((1, 4, 4, 2)), tf.ones((1, 8, 8, 2)))
    with pytest.raises(ValueError, match="at least as large"):
        lcr.retention_matrix(tf.ones((1, 8, 2, 2)), tf.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        lcr.retention_matrix(tf.ones((4, 4, 2)), tf.ones((1, 4, 4, 2)))
    with pytest.raises(TypeError, match="floating point"):
        lcr.retention_matrix(tf.ones((1, 4, 4, 2), tf.int32), tf.ones((1, 4, 4, 2)))


# --- power estimate -------------------------------------------------------------------


@HYPOTHESIS
@given(stage_pairs())
def test_top_eigen_estimate_matches_numpy(pair):
    rm = np_retention(*pair)
    got = lcr.top_eigen_estimate(tf.constant(rm)).numpy()
    assert got.shape == (rm.shape[0],)
    np.testing.assert_allclose(got, np_top_eigen(rm), rtol=1e-10, atol=1e-12)


def test_top_eigen_estimate_is_a_loose_approximation():
    """sqrt(||RM RM^T 1||) vs the top singular value of RM, on random features."""
    rng = np.random.default_rng(7)
    channels = 16
    # Nonnegative features (ReLU-like): RM is close to rank one with a flat left vector.
    fk, fk1 = random_stages(rng, 4, [8, 4], [channels, 12], positive=True)
    rm = np_retention(fk, fk1)
    sigma = np.linalg.svd(rm, compute_uv=False)[:, 0]
    estimate = lcr.top_eigen_estimate(tf.constant(rm)).numpy()
    ratio = estimate / sigma
    # The estimate overshoots by nearly the worst case C^(1/4) = 2 here (1.99 seen).
    assert np.all(ratio <= channels**0.25 + 1e-9)
    assert np.all(ratio > 1.9), ratio
    # Signed features: the ratio spreads over [0, C^(1/4)] (0.7 to 1.6 seen here).
    fk, fk1 = random_stages(rng, 64, [8, 4], [channels, 12])
    rm = np_retention(fk, fk1)
    sigma = np.linalg.svd(rm, compute_uv=False)[:, 0]
    ratio = lcr.top_eigen_estimate(tf.constant(rm)).numpy() / sigma
    assert np.all((ratio >= 0) & (ratio <= channels**0.25 + 1e-9))
    assert np.mean(np.abs(ratio - 1)) > 0.1, ratio
    # More power steps converge to sigma_1.
    many = lcr.top_eigen_estimate(tf.constant(rm), iterations=200).numpy()
    np.testing.assert_allclose(many, sigma, rtol=1e-6)


def test_top_eigen_estimate_underestimates_when_ones_miss_the_top_vector():
    c = 16
    a = np.zeros(c)
    a[0], a[1] = 1 / np.sqrt(2), -1 / np.sqrt(2)  # orthogonal to the all-ones vector
    flat = np.ones(c) / np.sqrt(c)
    b, d = np.eye(c)[0], np.eye(c)[1]
    rm = 10.0 * np.outer(a, b) + 1.0 * np.outer(flat, d)  # sigma_1 = 10
    got = lcr.top_eigen_estimate(tf.constant(rm[None])).numpy()[0]
    # K 1 = 100 a (a.1) + flat (flat.1) = sqrt(c) flat: the estimate is c^(1/4) = 2
    np.testing.assert_allclose(got, c**0.25, rtol=1e-12)
    np.testing.assert_allclose(got, np_top_eigen(rm[None])[0], rtol=1e-12)


def test_top_eigen_estimate_zero_input_has_zero_gradient():
    rm = tf.Variable(tf.zeros((2, 3, 4)))
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(lcr.top_eigen_estimate(rm, iterations=2))
    grad = tape.gradient(value, rm).numpy()
    assert value.numpy() == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)


def test_top_eigen_estimate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        lcr.top_eigen_estimate(tf.ones((1, 2, 2)), iterations=0)
    with pytest.raises(ValueError, match=r"\(batch, C_k, C_k1\)"):
        lcr.top_eigen_estimate(tf.ones((2, 2)))


# --- loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_lcr_loss_matches_numpy(stages):
    rng = np.random.default_rng(stages)
    sizes, channels = [8, 8, 4, 2][:stages], [3, 5, 6, 4][:stages]
    student = random_stages(rng, 3, sizes, channels)
    teacher = random_stages(rng, 3, sizes, [c + 1 for c in channels], positive=True)
    scales = rng.uniform(-1.5, 1.5, size=stages)
    want = np_lcr_per_sample(student, teacher, scales)
    args = ([tf.constant(f) for f in student], [tf.constant(f) for f in teacher])
    per_sample = lcr.lcr_loss(*args, [tf.constant(s) for s in scales], reduction="none")
    np.testing.assert_allclose(per_sample.numpy(), want, rtol=1e-10)
    mean = lcr.lcr_loss(*args, list(scales))
    np.testing.assert_allclose(mean.numpy(), want.mean(), rtol=1e-10)
    unscaled = lcr.lcr_loss(*args)
    np.testing.assert_allclose(
        unscaled.numpy(), np_lcr_per_sample(student, teacher).mean()
    )


def test_lcr_loss_weights_deepest_pair_most():
    """ResNet-18 layout (4 stages): pairs weigh 1/8, 1/4, 1/2 of their own MSE."""
    rng = np.random.default_rng(3)
    student = [
        tf.constant(f) for f in random_stages(rng, 2, [8, 4, 2, 1], [2, 3, 4, 5])
    ]
    teacher = [
        tf.constant(f) for f in random_stages(rng, 2, [8, 4, 2, 1], [2, 3, 4, 5])
    ]
    # a 2-stage list is one pair weighted 2^-(2-1-0) = 1/2: undo that to get the MSE
    pairs = [
        2 * lcr.lcr_loss(student[k : k + 2], teacher[k : k + 2]).numpy()
        for k in range(3)
    ]
    total = lcr.lcr_loss(student, teacher).numpy()
    np.testing.assert_allclose(
        total, pairs[0] / 8 + pairs[1] / 4 + pairs[2] / 2, rtol=1e-12
    )


def test_lcr_loss_gradients_reach_student_and_scales_not_teacher():
    rng = np.random.default_rng(11)
    sizes, channels = [4, 2, 1], [2, 3, 4]
    student_np = random_stages(rng, 2, sizes, channels)
    teacher_np = random_stages(rng, 2, sizes, channels, positive=True)
    scales_np = np.array([0.7, 1.3, -0.9])
    student = [tf.Variable(f) for f in student_np]
    teacher = [tf.Variable(f) for f in teacher_np]  # trainable on purpose
    scales = [tf.Variable(s) for s in scales_np]
    with tf.GradientTape(persistent=True) as tape:
        loss = lcr.lcr_loss(student, teacher, scales)
    assert all(tape.gradient(loss, v) is None for v in teacher)
    student_grads = tape.gradient(loss, student)
    assert all(g is not None and np.any(g.numpy() != 0) for g in student_grads)
    scale_grads = np.array([g.numpy() for g in tape.gradient(loss, scales)])
    # central differences of the float64 NumPy reference
    eps = 1e-6
    numeric = []
    for k in range(3):
        up, down = scales_np.copy(), scales_np.copy()
        up[k] += eps
        down[k] -= eps
        numeric.append(
            (
                np_lcr_per_sample(student_np, teacher_np, up).mean()
                - np_lcr_per_sample(student_np, teacher_np, down).mean()
            )
            / (2 * eps)
        )
    np.testing.assert_allclose(scale_grads, numeric, rtol=1e-5, atol=1e-8)
    # and one student entry, against the same reference
    k, index = 1, (0, 1, 0, 2)
    up, down = [f.copy() for f in student_np], [f.copy() for f in student_np]
    up[k][index] += eps
    down[k][index] -= eps
    numeric_entry = (
        np_lcr_per_sample(up, teacher_np, scales_np).mean()
        - np_lcr_per_sample(down, teacher_np, scales_np).mean()
    ) / (2 * eps)
    np.testing.assert_allclose(
        student_grads[k].numpy()[index], numeric_entry, rtol=1e-5
    )


def test_lcr_loss_rejects_mismatched_inputs():
    f = [tf.ones((1, 4, 4, 2)), tf.ones((1, 2, 2, 2))]
    with pytest.raises(ValueError, match="at least 2 stages"):
        lcr.lcr_loss(f[:1], f[:1])
    with pytest.raises(ValueError, match="same stage layout"):
        lcr.lcr_loss(f, f[:1])
    with pytest.raises(ValueError, match="one scale per student stage"):
        lcr.lcr_loss(f, f, [1.0])
    with pytest.raises(ValueError, match="reduction must be"):
        lcr.lcr_loss(f, f, reduction="sum")


# --- LCRModel -------------------------------------------------------------------------


def test_find_stage_names_orders_by_number():
    inputs = tf.keras.Input((4, 4, 1))
    x = inputs
    for k in (1, 2, 10):
        x = tf.keras.layers.Conv2D(1, 1, name=f"stage{k}_out")(x)
    x = tf.keras.layers.Conv2D(1, 1, name="stage3_outx")(x)
    assert lcr.find_stage_names(tf.keras.Model(inputs, x)) == [
        "stage1_out",
        "stage2_out",
        "stage10_out",
    ]


def test_lcr_model_trains_and_leaves_teacher_alone():
    tf.keras.utils.set_random_seed(0)
    student = tiny_net(True, "student", tf.keras.regularizers.L2(1e-3))
    teacher = tiny_net(False, "teacher")
    teacher_before = [w.copy() for w in teacher.get_weights()]
    model = lcr.LCRModel(student, teacher, alpha=300.0)
    assert model.stage_names == ["stage1_out", "stage2_out", "stage3_out"]
    assert not teacher.trainable
    trainable = {id(v) for v in model.trainable_variables}
    assert all(id(v) in trainable for v in student.trainable_variables + model.scales)
    assert not any(id(v) in trainable for v in teacher.weights)
    model.compile(tf.keras.optimizers.Adam(1e-2), ce_loss(), metrics=["accuracy"])
    x, y = data(32)
    history = model.fit(x, y, batch_size=32, epochs=15, verbose=0).history
    losses = history["loss"]
    assert set(history) == {"loss", "ce", "lcr", "accuracy"}
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert history["lcr"][0] > 0
    assert any(abs(s.numpy() - 1.0) > 1e-4 for s in model.scales)
    for before, after in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    # call / predict are the student's
    np.testing.assert_allclose(
        model.predict(x, verbose=0), student.predict(x, verbose=0)
    )
    # evaluate reports what the student alone reports: CE + its regularization
    result = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    assert set(result) == {"loss", "ce", "accuracy"}
    student.compile(loss=ce_loss(), metrics=["accuracy"])
    alone = student.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], alone["loss"], rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"], alone["accuracy"])
    assert result["ce"] < result["loss"]


def test_train_step_loss_is_ce_plus_scaled_lcr_plus_regularization():
    tf.keras.utils.set_random_seed(1)
    student = tiny_net(True, "student", tf.keras.regularizers.L2(1e-2))
    teacher = tiny_net(False, "teacher")
    alpha, batch = 50.0, 12
    model = lcr.LCRModel(student, teacher, alpha=alpha)
    model.compile(tf.keras.optimizers.SGD(0.0), ce_loss())
    x, y = data(batch, seed=5)
    names = model.stage_names
    s_feat = tf.keras.Model(
        student.input, [student.get_layer(n).output for n in names]
    )(x)
    t_feat = tf.keras.Model(
        teacher.input, [teacher.get_layer(n).output for n in names]
    )(x)
    logits = student(x).numpy().astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ce = -log_p[np.arange(batch), y].mean()
    reg = sum(
        1e-2 * np.sum(np.square(w))
        for w in [student.get_layer(n).kernel for n in names]
    )
    lcr_mean = np_lcr_per_sample(
        [f.numpy() for f in s_feat], [f.numpy() for f in t_feat]
    ).mean()
    want = ce + alpha * lcr_mean / (batch * 1e4) + reg
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["lcr"], alpha * lcr_mean / (batch * 1e4), rtol=1e-4)
    np.testing.assert_allclose(logs["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)


def _one_device_vs_mirrored(strategy, x, y, batch_size):
    def build():
        tf.keras.utils.set_random_seed(4)
        student = tiny_net(True, "student", tf.keras.regularizers.L2(1e-2))
        teacher = tiny_net(False, "teacher")
        model = lcr.LCRModel(student, teacher, alpha=200.0)
        model.compile(tf.keras.optimizers.SGD(0.1), ce_loss())
        return model

    def run(model):
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        history = model.fit(dataset, epochs=1, verbose=0).history
        return [v.numpy() for v in model.student.weights + model.scales], history[
            "loss"
        ]

    single = build()
    initial = [v.numpy() for v in single.weights]
    with strategy.scope():
        mirrored = build()
    for v, value in zip(mirrored.weights, initial, strict=True):
        v.assign(value)
    return run(single), run(mirrored), initial


def test_mirrored_update_matches_single_device(mirrored_strategy):
    """Two replicas and one device make the same update from the same global batches.

    31 examples in batches of 16: the first step splits 8 + 8 and the second 8 + 7,
    which checks that the global batch is counted exactly, not as replicas x local.
    """
    assert mirrored_strategy.num_replicas_in_sync == 2
    x, y = data(31, seed=9)
    (single, single_loss), (mirrored, mirrored_loss), initial = _one_device_vs_mirrored(
        mirrored_strategy, x, y, batch_size=16
    )
    moved = max(np.abs(a - b).max() for a, b in zip(single, initial, strict=False))
    assert moved > 1e-3  # the step really changed the weights
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)


def test_student_and_lcr_model_save_and_load(tmp_path):
    tf.keras.utils.set_random_seed(2)
    model = lcr.LCRModel(
        tiny_net(True, "student"), tiny_net(False, "teacher"), alpha=3.2
    )
    model.compile(tf.keras.optimizers.Adam(1e-2), ce_loss(), metrics=["accuracy"])
    x, y = data(16)
    model.fit(x, y, epochs=2, verbose=0)
    path = str(tmp_path / "student.keras")
    model.student.save(path)
    reloaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    config = model.get_config()
    clone = lcr.LCRModel.from_config(config)
    assert clone.get_config() == config
    assert clone.alpha == 3.2 and clone.stage_names == model.stage_names
    whole = str(tmp_path / "lcr.keras")
    model.save(whole)
    restored = tf.keras.models.load_model(whole)
    assert isinstance(restored, lcr.LCRModel)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    np.testing.assert_allclose(
        [s.numpy() for s in restored.scales], [s.numpy() for s in model.scales]
    )
    assert not restored.teacher.trainable


def test_lcr_model_rejects_bad_configurations():
    student, teacher = tiny_net(True, "student"), tiny_net(False, "teacher")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        lcr.LCRModel(student, teacher, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        lcr.LCRModel(student, teacher, alpha=float("nan"))
    with pytest.raises(ValueError, match="no top-level layer named 'stage3_out'"):
        lcr.LCRModel(student, tiny_net(False, "short", stages=2))
    with pytest.raises(ValueError, match="at least 2 stages"):
        lcr.LCRModel(tiny_net(True, "one", stages=1), teacher)
    with pytest.raises(ValueError, match="must not grow spatially"):
        lcr.LCRModel(student, teacher, stage_names=["stage3_out", "stage1_out"])

    class Subclassed(tf.keras.Model):
        def call(self, inputs):
            return inputs

    with pytest.raises(ValueError, match="must be a functional Keras model"):
        lcr.LCRModel(Subclassed(), teacher, stage_names=["stage1_out", "stage2_out"])
    model = lcr.LCRModel(student, teacher)
    with pytest.raises(ValueError, match="loss_weights is not supported"):
        model.compile("sgd", ce_loss(), loss_weights=[1.0])
    model.compile("sgd")
    with pytest.raises(ValueError, match="compile the model with a loss"):
        model.train_on_batch(*data(4))


def test_quantized_teacher_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="larq_lipschitz.lcr"):
        lcr.LCRModel(tiny_net(True, "student"), tiny_net(True, "binary_teacher"))
    assert "quantized layers" in caplog.text


def test_build_teacher_from_function_and_from_name(tmp_path, monkeypatch):
    tf.keras.utils.set_random_seed(3)
    trained = tiny_net(False, "fp")
    path = str(tmp_path / "fp.weights.h5")
    trained.save_weights(path)
    teacher = lcr.build_teacher(tiny_net, weights=path, binary=False, name="fp")
    assert not teacher.trainable
    for a, b in zip(trained.get_weights(), teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    calls = {}

    def fake_get(name, **kwargs):
        calls.update(kwargs, name=name)
        return tiny_net(False, name)

    fake = types.ModuleType("larq_lipschitz.models")
    fake.get = fake_get
    monkeypatch.setitem(sys.modules, "larq_lipschitz.models", fake)
    monkeypatch.setattr(sys.modules["larq_lipschitz"], "models", fake, raising=False)
    built = lcr.build_teacher("resnet20", num_classes=10)
    assert calls == {
        "name": "resnet20",
        "weight_bits": 32,
        "activation_bits": 32,
        "num_classes": 10,
    }
    assert not built.trainable
    with pytest.raises(TypeError, match="model name or a callable"):
        lcr.build_teacher(42)
