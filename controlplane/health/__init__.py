"""Health: Envoy stats and vLLM metrics per version, windows, and the analysis verdicts."""
