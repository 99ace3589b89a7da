"""larq-lipschitz: L1,inf Lipschitz control for binarized neural networks."""

from larq_lipschitz._keras_select import select_keras2

select_keras2()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("larq-lipschitz")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
