"""NaN and Inf during training: the run stops, names the layer or batch, keeps its state.

Unit tests drive `NonFiniteCheck` and `check_finite_inputs` with tiny Keras models and
check the place they report against NumPy: which layer holds the first non-finite weight
(in layer order), which batch holds the non-finite pixel, at which step a float32 SGD
on a linear model overflows. The last tests go through `train` and the command line on
real CIFAR-10 and check that nothing of the previous good state is overwritten.
"""

import re

import larq_lipschitz  # noqa: F401
from larq_lipschitz import cli, runs, training
from larq_lipschitz.training import (
    NONFINITE_INPUT_MESSAGE,
    NonFiniteCheck,
    TrainConfig,
    check_finite_inputs,
)

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LAYERS = ("dense_a", "dense_b", "dense_c")


def _tiny_model(seed=0):
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((4,))
    x = tf.keras.layers.Dense(5, activation="relu", name=LAYERS[0])(inputs)
    x = tf.keras.layers.Dense(5, activation="relu", name=LAYERS[1])(x)
    outputs = tf.keras.layers.Dense(3, name=LAYERS[2])(x)
    model = tf.keras.Model(inputs, outputs)
    model.compile(
        optimizer=tf.keras.optimizers.SGD(0.01),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _data(batches=6, batch=8, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (batches * batch, 4)).astype("float32")
    labels = rng.integers(0, 3, batches * batch).astype("int32")
    return images, labels


def _first_nonfinite_layer(model):
    """Independent reference: the first layer, in model order, with a NaN/Inf weight."""
    for layer in model.layers:
        if any(not np.isfinite(w).all() for w in layer.get_weights()):
            return layer.name
    return None


class _Poison(tf.keras.callbacks.Callback):
    """Writes `value` into one weight of one layer before a chosen training step."""

    def __init__(self, layer, weight, index, value, epoch=0, step=0):
        super().__init__()
        self.where = (layer, weight, index, value, epoch, step)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        layer, weight, index, value, epoch, step = self.where
        if (self._epoch, batch) != (epoch, step):
            return
        variable = self.model.get_layer(layer).weights[weight]
        array = variable.numpy()
        array.flat[index] = value
        variable.assign(array)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    layer=st.sampled_from(LAYERS),
    weight=st.integers(0, 1),
    index=st.integers(0, 14),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_a_weight_set_to_nan_before_training_is_named(layer, weight, index, value):
    model = _tiny_model()
    variable = model.get_layer(layer).weights[weight]
    array = variable.numpy()
    array.flat[index % array.size] = value
    variable.assign(array)
    expected = _first_nonfinite_layer(model)
    assert expected == layer
    guard = NonFiniteCheck()
    images, labels = _data()
    history = model.fit(
        images, labels, batch_size=8, epochs=3, verbose=0, callbacks=[guard]
    )
    assert guard.failure == (
        f"the weights of layer '{expected}' became non-finite before the first "
        "training step (they were already non-finite)"
    )
    assert model.stop_training
    assert len(history.epoch) == 1  # stopped in the first epoch


@pytest.mark.parametrize(
    "epoch,step,layer", [(0, 3, "dense_c"), (1, 0, "dense_b"), (2, 5, "dense_a")]
)
def test_a_weight_poisoned_during_training_is_named_with_its_step(epoch, step, layer):
    model = _tiny_model()
    poison = _Poison(layer, 0, 2, np.nan, epoch=epoch, step=step)
    guard = NonFiniteCheck()
    images, labels = _data()
    model.fit(
        images, labels, batch_size=8, epochs=3, verbose=0, callbacks=[poison, guard]
    )
    steps = 6
    before = epoch * steps + step - 1  # the last update before the poisoned step
    assert guard.failure == (
        f"the weights of layer '{layer}' became non-finite after the update of "
        f"epoch {before // steps + 1}, step {before % steps + 1}"
    )


def test_without_the_step_check_the_loss_reports_epoch_and_step():
    model = _tiny_model()
    poison = _Poison("dense_b", 1, 0, np.inf, epoch=1, step=2)
    guard = NonFiniteCheck(check_every_step=False)
    images, labels = _data()
    model.fit(
        images, labels, batch_size=8, epochs=3, verbose=0, callbacks=[poison, guard]
    )
    assert guard.failure is not None
    assert guard.failure.startswith("the loss became non-finite (")
    assert "at epoch 2, step 3; the first layer with non-finite weights is" in (
        guard.failure
    )


def test_a_weight_that_turns_nan_in_the_last_step_is_caught_at_epoch_end():
    """The epoch's last update is checked before a checkpoint would save it."""
    model = _tiny_model()
    guard = NonFiniteCheck()

    class LastStep(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                kernel = self.model.get_layer("dense_a").kernel
                kernel.assign(tf.fill(kernel.shape, np.nan))

    saved = []

    class Saver(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if not guard.failure:
                saved.append(epoch)

    images, labels = _data()
    model.fit(
        images,
        labels,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[LastStep(), guard, Saver()],
    )
    assert guard.failure == (
        "the weights of layer 'dense_a' became non-finite after the update of "
        "epoch 1, step 6"
    )
    assert saved == []


@settings(max_examples=8, deadline=None)
@given(
    bad_batch=st.integers(0, 5),
    position=st.integers(0, 31),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_nonfinite_input_stops_before_training_on_the_batch(bad_batch, position, value):
    images, labels = _data()
    poisoned = images.copy()
    row = bad_batch * 8 + position // 4
    poisoned[row, position % 4] = value
    # NumPy reference: the first batch of 8 that holds a non-finite value.
    expected = int(np.flatnonzero(~np.isfinite(poisoned).all(axis=1))[0] // 8)
    assert expected == bad_batch

    model = _tiny_model()
    start = model.get_weights()
    guard = NonFiniteCheck()
    data = tf.data.Dataset.from_tensor_slices((poisoned, labels)).batch(8)
    with pytest.raises(tf.errors.InvalidArgumentError, match=NONFINITE_INPUT_MESSAGE):
        model.fit(check_finite_inputs(data), epochs=2, verbose=0, callbacks=[guard])
    assert guard.position == f"training batch: epoch 1, step {expected + 1}"
    assert guard.failure is None  # the data check stopped it, before any NaN reached

    # The weights are those of training on the batches before the bad one, exactly.
    reference = _tiny_model()
    reference.set_weights(start)
    if expected:
        clean = tf.data.Dataset.from_tensor_slices(
            (images[: expected * 8], labels[: expected * 8])
        ).batch(8)
        reference.fit(clean, epochs=1, verbose=0)
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_check_finite_inputs_leaves_finite_data_and_labels_alone():
    images, labels = _data(batches=2)
    labels_f = labels.astype("float32") + np.float32(np.inf)  # labels are not checked
    data = tf.data.Dataset.from_tensor_slices((images, labels_f)).batch(8)
    out = list(check_finite_inputs(data))
    assert len(out) == 2
    np.testing.assert_array_equal(np.concatenate([x for x, _ in out]), images)
    single = list(check_finite_inputs(tf.data.Dataset.from_tensor_slices(images)))
    assert len(single) == 16
    with pytest.raises(TypeError, match="expected a tf.data.Dataset"):
        check_finite_inputs(images)


def _overflow_step(x, y, w, lr):
    """NumPy float64 replay of full-batch SGD on the MSE of y = x w (no bias).

    Returns the 0-based step whose loss overflows float32: Keras sums the squared
    residuals before dividing by the batch size, so the sum is what must stay below
    float32's largest value.
    """
    w = w.astype(np.float64)
    limit = float(np.finfo(np.float32).max)
    for step in range(1000):
        residual = x @ w - y
        if float(np.sum(residual**2)) > limit:
            return step
        w = w - lr * (2.0 / residual.size) * x.T @ residual
    raise AssertionError("no overflow")


def test_divergence_is_reported_at_the_step_where_the_loss_overflows():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (32, 4)).astype("float32")
    y = rng.normal(0, 1, (32, 1)).astype("float32")
    lr = 8.0
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [tf.keras.Input((4,)), tf.keras.layers.Dense(1, use_bias=False, name="linear")]
    )
    model.compile(optimizer=tf.keras.optimizers.SGD(lr), loss="mse")
    start = model.get_weights()[0]
    expected = _overflow_step(x, y, start, lr)
    guard = NonFiniteCheck(advice="lower the learning rate")
    model.fit(x, y, batch_size=32, epochs=1000, verbose=0, callbacks=[guard])
    assert guard.failure is not None
    match = re.fullmatch(
        r"the loss became non-finite \((inf|nan)\) at epoch (\d+), step 1 while the "
        r"weights were finite: training diverged \(lower the learning rate\)",
        guard.failure,
    )
    assert match, guard.failure
    # One full batch per epoch: epoch k (from 1) is step k-1 of the replay.
    assert int(match.group(2)) - 1 == expected


def test_check_every_step_must_be_a_bool():
    with pytest.raises(TypeError, match="check_every_step must be True or False"):
        NonFiniteCheck(check_every_step="yes")


# --- through train() and the command line, on real CIFAR-10 ------------------------


def _config(cifar_archive, **kw):
    base = dict(
        model="resnet20",
        data=str(cifar_archive),
        regularizer="l1inf",
        epochs=2,
        batch_size=64,
        train_examples=128,
        noise_sigmas=(),
        seed=5,
    )
    return TrainConfig(**{**base, **kw})


def test_train_stops_on_a_nan_weight_and_keeps_the_last_good_checkpoint(
    tmp_path, cifar_archive
):
    out = tmp_path / "run"
    poison = _Poison("stage2_block1_conv1", 0, 7, np.nan, epoch=1, step=1)
    after_epoch_1 = {}

    class Snapshot(tf.keras.callbacks.Callback):
        """The checkpoint files as they are once epoch 1 is saved."""

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                for p in (out / "checkpoints").iterdir():
                    after_epoch_1[p.name] = p.read_bytes()

    with pytest.raises(FloatingPointError) as caught:
        training.train(_config(cifar_archive), out, callbacks=[Snapshot(), poison])
    assert str(caught.value) == (
        "the weights of layer 'stage2_block1_conv1' became non-finite after the update "
        "of epoch 2, step 1; nothing of it was saved; the checkpoint after epoch 1 is "
        "kept."
    )
    state = tf.train.get_checkpoint_state(str(out / "checkpoints"))
    assert state.model_checkpoint_path.endswith("ckpt-1")
    assert list(state.all_model_checkpoint_paths) == [state.model_checkpoint_path]
    assert {"checkpoint", "ckpt-1.index"} <= set(after_epoch_1)
    now = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert now == after_epoch_1  # not a byte of the good state was touched
    reader = tf.train.load_checkpoint(state.model_checkpoint_path)
    assert int(reader.get_tensor("epochs_done/.ATTRIBUTES/VARIABLE_VALUE")) == 1
    rows = (out / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "0"]
    assert not (out / runs.RESULTS_FILE).exists()
    assert not (out / runs.MODEL_FILE).exists()


def _with_nan_pixel(monkeypatch, step):
    """Make data.load return CIFAR-10 whose training batch `step` (0-based) has a NaN."""
    from larq_lipschitz import data as data_lib

    real = data_lib.load

    def load(*args, **kwargs):
        splits = real(*args, **kwargs)

        def poison(index, batch):
            images, labels = batch
            bad = tf.tensor_scatter_nd_update(images, [[0, 3, 4, 1]], [float("nan")])
            return tf.where(index == step, bad, images), labels

        train = splits.train.enumerate().map(poison)
        return data_lib.DataSplits(
            train=train,
            validation=splits.validation,
            test=splits.test,
            info=splits.info,
        )

    monkeypatch.setattr(data_lib, "load", load)


def test_nan_input_through_the_command_line_is_one_line_exit_2_and_no_checkpoint(
    tmp_path, cifar_archive, monkeypatch, capsys
):
    _with_nan_pixel(monkeypatch, step=1)
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--data",
            str(cifar_archive),
            "--train-examples",
            "128",
            "--batch-size",
            "64",
            "--noise",
            "",
            "--output",
            str(out),
        ]
    )
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        "larq-lipschitz train: error: non-finite input data (NaN) in the training batch: "
        "epoch 1, step 2; no epoch had finished, so no checkpoint was written."
    )
    assert tf.train.latest_checkpoint(str(out / "checkpoints")) is None
    assert not (out / "history.csv").exists()
    assert not (out / runs.RESULTS_FILE).exists()
    assert not (out / runs.MODEL_FILE).exists()
