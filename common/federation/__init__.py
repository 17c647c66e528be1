"""What federated apps share: the run configuration, the exchanged model state, pooling and audit logs."""
