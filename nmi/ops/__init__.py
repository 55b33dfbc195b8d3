"""Logs, probes, metrics and Events: what operators see of nmi."""
