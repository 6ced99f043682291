"""The modelled cross-node traffic of a replay (``eplb.tools.scoring.modelled_remote_nodes``,
``simulate``'s ``remote_nodes``): the locality policy's surrogate, layers a few at a time,
scale-free, and refusals by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run

import eplb
from eplb.core.dispatch import remote_nodes_by_node
from eplb.core.locality import surrogate_co_selection
from eplb.tools import scoring
from eplb.tools.scoring import modelled_remote_nodes


def _maps(layers: int, slots: int, experts: int, seed: int) -> torch.Tensor:
    """``[L, R]`` random fully placed maps: every expert once, the rest at random."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(slots, generator=g) % experts for _ in range(layers)])


@pytest.mark.parametrize(("experts", "slots", "nodes", "groups"),
                         [(16, 32, 2, 4), (16, 32, 4, 1), (64, 96, 8, 8), (12, 24, 2, 3)])
def test_the_model_is_the_locality_policys_a_few_layers_at_a_time(
        monkeypatch, experts: int, slots: int, nodes: int, groups: int) -> None:
    """The locality policy's surrogate (what it plans with), whether the layers go at once
    or one by one, on skewed loads, an idle layer and one expert taking every token; its
    figures lie in [0, N − 1]."""
    g = torch.Generator().manual_seed(experts + nodes)
    weight = torch.rand(4, experts, generator=g, dtype=torch.float64) ** 4 * 100
    weight[1] = 0  # an idle layer (modelled as uniform)
    weight[2] = 0
    weight[2, 3] = 7  # one expert takes every token
    phy2log = _maps(4, slots, experts, seed=nodes)
    expected = remote_nodes_by_node(phy2log, *surrogate_co_selection(weight, groups), nodes)
    whole = modelled_remote_nodes(phy2log, weight, nodes, groups)
    monkeypatch.setattr(scoring, "MAX_TRAFFIC_CELLS", 1)  # one layer at a time
    one_by_one = modelled_remote_nodes(phy2log, weight, nodes, groups)
    assert torch.allclose(whole, expected, rtol=1e-12, atol=1e-12), (whole, expected)
    assert torch.equal(whole, one_by_one)
    assert bool(((whole >= 0) & (whole <= nodes - 1)).all())


def test_many_nodes_hold_a_bounded_model_at_once(monkeypatch) -> None:
    """64 nodes, 256 experts on 512 slots: the model's hit tensors hold L·N²·E floats (2 GB
    each at 58 layers on 128 nodes, out of memory under 8 GB: attacker pass), so layers go
    a few at a time, under MAX_TRAFFIC_CELLS entries each."""
    experts, nodes = 256, 64
    seen = []
    inner = scoring.remote_nodes_by_node

    def spy(phy2log, *args):
        seen.append(phy2log.shape[0])
        return inner(phy2log, *args)

    monkeypatch.setattr(scoring, "remote_nodes_by_node", spy)
    weight = torch.rand(6, experts, generator=torch.Generator().manual_seed(0)) + 0.1
    remote = modelled_remote_nodes(_maps(6, 8 * nodes, experts, seed=0), weight, nodes, 8)
    assert max(seen) * nodes * nodes * experts <= scoring.MAX_TRAFFIC_CELLS and sum(seen) == 6
    assert remote.shape == (6,) and bool(((remote >= 0) & (remote <= nodes - 1)).all())
    # tokens pick 8 experts of 4 groups, each mostly on another node: nearly 8 remote nodes
    assert 6 < float(remote.mean()) <= 8


def test_groups_that_do_not_divide_the_experts_are_modelled_without_groups(
        capsys, tmp_path) -> None:
    """The global policy plans around --groups 3 on 256 experts (it ignores groups), and
    the replay's traffic model stopped there with an internal error (a view of 256
    experts as 3 groups); no routing has such groups: modelled as routing without them.
    The API's model refuses them by name."""
    from eplb.tools.generator import generate_trace

    trace = tmp_path / "trace.npy"
    counts = generate_trace("deepseek-v3", 20, seed=0, num_layers=2).counts
    np.save(trace, counts.numpy())
    cluster = ("-r", 288, "-g", 32, "--nodes", 4, "--window", 10, "--dispatch", "nearest",
               "--policy", "global", "--json")
    code, out, err = run(capsys, "simulate", trace, *cluster, "--groups", 3)
    assert code == 0, err
    three = json.loads(out)["runs"][0]["windows"]["remote_nodes"]
    code, out, err = run(capsys, "simulate", trace, *cluster, "--groups", 1)
    assert code == 0, err
    assert three == json.loads(out)["runs"][0]["windows"]["remote_nodes"]
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide the 256 experts"):
        modelled_remote_nodes(torch.zeros(2, 288, dtype=torch.int64), counts[0], 4, 3)


@pytest.mark.parametrize("peak", [1e306, 1e-318])
def test_the_traffic_is_scale_free(peak: float) -> None:
    """Counts of up to 1e306 summed to inf in the model, and every window, the summary and
    its JSON read NaN (json.dumps(allow_nan=False) refused it); tiny ones fell under the
    frequencies' floor and read 0 remote nodes. The figures are those of the counts
    themselves."""
    from eplb.tools.generator import generate_trace
    from eplb.tools.simulate import simulate

    counts = generate_trace("deepseek-v3", 20, seed=0, num_layers=2).counts.double()
    cluster = {"num_replicas": 288, "num_gpus": 32, "num_nodes": 4, "num_groups": 8,
               "window": 10, "interval": 10, "score_dispatch": "nearest", "oracle": False}
    plain = simulate(counts, "none", **cluster)
    scaled = simulate(counts * (peak / float(counts.max())), "none", **cluster)
    assert torch.allclose(scaled.remote_nodes, plain.remote_nodes, rtol=1e-9, atol=0)
    assert scaled.summary()["remote_nodes_per_token"] == pytest.approx(
        plain.summary()["remote_nodes_per_token"], rel=1e-9)
    json.dumps(scaled.to_dict(), allow_nan=False)


def _topk_ids(tokens: int, layers: int, experts: int, k: int, seed: int) -> torch.Tensor:
    """``[tokens, L, k]`` distinct top-k ids per token, skewed toward low ids."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.arange(experts, 0, -1, dtype=torch.float64) ** 2
    return torch.stack([torch.stack([torch.multinomial(weight, k, generator=g)
                                     for _ in range(layers)]) for _ in range(tokens)])


def test_a_replay_given_the_traces_own_ids_counts_its_traffic() -> None:
    """simulate(routing=): every window's remote nodes counted from its tokens, as
    eval --routing counts them (remote_nodes_per_token), not modelled."""
    from eplb.core.dispatch import remote_nodes_per_token
    from eplb.core.topology import Topology
    from eplb.online import trivial_placement
    from eplb.tools.simulate import Cadence, simulate

    layers, experts, steps, per = 2, 16, 8, 12
    ids = _topk_ids(steps * per, layers, experts, 3, seed=1)
    routing = list(ids.split(per))
    counts = torch.stack([torch.zeros(layers * experts).index_add_(
        0, (step + torch.arange(layers)[None, :, None] * experts).reshape(-1),
        torch.ones(step.numel())).view(layers, experts) for step in routing]).double()
    # every expert once (the trivial map of 32 slots held all of them on both nodes)
    cluster = {"num_replicas": 16, "num_gpus": 8, "num_nodes": 2, "num_groups": 4,
               "cadence": Cadence(2, 2), "oracle": False, "score_dispatch": "nearest"}
    res = simulate(counts, "none", routing=routing, **cluster)
    trivial = trivial_placement(experts, layers, Topology(16, 8, 2, 4))
    want = remote_nodes_per_token(trivial.phy2log, torch.cat(routing[2:4]), experts, 8, 2)
    assert res.remote_counted and res.summary()["remote_nodes_counted"]
    assert res.remote_nodes[1].item() == pytest.approx(float(want.mean()))
    modelled = simulate(counts, "none", **cluster)
    assert not modelled.remote_counted
    assert not torch.allclose(modelled.remote_nodes, res.remote_nodes)
    with pytest.raises(ValueError, match="nearest dispatch on several nodes only"):
        simulate(counts, "none", routing=routing, **{**cluster, "score_dispatch": "even"})
    with pytest.raises(ValueError, match="routing has 7 steps, the trace 8"):
        simulate(counts, "none", routing=routing[1:], **cluster)
    with pytest.raises(ValueError, match="routing step 0: its ids do not count"):
        simulate(counts, "none", routing=[routing[1], *routing[1:]], **cluster)


def test_a_replays_routing_is_checked_before_planning() -> None:
    """simulate(routing=) refuses ids that are not plain integer top-k ids, by step, as
    remote_nodes_per_token would: complex ids were cast with torch's warning, a sparse,
    meta or None step met torch's internal errors, a str or dict read as steps, and a
    top-k row naming an expert twice (the counts tallied from it) stopped mid-replay."""
    from eplb.tools.simulate import Cadence, simulate

    layers, experts, per = 2, 16, 12
    routing = list(_topk_ids(8 * per, layers, experts, 3, seed=1).split(per))

    def counted(steps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.zeros(layers * experts).index_add_(
            0, (step + torch.arange(layers)[None, :, None] * experts).reshape(-1),
            torch.ones(step.numel())).view(layers, experts) for step in steps]).double()

    counts = counted(routing)
    cluster = {"num_replicas": 16, "num_gpus": 8, "num_nodes": 2, "cadence": Cadence(2, 2),
               "oracle": False, "score_dispatch": "nearest"}
    bad_steps = {
        "complex64": [routing[0].to(torch.complex64), *routing[1:]],
        "sparse": [routing[0].to_sparse(), *routing[1:]],
        "meta tensor": [routing[0].to("meta"), *routing[1:]],
        "NoneType": [None, *routing[1:]],
    }
    for words, steps in bad_steps.items():
        with pytest.raises(TypeError, match=f"routing step 0.*{words}"):
            simulate(counts, "none", routing=steps, **cluster)
    for value in ("abcdefgh", dict(enumerate(routing))):
        with pytest.raises(TypeError, match="routing must be a sequence"):
            simulate(counts, "none", routing=value, **cluster)
    twice = [step.clone() for step in routing]
    twice[3][0, 1, 1] = twice[3][0, 1, 0]
    with pytest.raises(ValueError, match="routing step 3: token 0 names an expert twice"):
        simulate(counted(twice), "none", routing=twice, **cluster)
    # numpy arrays and lists of lists are ids as tensors are
    as_numpy = simulate(counts, "none", routing=[s.numpy() for s in routing], **cluster)
    as_lists = simulate(counts, "none", routing=[s.tolist() for s in routing], **cluster)
    assert as_numpy.remote_counted and torch.equal(as_numpy.remote_nodes, as_lists.remote_nodes)


def test_simulate_counts_a_topk_files_traffic(capsys, tmp_path) -> None:
    """eplb simulate on a top-k file under --dispatch nearest on several nodes counts the
    remote nodes per token from the file's own tokens (the model assumed DeepSeek-V3's
    routing whatever the file's), with --step-range too."""
    ids = _topk_ids(96, 2, 16, 2, seed=2)
    path = tmp_path / "t.npz"
    np.savez(path, topk_ids=ids.numpy())
    args = ("simulate", path, "--tokens-per-step", 8, "--window", 2, "-r", 16, "-g", 8,
            "--nodes", 2, "--groups", 4, "--dispatch", "nearest", "--json")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    summary = json.loads(out)["runs"][0]["summary"]
    assert summary["remote_nodes_counted"] is True
    code, out, err = run(capsys, *args, "--step-range", "2:10")
    assert code == 0, err
    assert json.loads(out)["runs"][0]["summary"]["remote_nodes_counted"] is True
    code, out, err = run(capsys, *args[:-1])
    assert code == 0 and "counted from the trace's\n  own tokens" in out, out


def test_padded_tokens_count_as_no_tokens() -> None:
    """Rows of -1 (SGLang's padded tokens) anywhere in a trace change neither the remote
    nodes per token, with or without source GPUs, nor the pair counts; a layer whose
    tokens are padded there averages over its own tokens."""
    from eplb.core.dispatch import coactivation, remote_nodes_per_token

    ids = _topk_ids(40, 3, 16, 2, seed=5)
    phy2log = _maps(3, 32, 16, seed=5)
    where = torch.randperm(55, generator=torch.Generator().manual_seed(5))
    padded = torch.cat([ids, torch.full((15, 3, 2), -1)])[where]
    sources = torch.arange(55)[where] % 8
    assert torch.equal(coactivation(padded, 16), coactivation(ids, 16))
    assert torch.allclose(remote_nodes_per_token(phy2log, padded, 16, 8, 2),
                          remote_nodes_per_token(phy2log, ids, 16, 8, 2), rtol=1e-12)
    real = where < 40
    assert torch.allclose(
        remote_nodes_per_token(phy2log, padded, 16, 8, 2, sources=sources),
        remote_nodes_per_token(phy2log, padded[real], 16, 8, 2, sources=sources[real]),
        rtol=1e-12)
    some = ids.clone()
    some[:10, 1] = -1  # layer 1 padded for 10 tokens only
    assert torch.allclose(remote_nodes_per_token(phy2log, some, 16, 8, 2)[1],
                          remote_nodes_per_token(phy2log[1:2], ids[10:, 1:2], 16, 8, 2)[0],
                          rtol=1e-12)
    with pytest.raises(ValueError, match="every id is padding"):
        remote_nodes_per_token(phy2log, torch.full((4, 3, 2), -1), 16, 8, 2)


def test_a_layer_padded_throughout_is_left_out_of_the_mean(capsys, tmp_path) -> None:
    """eval --routing and plan --routing report the mean over the layers in which the
    trace holds a token: a layer whose every row is -1 has no traffic to count (its 0 was
    averaged in: 1.237 where the trace's 3 layers read 1.650)."""
    from helpers import skewed_loads_json

    from eplb.core.dispatch import remote_nodes_per_token

    path, _ = skewed_loads_json(tmp_path, 4, 64, seed=3)
    ids = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(t))[:4]
                       .expand(4, 4) for t in range(200)])  # [200, 4, 4]
    padded = ids.clone()
    padded[:, 2] = -1
    np.savez(tmp_path / "padded.npz", topk_ids=padded.numpy())
    out = tmp_path / "p.json"
    assert run(capsys, "plan", path, "-r", 96, "-g", 16, "--nodes", 4, "-o", out)[0] == 0
    phy2log = torch.tensor(json.loads(out.read_text())["phy2log"])
    want = float(remote_nodes_per_token(phy2log, ids, 64, 16, 4)[[0, 1, 3]].mean())
    code, text, err = run(capsys, "eval", "--placement", out, path, "--dispatch", "nearest",
                          "--routing", tmp_path / "padded.npz", "--json")
    assert code == 0, err
    assert json.loads(text)["remote_nodes_per_token"] == pytest.approx(want, rel=1e-12)
    code, text, err = run(capsys, "plan", path, "-r", 96, "-g", 16, "--nodes", 4,
                          "--groups", 8, "--policy", "locality", "--dispatch", "nearest",
                          "--routing", tmp_path / "padded.npz", "-o", tmp_path / "l.json",
                          "--json")
    assert code == 0, err
    placed = torch.tensor(json.loads((tmp_path / "l.json").read_text())["phy2log"])
    assert json.loads(text)["remote_nodes_per_token"] == pytest.approx(
        float(remote_nodes_per_token(placed, ids, 64, 16, 4)[[0, 1, 3]].mean()), rel=1e-12)


def test_tokens_padded_in_every_layer_cost_nothing(monkeypatch) -> None:
    """A trace of mostly padded tokens (SGLang pads a batch up to its CUDA graph's size)
    is counted over its real tokens only: each padded token was looped over as a real
    one (1M tokens, 1,000 real: 315 s for what the 1,000 alone count in 0.08 s). The
    token loops' lengths are counted here, not timed."""
    import eplb.core.dispatch as dispatch

    ids = _topk_ids(20, 4, 64, 8, seed=6)
    phy2log = _maps(4, 128, 64, seed=6)
    padded = torch.full((20_000, 4, 8), -1)
    padded[::1000] = ids
    sources = torch.arange(20_000) % 16
    steps = []

    def counted_range(*args):  # the module's loops over token chunks, and any other
        steps.append(len(range(*args)))
        return range(*args)

    monkeypatch.setattr(dispatch, "range", counted_range, raising=False)
    counted = dispatch.remote_nodes_per_token(phy2log, padded, 64, 16, 4, chunk=1)
    from_sources = dispatch.remote_nodes_per_token(phy2log, padded, 64, 16, 4,
                                                   sources=sources, chunk=1)
    pairs = dispatch.coactivation(padded, 64, chunk=1)
    assert steps and max(steps) <= 20  # (20,000 a call before)
    monkeypatch.undo()
    assert torch.equal(counted, dispatch.remote_nodes_per_token(phy2log, ids, 64, 16, 4))
    assert torch.equal(from_sources, dispatch.remote_nodes_per_token(
        phy2log, ids, 64, 16, 4, sources=sources[::1000]))
    assert torch.equal(pairs, dispatch.coactivation(ids, 64))


def test_simulate_counts_a_padded_topk_files_traffic(capsys, tmp_path) -> None:
    """A top-k file whose batches SGLang padded with -1 ids counts its traffic as the file
    without the padded tokens (it fell back to the model, with a warning): the padded
    tokens sit at the end of every step, so the steps hold the same real tokens."""
    ids = _topk_ids(96, 2, 16, 2, seed=4)
    steps = ids.view(12, 8, 2, 2)  # 12 steps of 8 tokens
    padded = torch.cat([steps, torch.full((12, 4, 2, 2), -1)], 1).reshape(-1, 2, 2)
    np.savez(tmp_path / "plain.npz", topk_ids=ids.numpy())
    np.savez(tmp_path / "padded.npz", topk_ids=padded.numpy())
    args = ("--window", 2, "-r", 16, "-g", 8, "--nodes", 2, "--groups", 4, "--dispatch",
            "nearest", "--json")
    summaries = []
    for name, per in (("plain.npz", 8), ("padded.npz", 12)):
        code, out, err = run(capsys, "simulate", tmp_path / name, "--tokens-per-step", per,
                             *args)
        assert code == 0 and "modelled" not in err, err
        summaries.append(json.loads(out)["runs"][0]["summary"])
    assert summaries[1]["remote_nodes_counted"] is True
    assert summaries[1]["remote_nodes_per_token"] == pytest.approx(
        summaries[0]["remote_nodes_per_token"], rel=1e-12)


def test_simulate_counts_several_topk_files_traffic(capsys, tmp_path) -> None:
    """Two top-k files count their tokens' traffic as one file of both does: they were
    modelled (DeepSeek-V3's routing) while the notes said a top-k trace's own tokens are
    counted."""
    ids = _topk_ids(96, 2, 16, 2, seed=3)
    np.savez(tmp_path / "both.npz", a_topk_ids=ids[:40].numpy(), b_topk_ids=ids[40:].numpy())
    np.savez(tmp_path / "a.npz", topk_ids=ids[:40].numpy())
    np.savez(tmp_path / "b.npz", topk_ids=ids[40:].numpy())
    args = ("--tokens-per-step", 8, "--num-experts", 16, "--step-range", "1:-1", "--window", 2,
            "-r", 16, "-g", 8, "--nodes", 2, "--dispatch", "nearest", "--json")
    code, out, err = run(capsys, "simulate", tmp_path / "both.npz", "--key",
                         "a_topk_ids,b_topk_ids", *args)
    assert code == 0, err
    one = json.loads(out)["runs"][0]["summary"]
    code, out, err = run(capsys, "simulate", tmp_path / "a.npz", tmp_path / "b.npz", *args)
    assert code == 0, err
    two = json.loads(out)["runs"][0]["summary"]
    assert one["remote_nodes_counted"] is True and two["remote_nodes_counted"] is True
    assert two["remote_nodes_per_token"] == one["remote_nodes_per_token"]


def test_dead_gpus_by_source_node_equal_the_per_gpu_estimate() -> None:
    """With dead GPUs (their slots -1, no token arising there) the by-node model weighs
    each node by its live GPUs and equals the per-GPU estimate over the live sources."""
    from eplb.core.dispatch import coactivation, remote_nodes_from_coactivation
    from eplb.core.locality import pair_stats

    layers, experts, gpus, nodes, tokens = 3, 16, 8, 2, 300
    live = torch.ones(gpus, dtype=torch.bool)
    live[[1, 2, 6]] = False  # node 0 keeps 2 live GPUs of 4, node 1 keeps 3
    weight = torch.rand(layers, experts, generator=torch.Generator().manual_seed(3)) + 0.2
    placement = eplb.plan(weight, 40, gpus, num_nodes=nodes, active_gpus=live)
    assert bool((placement.phy2log.view(layers, gpus, -1)[:, ~live] == -1).all())
    ids = _topk_ids(tokens, layers, experts, 4, seed=2)
    freq, pair = pair_stats(ids, experts)
    share = live.view(nodes, -1).sum(1).double() / live.sum()
    by_node = remote_nodes_by_node(placement.phy2log, freq, lambda x: torch.bmm(pair, x),
                                   nodes, share)
    per_gpu = remote_nodes_from_coactivation(placement.phy2log, coactivation(ids, experts),
                                             tokens, gpus, nodes, active_gpus=live)
    assert torch.allclose(by_node, per_gpu, rtol=1e-10, atol=1e-12)
    even = remote_nodes_by_node(placement.phy2log, freq, lambda x: torch.bmm(pair, x), nodes)
    assert not torch.allclose(even, by_node)  # the node shares matter here
    assert torch.equal(modelled_remote_nodes(placement.phy2log, weight, nodes, 1, live),
                       modelled_remote_nodes(placement.phy2log, weight, nodes, 1,
                                             placement.live_gpus()))
    with pytest.raises(ValueError, match="active_gpus names 6 GPUs"):
        modelled_remote_nodes(placement.phy2log, weight, nodes, 1, live[:6])


def test_a_replay_with_dead_gpus_reports_its_traffic() -> None:
    """A replay whose map in force has dead GPUs counts (routing=) and models its
    cross-node traffic over the tokens of the live GPUs, as eval --routing does; it
    reported none at all (the traffic was switched off at the first map with an empty
    slot)."""
    from eplb.core.dispatch import remote_nodes_per_token
    from eplb.tools.simulate import Cadence, simulate

    layers, experts, gpus, nodes, steps, per = 2, 16, 8, 2, 8, 12
    live = torch.ones(gpus, dtype=torch.bool)
    live[5] = False
    ids = _topk_ids(steps * per, layers, experts, 3, seed=4)
    routing = list(ids.split(per))
    counts = torch.stack([torch.zeros(layers * experts).index_add_(
        0, (step + torch.arange(layers)[None, :, None] * experts).reshape(-1),
        torch.ones(step.numel())).view(layers, experts) for step in routing]).double()
    initial = eplb.plan(counts.sum(0), 24, gpus, num_nodes=nodes, active_gpus=live)
    cluster = {"num_replicas": 24, "num_gpus": gpus, "num_nodes": nodes,
               "cadence": Cadence(2, 2), "oracle": False, "score_dispatch": "nearest"}
    counted = simulate(counts, "none", initial=initial, routing=routing, **cluster)
    want = remote_nodes_per_token(initial.phy2log, torch.cat(routing[2:4]), experts, gpus,
                                  nodes, active_gpus=live)
    assert counted.remote_counted
    assert counted.remote_nodes[1].item() == pytest.approx(float(want.mean()))
    modelled = simulate(counts, "none", initial=initial, **cluster)
    window = counts[2:4].sum(0)
    model = modelled_remote_nodes(initial.phy2log, window, nodes, 1, live)
    expected = float((window.sum(1) * model).sum() / window.sum())
    assert modelled.remote_nodes[1].item() == pytest.approx(expected, rel=1e-12)
    # planned with the GPU dead throughout: every window reports its traffic
    planned = simulate(counts, "eplb", active_gpus=live, routing=routing, **cluster)
    assert bool(torch.isfinite(planned.remote_nodes).all())
    assert 0 < planned.summary()["remote_nodes_per_token"] <= nodes - 1


def test_the_model_refuses_a_map_that_does_not_fit_the_loads() -> None:
    """A dead GPU's slots blanked to -1 without re-placing its experts: the model served
    their tokens nowhere and read fewer remote nodes (the counted figure refuses such a
    map); an id of -2 read as an empty slot (every figure about 0); ids beyond the
    experts and a map of other layers met torch's internal errors (attacker pass)."""
    layers, experts, gpus, nodes = 2, 16, 8, 2
    weight = torch.rand(layers, experts, generator=torch.Generator().manual_seed(0)) + 0.1
    full = eplb.plan(weight, 24, gpus, num_nodes=nodes).phy2log
    live = torch.ones(gpus, dtype=torch.bool)
    live[3] = False
    blank = full.clone()
    blank[:, 9:12] = -1  # GPU 3's slots
    lost = sorted(set(range(experts)) - set(blank[0].tolist()))
    assert lost  # it held the only replica of some expert
    with pytest.raises(ValueError, match=f"expert {lost[0]} of layer 0 has load but phy2log "
                                         "gives it no replica"):
        modelled_remote_nodes(blank, weight, nodes, 1, live)
    for wrong in (full.clone().fill_(-2), full.clone().fill_(experts)):
        with pytest.raises(ValueError, match=r"expert ids outside \[-1, 16\)"):
            modelled_remote_nodes(wrong, weight, nodes, 1)
    with pytest.raises(ValueError, match=r"phy2log has shape \(1, 24\): expected \[2, R\]"):
        modelled_remote_nodes(full[:1], weight, nodes, 1)
    with pytest.raises(ValueError, match="R split over the 5 nodes"):
        modelled_remote_nodes(full, weight, 5, 1)
    with pytest.raises(TypeError, match="phy2log must hold integer expert ids"):
        modelled_remote_nodes(full.double(), weight, nodes, 1)
    with pytest.raises(TypeError, match="phy2log is a meta tensor"):
        modelled_remote_nodes(full.to("meta"), weight, nodes, 1)
    # an expert without load needs no replica
    idle = weight.clone()
    idle[:, lost] = 0
    assert torch.isfinite(modelled_remote_nodes(blank, idle, nodes, 1, live)).all()


def test_the_models_live_mask_must_match_the_maps_empty_slots() -> None:
    """active_gpus marking dead a GPU that holds experts, or left out (or keeping a GPU
    live) beside a map whose slots there are -1, gave a figure silently: tokens arose on
    GPUs that hold nothing, or none on GPUs that serve (the counted figure refuses the
    first). Masks that are no [P] sequence met len()'s own message (attacker pass)."""
    layers, experts, gpus, nodes = 2, 16, 8, 2
    weight = torch.rand(layers, experts, generator=torch.Generator().manual_seed(0)) + 0.1
    live = torch.ones(gpus, dtype=torch.bool)
    live[3] = False
    phy2log = eplb.plan(weight, 24, gpus, num_nodes=nodes, active_gpus=live).phy2log
    want = modelled_remote_nodes(phy2log, weight, nodes, 1, live)
    assert torch.equal(want, modelled_remote_nodes(phy2log, weight, nodes, 1, live.numpy()))
    other = live.clone()
    other[0], other[3] = False, True
    with pytest.raises(ValueError, match=r"GPU 0 is dead \(active_gpus\) but phy2log places"):
        modelled_remote_nodes(phy2log, weight, nodes, 1, other)
    with pytest.raises(ValueError, match=r"empty \(-1\) slots, a dead GPU's, but active_gpus is "
                                         "not given"):
        modelled_remote_nodes(phy2log, weight, nodes, 1)
    with pytest.raises(ValueError, match=r"GPU 4 \(of the 12 active_gpus names\) is live"):
        modelled_remote_nodes(phy2log, weight, nodes, 1, torch.ones(12, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got shape \(1, 8\)"):
        modelled_remote_nodes(phy2log, weight, nodes, 1, live[None])
    for mask in (3, torch.tensor(True), (x for x in live.tolist())):
        with pytest.raises(TypeError, match=r"active_gpus must be a \[P\] boolean mask"):
            modelled_remote_nodes(phy2log, weight, nodes, 1, mask)


def test_the_by_node_model_checks_its_node_shares() -> None:
    """node_share is any scale (taken over its sum, as token sources are): shares of
    [2, 2] read 4 remote nodes of 2 nodes, a NaN share gave NaN, and a list or a share of
    the wrong length met torch's internal errors (attacker pass)."""
    layers, experts, nodes = 2, 8, 2
    phy2log = _maps(layers, 16, experts, seed=1)
    freq, pair_times = surrogate_co_selection(torch.rand(layers, experts) + 0.1, 1)
    even = remote_nodes_by_node(phy2log, freq, pair_times, nodes)
    for share in ([2.0, 2.0], torch.tensor([0.5, 0.5]), np.array([3, 3])):
        assert torch.allclose(remote_nodes_by_node(phy2log, freq, pair_times, nodes, share),
                              even, rtol=1e-12)
    with pytest.raises(ValueError, match=r"node_share must have shape \[2\] \(one per node\)"):
        remote_nodes_by_node(phy2log, freq, pair_times, nodes, torch.ones(3))
    for bad in ([float("nan"), 1.0], [-1.0, 2.0]):
        with pytest.raises(ValueError, match=r"node_share\[0\] is .*must be finite and >= 0"):
            remote_nodes_by_node(phy2log, freq, pair_times, nodes, bad)
    with pytest.raises(ValueError, match="node_share is all zero"):
        remote_nodes_by_node(phy2log, freq, pair_times, nodes, [0.0, 0.0])


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_the_model_refuses_loads_that_are_no_loads(bad: float) -> None:
    """A NaN or negative load read as an idle layer (modelled as uniform) and gave a
    figure silently (attacker pass): refused as every load input is."""
    weight = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    weight[1, 5] = bad
    with pytest.raises(ValueError, match=r"weight\[1, 5\] .* loads must be finite and >= 0"):
        modelled_remote_nodes(_maps(2, 32, 16, seed=0), weight, 2, 1)
