"""Relabel a fresh plan's GPUs so that it keeps as many of the old placement's slots as
it can: GPUs are interchangeable to the planner, not to the weights already on them."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from eplb.online.moves import id_type, twice_on_a_gpu

# nodes are matched by trying every permutation up to this many nodes (6! = 720)
_MAX_PERMUTED_NODES = 6


def match_blocks(overlap: np.ndarray) -> np.ndarray:
    """``[B, n]``: for every row of ``overlap [B, n, n]`` the old index matched to each
    new index, maximising the total overlap."""
    _, n, _ = overlap.shape
    if n <= _MAX_PERMUTED_NODES:
        perms = np.array(list(itertools.permutations(range(n))))  # [n!, n]
        totals = overlap[:, np.arange(n)[None], perms].sum(2)  # [B, n!]
        return perms[np.argmax(totals, 1)]
    # where every new index's best old index is a different one, that choice is optimal
    # (it reaches the upper bound Σ_i max_j overlap): the assignment problem is solved
    # only for the other rows (few: a fresh plan mostly keeps GPUs whole)
    out = np.argmax(overlap, 2)
    clash = np.nonzero((np.sort(out, 1) != np.arange(n)).any(1))[0]
    for b in clash:
        new_idx, old_idx = linear_sum_assignment(overlap[b], maximize=True)
        out[b, new_idx] = old_idx
    return out


def _overlap(
    new: np.ndarray, old: np.ndarray, num_experts: int, small: bool | None = None
) -> np.ndarray:
    """``[B, n, n]`` replicas in common between blocks ``new [B, n, k]`` and ``old [B, n, k]``
    (blocks: GPUs or nodes; -1 entries hold nothing). ``small``: whether the blocks are
    counted as multisets by two dense tables (an expert twice on both blocks counts twice),
    else as sets; by default where the tables are small (``B·n²·E`` at most 2**20). A
    caller that splits one problem into parts passes the whole problem's choice."""
    rows, n, _ = new.shape
    if small is None:
        small = n * n * num_experts * rows <= 1 << 20

    def table(blocks: np.ndarray) -> np.ndarray:
        ids = np.where(blocks >= 0, blocks, num_experts)
        flat = (np.arange(rows * n).reshape(rows, n, 1) * (num_experts + 1) + ids).ravel()
        counts = np.bincount(flat, minlength=rows * n * (num_experts + 1))
        return counts.reshape(rows, n, num_experts + 1)[..., :num_experts].astype(np.float32)

    if small:
        a, b = table(new), table(old)
        return np.minimum(a[:, :, None], b[:, None]).sum(3)

    pairs = _common_pairs(new, old, num_experts)
    if pairs is not None:
        return pairs

    def present(blocks: np.ndarray) -> np.ndarray:
        """``[B, n, E]`` 1.0 where the block holds the expert (set, not count)."""
        out = np.zeros((rows, n, num_experts + 1), np.float32)
        row, block, _ = np.indices(blocks.shape, sparse=True)
        out[row, block, np.where(blocks >= 0, blocks, num_experts)] = 1.0
        return out[..., :num_experts]

    # many experts in common per pair of blocks: as sets, one batched product
    return np.matmul(present(new), present(old).transpose(0, 2, 1))


def _common_pairs(new: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray | None:
    """:func:`_overlap` of blocks ``new, old [B, n, k]`` as sets (the experts two blocks
    have in common, each once), by joining the blocks that hold each expert: one count
    per (new block, old block, expert) met. ``None`` where the pairs would take more memory
    than the product's two float32 tables, about five int64 arrays of them against
    ``2·B·n·(E + 1)`` entries of 4 bytes (experts on many blocks in both: 8 experts on
    1024 GPUs, or 256 spread evenly over 1024 GPUs of 8 slots, where the join took 2.5
    times the memory; second attacker pass): the caller's batched product then.

    The same integers as the product of the ``[B, n, E]`` 0/1 tables, without them: at
    58 layers × 32 GPUs × 256 experts those are 1.9 MB each, freshly allocated per call,
    and the product over them cost about 2 ms where this costs 0.8 (vLLM's first call
    aligns every layer)."""
    rows, n, k = new.shape

    def entries(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, expert) key a block holds, each once per block, and its block."""
        ids = blocks.reshape(rows * n, k)
        if int(ids.min(initial=0)) >= 0 and not twice_on_a_gpu(ids, 1):  # one block a row
            # every slot filled, no expert twice on a block (a plan's blocks mostly): every
            # entry is a key, in any order (the pairs are counted, not listed)
            block = np.repeat(np.arange(rows * n), k)
            return (block // n) * num_experts + ids.reshape(-1), block
        ids = np.sort(ids, 1)
        keep = ids >= 0
        keep[:, 1:] &= ids[:, 1:] != ids[:, :-1]  # an expert twice on a block: once
        block = np.nonzero(keep)[0]
        return (block // n) * num_experts + ids[keep], block

    key_new, block_new = entries(new)
    key_old, block_old = entries(old)
    keys = rows * num_experts
    held = np.bincount(key_old, minlength=keys)  # old blocks holding each (row, expert)
    first = np.cumsum(held) - held
    # the old entries grouped by key (a stable radix sort where keys fit 16 bits)
    order = np.argsort(key_old.astype(np.uint16) if keys <= 1 << 16 else key_old,
                       kind="stable")
    met = held[key_new]  # old blocks each new entry meets
    total = int(met.sum())
    if 5 * total > rows * n * (num_experts + 1):
        return None
    # pair p of new entry e reads the old entry at first[key] + (p − e's first pair)
    at = np.arange(total) + np.repeat(first[key_new] - (np.cumsum(met) - met), met)
    bins = np.repeat(block_new * n, met) + (block_old % n)[order][at]
    cells = rows * n * n
    if cells <= 1 << 22:
        return np.bincount(bins, minlength=cells).reshape(rows, n, n).astype(np.float32)
    # many cells, few of them met: no int64 count of every cell (3× the float32 result)
    met_cells, counts = np.unique(bins, return_counts=True)
    out = np.zeros(cells, np.float32)
    out[met_cells] = counts
    return out.reshape(rows, n, n)


def _align_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Reorder each row of ``new [B, S]`` so an expert also in the same row of
    ``old [B, S]`` sits in its old slot; the other experts fill the free slots in order."""
    slots = new.shape[1]
    # compares in int16 where ids fit (several times faster than int64), laid out so
    # that every reduction runs over a leading axis (element-wise in NumPy; over the
    # short last axis it runs row by row, 3-4× slower at S = 9)
    largest = max(int(new.max(initial=0)), int(old.max(initial=0)))
    narrow = id_type(max(largest, slots))
    new_narrow = new.astype(narrow)
    # an empty new slot (-1) matches nothing: -2 is in no old slot
    probe = np.where(new_narrow < 0, narrow(-2), new_narrow)
    same = np.ascontiguousarray(old.T, narrow)[:, :, None] == probe[None]  # [S_old, B, S_new]
    position = np.arange(slots, dtype=narrow)[:, None, None]
    target = np.where(same, position, narrow(slots)).min(0)  # [B, S_new] first old slot
    matched = target < slots
    # items of one expert target the same old slot: the first of them keeps it. A row
    # holds an expert twice only where replicas stack; the later ones of each expert are
    # those after the first of their run in a stable sort (one sort per row: a loop over
    # the slots of a table of slot pairs took S³, 59 s at 4,096 slots per GPU: attacker
    # pass)
    order = np.argsort(new_narrow, axis=1, kind="stable")
    ranked = np.take_along_axis(new_narrow, order, 1)
    repeat = np.zeros(new.shape, bool)
    repeat[:, 1:] = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
    if repeat.any():
        later = np.zeros(new.shape, bool)
        np.put_along_axis(later, order, repeat, 1)
        matched &= ~later
    # flat indices (one axis) throughout: cheaper than NumPy's two-axis fancy indexing
    out = np.full_like(new, -2)
    flat_out, flat_new = out.reshape(-1), new.reshape(-1)
    at = np.flatnonzero(matched)
    home = at - at % slots + target.reshape(-1)[at]
    flat_out[home] = flat_new[at]
    taken = np.zeros(new.size, bool)
    taken[home] = True
    # unmatched items, in their order, into the free slots, in order: a row has as many
    # of each, so the k-th of all rows' (row-major) goes to the k-th
    flat_out[np.flatnonzero(~taken)] = flat_new[np.flatnonzero(~matched)]
    return out


#: the most overlap-table cells (rows × n² for blocks of n GPUs) the relabelling holds at
#: once: larger problems are matched in parts of layers (64 MiB of float32 per table)
_MAX_TABLE_CELLS = 1 << 24
#: the most matching work (layers × n³ for the largest block of n GPUs or nodes) and the
#: largest block an incremental plan may relabel: one layer's assignment problem on 4,096
#: GPUs took 0.74 s here (58 such layers: 43 s), one on 8,192 about 3 s and 1.6 GB, and
#: 58 layers on 2,120 GPUs 6.5 s; 2**41 is 58 layers on 3,300 GPUs (about 25 s)
MAX_MATCHING_WORK = 1 << 41
MAX_MATCHED_BLOCK = 8192


def relabel_size_problem(num_layers: int, block: int, plans: int = 1) -> str | None:
    """Why relabelling ``plans`` fresh plans of ``num_layers`` layers each, whose largest
    matched block (GPUs, or nodes) has ``block`` members, is beyond what eplb does, or
    ``None``."""
    work = plans * num_layers * block**3
    if block <= MAX_MATCHED_BLOCK and work <= MAX_MATCHING_WORK:
        return None
    what = "a fresh plan's GPUs" if plans == 1 else f"{plans} fresh plans' GPUs"
    count = "" if plans == 1 else "plans x "
    return (f"planning from the placement in force relabels {what} onto the old ones, an "
            f"assignment problem per layer: {num_layers} layer(s) on {block} GPUs is "
            f"beyond what eplb does (at most {MAX_MATCHED_BLOCK:,} GPUs and {count}layers "
            f"x GPUs^3 = {work:,} at most {MAX_MATCHING_WORK:,}; one layer on 4,096 GPUs "
            f"takes about 0.7 s)")


def align_to_previous(
    new: torch.Tensor, old: torch.Tensor, num_gpus: int, gpus_per_node: int | None = None
) -> torch.Tensor:
    """Relabel the GPUs of ``new [L, R]`` to match ``old [L, R]`` as well as possible.

    GPUs are matched by an assignment problem maximising common replicas, then each GPU's
    slots are ordered so that an expert kept on a GPU stays in the slot it had. With
    ``gpus_per_node`` whole nodes are matched first and GPUs only inside matched nodes,
    so a hierarchical plan stays hierarchical. Returns the relabelled ``[L, R]``.

    Every layer is matched on its own, so the layers go in parts whose overlap tables
    hold at most :data:`_MAX_TABLE_CELLS` cells (the same result, bounded memory).
    """
    layers, num_slots = new.shape
    slots = num_slots // num_gpus
    per_node = num_gpus if gpus_per_node is None else gpus_per_node
    nodes = num_gpus // per_node
    a = new.cpu().numpy().reshape(layers, nodes, per_node * slots)
    b = old.cpu().numpy().reshape(layers, nodes, per_node * slots)
    num_experts = int(max(a.max(), b.max())) + 1 if layers else 0
    # the overlaps' kind as the whole problem decides it (see _overlap)
    small = (nodes * nodes * num_experts * layers <= 1 << 20,
             per_node * per_node * num_experts * layers * nodes <= 1 << 20)
    per_layer = nodes * nodes + nodes * per_node * per_node
    part = max(1, _MAX_TABLE_CELLS // per_layer)
    out = np.concatenate([
        _align_part(a[k:k + part], b[k:k + part], num_experts, slots, small)
        for k in range(0, layers, part)]) if layers else a
    return torch.from_numpy(out.reshape(layers, num_slots)).to(new.device)


def _align_part(
    a: np.ndarray, b: np.ndarray, num_experts: int, slots: int, small: tuple[bool, bool]
) -> np.ndarray:
    """:func:`align_to_previous` of layers ``a`` (new) onto ``b`` (old), both
    ``[L, N, g·S]`` (``N`` nodes of ``g`` GPUs of ``slots``): ``[L, N, g·S]``."""
    layers, nodes, width = a.shape
    per_node = width // slots
    if nodes > 1:
        # [L, N] old node of new node n
        node_of = match_blocks(_overlap(a, b, num_experts, small[0]))
        placed = np.empty_like(a)
        placed[np.arange(layers)[:, None], node_of] = a
        a = placed
    # GPUs inside each (layer, node) row
    a = a.reshape(layers * nodes, per_node, slots)
    b = b.reshape(layers * nodes, per_node, slots)
    gpu_of = match_blocks(_overlap(a, b, num_experts, small[1]))  # [L·N, g]
    placed = np.empty_like(a)
    placed[np.arange(layers * nodes)[:, None], gpu_of] = a
    aligned = _align_slots(placed.reshape(-1, slots), b.reshape(-1, slots))
    return aligned.reshape(layers, nodes, width)
