"""`switchyard sim`: a vLLM stand-in that speaks the OpenAI API, vLLM's metrics and sleep mode."""

from controlplane.sim.server import SimConfig, make_app, run, serve

__all__ = ["SimConfig", "make_app", "run", "serve"]
