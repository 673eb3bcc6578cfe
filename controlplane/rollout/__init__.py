"""Rollouts: strategies as step plans, walked by the engine, gated by analysis."""
