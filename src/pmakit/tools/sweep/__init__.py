"""Choose the merge after training: score candidate (rule, window) merges of a run's checkpoints or samples."""

from .run import *  # noqa: F403
from .run import __all__, causal_lm_nats, load_weights_into, write_plot  # noqa: F401
