"""Every Lipschitz control counts once per global batch, whatever the number of replicas.

One `model.fit` step on the same global batch must update the weights identically on one
device and on a `MirroredStrategy` over two logical CPUs (synchronized BatchNorm, so that
the two runs normalize with the same statistics, METHOD §9). The binarized layers have
binary kernels and real activations (1/32): a sign activation would turn float32
reduction-order differences of 1e-7 into flipped signs and make "equal" meaningless.
"""

import larq_lipschitz  # noqa: F401
from larq_lipschitz import L1InfConstraint, L1InfLipschitz, SpectralNormLipschitz
from larq_lipschitz.lcr import LCRModel
from larq_lipschitz.scale_aware import add_scale_aware_penalty

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

GLOBAL_BATCH = 16


def _block(x, filters, name, regularizer, constraint, binary):
    x = lq.layers.QuantConv2D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_quantizer="magnitude_aware_sign" if binary else None,
        kernel_regularizer=regularizer() if regularizer else None,
        kernel_constraint=constraint() if constraint else None,
        name=f"{name}_conv",
    )(x)
    x = tf.keras.layers.BatchNormalization(synchronized=True, name=f"{name}_bn")(x)
    return tf.keras.layers.Activation("relu", name=name)(x)


def _model(regularizer=None, constraint=None, binary=True):
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = _block(x, 6, "stage1_out", regularizer, constraint, binary)
    x = tf.keras.layers.MaxPool2D(name="pool")(x)
    x = _block(x, 8, "stage2_out", regularizer, constraint, binary)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(5, name="logits")(x))


CONTROLS = {
    "none": lambda: _model(),
    "l1inf": lambda: _model(regularizer=lambda: L1InfLipschitz(0.05)),
    "constraint": lambda: _model(constraint=lambda: L1InfConstraint(0.5)),
    "spectral": lambda: _model(regularizer=lambda: SpectralNormLipschitz(0.05)),
    "scale-aware": lambda: _scale_aware(),
    "lcr": lambda: _lcr(),
}


def _scale_aware():
    model = _model()
    assert add_scale_aware_penalty(model, 0.05) == [
        "stage1_out_conv",
        "stage2_out_conv",
    ]
    return model


def _lcr():
    return LCRModel(_model(), _model(binary=False), alpha=3.2)


def _one_step(name, strategy, initial):
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        model = CONTROLS[name]()
        if initial is not None:
            model.set_weights(initial)
        model.compile(
            optimizer=tf.keras.optimizers.SGD(0.1),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    weights = model.get_weights()
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (GLOBAL_BATCH, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 5, GLOBAL_BATCH).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH)
    history = model.fit(data, epochs=1, verbose=0)
    return weights, model.get_weights(), history.history["loss"][0]


def _compare(name, mirrored_strategy):
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    initial, after_single, loss_single = _one_step(name, single, None)
    _, after_mirrored, loss_mirrored = _one_step(name, mirrored_strategy, initial)
    moved = max(
        np.max(np.abs(a - b)) for a, b in zip(after_single, initial, strict=True)
    )
    assert moved > 1e-4, "the step changed nothing: the comparison would prove nothing"
    assert loss_mirrored == pytest.approx(loss_single, rel=1e-5, abs=1e-6)
    for a, b in zip(after_single, after_mirrored, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# Controls that all-reduce inside the train step (batch moments, global batch size).
OWN_COLLECTIVES = ("scale-aware", "lcr")


@pytest.mark.parametrize("name", [n for n in CONTROLS if n not in OWN_COLLECTIVES])
def test_one_step_is_the_same_on_one_and_two_replicas(name, mirrored_strategy):
    _compare(name, mirrored_strategy)


@pytest.mark.parametrize("name", OWN_COLLECTIVES)
def test_all_reducing_controls_step_the_same_on_one_and_two_replicas(name):
    """In a process of its own, as `larq-lipschitz train` runs it.

    These controls all-reduce inside the train step next to synchronized BatchNorm. Seen
    here: once an earlier MirroredStrategy in the same process has run collectives, such
    an all-reduce can be paired with a BatchNorm one on the other replica (a collective
    "shape mismatch" error); a process that creates one strategy, as training does, is
    not affected.
    """
    import subprocess
    import sys

    code = (
        "import tests.conftest\n"
        "import tensorflow as tf\n"
        "from tests.test_distribution import _compare\n"
        "devices = [d.name for d in tf.config.list_logical_devices('CPU')[:2]]\n"
        f"_compare({name!r}, tf.distribute.MirroredStrategy(devices))\n"
        "print('equal')\n"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("equal")


def test_penalty_changes_the_step(mirrored_strategy):
    """The regularized step differs from the plain one, so the test above tests it."""
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    initial, plain, _ = _one_step("none", single, None)
    _, penalized, _ = _one_step("l1inf", single, initial)
    diff = max(np.max(np.abs(a - b)) for a, b in zip(plain, penalized, strict=True))
    assert diff > 1e-5
