"""Files: atomic checksummed checkpoints and run plots."""
