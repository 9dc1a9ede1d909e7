"""Flow-matching schedules, classifier-free guidance and per-request sampler state for the generator."""
