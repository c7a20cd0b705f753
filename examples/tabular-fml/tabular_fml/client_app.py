"""ClientApp: FML on this client's tabular data, with fml-flower's public API only.

``train``: meme <- the global arrays (fresh optimizer); personalized model restored from
``context.state`` (created on the first round); E epochs of mutual learning; the
personalized model stored back; reply with the meme's arrays and ``num-examples`` only.

``evaluate``: the global model and the personalized model on this client's test split.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.state import has_personal_model, load_personal, save_personal
from fml_flower.training import evaluate, mutual_learning_epoch, sgd
from tabular_fml.task import PERSONAL_ARCH, ClientData, load_data, meme_model, personal_model

app = ClientApp()


def client_data(context: Context) -> ClientData:
    """This node's partition, from ``partition-id``/``num-partitions`` in its node config."""
    return load_data(
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        float(context.run_config["dirichlet-alpha"]),
        int(context.run_config["seed"]),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of Federated Mutual Learning on this client."""
    data = client_data(context)
    x, y, run = data.x_train, data.y_train, context.run_config
    config = msg.content["config"]  # from FedMutualLearning: alpha, beta, lr, server-round
    lr, alpha, beta = float(config["lr"]), float(config["alpha"]), float(config["beta"])
    momentum, batch = float(run["momentum"]), int(run["batch-size"])

    meme = meme_model()  # the global model, with a fresh optimizer
    meme.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt_meme = sgd(meme, lr, momentum, 0.0)
    local = personal_model()  # the private model, restored if this client has one
    opt_local = sgd(local, lr, momentum, 0.0)
    if has_personal_model(context):
        load_personal(context, local, opt_local, PERSONAL_ARCH)
        opt_local.param_groups[0]["lr"] = lr  # the stored optimizer state holds the old lr
    for _ in range(int(run["local-epochs"])):
        mutual_learning_epoch(local, meme, opt_local, opt_meme, x, y, batch, alpha, beta)
    save_personal(context, local, opt_local, PERSONAL_ARCH)

    arrays = ArrayRecord(meme.state_dict())  # only the meme leaves the client
    metrics = MetricRecord({"num-examples": len(y)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_models(msg: Message, context: Context) -> Message:
    """Accuracy of the global and the personalized model on this client's test split."""
    data = client_data(context)
    meme = meme_model()
    meme.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics: dict[str, float | int] = {
        "num-examples": len(data.y_test),
        "partition_id": int(context.node_config["partition-id"]),
        "global_acc": evaluate(meme, data.x_test, data.y_test).accuracy,
    }
    if has_personal_model(context):  # a client that never trained has none yet
        local = personal_model()
        load_personal(context, local, None, PERSONAL_ARCH)
        metrics["personal_acc"] = evaluate(local, data.x_test, data.y_test).accuracy
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
