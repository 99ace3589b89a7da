"""Choosing a `tf.distribute` strategy from what the process can see.

Multi-worker training: start the same `larq-lipschitz train` command once per worker,
each with a `TF_CONFIG` naming the whole cluster and that worker's own task, e.g. for
two workers on one machine

```
TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:23456"]},
            "task": {"type": "worker", "index": 0}}' larq-lipschitz train ...
```

(index 1 for the second). Worker 0 (or the task of type `chief`, if there is one) is the
chief: it alone writes the run folder. docs/reliability.md has the details.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)


def cluster_size() -> int:
    """The number of tasks `TF_CONFIG` names (0 when it is unset or names no cluster).

    # Raises
        ValueError: `TF_CONFIG` is set but is not a JSON object with a valid cluster.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {raw!r}.")
    cluster = parsed.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ValueError(f"TF_CONFIG's cluster must be an object, got {cluster!r}.")
    return sum(len(v) for v in cluster.values() if isinstance(v, list))


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
    if cluster_size() > 1:
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


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several processes (a multi-worker cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(tasks) for tasks in spec.values()) > 1


def agree_across_workers(
    strategy: tf.distribute.Strategy, value: int
) -> tuple[int, int]:
    """The smallest and largest of `value` over all workers, the same on every worker.

    Every worker must call it: it is one collective, a sum all-reduce of a vector with
    one slot per replica in which each replica puts its `value` in its own slot (sums
    are what every strategy's collectives support), so every worker ends up with every
    replica's value. With a single process it returns `(value, value)` at once.

    # Example
    ```python
    low, high = agree_across_workers(strategy, epochs_done)
    if low != high:
        raise RuntimeError("the workers restored different checkpoints")
    ```
    """
    value = int(value)
    if not is_multi_worker(strategy):
        return value, value
    slots = strategy.num_replicas_in_sync

    @tf.function
    def gather():
        def step():
            ctx = tf.distribute.get_replica_context()
            own = tf.one_hot(ctx.replica_id_in_sync_group, slots, dtype=tf.int64)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, own * value)

        return strategy.run(step)

    values = strategy.experimental_local_results(gather())[0].numpy().tolist()
    log.debug("values of the %d replicas: %s", slots, values)
    return int(min(values)), int(max(values))
