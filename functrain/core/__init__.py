"""The pure core: tree (optree), rng, TrainState, precision, metrics, schedules, optim.

Nothing here imports anything above it (step, drivers) or does I/O.
"""
