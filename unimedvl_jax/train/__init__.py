"""Training: curriculum, (later) optimizer, train step, loop and checkpointing."""
