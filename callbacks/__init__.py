"""The Lightning face of lightning-privacy."""
