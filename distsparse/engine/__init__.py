"""The engine: trainer loop, backends, checkpoints, metrics and reports."""
