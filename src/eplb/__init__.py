"""eplb: expert placement planning for Mixture-of-Experts expert-parallel inference.

The public entry points are :func:`plan` (returns a :class:`Placement`) and the drop-in
:func:`rebalance_experts` (DeepSeek's signature and return value). Online rebalancing
lives in :mod:`eplb.online`, engine formats in :mod:`eplb.formats`, engine plugins in
:mod:`eplb.integrations`.

``import eplb`` itself loads nothing heavy: each public name below is imported from its
module the first time it is used (PEP 562), and so are :mod:`eplb.api`,
:mod:`eplb.core` and :mod:`eplb.online` as attributes. torch's import takes seconds,
and the ``eplb`` command (:mod:`eplb.__main__`) must be able to answer a Ctrl-C during
it as it answers one later: one line and exit code 130, not a traceback (attacker pass).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from eplb._version import __version__

if TYPE_CHECKING:  # what static tools read: the same names, from the same modules
    from eplb.api import plan, rebalance_experts
    from eplb.core.options import IncrementalOptions, PackingOptions, PlanOptions
    from eplb.core.placement import Placement, PlacementError
    from eplb.core.topology import Topology

__all__ = [
    "IncrementalOptions",
    "PackingOptions",
    "Placement",
    "PlacementError",
    "PlanOptions",
    "Topology",
    "__version__",
    "plan",
    "rebalance_experts",
]

#: the module each public name is imported from on first use
_HOME = {
    "plan": "eplb.api",
    "rebalance_experts": "eplb.api",
    "IncrementalOptions": "eplb.core.options",
    "PackingOptions": "eplb.core.options",
    "PlanOptions": "eplb.core.options",
    "Placement": "eplb.core.placement",
    "PlacementError": "eplb.core.placement",
    "Topology": "eplb.core.topology",
}
#: subpackages an ``import eplb`` used to load with the API (``eplb.core.plan_greedy``
#: after a bare ``import eplb`` kept working); the others need their own import, as the
#: README says
_LOADED_WITH_THE_API = ("api", "core", "online")


def __getattr__(name: str) -> Any:
    """A public name (or one of :data:`_LOADED_WITH_THE_API`), imported on first use;
    later uses find it in the module's namespace."""
    if name in _HOME or name in _LOADED_WITH_THE_API:
        # first the whole API, as the eager ``import eplb`` loaded it: one import, so
        # threads that first use different names wait on its lock. Each importing its own
        # module took that module's lock before its package's, and the locks crossed: an
        # ImportError from a half-made module, or importlib's _DeadlockError (attacker pass)
        importlib.import_module(f"{__name__}.api")
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    if name in _LOADED_WITH_THE_API:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LOADED_WITH_THE_API))
