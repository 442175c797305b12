"""Alerts once raised: the record and its hysteresis, and where transitions go (stream, Alertmanager, webhook)."""
