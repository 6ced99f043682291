from eplb.tools.generator.model import *  # noqa: F403
