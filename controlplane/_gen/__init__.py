"""Generated from protos/ by `make protos` (protos/generate.py): do not edit."""
