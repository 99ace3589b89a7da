"""larq-lipschitz: L1,inf Lipschitz control for binarized neural networks.

Import this package before TensorFlow: it selects Keras 2 (tf-keras), which Larq needs.
"""

from larq_lipschitz._keras_select import select_keras2

select_keras2()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

# Importing these modules registers their Keras objects, so saved models reload
# without `custom_objects`.
from larq_lipschitz import (  # noqa: E402
    constraints,
    layers,
    norms,
    quantization,
    regularizers,
    scale_aware,
)
from larq_lipschitz.constraints import L1InfConstraint  # noqa: E402
from larq_lipschitz.regularizers import L1InfLipschitz, SpectralNormLipschitz  # noqa: E402
from larq_lipschitz.scale_aware import (  # noqa: E402
    add_scale_aware_penalty,
    check_lipschitz_controls,
    effective_bounds,
    remove_scale_aware_penalty,
)

try:
    __version__ = version("larq-lipschitz")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "L1InfConstraint",
    "L1InfLipschitz",
    "SpectralNormLipschitz",
    "__version__",
    "add_scale_aware_penalty",
    "check_lipschitz_controls",
    "constraints",
    "effective_bounds",
    "layers",
    "norms",
    "quantization",
    "regularizers",
    "remove_scale_aware_penalty",
    "scale_aware",
]
