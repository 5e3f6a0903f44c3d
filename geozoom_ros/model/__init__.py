"""The zoom policy and the retrieval baseline (torch)."""
