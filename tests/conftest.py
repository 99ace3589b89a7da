"""Shared fixtures. Importing larq_lipschitz first selects Keras 2 for the whole run."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import larq_lipschitz  # noqa: E402,F401  (must precede tensorflow)

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so that MirroredStrategy tests run on a one-CPU machine.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # devices were already initialised by an earlier import
    pass

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = pathlib.Path(
    os.environ.get(
        "LARQ_LIPSCHITZ_CIFAR10",
        REPO.parent / "shared" / "data" / "cifar10" / "cifar-10-binary.tar.gz",
    )
)


@pytest.fixture(scope="session")
def cifar_archive() -> pathlib.Path:
    """Path of the real CIFAR-10 binary archive; tests that need it skip without it."""
    if not CIFAR_ARCHIVE.is_file():
        message = f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE}"
        if os.environ.get("LARQ_LIPSCHITZ_REQUIRE_DATA"):
            pytest.fail(message + " (LARQ_LIPSCHITZ_REQUIRE_DATA is set)")
        pytest.skip(message + "; set LARQ_LIPSCHITZ_CIFAR10 to its path")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def mirrored_strategy():
    """A MirroredStrategy over the two logical CPU devices, one for the whole session.

    Seen here: a second MirroredStrategy created in the same process after the first one
    ran collectives can pair the collectives of the two replicas wrongly ("shape
    mismatch in the collective instance 100"). Training creates one strategy per
    process; the tests do the same.
    """
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("two logical CPU devices could not be configured")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
