"""``eplb plan``'s options for SGLang's nearest dispatch (``--dispatch``, ``--fair``,
``--slack``, ``--routing``), and its plan for an SGLang start-up file on one node, where
every rank draws its own fair choice (:mod:`eplb.core.rank_draws`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from eplb.cli._checks import existing_file
from eplb.cli._common import CliError, info, timed
from eplb.cli._inputs import warn
from eplb.core.dispatch import remote_nodes_per_token
from eplb.core.expert_ids import require_distinct_topk
from eplb.core.messages import integer_runs
from eplb.core.placement import Placement
from eplb.core.rank_draws import (
    plan_for_start_up_file,
    rank_draw_balancedness,
    split_draw_balancedness,
)
from eplb.formats import read_routing

#: what --dispatch nearest on one node means (plan and simulate warn with it; plan adds
#: what it planned)
ONE_NODE_NEAREST = (
    "--dispatch nearest with one node: every replica is on the token's node, so the rule is "
    "scored by the expectation of SGLang's random choice for the GPUs without a replica "
    "(from an --init-expert-location file SGLang realised 0.883-0.955 for eplb's even split "
    "where this reads 1.0, its runtime rebalancing 0.980-0.991: BENCHMARKS.md §14)")


def dispatch_options(args: argparse.Namespace, num_rows: int, num_experts: int,
                     rows: list[int] | None = None,
                     loaded: torch.Tensor | None = None) -> dict:
    """``plan()`` keywords for ``--dispatch``, ``--fair``, ``--slack`` and ``--routing``.
    ``num_rows``: the loads file's rows (the routing trace's layers are those, or those of
    the rows that carry load: :func:`pad_dense_rows`);
    ``num_experts``: the loads' experts (the trace's ids lie below);
    ``rows``: the ones planned, where some were left out; ``loaded``: ``[num_rows]`` bool,
    the rows that carry load."""
    if args.dispatch != "nearest":  # (nearest-only flags: _refuse_flag_mistakes)
        return {}
    options = {"dispatch": "nearest", "fair": args.fair}
    if args.slack is not None:  # the API refuses a slack outside the locality policy
        options["slack"] = args.slack
    routing = read_routing_flag(args)
    if routing is not None:
        note, read = None, routing
        if routing.shape[1] != num_rows and loaded is not None:
            routing, note = pad_dense_rows(routing, loaded, args.routing)
        if routing.shape[1] != num_rows:
            raise CliError(f"--routing {args.routing} has {routing.shape[1]} layers, the loads "
                           f"{num_rows}{loaded_rows_hint(loaded)}")
        if int(routing.max()) >= num_experts:
            raise CliError(f"--routing {args.routing} names expert {int(routing.max())}, beyond "
                           f"the loads' {num_experts} experts (for a routing trace as LOADS, "
                           "give the model's count with --num-experts E)")
        # on the trace as read: its message names a layer of the file, where the padded
        # trace's index was the loads' row (attacker pass: "layer 8" for the file's 5)
        distinct_rows(read, args)
        if note:  # once the trace is taken: a refusal stays one line (attacker pass)
            info(note)
        options["routing"] = routing if rows is None else routing[:, rows]
    return options


def loaded_rows_hint(loaded: torch.Tensor | None) -> str:
    """What a refusal of a routing trace's layer count adds where some of the loads' rows
    are all zero (``loaded [L]`` bool, the rows with load): how many carry load, and which,
    since a trace of those alone is taken too (attacker pass: a MoE row idle in the steps
    of --step-range left 57 of a dump's 61 rows with load, and a 58-layer trace of its MoE
    rows read only "has 58 layers, the loads 61"). "" where every row carries load."""
    if loaded is None or bool(loaded.all()):
        return ""
    rows = loaded.nonzero().flatten().tolist()
    return (f", of which {len(rows)} carry load (rows {integer_runs(rows) or 'none'}): a "
            "trace has a layer for each row, or for each row with load")


def pad_dense_rows(routing: torch.Tensor, loaded: torch.Tensor, name: str
                   ) -> tuple[torch.Tensor, str | None]:
    """``routing [T, n, k]`` laid over the loads' rows, where its ``n`` layers are as many
    as the rows that carry load (``loaded [L]`` bool, ``n < L``) and the other rows are all
    zero: an SGLang dump's dense layers, which a top-k trace of the MoE layers leaves out.
    The trace's layers go to the loaded rows in order, the all-zero rows get padding
    (``-1``: no token). Returns ``[T, L, k]`` and the note that says so, or ``routing``
    itself and ``None`` where the counts differ (the caller then says what does not fit).
    The caller prints the note once its checks of the trace pass: before a refusal it made
    the error two lines (attacker pass).

    New-user passes: a 58-layer trace beside a DeepSeek-V3 dump's 61 rows could only be
    used by writing the MoE rows out in Python first; with the padding every MoE row is
    planned and counted as it is from those rows alone, and the files keep a row per
    model layer."""
    num_rows = loaded.shape[0]
    rows = loaded.nonzero().flatten()
    if not 0 < len(rows) == routing.shape[1] < num_rows:
        return routing, None
    full = routing.new_full((routing.shape[0], num_rows, routing.shape[2]), -1)
    full[:, rows] = routing
    dense = (~loaded).nonzero().flatten().tolist()
    return full, (f"--routing {name}: its {len(rows)} layers are the loads' {len(rows)} rows "
                  f"that carry load (rows {integer_runs(rows.tolist())}), in order; the "
                  f"{len(dense)} all-zero row{'s' if len(dense) > 1 else ''} "
                  f"({integer_runs(dense)}, as an SGLang dump's dense layers) get no tokens")


def plan_nearest(args: argparse.Namespace, policy: str, emit: str, options: dict,
                 plan: Callable[..., Placement], weight: torch.Tensor
                 ) -> tuple[Placement, float | None, float]:
    """The plan ``plan(**options)`` makes, said where one node makes it special, the
    balancedness each rank's own draw gives it where it is planned for them, and the
    seconds the planning took. For an SGLang start-up file on one node under the global
    policy (``--fair`` left at auto, no ``--previous``): per layer the even split or
    ``fair="avoid"``, whichever every rank's own fair draw serves better (the API's
    ``"auto"`` cannot know a plan is for such a file, where the even split realised
    0.883-0.955: BENCHMARKS.md §14). Elsewhere the figures for the table and the warning
    are scored after the plan and not timed with it (they were: an even-split SGLang file
    on one node of 32 GPUs reported 0.53 s "planned in" for a 27 ms plan)."""
    one_node = options.get("dispatch") == "nearest" and args.nodes <= 1
    if one_node and emit == "sglang" and args.fair == "auto" and not args.previous and (
            policy == "global"):
        info("--dispatch nearest on one node, for an SGLang start-up file: per layer the even "
             "split or --fair avoid, as the ranks' own fair draws serve them (BENCHMARKS.md "
             "§14)")
        (placement, said, drawn), seconds = timed(lambda: plan_for_start_up_file(
            lambda fair: plan(**{**options, "fair": fair}), weight))
        info(said)
        return placement, drawn, seconds
    placement, seconds = timed(lambda: plan(**options))
    drawn = None
    if emit == "sglang" and args.nodes <= 1:
        # what SGLang's start-up file realises where every rank draws for itself (new-user
        # pass: the table's figure, the draws' expectation, was the only one given)
        drawn = rank_draw_balancedness(weight, placement.phy2log,
                                       placement.topology.num_gpus)
    this = "" if drawn is None else f"; this file: {drawn:.4f}, each rank drawing its own"
    if one_node and options.get("fair") != "avoid":
        gpus = placement.topology.num_gpus
        # every GPU live only, as plan's table gives it (review pass: with dead GPUs the
        # model counted their ranks' tokens, 0.86 in the warning beside 1.0 in the table)
        runtime = ("" if placement.active_gpus is not None else
                   f"; SGLang's runtime table (eplb's model): "
                   f"{split_draw_balancedness(weight, placement.phy2log, gpus):.4f}")
        if policy == "global" and (args.fair == "divide" or (
                args.fair == "auto" and not args.dead_gpus)):
            what = ("counts that divide the GPUs, which SGLang's runtime rebalancing table "
                    "splits exactly" if args.fair == "divide" else
                    "per layer the even split or counts that divide the GPUs, as SGLang's "
                    "runtime rebalancing table serves them")
            what = f"the plan is {what}" + (
                "; --previous plans from the map in force" if args.previous else "")
        else:
            why = ("; --fair expect asked for it" if args.fair == "expect" else
                   "; dead GPUs" if args.dead_gpus else f"; the {policy} policy")
            what = f"the plan is the even-split one{why}"
        warn(f"{ONE_NODE_NEAREST}; {what}{runtime}{this} (an SGLang file from eplb plan "
             "--emit sglang, fresh and global, is planned per layer for the ranks' own "
             "draws" + (", unless --fair divide or expect is given" if args.fair != "auto"
                        else "") + ")")
    # (a plan for an even split, SGLang's dynamic dispatch, gets the figure in plan's
    # table only: a warning on every such file would be noise without DeepEP)
    return placement, drawn, seconds


def read_routing_flag(args: argparse.Namespace) -> torch.Tensor | None:
    if args.routing is None:  # (a stray --routing-key: _refuse_flag_mistakes)
        return None
    key = None if args.routing_key is None else args.routing_key.split(",")
    try:
        routing = read_routing(existing_file(args.routing, "routing trace"), key=key)
    except ValueError as exc:  # the readers name the loads' --key; here it is --routing-key
        raise CliError(str(exc).replace("--key", "--routing-key")) from None
    if routing.numel() == 0:
        raise CliError(f"--routing {args.routing} holds no tokens (shape "
                       f"{tuple(routing.shape)}; a routing trace is [tokens, layers, k])")
    if int(routing.max()) < 0:  # (ids below 0 are padding: SGLang pads a batch with -1)
        raise CliError(f"--routing {args.routing} names no expert: every id is padding (< 0)")
    return routing


def distinct_rows(routing: torch.Tensor, args: argparse.Namespace) -> None:
    """:func:`require_distinct_topk` naming the file (after its shape is checked)."""
    try:
        require_distinct_topk(routing, f"--routing {args.routing}")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def remote_nodes(options: dict, placement: Placement | None,
                 num_nodes: int | None = None) -> float | None:
    """Remote nodes per token (the mean over layers) of ``placement`` on the ``--routing``
    trace that ``options`` (:func:`dispatch_options`) hold, as ``eval --routing`` counts
    them: the traffic side of the locality policy's trade, which the plan's summary shows
    beside its balance (new-user pass: ``plan --policy locality --routing`` showed only the
    balance). ``num_nodes``: the cluster's (the plan's), where ``placement`` is a map in
    force recorded for another node count (plan warns, and takes its map as the slots hold
    it: its balance is scored on the plan's nodes, and so is its traffic). ``None`` without
    a routing trace or a placement."""
    routing = options.get("routing")
    if routing is None or placement is None:
        return None
    topo = placement.topology
    nodes = topo.num_nodes if num_nodes is None else num_nodes
    return routed_layers_mean(remote_nodes_per_token(placement.phy2log, routing,
                                                     placement.num_experts, topo.num_gpus,
                                                     nodes, active_gpus=placement.active_gpus),
                              routing)


def routed_layers_mean(remote: torch.Tensor, routing: torch.Tensor) -> float:
    """The mean of the per-layer remote nodes per token ``remote [L]`` over the layers in
    which the trace ``routing [T, L, k]`` holds a token (an id not padding, ``>= 0``).

    A layer whose every row is padding has no token to count: its figure (0) says nothing
    of its traffic, and averaged in it lowered the figure (eval --routing read 1.237 on a
    trace with one of 4 layers padded where its 3 layers read 1.650; attacker pass)."""
    routed = (routing >= 0).any(2).any(0)  # [L]; some layer holds one: read_routing_flag
    return float(remote[routed.to(remote.device)].mean())
