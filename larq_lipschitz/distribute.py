"""Choosing a `tf.distribute` strategy from what the process can see."""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)


def choose_strategy() -> tf.distribute.Strategy:
    """The strategy `larq-lipschitz train` uses, picked from the environment.

    - `TF_CONFIG` names a cluster with more than one task: `MultiWorkerMirroredStrategy`;
    - more than one visible GPU: `MirroredStrategy` over all of them;
    - otherwise: `OneDeviceStrategy` on the GPU if there is one, else on the CPU.

    Batch sizes given to `train` are global: each of the `num_replicas_in_sync` replicas
    sees `batch_size / num_replicas_in_sync` examples per step.

    # Raises
        ValueError: `TF_CONFIG` is set but is not valid JSON.
    """
    raw = os.environ.get("TF_CONFIG")
    if raw:
        try:
            cluster = json.loads(raw).get("cluster", {})
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
        tasks = sum(len(v) for v in cluster.values() if isinstance(v, list))
        if tasks > 1:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            log.info(
                "MultiWorkerMirroredStrategy: %d replicas in sync",
                strategy.num_replicas_in_sync,
            )
            return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy([g.name for g in gpus])
        log.info("MirroredStrategy over %d GPUs", len(gpus))
        return strategy
    device = gpus[0].name if gpus else "/cpu:0"
    log.info("OneDeviceStrategy on %s", device)
    return tf.distribute.OneDeviceStrategy(device)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process should write files that only one worker may write."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if has_chief:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0
