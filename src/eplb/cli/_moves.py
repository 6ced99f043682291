"""What a plan from ``--previous`` moved: the forced moves told apart from the others,
and why forced moves went past ``--max-moves`` or re-planned whole layers."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable

import torch

from eplb.cli._common import FORCED_MOVES, timed
from eplb.cli._inputs import straddling_layers, warn
from eplb.core.messages import counted, integer_runs
from eplb.core.placement import Placement
from eplb.online.moves import stacked


@dataclasses.dataclass(frozen=True)
class MoveSplit:
    """The slots a plan moved from the map in force, in two parts that add up to them.

    Attributes:
        forced: ``[L]`` slots moved that the forced moves alone move too (made whatever
            ``--max-moves`` says).
        beyond: the other slots moved (what ``--max-moves`` caps).
        no_load: of ``forced``, those in rows with no load (a dump's dense layers).
        seconds: the time of the plan of the forced moves alone.
    """

    forced: torch.Tensor
    beyond: int
    no_load: int
    seconds: float

    def summary(self) -> dict[str, int]:
        return {"moved_slots_forced": int(self.forced.sum()),
                "moved_slots_forced_no_load": self.no_load,
                "moved_slots_beyond_forced": self.beyond}

    def parts(self) -> str:
        """`` (F forced by the map in force, B beyond them)``, or nothing where none was
        forced."""
        forced = int(self.forced.sum())
        if not forced:
            return ""
        idle = f", {self.no_load} of them in rows with no load" if self.no_load else ""
        return f" ({forced} forced by the map in force{idle}, {self.beyond} beyond them)"


def may_force(previous: Placement, placement: Placement, args: argparse.Namespace) -> bool:
    """Whether planning ``placement`` from ``previous`` can force any move: GPUs dead now
    that were live in ``previous`` or live again, replicas ``previous`` stacks on one GPU,
    or, under the hierarchical policy, groups it keeps on several nodes
    (:data:`FORCED_MOVES`). Elsewhere the plan of the forced moves alone is ``previous``
    itself: not made (a second plan cost up to half the call's time under nearest
    dispatch: attacker pass)."""
    if not torch.equal(previous.live_gpus().cpu(), placement.live_gpus().cpu()):
        return True
    if stacked(previous.phy2log.cpu().numpy(), previous.topology.num_gpus).any():
        return True
    return placement.policy == "hierarchical" and bool(
        straddling_layers(previous, args.nodes, args.groups))


def split_moves(forced_plan: Callable[[], Placement] | None, previous: Placement,
                placement: Placement, weight: torch.Tensor) -> MoveSplit | None:
    """Split the slots ``placement`` moved from ``previous`` with ``forced_plan()``, the
    same call with a budget of 0 (which makes the forced moves only): a moved slot the
    forced moves change too is forced (also where the plan then gave it yet another
    expert), the others are beyond them, so the two add up to the total (new-user pass:
    "moved 238 slots, more than --max-moves 100", where 142 were forced, and a first
    split that counted re-changed slots twice). ``None`` where the planner takes no
    budget (nearest dispatch re-plans whole, then relabels): the same call but the
    budget can only have been refused for it. ``forced_plan`` ``None``: nothing can be
    forced (:func:`may_force`). ``weight [L, E]``."""
    old = previous.phy2log.to(placement.phy2log.device)
    moved = (placement.phy2log != old) & (placement.phy2log >= 0)  # as moved_slots
    if forced_plan is None:
        return MoveSplit(torch.zeros(moved.shape[0], dtype=torch.int64), int(moved.sum()), 0,
                         0.0)
    try:
        # the same call as the plan's, budget aside: its warnings were given once already
        # (new-user pass: "previous placement was planned for 1 node(s)..." printed twice)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forced, seconds = timed(forced_plan)
    except ValueError:
        return None
    in_forced = (moved & (forced.phy2log.to(old.device) != old)).sum(1)  # [L]
    idle = ~weight.any(-1).to(in_forced.device)
    return MoveSplit(in_forced, int(moved.sum()) - int(in_forced.sum()),
                     int(in_forced[idle].sum()), seconds)


def warn_forced_moves(previous: Placement, placement: Placement, moved: torch.Tensor,
                      split: MoveSplit | None, args: argparse.Namespace,
                      weight: torch.Tensor) -> None:
    """Say why a plan from ``--previous`` moved what it did where forced moves decided it:
    layers whose groups straddle nodes re-planned hierarchically (which may lower their
    balance: the old map balanced them across nodes), or more slots than --max-moves.
    ``moved [L]``: the slots the plan moved per layer; ``split``: their forced part.
    ``weight [L, E]``: rows with no load (a dump's dense layers) are re-planned too, but
    have no balance to lose, so they are counted apart."""
    straddling = (straddling_layers(previous, args.nodes, args.groups)
                  if placement.policy == "hierarchical" else [])
    loaded = weight.any(-1).tolist()
    idle = [row for row in straddling if not loaded[row]]
    straddling = [row for row in straddling if loaded[row]]
    total = int(moved.sum())
    over = args.max_moves is not None and total > args.max_moves
    parts = []
    if over and split is not None:
        where = f" ({split.no_load} in rows with no load)" if split.no_load else ""
        parts.append(f"moved {counted(total, 'slot')}, more than --max-moves "
                     f"{args.max_moves}: {int(split.forced.sum())} were forced moves{where}, "
                     f"made whatever the budget, and {split.beyond} changed beyond them; "
                     f"forced moves are {FORCED_MOVES}")
    if straddling:
        no_load = (f" ({len(idle)} more, rows {integer_runs(idle)}, carry no load: "
                   "re-planned too)" if idle else "")
        parts.append(f"{len(straddling)} layer(s) of {args.previous} (rows "
                     f"{integer_runs(straddling)}) keep expert groups on several of the "
                     f"{args.nodes} nodes or an unequal share of them on a node, so the "
                     f"hierarchical policy re-planned them whole (each group on one node, "
                     f"{args.groups // args.nodes} a node){no_load}; pass --policy global "
                     "to plan from that map without the node constraint")
    if parts:
        warn("; ".join(parts))
