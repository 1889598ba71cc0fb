"""The one table of defaults, read by the Python API and the CLI alike (no heavy imports here).

:func:`fedmdh.algorithms.make_algorithm`, :class:`fedmdh.config.ExperimentConfig` and the ``fedmdh``
commands (their ``--help`` included) all take their defaults from here, so that
``make_algorithm(name)`` builds exactly the algorithm ``fedmdh run --algorithm name`` trains.
"""

from __future__ import annotations

from typing import Any

#: Per-algorithm defaults, chosen on validation splits of the training data (see docs/algorithms.md):
#: local-training settings (optimizer, lr, momentum, weight_decay) and the algorithm's own
#: hyperparameters. Its keys are every algorithm's name, in the order the CLI lists them.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"optimizer": "adam", "lr": 0.001},
    "pooled": {"optimizer": "adam", "lr": 0.003},
    "fedavg": {"optimizer": "sgd", "lr": 0.2},
    "fedprox": {"optimizer": "sgd", "lr": 0.2, "proximal_mu": 0.01},
    "fedmdh": {"optimizer": "sgd", "lr": 0.2, "max_grad_norm": 2.0, "eval_average": 0.9},
    "fedmdh-no-gfam": {"optimizer": "sgd", "lr": 0.2, "max_grad_norm": 2.0, "eval_average": 0.9},
    "fedmdh-no-cgan": {"optimizer": "sgd", "lr": 0.2, "max_grad_norm": 2.0, "eval_average": 0.9},
    "fedmdh-no-rkd": {"optimizer": "sgd", "lr": 0.2, "max_grad_norm": 2.0, "eval_average": 0.9},
    "fedgan": {"optimizer": "sgd", "lr": 0.2},
    "flic": {"optimizer": "sgd", "lr": 0.05},
    "fedgen": {"optimizer": "sgd", "lr": 0.2, "max_grad_norm": 1.0},
    "fedkd": {"optimizer": "sgd", "lr": 0.2},
}

ALGORITHM_NAMES: tuple[str, ...] = tuple(ALGORITHM_DEFAULTS)

#: What ``fedmdh benchmark`` runs without ``--algorithms``: the references, the FedAvg family and FedMDH.
BENCHMARK_ALGORITHMS: tuple[str, ...] = ("local", "pooled", "fedavg", "fedprox", "fedmdh")

#: Experiment defaults (ExperimentConfig's, shown by ``--help``).
ROUNDS = 400
SEEDS = 3
FIRST_SEED = 0
RUN_ALGORITHM = "fedavg"

#: Bounds that catch a typo before it costs days (e.g. ``local_steps = 1e9``).
MAX_ROUNDS = 100_000
MAX_LOCAL_STEPS = 10_000
MAX_BATCH_SIZE = 1_000_000
MAX_SEEDS = 1_000
MAX_WIDTH = 4_096
MAX_LAYERS = 16
#: rounds x local_steps: minibatch steps per institution over a run
MAX_STEPS = 10_000_000
