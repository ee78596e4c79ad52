"""Public path ``functrain.optim``: the optax-style transformations of ``functrain.core.optim``."""

from functrain.core.optim import *  # noqa: F401,F403
