"""The FML ClientApp."""
