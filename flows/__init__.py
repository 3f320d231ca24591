"""Orchestration: Prefect flows and deployments over the DVC stages, MLflow tracking and the policy registry."""
