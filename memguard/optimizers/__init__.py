"""The optimizer catalog and everything built on it (see :mod:`memguard.optimizers.programs`)."""

from memguard.optimizers.programs import *  # noqa: F401,F403
