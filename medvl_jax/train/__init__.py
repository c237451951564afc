"""Training: state, update step, accumulation, the program, the loop, ahead-of-time."""
