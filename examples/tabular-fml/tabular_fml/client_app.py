"""ClientApp: FML on this client's tabular data, with fml-flower's public API only.

``train`` and ``evaluate`` hand the message to :func:`client_app.fml.train` and
:func:`client_app.fml.evaluate` with freshly built models and this client's data. Those
read everything they train with (``lr``, ``alpha``, ``beta``, ``local-epochs``,
``batch-size``, ``momentum``) from the message that ``FedMutualLearning`` sent, keep the
personalized model and its optimizer in ``context.state`` between rounds, and return the
reply: after training, the meme's arrays and ``num-examples`` only; after evaluation,
``global_acc``/``global_loss`` (the global model) and ``personal_acc``/``personal_loss``
(this client's personalized model) on its test split.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.fml import evaluate as fml_evaluate
from client_app.fml import train as fml_train
from tabular_fml.task import ClientData, load_data, meme_model, personal_model

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
    reply = fml_train(
        msg.content,
        context.state,
        meme=meme_model(),
        local=personal_model(),
        data=(data.x_train, data.y_train),
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global and the personalized model on this client's test split."""
    data = client_data(context)
    reply = fml_evaluate(
        msg.content,
        context.state,
        meme=meme_model(),
        local=personal_model(),
        data=(data.x_test, data.y_test),
    )
    return Message(reply, reply_to=msg)
