"""Select Keras 2 (tf-keras) before TensorFlow is imported.

Larq is written against Keras 2. From TensorFlow 2.16 on, `tf.keras` is Keras 3 unless
the environment variable `TF_USE_LEGACY_KERAS` is set to `1` *before* TensorFlow is first
imported: TensorFlow reads it once, at import time. Setting it later leaves `tf.keras`
pointing at Keras 3 while Larq expects Keras 2, and Larq then fails at import with an
unrelated-looking error. This module makes the choice early and explains the failure
when it is too late to make it.
"""

import os
import sys

_FIX = (
    "larq-lipschitz needs Keras 2 (the tf-keras package), but TensorFlow was imported "
    "before larq_lipschitz and has already selected Keras 3. Either import "
    "larq_lipschitz first, before tensorflow and larq, or set the environment variable "
    "TF_USE_LEGACY_KERAS=1 before starting Python."
)


def select_keras2() -> None:
    """Make `tf.keras` resolve to tf-keras, or raise `ImportError` if it is too late."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and getattr(tf, "_tf_uses_legacy_keras", True) is False:
        raise ImportError(_FIX)
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
