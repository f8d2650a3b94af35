"""Compatibility module: ``from steering_opt import steering_opt`` (the reference tutorial's import).

Re-exports the public API so that ``steering_opt.steering_opt.optimize_vector`` etc. work.
"""

from . import *  # noqa: F401,F403
from . import __all__  # noqa: F401
