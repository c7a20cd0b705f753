"""The FML ServerApp."""
