"""Device modes (cpu float, gpu half, sharded) and where a model's parts go."""
