"""Checkpoints in the released Cosmos 3 unified (Diffusers) layout."""
