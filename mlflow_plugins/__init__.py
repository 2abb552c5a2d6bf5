"""The MLflow face of lightning-privacy."""
