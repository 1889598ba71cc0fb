"""The ledger of one ``fedmdh run``: opened over the simulator's federation and initial state, closed with the
archive of the run's models (the experiment runner's side of :mod:`fedmdh.ledger.recorder`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedmdh.algorithms.base import Algorithm, FederationSpec
from fedmdh.data.federation import PreparedFederation
from fedmdh.ledger.options import LedgerOptions
from fedmdh.ledger.recorder import RUN_FILES, LedgerRecorder, open_ledger
from fedmdh.runtime.protocol import initial_state
from fedmdh.runtime.simulator import POOLED_NAME


def start_run_ledger(
    options: LedgerOptions | None,
    ledger_dir: Path,
    algorithm: Algorithm,
    fed: PreparedFederation,
    target: str,
    rounds: int,
    seed: int,
    config_file: Path,
    archive: bool = True,
    **kw: Any,
) -> LedgerRecorder | None:
    """Open the ledger of one training run (``None`` when it is off).

    ``archive``: the run ends by archiving its models (``fedmdh run``); a benchmark's runs do not.
    """
    options = options or LedgerOptions()
    if options.mode == "off":
        return None
    names = (POOLED_NAME,) if algorithm.centralized else fed.names
    # the simulator starts from algorithm.init over the federation (a pure function of spec and seed)
    initial = initial_state(algorithm, FederationSpec.from_federation(fed), seed)
    return open_ledger(
        options, ledger_dir, algorithm, names, target, rounds, initial,
        config_path=os.path.relpath(config_file, ledger_dir), seed=seed, archive=archive, **kw,
    )


def finish_run_ledger(recorder: LedgerRecorder | None, models_dir: Path | None, after_error: bool = False) -> str | None:
    """Check the last round, archive the final models (when given) and close; returns a line for run.log.

    The run's files named by ``RUN_FILES`` beside ``models_dir`` (metrics) are archived with the
    models when they exist by then.

    ``after_error``: the run is failing already; only let the round in flight finish and close.
    """
    if recorder is None:
        return None
    try:
        if after_error:
            return None
        recorder.flush()
        if models_dir is not None and recorder.address is not None:
            run_files = [models_dir.parent / n for n in RUN_FILES if (models_dir.parent / n).is_file()]
            digest = recorder.archive_models(models_dir, run_files=run_files)
        else:
            digest = None
    finally:
        recorder.close()
    s = recorder.summary()
    line = (f"ledger ({recorder.chain.kind}, contract {recorder.address}): {s['rounds']} rounds finalized, "
            f"{s['ms_per_participant_round']:.1f} ms of chain work and {s['gas_per_participant_round']:.0f} gas per "
            f"participant per round")
    if digest:
        line += f"; final models archived as {digest}"
    return line
