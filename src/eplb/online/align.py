"""Relabel a fresh plan's GPUs so that it keeps as many of the old placement's slots as
it can: GPUs are interchangeable to the planner, not to the weights already on them."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

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


def _overlap(new: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray:
    """``[B, n, n]`` replicas in common between blocks ``new [B, n, k]`` and ``old [B, n, k]``
    (blocks: GPUs or nodes; -1 entries hold nothing)."""
    rows, n, _ = new.shape

    def table(blocks: np.ndarray) -> np.ndarray:
        ids = np.where(blocks >= 0, blocks, num_experts)
        flat = (np.arange(rows * n).reshape(rows, n, 1) * (num_experts + 1) + ids).ravel()
        counts = np.bincount(flat, minlength=rows * n * (num_experts + 1))
        return counts.reshape(rows, n, num_experts + 1)[..., :num_experts].astype(np.float32)

    if n * n * num_experts * rows <= 1 << 20:
        a, b = table(new), table(old)
        return np.minimum(a[:, :, None], b[:, None]).sum(3)

    def present(blocks: np.ndarray) -> np.ndarray:
        """``[B, n, E]`` 1.0 where the block holds the expert (set, not count)."""
        out = np.zeros((rows, n, num_experts + 1), np.float32)
        row, block, _ = np.indices(blocks.shape, sparse=True)
        out[row, block, np.where(blocks >= 0, blocks, num_experts)] = 1.0
        return out[..., :num_experts]

    # large tables: experts in common as sets, one batched product
    return np.matmul(present(new), present(old).transpose(0, 2, 1))


def _align_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Reorder each row of ``new [B, S]`` so an expert also in the same row of
    ``old [B, S]`` sits in its old slot; the other experts fill the free slots in order."""
    rows, slots = new.shape
    # an empty new slot (-1) matches nothing: -2 is in no old slot
    eq = np.where(new < 0, -2, new)[:, :, None] == old[:, None, :]  # [B, S_new, S_old]
    # one partner each: the first old slot for every new item, then the first new item
    # for every old slot (duplicates of one expert keep only one match). [B, S, S]
    # passes are the cost here, so each flag is read back by index, not reduced again
    column = np.arange(slots)
    target = np.argmax(eq, 2)  # [B, S_new] first old slot of each new item
    has = np.take_along_axis(eq, target[:, :, None], 2)[:, :, 0]  # [B, S_new]
    claims = np.where(has, target, slots)[:, :, None] == column  # [B, S_new, S_old]
    source = np.argmax(claims, 1)  # [B, S_old] first new item claiming the old slot
    taken = np.take_along_axis(claims, source[:, None, :], 1)[:, 0, :]  # [B, S_old]
    matched = has & (np.take_along_axis(source, target, 1) == column)
    out = np.full_like(new, -2)
    r, i = np.nonzero(matched)
    out[r, target[r, i]] = new[r, i]
    # unmatched items, in their order, into the free slots, in order
    free_rank = np.cumsum(~taken, 1) - 1  # rank of each free slot
    item_rank = np.cumsum(~matched, 1) - 1
    free_slot = np.full((rows, slots), -1)
    fr, fj = np.nonzero(~taken)
    free_slot[fr, free_rank[fr, fj]] = fj
    ur, ui = np.nonzero(~matched)
    out[ur, free_slot[ur, item_rank[ur, ui]]] = new[ur, ui]
    return out


def align_to_previous(
    new: torch.Tensor, old: torch.Tensor, num_gpus: int, gpus_per_node: int | None = None
) -> torch.Tensor:
    """Relabel the GPUs of ``new [L, R]`` to match ``old [L, R]`` as well as possible.

    GPUs are matched by an assignment problem maximising common replicas, then each GPU's
    slots are ordered so that an expert kept on a GPU stays in the slot it had. With
    ``gpus_per_node`` whole nodes are matched first and GPUs only inside matched nodes,
    so a hierarchical plan stays hierarchical. Returns the relabelled ``[L, R]``.
    """
    layers, num_slots = new.shape
    slots = num_slots // num_gpus
    per_node = num_gpus if gpus_per_node is None else gpus_per_node
    nodes = num_gpus // per_node
    a = new.cpu().numpy().reshape(layers, nodes, per_node * slots)
    b = old.cpu().numpy().reshape(layers, nodes, per_node * slots)
    num_experts = int(max(a.max(), b.max())) + 1
    if nodes > 1:
        node_of = match_blocks(_overlap(a, b, num_experts))  # [L, N] old node of new node n
        placed = np.empty_like(a)
        placed[np.arange(layers)[:, None], node_of] = a
        a = placed
    # GPUs inside each (layer, node) row
    a = a.reshape(layers * nodes, per_node, slots)
    b = b.reshape(layers * nodes, per_node, slots)
    gpu_of = match_blocks(_overlap(a, b, num_experts))  # [L·N, g]
    placed = np.empty_like(a)
    placed[np.arange(layers * nodes)[:, None], gpu_of] = a
    aligned = _align_slots(placed.reshape(-1, slots), b.reshape(-1, slots))
    return torch.from_numpy(aligned.reshape(layers, num_slots)).to(new.device)
