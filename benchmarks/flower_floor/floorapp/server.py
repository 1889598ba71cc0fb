"""The floor's ServerApp: ``exchange`` pushes one message per node and pulls the replies with a short
sleep (the loop fedmdh's coordinator uses); ``fedavg`` runs Flower's own FedAvg strategy."""

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def emit(**fields) -> None:
    print("fedmdh-event " + json.dumps(fields), flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, floats = int(context.run_config["rounds"]), int(context.run_config["floats"])
    nodes = int(context.run_config.get("nodes", 3))
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(0.5)
    arrays = ArrayRecord({"w": Array(np.zeros(floats, dtype=np.float32))})
    if context.run_config["strategy"] == "fedavg":
        from flwr.serverapp.strategy import FedAvg

        t0 = time.perf_counter()
        FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
        emit(event="finished", seconds_per_round=(time.perf_counter() - t0) / rounds)
        return
    ids = sorted(grid.get_node_ids())
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        msgs = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type="train", group_id=str(r))
                for n in ids]
        pending = set(grid.push_messages(msgs))
        while pending:
            for m in grid.pull_messages(list(pending)):
                pending.discard(m.metadata.reply_to_message_id)
            if pending:
                time.sleep(0.1)
        times.append(time.perf_counter() - t0)
        emit(event="round", round=r + 1, seconds=times[-1])
    emit(event="finished", seconds_per_round=float(np.mean(times[1:] if len(times) > 1 else times)))
