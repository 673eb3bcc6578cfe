"""Reconcilers make model versions exist: local processes here, Kubernetes pods later."""
