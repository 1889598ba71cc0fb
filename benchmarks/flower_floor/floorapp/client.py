"""Returns the arrays it receives (the floor: Flower's transport and process start, no work)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": ArrayRecord({k: v for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
