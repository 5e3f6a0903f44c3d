"""Training data and loops (torch)."""
