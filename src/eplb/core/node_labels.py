"""The node labelling of nearest-dispatch plans: which GPU of the cluster each packed GPU's
contents ("bin") go to, so that every constrained expert has its replicas on distinct
nodes (see :mod:`eplb.core.dispatch_plan` for why).

Relabelling GPUs keeps every GPU's load under an even split, so the search only counts
*conflicts*: pairs of replicas of one constrained expert on one node (``node_conflicts``,
an ``[L, B, B]`` weight between bins). :func:`spread_over_nodes` starts from a greedy
labelling (:func:`_greedy_labelling`) and descends by best bin swaps (Kernighan-Lin,
:func:`_kl_swaps`); only layers it leaves with a conflict also search from the packing's
order and random labellings.
"""

from __future__ import annotations

import torch

from eplb.core.map_tables import expert_counts


def node_conflicts(
    phy2log: torch.Tensor, num_gpus: int, num_experts: int, min_count: int = 3,
    attract: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L, P, P]`` conflict weights between GPUs: for every expert with at least
    ``min_count`` replicas, one unit per replica pair on the two GPUs (``-1`` slots and
    the diagonal count nothing).

    ``attract [L, E]`` bool: experts whose replicas belong *together* (more replicas than
    nodes: :func:`eplb.core.dispatch_plan.node_attraction`). Their pairs weigh ``-1``
    instead, so a labelling with fewer conflicts keeps more of their replicas on a node:
    all on one node, or whole nodes."""
    num_layers, num_slots = phy2log.shape
    counts = expert_counts(phy2log, num_experts)  # [L, E]
    expert = torch.where(phy2log >= 0, phy2log, num_experts)
    repel = counts >= min_count
    if attract is not None:
        repel &= ~attract
    gpu = (torch.arange(num_slots, device=phy2log.device) // (num_slots // num_gpus))
    index = gpu[None] * (num_experts + 1) + expert

    def pairs(chosen: torch.Tensor) -> torch.Tensor:
        mark = torch.cat([chosen, chosen.new_zeros(num_layers, 1)], 1).gather(1, expert)
        inc = torch.zeros(num_layers, num_gpus * (num_experts + 1), dtype=torch.float64,
                          device=phy2log.device)
        inc.scatter_add_(1, index, mark.to(torch.float64))
        inc = inc.view(num_layers, num_gpus, num_experts + 1)
        return torch.bmm(inc, inc.transpose(1, 2))

    conflict = pairs(repel)
    if attract is not None and bool(attract.any()):
        conflict -= pairs(attract)
    conflict.diagonal(dim1=1, dim2=2).zero_()
    return conflict


def spread_over_nodes(
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    num_experts: int,
    live: torch.Tensor | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    starts: int = 4,
    min_count: int = 3,
    attract: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel GPUs so replicas of experts with ``c >= 3`` sit on distinct nodes.

    Args:
        phy2log: ``[L, R]``; its GPUs' contents ("bins") are kept, only moved.
        live: ``[P]`` bool; bins of live GPUs move among live GPUs only (dead GPUs keep
            their ``-1`` slots), so the nodes' live-GPU counts are respected.
        max_steps: swap steps (default ``2·P``); each applies the best bin swap per layer
            (Kernighan-Lin gain ``M[a, y_b] + M[b, y_a] − M[a, y_a] − M[b, y_b] − 2A[a, b]``).
        starts: labellings searched per layer where a greedy one (:func:`_greedy_labelling`,
            searched first) leaves a conflict: the given one and ``starts − 1`` random
            ones (``generator``); the one with the fewest conflicts left is kept (ties: the
            given one, the random ones, the greedy one).
        min_count: only experts with at least this many replicas constrain the labelling
            (3 for an even split in expectation; ``N`` to keep every covering expert's
            replicas on distinct nodes, where even two replicas on one node would leave
            the other ranks to the fair choice).
        attract: ``[L, E]`` bool, experts whose replicas are kept together instead
            (:func:`node_conflicts`).

    Returns:
        ``(phy2log [L, R] relabelled, conflicts [L])``: same-node replica pairs left, and
        split pairs of the attracted experts (0 when the rule realises the even split
        exactly).
    """
    num_layers, num_slots = phy2log.shape
    slots = num_slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    device = phy2log.device
    if live is None:
        live = torch.ones(num_gpus, dtype=torch.bool, device=device)
    pos = live.nonzero()[:, 0]  # live GPU positions; bin k sits at pos[k] at the start
    num_live = len(pos)
    bins = phy2log.view(num_layers, num_gpus, slots)[:, pos]  # [L, B, S]
    conflict = node_conflicts(bins.reshape(num_layers, -1), num_live, num_experts, min_count,
                              attract)
    node_of_pos = pos // gpus_per_node  # [B]
    # rows = starts × layers: start 0 keeps the packing's order, the others are random
    first = torch.arange(num_live, device=device).expand(num_layers, -1)
    # float32 on the host whatever torch's default dtype: a thread or engine that set
    # torch.set_default_dtype (float64, bfloat16) would otherwise draw other numbers.
    # One draw per start, shared by every layer, before the greedy start below: a layer's
    # labels depend on its own packing only, not on the other layers in the call
    noise = torch.rand(max(starts - 1, 0), 1, num_live, generator=generator,
                       dtype=torch.float32, device="cpu").expand(-1, num_layers, -1)
    steps = 2 * num_gpus if max_steps is None else max_steps

    def descend(conflicts: torch.Tensor, starting: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # rows are independent: in chunks of at most _KL_CELLS conflict cells, so memory
        # stays bounded (a search step holds a few [rows, B, B] temporaries)
        chunk = max(1, _KL_CELLS // max(1, num_live * num_live))
        done = [_kl_swaps(conflicts[i : i + chunk], starting[i : i + chunk], node_of_pos,
                          num_nodes, steps) for i in range(0, len(starting), chunk)]
        return torch.cat([d[0] for d in done]), torch.cat([d[1] for d in done])

    # the greedy start first: a layer it leaves without same-node conflict is done (every
    # such labelling realises the same loads), and with many nodes that is nearly every
    # layer (58 DeepSeek-V3 layers on 256 GPUs: 0.2 s where the starts below took 19 s)
    where, left = descend(conflict, _greedy_labelling(conflict, node_of_pos, num_nodes))
    open_rows = (left > 0).nonzero()[:, 0]
    searched = max(starts, 1)
    if len(open_rows):
        # the rest search the packing's order and the random starts too; the fewest
        # conflicts left wins, ties to the packing's order, then the random starts, then
        # the greedy start
        begin = torch.cat([first[open_rows][None],
                           noise[:, open_rows.cpu()].argsort(2).to(device)])
        tried, tried_left = descend(conflict[open_rows].repeat(searched, 1, 1),
                                    begin.reshape(-1, num_live))
        tried = torch.cat([tried.view(searched, -1, num_live), where[open_rows][None]])
        tried_left = torch.cat([tried_left.view(searched, -1), left[open_rows][None]])
        best = tried_left.argmin(0)  # first on ties
        pick = torch.arange(len(open_rows), device=device)
        where[open_rows] = tried[best, pick]
        left[open_rows] = tried_left[best, pick]
    out = phy2log.clone().view(num_layers, num_gpus, slots)
    target = pos[where]  # [L, B] GPU each bin goes to
    out.scatter_(1, target[:, :, None].expand(-1, -1, slots), bins)
    return out.view(num_layers, num_slots), left


def _greedy_labelling(
    conflict: torch.Tensor, node_of_pos: torch.Tensor, num_nodes: int
) -> torch.Tensor:
    """``[rows, B]`` a position for every bin of ``conflict [rows, B, B]``, built bin by
    bin: the most conflicted bin first (ties: the lower bin), each to the node with
    room whose bins so far conflict least with it (ties: the lower node), on that
    node's lowest free position (``node_of_pos [B]`` ascending). Most rows come out
    with no same-node conflict, so the descent from here has little left to do: it
    costs ``B`` steps of ``[rows, B]``, where a descent from a packing's order takes a
    step of ``[rows, B, B]`` per swap."""
    rows, num_bins, _ = conflict.shape
    device = conflict.device
    row = torch.arange(rows, device=device)
    bins = torch.arange(num_bins, device=device)
    # the most constrained first: attracted bins (negative weights) by their pull
    order = conflict.abs().sum(2).argsort(dim=1, descending=True, stable=True)  # [rows, B]
    room = torch.bincount(node_of_pos, minlength=num_nodes)  # positions per node
    first = torch.cumsum(room, 0) - room  # each node's lowest position
    used = torch.zeros(rows, num_nodes, dtype=torch.int64, device=device)
    # [rows, B, N]: each bin's conflict with the bins placed on each node so far
    with_node = torch.zeros(rows, num_bins, num_nodes, dtype=conflict.dtype, device=device)
    where = torch.empty(rows, num_bins, dtype=torch.int64, device=device)
    for step in range(num_bins):
        bin_now = order[:, step]
        cost = with_node[row, bin_now].masked_fill(used >= room, float("inf"))
        node = cost.argmin(1)  # first on ties: the lower node
        where[row, bin_now] = first[node] + used[row, node]
        used[row, node] += 1
        with_node[row[:, None], bins, node[:, None]] += conflict[row, :, bin_now]
    return where


#: conflict cells (rows × B × B) one Kernighan-Lin search holds at once
_KL_CELLS = 1 << 24


def _kl_swaps(
    conflict: torch.Tensor, where: torch.Tensor, node_of_pos: torch.Tensor, num_nodes: int,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-swap descent on bin positions: ``conflict [rows, B, B]``, ``where [rows, B]``
    (position of every bin) → ``(where, same-node conflict left [rows])``."""
    rows, num_bins = where.shape
    where = where.clone()
    # the search runs on float32 copies where every sum it forms is an integer below 2**24
    # (exact in float32 as in float64, so the same swaps): the [n, B, B] passes that make
    # up most of a step then move half the bytes
    small = bool(conflict.numel()) and float(conflict.abs().sum((1, 2)).max()) < 2.0**22
    # with attraction (negative weights) an improving swap need not have a bin in
    # conflict on its own node, so every pair is searched
    attracted = bool((conflict < 0).any())
    work = conflict.to(torch.float32) if small else conflict
    eye = torch.eye(num_nodes, dtype=work.dtype, device=conflict.device)
    # the full search's gain as one batched product (below) where every number in it is
    # an integer of at most 256 or a power of two: exact even where a caller lets float32
    # products run in bfloat16 or TF32 (torch.set_float32_matmul_precision, the mkldnn
    # and CUDA flags). |M[a, k] − M[a, y_a]| is at most bin a's row of |A|
    product = small and float(conflict.abs().sum(2).amax()) <= _EXACT_PRODUCT
    # rows are independent and a row without an improving swap is done: each step searches
    # the rows still moving only (most converge within a few steps)
    active = torch.arange(rows, device=where.device)
    searched, twice = work, 2 * work  # the active rows' conflicts
    # [n, B, N] conflict of bin a with node n, kept up to date swap by swap: a fresh
    # product every step cost B²·N per row, most of a step with many nodes. The counts are
    # integers, so the updates give the sums' numbers exactly. Summed by scatter, not as
    # a product with the one-hot nodes: a float32 product may run in bfloat16 or TF32
    # (torch.set_float32_matmul_precision), which rounds counts above 256 or 2048
    nodes_of_bins = node_of_pos[where][:, None, :].expand(-1, num_bins, -1)  # [n, a, b]
    m = work.new_zeros((rows, num_bins, num_nodes)).scatter_add_(2, nodes_of_bins, searched)
    for _ in range(steps):
        y = node_of_pos[where[active]]  # [n, B] node of every bin
        own = m.gather(2, y[:, :, None])[..., 0]
        # a swap of two bins without conflict on their own nodes cannot improve (its gain
        # is at least A[a, b] + A[b, a] − 2A[a, b] = 0, as M[a, y_b] >= A[a, b]), so every
        # improving swap has a conflicted bin: where they are few (most of a long search
        # at hundreds of GPUs) only their rows of the gain are searched
        conflicted = own > 0
        width = int(conflicted.sum(1).max())
        if width == 0 and not attracted:
            break
        if 2 * width <= num_bins and not attracted:
            best, a, b = _best_conflicted_swap(m, own, y, twice, conflicted, width)
        elif product:
            best, a, b = _best_swap_by_product(m, own, y, twice, eye)
        else:
            # M[a, y_b] − M[a, y_a] + M[b, y_a] − M[b, y_b] − 2A[a, b]: counts, so exact in
            # any order. The [n, B, B] passes are most of a plan at 128 GPUs, so their
            # number is kept low: the own-node difference is taken on the [n, B, N] table
            # before the gather, and a same-node pair (no change) reads +inf there instead
            # of a masked 0 afterwards. Only a row whose best gain is negative swaps, and
            # there neither 0 nor +inf is the minimum, so it swaps the same first pair
            off = (m - own[:, :, None]).scatter_(2, y[:, :, None], float("inf"))
            half = off.gather(2, y[:, None, :].expand(-1, num_bins, -1))  # [n, a, b]
            # half + halfᵀ, not halfᵀ + half: the sum comes out contiguous, so the flat
            # view below is not one more copy
            best, a, b = _first_min(half.add(half.transpose(1, 2)).sub_(twice))
        todo = best < -1e-9
        if not bool(todo.any()):
            break
        moving = todo.nonzero()[:, 0]
        a, b = a[moving], b[moving]
        row = active[moving]
        wa, wb = where[row, a], where[row, b]
        where[row, a], where[row, b] = wb, wa
        # bin a moves from node y_a to y_b and bin b the other way: every bin's conflict
        # with node y_a loses A[·, a] and gains A[·, b], with node y_b the reverse
        change = searched[moving, :, b] - searched[moving, :, a]  # [k, B]
        bins = torch.arange(num_bins, device=m.device)
        m[moving[:, None], bins, y[moving, a][:, None]] += change
        m[moving[:, None], bins, y[moving, b][:, None]] -= change
        if len(moving) < len(active):
            active, searched, twice, m = row, searched[moving], twice[moving], m[moving]
    y = node_of_pos[where]
    same = (y[:, :, None] == y[:, None, :]).to(conflict.dtype)
    left = (conflict.clamp(min=0) * same).sum((1, 2))
    if attracted:  # attracted pairs left split over two nodes
        left += (conflict.clamp(max=0) * (same - 1)).sum((1, 2))
    return where, left / 2


#: largest row sum of |conflict| for which :func:`_best_swap_by_product` runs: bfloat16
#: holds the integers up to 256 exactly
_EXACT_PRODUCT = 256.0
#: a same-node pair's share of the product search's gain (a power of two: exact in
#: bfloat16), so such a pair scores 2·2**20 − 2A[a, b] > 0 and never swaps
_SAME_NODE = 2.0**20


def _best_swap_by_product(
    m: torch.Tensor, own: torch.Tensor, y: torch.Tensor, twice: torch.Tensor,
    eye: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_kl_swaps`' full search, ``(gain [n], a [n], b [n])``: the first minimum in
    row-major order of the ``[n, B, B]`` gain, the same pair as the gather search's where
    the gain is negative. ``m [n, B, N]``, ``own [n, B]``, ``y [n, B]``, ``twice [n, B, B]``
    as there, ``eye [N, N]``.

    ``off[a, k] = M[a, k] − M[a, y_a]`` and the one-hot ``Y[b, k] = [y_b = k]`` give the
    gain as ``[off | Y] · [Y | off]ᵀ − 2A``: ``off[a, y_b] + off[b, y_a] − 2A[a, b]``, one
    batched product for the gather, the transposed add (a strided read of ``[n, B, B]``)
    and the copy a gather search makes. Every product is a number times 0 or 1 and every
    sum one of integers below 2**24, so the gain of a pair on two nodes is the gather
    search's exactly; a same-node pair reads ``_SAME_NODE`` twice (+inf there), positive
    either way, and only a row whose best gain is negative swaps."""
    off = (m - own[:, :, None]).scatter_(2, y[:, :, None], _SAME_NODE)
    hot = eye[y]  # [n, B, N]
    gain = torch.bmm(torch.cat([off, hot], 2), torch.cat([hot, off], 2).transpose(1, 2))
    return _first_min(gain.sub_(twice))


def _first_min(gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(best [n], a [n], b [n])``: the minimum of each ``gain [n, B, B]`` and its first
    place in row-major order, as a min over the flattened rows gives it. Taken as each
    row's minimum (amin, one vectorised pass), the first row ``a`` holding the least, and
    the first ``b`` of that row equal to it: about 2.5x faster than the flat min, whose
    index tracking is not vectorised (the search's largest pass after the gain itself)."""
    rows = torch.arange(len(gain), device=gain.device)
    best, a = gain.amin(2).min(1)  # first on ties: the lowest a
    b = (gain[rows, a] == best[:, None]).to(torch.uint8).argmax(1)  # the lowest such b
    return best, a, b


def _best_conflicted_swap(
    m: torch.Tensor, own: torch.Tensor, y: torch.Tensor, twice: torch.Tensor,
    conflicted: torch.Tensor, width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_kl_swaps`' best swap per row, searched from the conflicted bins only:
    ``(gain [n], a [n], b [n])`` with ``a < b`` the same pair as the full ``[n, B, B]``
    search's first minimum in row-major order (the gain is symmetric, so that is the
    optimal pair with the smallest ``(lower bin, higher bin)``). Meaningful where the
    gain is negative: every such swap has a conflicted bin. ``m [n, B, N]`` conflict of
    every bin with every node, ``own [n, B]`` with its own, ``y [n, B]`` its node,
    ``twice [n, B, B]`` 2A, ``conflicted [n, B]`` (at most ``width`` per row)."""
    num_bins = y.shape[1]
    # each row's conflicted bins, ascending (padding: any bin, masked below)
    pick = conflicted.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
    valid = conflicted.gather(1, pick)  # [n, k]
    y_pick = y.gather(1, pick)
    m_pick = m.gather(1, pick[:, :, None].expand(-1, -1, m.shape[2]))  # [n, k, N]
    # M[a, y_b] − M[a, y_a] + M[b, y_a] − M[b, y_b] − 2A[a, b] for a picked: integer
    # counts, so the same numbers as the full search's
    there = m_pick.gather(2, y[:, None, :].expand(-1, width, -1)).sub_(
        own.gather(1, pick)[:, :, None])  # [n, k, B]
    back = m.gather(2, y_pick[:, None, :].expand(-1, num_bins, -1)).sub_(
        own[:, :, None]).transpose(1, 2)  # [n, k, B] M[b, y_a] − M[b, y_b]
    gain = back.add(there).sub_(twice.gather(1, pick[:, :, None].expand(-1, -1, num_bins)))
    gain.masked_fill_(y_pick[:, :, None] == y[:, None, :], 0.0)  # same node: no change
    gain.masked_fill_(~valid[:, :, None], float("inf"))
    best = gain.flatten(1).amin(1)
    bins = torch.arange(num_bins, device=y.device)
    low = torch.minimum(pick[:, :, None], bins)
    high = torch.maximum(pick[:, :, None], bins)
    key = torch.where(gain == best[:, None, None], low * num_bins + high, num_bins * num_bins)
    key = key.flatten(1).amin(1)
    return best, key // num_bins, key % num_bins
