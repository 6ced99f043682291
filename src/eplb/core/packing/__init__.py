from eplb.core.packing.refine import *  # noqa: F403  (temporary: split below)
from eplb.core.packing.refine import EXPERT, LOAD, PackingOptions, Tracking  # noqa: F401
