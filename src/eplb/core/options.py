"""Every knob of a plan, in two frozen records.

- :class:`PackingOptions`: the packing search (randomised starts, swap-refinement steps,
  construction).
- :class:`PlanOptions`: the replication portfolio, plus the packing options.

The defaults are fast and near the bound; each default's reason is written next to it.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from eplb.core.topology import int_at_least, is_name, real_number

#: divisor shifts δ of the default replication portfolio (w / (c + δ)); 0 is Jefferson
DEFAULT_SHIFTS: tuple[float, ...] = (0.0, -0.25, -0.5, -0.75)

AUTO_PAIR_STEPS = 2
AUTO_MAX_STEPS = 8
#: with at most this many slots per GPU replicas are coarse and many GPUs start above
#: the target: one replica allocation is packed per layer (the one with the smallest
#: packing bound) instead of five, and the saved time buys twice the refinement steps
FEW_SLOTS = 4
FEW_SLOT_STEP_FACTOR = 2
#: ... and where that one packing ends more than this fraction above its allocation's
#: packing bound, the bound has not seen what packs well: the layer packs the other
#: allocations too (and the FEW_SLOT_SHIFTS and filler allocations) and keeps the lowest
#: peak (``policies.base._second_look``). Under heavy skew or many idle experts the bound
#: is the mean GPU load for every allocation while Jefferson's counts leave more than P
#: replicas above half a GPU's mean load, so pairs of them share GPUs; DeepSeek's greedy,
#: which stacks two replicas of one expert on a GPU where eplb may not, then beat eplb
#: (0.64 against 0.74 for two hot experts among 16 on 8 GPUs of 3 slots; 0.94 now).
#: 0.03 against 0.01 on 200 random S = 3-4 inputs (log-normal σ 1.5-3, Zipf, 30-80 %
#: idle experts, dominant experts; before the extra allocations): 0.9613 against 0.9621
#: of the ceiling on average for 12 % less time; on bench_shapes' S = 3-4 shapes 0.01
#: fired on rows near their bound and cost up to +80 % time for at most +0.0019, 0.03
#: costs +3-10 % there except gpt-oss-like S = 3 (3.8 → 6.5 ms, +0.0005); 0.05 left a
#: case 0.014 below the greedy
SECOND_LOOK_GAP = 0.03
#: divisor shifts the second look adds to the portfolio: closer to −1 than its own, so
#: that cold experts get a second replica before hot ones get more (distances to −1 about
#: halving after the portfolio's 0.25): fewer, larger hot replicas, one per GPU, with
#: finer cold ones to fill the other slots. On 200 random S = 3-4 inputs (seeds 1000-1199,
#: chosen on seeds 0-199) 0.9607 → 0.9682 of the ceiling on average, worst 0.728 → 0.814
FEW_SLOT_SHIFTS: tuple[float, ...] = (-0.85, -0.93, -0.98)
#: rows of at most LADDER_MAX_GPUS GPUs (a hierarchical policy's node of 2-4 GPUs, or a
#: small global problem) packed more than LADDER_GAP above their bound ``max(W / P,
#: T_rep)`` also pack up to LADDER_RUNGS allocations that give some of Jefferson's extra
#: replicas to the coldest experts instead (``count_fillers.ladder_counts``,
#: ``policies.base._filler_ladder``). There a GPU's mean load is a few experts' loads and
#: the counts decide whether the replicas can add up to it: on 1,300 random hierarchical
#: inputs with 2-4 GPUs per node the cases 0.01 or more below DeepSeek's greedy went from
#: 11 to 3. On more GPUs the swap search finds fitting sums among many GPUs; on rows of
#: 8-128 GPUs (six shapes of generated and real DeepSeek-V3, Qwen3, Kimi-K2, gpt-oss-like
#: loads at S = 3-5) the ladder gained 0.0001-0.0002 on four, 0.001 and 0.002 on two (Qwen3-like
#: 128 GPUs S = 3, real DeepSeek-V3 on 4 nodes of 24 GPUs), for 33-135 % more time
LADDER_MAX_GPUS = 4
LADDER_GAP = 0.01
LADDER_RUNGS = 8
#: the automatic portfolio thresholds (largest Jefferson replica / mean GPU load above
#: which a layer scores the replication portfolio): where the allocations are only
#: ranked by their packing bound (a few array passes) every layer above 1/3; where each
#: is packed and refined (S > FEW_SLOTS) only above 1/2. Between 1/3 and 1/2 the packed
#: portfolio gained 0.0003-0.0005 in sample at S = 5 and nothing on the next window
#: (+0.0003, 0.0000, -0.0002, 0.0000 on four shapes, drift exp(0.15 N(0, 1))), and the
#: same plans at S = 9 and 17, for up to half the call's time (BENCHMARKS.md §12)
RANKED_PORTFOLIO_THRESHOLD = 1 / 3
PACKED_PORTFOLIO_THRESHOLD = 1 / 2
#: the most polish steps the few-slot rule gives (reached at 128 GPUs). Chosen on generated
#: loads (``benchmarks/bench_shapes.py --steps-sweep``, BENCHMARKS.md §12): +0.0006 to
#: +0.0021 of the ceiling at S = 3-4 on 96-256 GPUs for 8-22 % more time
FEW_SLOT_MAX_STEPS = 32
#: at most this many slots per GPU, the packing also tries a second, randomised start
#: (``num_candidates`` left automatic) where the polish has a step per GPU: with 3 slots
#: the start decides much, and with few GPUs the search converges within its steps, so a
#: second start is the way past its local optimum. With more GPUs than polish steps the
#: steps, not the starts, are what is short: both starts perturbed (see FEW_SLOT_NOISE),
#: a second one added +0.0003 to +0.0006 of the packing bound at S = 3 on 64-256 GPUs for
#: 1.4-2.0× the packing time, and +0.0017 on 16 GPUs for 1.3× (generated loads, seeds
#: 10-12, worst of three)
COARSE_SLOTS = 3
COARSE_SLOT_CANDIDATES = 2
#: relative noise on expert loads that orders the randomised packing starts
DEFAULT_NOISE = 0.05
#: with at most COARSE_SLOTS slots per GPU every start of the replica packing is
#: perturbed, the first too, by this much: balanced largest differencing of the exactly
#: sorted items gives every GPU one item of each third of the sort, a start the swap
#: searches leave at a worse local optimum than a perturbed order's. One start at S = 3
#: (generated loads, seeds 10-12, worst of three, Σ packing bound / Σ max GPU load):
#: 58×256 P=96 0.9893 → 0.9954, P=128 0.9944 → 0.9973, 94×128 P=64 0.9939 → 0.9956; 0.05
#: reached 0.9930 at P=96, better only at P=256 (0.9970 against 0.9961). At S = 4 it
#: gained 0.0004-0.0017 for 10-16 % more time on shapes already above 0.995 of the
#: ceiling: not taken there
FEW_SLOT_NOISE = 0.1
#: the most packing starts a plan accepts: each start multiplies the packing's work, and
#: beyond a few they stop paying (8 starts add at most 0.0007 of the ceiling over 4 on
#: any shape of BENCHMARKS.md §12's sweep); 10**6 ran for minutes before this limit
MAX_CANDIDATES = 1024
#: the slots per GPU ``IncrementalOptions.move_price`` is stated at: a DeepSeek-V3 layer
#: of 288 slots on 32 GPUs, where its default was derived. Moving all of a layer's slots
#: sends ``S`` experts' weights into each GPU at ``S`` slots per GPU, so the price of a
#: move follows ``S`` (:meth:`IncrementalOptions.layer_price`)
PRICE_SLOTS_PER_GPU = 9
#: the most warm-start steps an incremental plan accepts: every step is a candidate
#: placement of every layer, built and scored (``[steps, L, R]`` and its draws), so memory
#: grows with it (10**9 steps was killed for memory; attacker pass). 256 steps of the
#: default quota reach every slot 12 times over, and took 0.26 s and 170 MB more than the
#: default's 4 at DeepSeek-V3's shape
MAX_INCREMENTAL_STEPS = 256
#: the warm-start steps at :data:`PRICE_SLOTS_PER_GPU` slots per GPU and above (and at
#: :data:`COARSE_SLOTS` or fewer), where ``steps`` is left to choose itself
#: (:meth:`IncrementalOptions.steps_for`)
DEFAULT_INCREMENTAL_STEPS = 4
#: the most divisor shifts a replication portfolio accepts: each is an allocation counted,
#: compared with the others and perhaps packed (10**4 shifts took 24 s and 5.3 GB on a
#: 3×16 plan; attacker pass); the default has 5
MAX_SHIFTS = 64


def _few_slot_factor(slots: int | None) -> int:
    return FEW_SLOT_STEP_FACTOR if slots is not None and slots <= FEW_SLOTS else 1


CONSTRUCTIONS = ("bldm", "lpt")


@dataclass(frozen=True)
class PackingOptions:
    """Knobs of the packing search.

    Attributes:
        num_candidates: packing starts per row, the first in the exact order (unless
            ``perturb_first``), the others randomised. ``None`` (default): 1, or
            :data:`COARSE_SLOT_CANDIDATES` where a GPU has at most :data:`COARSE_SLOTS`
            slots and there are no more GPUs than polish steps.
        pair_steps: steps of the all-pairs L2 swap search over paired GPUs (smooths
            every GPU, up to ``P/2`` swaps per row per step). ``None`` (default):
            :data:`AUTO_PAIR_STEPS` per doubling of the heavy half of the GPUs (``P/2``)
            over the polish steps (2 at P = 32, 6 at P = 128), and none where the polish
            reaches every heavy GPU by itself (measured: they change nothing there).
        max_steps: steps of the heaviest-GPU polish (one swap per row per step between
            the heaviest GPU and its best partner, aimed at the max load). ``None``
            (default): :data:`AUTO_MAX_STEPS`, or ``max(4, P/2)`` for fewer GPUs, about one
            step per GPU above the mean (measured on the DeepSeek-V3 8-GPU node rows:
            steps past the fourth close the hierarchical gap by 0.00004 at most).
            Both automatic counts double where a GPU has at most :data:`FEW_SLOTS`
            slots (coarse replicas; one allocation is packed there instead of five),
            and there the polish gets at least a step per 4 GPUs, up to
            :data:`FEW_SLOT_MAX_STEPS`.
        construction: ``"bldm"`` (balanced largest differencing) or ``"lpt"``.
        noise: relative perturbation of expert loads that orders randomised starts.
            ``None`` (default): :data:`DEFAULT_NOISE`, or :data:`FEW_SLOT_NOISE` in the
            replica packing where a GPU has at most :data:`COARSE_SLOTS` slots.
        perturb_first: whether the first start is perturbed too (else it keeps the
            exact order). ``None`` (default): in the replica packing where a GPU has at
            most :data:`COARSE_SLOTS` slots, nowhere else.

    Both searches stop early once no swap improves.
    """

    num_candidates: int | None = None
    pair_steps: int | None = None
    max_steps: int | None = None
    construction: str = "bldm"
    noise: float | None = None
    perturb_first: bool | None = None

    def __post_init__(self) -> None:
        for name, low in (("num_candidates", 1), ("pair_steps", 0), ("max_steps", 0)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int_at_least(name, getattr(self, name), low))
        if self.num_candidates is not None and self.num_candidates > MAX_CANDIDATES:
            raise ValueError(f"num_candidates must be at most {MAX_CANDIDATES}, got "
                             f"{self.num_candidates}")
        if not is_name(self.construction, CONSTRUCTIONS):
            raise ValueError(
                f"construction must be one of {CONSTRUCTIONS}, got {self.construction!r}"
            )
        if self.noise is not None and (
            isinstance(self.noise, bool) or not isinstance(self.noise, numbers.Real)
            or not 0 <= self.noise < 1
        ):
            raise ValueError(f"noise must be a number in [0, 1), got {self.noise!r}")
        if self.perturb_first is not None and not isinstance(self.perturb_first, bool):
            raise ValueError(f"perturb_first must be a bool or None, got {self.perturb_first!r}")

    def candidates_for(self, slots: int, num_gpus: int | None = None) -> int:
        """The packing starts of the planner's replica packing for rows of ``slots`` per
        GPU on ``num_gpus`` GPUs (``None``: taken as few enough for a second start).

        The other packings, of groups onto nodes and in the locality and nearest-dispatch
        searches, take ``num_candidates`` or one start: the second start was measured for
        the replica packing only."""
        if self.num_candidates is not None:
            return self.num_candidates
        if slots > COARSE_SLOTS:
            return 1
        if num_gpus is not None and num_gpus > self.max_steps_for(num_gpus, slots):
            return 1  # more GPUs than polish steps: see COARSE_SLOT_CANDIDATES
        return COARSE_SLOT_CANDIDATES

    def noise_for(self, slots: int | None = None) -> float:
        """The noise of the randomised starts for rows of ``slots`` per GPU (``None``:
        a packing other than the planner's replica packing)."""
        if self.noise is not None:
            return float(self.noise)
        return FEW_SLOT_NOISE if slots is not None and slots <= COARSE_SLOTS else DEFAULT_NOISE

    def perturbs_first(self, slots: int | None = None) -> bool:
        """Whether the first start is perturbed too, for rows of ``slots`` per GPU
        (``None``: a packing other than the planner's replica packing)."""
        if self.perturb_first is not None:
            return self.perturb_first
        return slots is not None and slots <= COARSE_SLOTS

    def max_steps_for(self, num_gpus: int, slots: int | None = None) -> int:
        """The polish steps used for rows of ``num_gpus`` GPUs (``slots`` per GPU)."""
        if self.max_steps is not None:
            return self.max_steps
        steps = min(AUTO_MAX_STEPS, max(4, num_gpus // 2)) * _few_slot_factor(slots)
        if _few_slot_factor(slots) > 1:
            # few slots: many GPUs start above the target and the polish lifts one per
            # step, so it gets a step per 4 GPUs, up to FEW_SLOT_MAX_STEPS
            steps = max(steps, min(FEW_SLOT_MAX_STEPS, num_gpus // 4))
        return steps

    def pair_steps_for(self, num_gpus: int, slots: int | None = None) -> int:
        """The all-pairs steps used for rows of ``num_gpus`` GPUs (``slots`` per GPU)."""
        if self.pair_steps is not None:
            return self.pair_steps
        heavy_per_polish_step = num_gpus / (2 * max(1, self.max_steps_for(num_gpus)))
        if heavy_per_polish_step <= 1:
            return 0
        # more GPUs than the polish can visit: 2 steps per doubling (2 at P = 32, 6 at 128)
        steps = AUTO_PAIR_STEPS * math.ceil(math.log2(heavy_per_polish_step))
        return steps * _few_slot_factor(slots)

    def two_slot_iterations(self) -> int | None:
        """Count-search iterations for two slots per GPU: the explicit step counts
        summed, or ``None`` (automatic) when neither is set."""
        if self.pair_steps is None and self.max_steps is None:
            return None
        return (self.pair_steps or 0) + (self.max_steps or 0)

    @classmethod
    def with_budget(cls, refine_steps: int, **kwargs: object) -> PackingOptions:
        """Split a total swap-step budget: about a third L2 pair steps, the rest polish."""
        refine_steps = int_at_least("refine_steps", refine_steps, 0)
        pair = (refine_steps + 2) // 3
        return cls(pair_steps=pair, max_steps=refine_steps - pair, **kwargs)  # type: ignore[arg-type]


def _slots_per_gpu(slots_per_gpu: object) -> int:
    """``slots_per_gpu`` as an int, else ``ValueError`` naming it (an integer >= 1)."""
    if not isinstance(slots_per_gpu, numbers.Integral) or isinstance(slots_per_gpu, bool) \
            or slots_per_gpu < 1:
        raise ValueError(f"slots_per_gpu must be an int >= 1, got {slots_per_gpu!r}")
    return int(slots_per_gpu)


@dataclass(frozen=True)
class IncrementalOptions:
    """How incremental planning (``previous=``) decides what to move.

    Every candidate is scored by its expected *next-window* max GPU load: each GPU's load
    moves by the change a drift of log-std ``drift`` per expert brings (part of it shared
    within an expert group, ``group_share``), and the max over GPUs is averaged over
    fixed stratified draws (:func:`eplb.online.score.expected_peak`). In-sample
    balance is not the criterion: past the noise drift adds, an in-sample gain does not
    survive to the next window, but its weight transfers are paid.

    Attributes:
        drift: log-std of one expert's load change between two rebalances. The default
            0.2 sits between what the real traces show (see BENCHMARKS.md, "Incremental
            planning"): consecutive windows of real DeepSeek-V3/ESFT traffic correlate at
            0.9–0.99. A larger value makes eplb move less.
        group_share: the share of that drift an expert has in common with its expert
            group, where the call names groups (``num_groups > 1``; experts
            ``[k·E/G, (k+1)·E/G)`` form group ``k``): a GPU holding several experts of
            one group swings more than one holding experts of different groups (no
            effect where the groups do not divide the experts, or without groups). The
            default 0.09 is measured on the real DeepSeek-V3 loads: between the 12
            SGLang workloads, 8.9 % (mean over the 66 pairs; median 8.5 %) of the
            per-expert log-load change is common to the expert's group, against 0.5 %
            with expert ids shuffled (BENCHMARKS.md §3).
        move_price: a layer takes the candidate with the best expected next-window
            balancedness minus a price × the fraction of its slots that change, with or
            without a budget: ``max_moves`` caps these moves and buys no others
            (``move_price=0`` spends a budget wherever it buys expected balance). With
            ``dispatch="nearest"`` the gain must exceed that price both in sample, as the
            rule realises it, and on the expected next window. The price is
            ``move_price`` at 9 slots per GPU and ``move_price × S / 9`` at ``S``
            (:meth:`layer_price`): a rebalance stalls on the weights each GPU receives,
            and moving all of a layer's slots sends ``S`` experts' weights into each GPU.
            The default 0.01 is where a rebalance breaks even at vLLM's defaults with
            the stalls users measure: moving
            all of a DeepSeek-V3 layer's slots on 32 GPUs sends 288 × 44 MB / 32 ≈ 0.4 GB
            into each GPU. A full reshuffle (≈ 23 GB into each GPU) stalls 0.65–1.7 s on
            32×GB200 (reported in vLLM's issues), 14–35 GB/s in effect, so about 21 ms per
            layer at the middle of that range, while 0.005 of balancedness saves ≈ 0.5 %
            of the layer's MoE time over the 3000 steps until the next rebalance (≈ 10 ms
            at 0.6 ms per layer-step): break-even near 0.01 (0.0055–0.0145 over the range;
            0.004 at the link's nominal 50 GB/s, the default until 2026-12-02). Raise it
            for slower transfers or shorter intervals, lower it for asynchronous transfers
            that overlap serving.
        quota: slots (as a fraction of a layer's slots) each step of the warm-start
            refinement may change: the spacing of the candidates between few and many
            moves. Under the hierarchical policy each node's share (``quota / N`` of
            the layer's slots).
        steps: warm-start refinement steps: candidates reach about
            ``(steps + 1) · quota`` of the slots beyond the replica transfers. Each step
            is one pass of the swap search over every layer, the largest cost of an
            incremental plan. ``None`` (default): :meth:`steps_for` the slots per GPU.
            4 steps of 3/64 at 9 slots per GPU reach as far as the former 6 of 1/32 in
            two steps fewer; chosen on synthetic DeepSeek-V3 loads
            (``benchmarks/bench_incremental_settings.py``), not on the real files the
            benchmarks report: 0.7–0.8× the time, next-window balancedness +0.0012,
            slots moved 19.0 → 19.5 % (global, both at move_price 0.005; BENCHMARKS.md
            §3).
    """

    drift: float = 0.2
    group_share: float = 0.09
    move_price: float = 0.01
    quota: float = 3 / 64
    steps: int | None = None

    def layer_price(self, slots_per_gpu: int) -> float:
        """What moving all of a layer's slots costs in expected balancedness at
        ``slots_per_gpu`` slots per GPU: ``move_price`` × slots per GPU / 9
        (:data:`PRICE_SLOTS_PER_GPU`). A rebalance stalls on the weights each GPU
        receives, and moving a share of a layer's slots sends that share of its slots
        per GPU into each GPU: at 2 slots per GPU moving every slot sends 2 experts into
        each GPU, at 9 slots 9. (With dead GPUs the fraction is still of all the layer's
        slots, the dead GPUs' empty ones included, so moving every live slot costs
        ``(P − k) / P`` of this price with ``k`` of ``P`` GPUs dead.)"""
        return self.move_price * (_slots_per_gpu(slots_per_gpu) / PRICE_SLOTS_PER_GPU)

    def steps_for(self, slots_per_gpu: int, dispatch: str = "even", num_nodes: int = 1) -> int:
        """The warm-start steps of a plan at ``slots_per_gpu`` slots per GPU: ``steps``
        where set, else :data:`DEFAULT_INCREMENTAL_STEPS` (4), but between
        :data:`COARSE_SLOTS` and :data:`PRICE_SLOTS_PER_GPU` slots per GPU enough steps
        that the ladder reaches as far *in price* (:meth:`layer_price`) as 4 steps do at
        9: ``ceil(5 · 9 / S) − 1``, 11 at 4 slots per GPU, 8 at 5, 5 at 8; under nearest
        ``dispatch`` on one node (``num_nodes``: SGLang's runtime table, and the plans
        made beside it there) 4.

        Why: the price of moving a slot falls with the slots per GPU, so more moves pay
        there, and a ladder of 4 steps ran out before they did. At 320 slots on 64 GPUs
        on vLLM's call the hierarchical plans took the ladder's last rung in 40–47 of 58
        layers, and on the next window they were 0.0024 below vLLM's policy, which
        re-plans every slot; with 8 steps 0.0011 above it (BENCHMARKS.md §3). Under
        nearest dispatch on several nodes (real DeepSeek-V3 loads at 4, 5, 6 and 8 slots
        per GPU) the next window was level (−0.0003 to +0.0012) and 16–22 percentage
        points fewer slots moved at 4–6 slots: the short ladder ran out there too and its
        layers took a fresh plan. On one node the table's rules that offer a fresh plan
        were set with 4 steps, and with 5 a layer at R = E on 8 GPUs ended 0.010 short of
        it in sample (BENCHMARKS.md §3, "Fiftieth session"). At 3 slots or fewer every
        layer is offered a fresh plan instead (12 steps there were no better).
        """
        # checked as layer_price checks them: int() read "5" as 5 and 5.9 as 5, and a
        # misspelt dispatch, or 0 slots, fell silently to the default steps
        slots = _slots_per_gpu(slots_per_gpu)
        if not is_name(dispatch, ("even", "nearest")):  # core/dispatch.py's rules
            raise ValueError(f"dispatch must be 'even' or 'nearest', got {dispatch!r}")
        nodes = int_at_least("num_nodes", num_nodes, 1)
        if self.steps is not None:
            return self.steps
        if not COARSE_SLOTS < slots < PRICE_SLOTS_PER_GPU or (
                dispatch == "nearest" and nodes == 1):
            return DEFAULT_INCREMENTAL_STEPS
        reach = (DEFAULT_INCREMENTAL_STEPS + 1) * PRICE_SLOTS_PER_GPU
        return max(DEFAULT_INCREMENTAL_STEPS, math.ceil(reach / slots) - 1)

    def __post_init__(self) -> None:
        for name in ("drift", "group_share", "move_price", "quota"):
            # NumPy and 0-d torch numbers work like floats (stored as float, so the
            # record stays hashable and prints plainly); bools and strings do not
            value = getattr(self, name)
            if isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {reprlib.repr(value)}")
            number = real_number(value)
            if number is not None:
                object.__setattr__(self, name, number)
        if not (isinstance(self.drift, (int, float)) and 0 <= self.drift <= 2):
            raise ValueError(f"drift must be a number in [0, 2], got {reprlib.repr(self.drift)}")
        if not (isinstance(self.group_share, (int, float)) and 0 <= self.group_share <= 1):
            raise ValueError(f"group_share must be a fraction in [0, 1], got "
                             f"{reprlib.repr(self.group_share)}")
        if not (isinstance(self.move_price, (int, float)) and 0 <= self.move_price < 1):
            raise ValueError(f"move_price must be a number in [0, 1), got "
                             f"{reprlib.repr(self.move_price)}")
        if not (isinstance(self.quota, (int, float)) and 0 < self.quota <= 1):
            raise ValueError(f"quota must be a fraction in (0, 1], got {reprlib.repr(self.quota)}")
        if self.steps is None:
            return
        object.__setattr__(self, "steps", int_at_least("steps", self.steps, 0))
        if self.steps > MAX_INCREMENTAL_STEPS:
            raise ValueError(f"steps must be at most {MAX_INCREMENTAL_STEPS}, got {self.steps} "
                             "(a larger quota reaches further per step)")


@dataclass(frozen=True)
class PlanOptions:
    """Everything that tunes a plan; the defaults are fast and near-optimal.

    Attributes:
        packing: the packing search (candidates, refinement steps, construction).
        shifts: divisor shifts ``δ`` of the replication portfolio (``w / (c + δ)``).
        hamilton: also try largest-remainder replication.
        portfolio_threshold: the portfolio is scored only in layers whose largest
            Jefferson replica exceeds this fraction of the mean GPU load (elsewhere every
            allocation packs alike). ``None`` (default): 1/3 where the allocations are
            ranked by their packing bound, 1/2 where each is packed and refined (see
            :meth:`portfolio_cut`).
        packed_allocations: in those layers, how many allocations are packed and
            refined: the ones with the smallest packing lower bound
            (:func:`eplb.core.count_bounds.packing_bound`). ``None`` (default): one where
            a GPU has at most :data:`FEW_SLOTS` slots (there the bound picks as well as
            packing all five, measured, and the packing gets twice the steps; a layer
            packed more than :data:`SECOND_LOOK_GAP` above its bound packs the others
            too), all of them elsewhere (with heavy skew at ``S >= 5`` the bound's pick
            packs worse: 0.955 vs 0.993 at σ = 2, R = 320, P = 64).
        incremental: how plans from a placement in force decide what to move.
    """

    packing: PackingOptions = field(default_factory=PackingOptions)
    shifts: tuple[float, ...] = DEFAULT_SHIFTS
    hamilton: bool = True
    portfolio_threshold: float | None = None
    packed_allocations: int | None = None
    incremental: IncrementalOptions = field(default_factory=IncrementalOptions)

    def __post_init__(self) -> None:
        # the records and flags are read deep inside planning: a wrong type failed there
        # with an AttributeError naming no option (found by the twelfth-session fuzz pass)
        for name, kind in (("packing", PackingOptions), ("incremental", IncrementalOptions)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be an eplb.{kind.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")
        if not isinstance(self.hamilton, bool | np.bool_):  # "no" would be true
            raise ValueError(f"hamilton must be True or False, got {self.hamilton!r}")
        threshold = self.portfolio_threshold
        number = None if threshold is None else real_number(threshold)
        if threshold is not None and (number is None or math.isnan(number)):
            raise ValueError(f"portfolio_threshold must be a number or None, got {threshold!r}")
        object.__setattr__(self, "portfolio_threshold", number)
        shifts = self.shifts
        if isinstance(shifts, np.ndarray | torch.Tensor) and shifts.ndim == 1:
            shifts = shifts.tolist()  # an array of shifts: its numbers, one by one
        if not isinstance(shifts, tuple | list) or any(
                isinstance(x, bool) or not isinstance(x, numbers.Real) for x in shifts):
            raise ValueError(f"shifts must be a tuple of numbers in (-1, 0], got {shifts!r}")
        if len(shifts) > MAX_SHIFTS:
            raise ValueError(f"shifts holds {len(shifts)} divisor shifts; at most {MAX_SHIFTS}")
        object.__setattr__(self, "shifts", tuple(float(x) for x in shifts))
        if not self.shifts and not self.hamilton:
            raise ValueError("the replication portfolio is empty: give shifts or hamilton=True")
        for shift in self.shifts:
            if not -1 < float(shift) <= 0:
                raise ValueError(f"divisor shifts must lie in (-1, 0], got {shift!r}")
        keep = self.packed_allocations
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"packed_allocations must be an integer >= 1 or None, got {keep!r}")

    @property
    def rules(self) -> tuple[float | str, ...]:
        return tuple(float(s) for s in self.shifts) + (("hamilton",) if self.hamilton else ())

    def portfolio_cut(self, each_packed: bool) -> float:
        """The portfolio threshold in force: the one given, else
        :data:`PACKED_PORTFOLIO_THRESHOLD` where ``each_packed`` (every allocation of a
        coarse layer is packed and refined) and :data:`RANKED_PORTFOLIO_THRESHOLD` where
        the allocations are only ranked by their packing bound."""
        if self.portfolio_threshold is not None:
            return self.portfolio_threshold
        return PACKED_PORTFOLIO_THRESHOLD if each_packed else RANKED_PORTFOLIO_THRESHOLD


def with_incremental(options: PlanOptions | None, **changes: float | None) -> PlanOptions:
    """``options`` (default: :class:`PlanOptions`) with the given
    :class:`IncrementalOptions` fields replaced; ``None`` values leave a field alone."""
    base = PlanOptions() if options is None else options
    if not isinstance(base, PlanOptions):
        raise TypeError(f"options must be an eplb.PlanOptions, got {type(base).__name__}")
    given = {name: value for name, value in changes.items() if value is not None}
    if not given:
        return base
    return replace(base, incremental=replace(base.incremental, **given))
