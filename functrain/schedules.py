"""Public path ``functrain.schedules``: the schedules of ``functrain.core.schedules``."""

from functrain.core.schedules import *  # noqa: F401,F403
