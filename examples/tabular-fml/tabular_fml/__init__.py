"""Example Flower app: Federated Mutual Learning (fml-flower) on tabular data."""
