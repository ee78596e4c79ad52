"""Data drivers: column handling, collators, deterministic resumable loading."""
