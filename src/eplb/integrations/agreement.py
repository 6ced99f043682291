"""One plan for every rank: a rank agreement over a ``torch.distributed`` key-value store.

vLLM calls its EPLB policy on every expert-parallel rank independently and broadcasts
nothing: each rank then moves weights according to *its own* plan, so ranks holding
different plans exchange the wrong experts (silently wrong outputs) or wait forever on
transfers their peers never post. Plans are bit-identical across ranks when every rank
runs the same eplb on the same input (see ``tests/test_determinism.py``), but that
cannot hold when one rank fails alone (``MemoryError``, a broken install) or when ranks
run different code (a node without the switch, another eplb version or options).

:class:`PlanAgreement` closes that gap after every rank planned:

1. every rank publishes ``{ok, digest of its plan, tag (version + options), error,
   question}`` (the question: what the caller was asked to plan, e.g. its shapes)
   under ``<namespace>/<round>/status/<rank>`` in the store;
2. it waits for all ``world_size`` statuses (at most ``timeout_s``); a rank that never
   publishes (it runs another policy, or crashed) makes every waiting rank raise
   :class:`AgreementError` naming it, instead of shuffling weights on mismatched plans;
3. every rank reads the same statuses and so takes the same decision:
   - ranks asked different questions (other layer or slot counts): no plan can answer
     them all, so every rank raises :class:`AgreementError` naming them;
   - all ok with one digest: each rank keeps its own plan (the normal case, no copy);
   - otherwise the lowest rank that planned successfully publishes its plan and every
     rank adopts it (a rank-local failure or a divergence is logged and repaired);
   - no rank succeeded: :attr:`Outcome.plan` is ``None`` and the caller takes its
     fallback, the same one on every rank.

A store (not a collective on one of the engine's process groups) carries this so that
it never interleaves with the engine's own collectives on those groups, and waits have a
timeout. Rounds are counted per :class:`PlanAgreement`: every rank of the group must
call :meth:`PlanAgreement.agree` once per rebalance, as vLLM calls the policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import reprlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from eplb.core.messages import integer_runs
from eplb.core.topology import real_number

__all__ = ["DEFAULT_TIMEOUT_S", "AgreementError", "Outcome", "PlanAgreement",
           "agree_and_log", "check_timeout_option", "plan_digest"]

_STATUS, _PLAN = "status", "plan"

#: a day: longer waits are typos, and an infinite one overflows the store's timedelta
MAX_TIMEOUT_S = 86400.0
#: the engine plugins' wait for the other ranks' plans (option ``agree_timeout_s``)
DEFAULT_TIMEOUT_S = 120.0
#: why a vLLM EP rank never publishes (the timeout's message names them): a rank with
#: ``agree_timeout_s`` 0 plans without publishing, as one without the switch does
VLLM_SILENT_CAUSES = ("those ranks do not run eplb's policy (switch unset there, eplb not "
                      "installed, a different vLLM policy, or agree_timeout_s 0 there) or "
                      "failed before planning.")


def check_timeout_option(options: dict[str, Any], source: str) -> float:
    """The plugins' ``agree_timeout_s`` option of ``options`` (default
    :data:`DEFAULT_TIMEOUT_S`; 0 turns the agreement off) as a float; ``ValueError``
    naming ``source`` (where the options came from) for anything else."""
    timeout = options.get("agree_timeout_s", DEFAULT_TIMEOUT_S)
    # (NumPy scalars too, as every planner option of EplbPolicy.options: np.int64(60)
    # was refused there)
    seconds = real_number(timeout)
    if seconds is None or not 0 <= seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"{source}: agree_timeout_s must be a number of seconds in "
                         f"[0, {MAX_TIMEOUT_S:g}], got {reprlib.repr(timeout)}")
    return seconds


class AgreementError(RuntimeError):
    """The ranks could not agree on one plan (a rank never published its status)."""


def plan_digest(plan: torch.Tensor) -> str:
    """Short SHA-256 of ``plan [L, R]`` (shape and int64 values): equal iff bit-identical."""
    data = plan.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    digest = hashlib.sha256(f"{tuple(data.shape)}".encode())
    digest.update(data.astype("<i8", copy=False).tobytes())
    return digest.hexdigest()[:24]


def _encode_plan(plan: torch.Tensor) -> bytes:
    data = plan.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    header = ",".join(str(n) for n in data.shape).encode() + b"\n"
    return header + data.astype("<i8", copy=False).tobytes()


def _decode_plan(raw: bytes) -> torch.Tensor:
    header, _, body = raw.partition(b"\n")
    shape = tuple(int(n) for n in header.decode().split(","))
    return torch.from_numpy(np.frombuffer(body, dtype="<i8").reshape(shape).astype(np.int64))


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"`` (compact: one rank list per plan in a message)."""
    return integer_runs(ranks, dash="-", sep=",")


@dataclass
class Outcome:
    """What the ranks agreed on in one round.

    Attributes:
        plan: the plan every rank must use, or ``None`` when no rank produced one.
        unanimous: every rank succeeded with the same plan (and the same tag).
        source: the rank whose plan was adopted when not unanimous, else ``None``.
        digests: ``digest → ranks`` of the successful ranks.
        failed: ``rank → error text`` of the ranks that failed to plan.
        tags: ``tag → ranks`` (eplb version and options of each rank).
    """

    plan: torch.Tensor | None
    unanimous: bool
    source: int | None = None
    digests: dict[str, list[int]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    tags: dict[str, list[int]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the log: who planned what."""
        parts = [f"plan {d[:12]} on ranks {_ranges(r)}" for d, r in self.digests.items()]
        parts += [f"rank {r} failed ({e})" for r, e in sorted(self.failed.items())]
        if len(self.tags) > 1:
            parts += [f"ranks {_ranges(r)} run {t}" for t, r in self.tags.items()]
        return "; ".join(parts)


class PlanAgreement:
    """Agree on one plan per round among ``world_size`` ranks sharing ``store``.

    Args:
        store: a ``torch.distributed.Store`` every rank of the group reaches (vLLM's
            default store, a ``TCPStore``, a ``FileStore``, a ``HashStore`` in tests).
        rank: this rank's index in the group, ``0 <= rank < world_size``.
        world_size: ranks in the group; each must call :meth:`agree` every round.
        namespace: key prefix unique to the group (several groups may share a store).
        timeout_s: longest wait for the other ranks' statuses and the adopted plan.
        silent_causes: why ranks may never publish, in the engine's terms: the sentence
            after "got none from rank(s) R:" in the timeout's message (default vLLM's).
    """

    def __init__(
        self, store: Any, rank: int, world_size: int, namespace: str, timeout_s: float = 120.0,
        silent_causes: str = VLLM_SILENT_CAUSES,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if isinstance(timeout_s, bool) or not (
            isinstance(timeout_s, (int, float)) and 0 < timeout_s <= MAX_TIMEOUT_S
        ):
            raise ValueError(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                             f"got {timeout_s!r}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.namespace, self.timeout_s = namespace.rstrip("/"), float(timeout_s)
        self.silent_causes = silent_causes
        self.round = 0

    def _key(self, round_: int, kind: str, rank: int | None = None) -> str:
        tail = "" if rank is None else f"/{rank}"
        return f"{self.namespace}/{round_}/{kind}{tail}"

    def _wait(self, keys: list[str], what: str, round_: int, source: int | None = None) -> None:
        """Wait for ``keys``: the statuses of all ranks, or (``source`` set) the plan that
        rank ``source`` must publish after reporting success."""
        # stores count whole milliseconds, and 0 ms means "no timeout" to a HashStore or
        # FileStore: a wait shorter than 1 ms would never end
        wait = timedelta(milliseconds=max(1, round(self.timeout_s * 1000)))
        try:
            self.store.wait(keys, wait)
        except Exception as exc:  # the store's timeout error type varies by store and version
            head = (f"eplb: rank {self.rank} waited {self.timeout_s:g} s for {what} of "
                    f"rebalance {round_} ({self.namespace})")
            if source is not None:
                # that rank did run eplb (it published its status): it died or lost the
                # store between its status and its plan, so the usual hint would mislead
                raise AgreementError(
                    f"{head}, but rank {source} reported a plan and never published it: it "
                    f"stopped (crashed or lost the store) after planning. ({exc})"
                ) from None
            missing = [k.rsplit("/", 1)[-1] for k in keys if not self._present(k)]
            raise AgreementError(
                f"{head} and got none from rank(s) {', '.join(missing)}: {self.silent_causes} "
                f"({exc})"
            ) from None

    def _get_all(self, keys: list[str]) -> list[bytes]:
        """Values of ``keys`` in one round trip where the store supports it."""
        try:
            return list(self.store.multi_get(keys))
        except (AttributeError, NotImplementedError, RuntimeError):
            return [self.store.get(k) for k in keys]

    def _present(self, key: str) -> bool:
        try:
            return bool(self.store.check([key]))
        except Exception:
            return False

    def agree(
        self, plan: torch.Tensor | None, error: BaseException | None = None, tag: str = "",
        question: str = "",
    ) -> Outcome:
        """Publish this rank's result, wait for all, return what every rank must use.

        Args:
            plan: this rank's ``[L, R]`` plan, or ``None`` when planning failed.
            error: the failure (only its text is shared).
            tag: what this rank runs (e.g. eplb version and options); a tag that differs
                between ranks is reported in the outcome.
            question: what this rank was asked to plan (e.g. the shapes of its input); a
                plan adopted from another rank must answer it, so ranks whose questions
                differ cannot agree.

        Raises:
            AgreementError: a rank did not publish within ``timeout_s``, or the ranks
                were asked different questions (every rank raises it).
        """
        round_ = self.round
        self.round += 1
        status = {
            "ok": plan is not None,
            "digest": None if plan is None else plan_digest(plan),
            "tag": tag,
            "error": None if plan is not None else f"{type(error).__name__}: {error}"[:300],
            "question": question,
        }
        self.store.set(self._key(round_, _STATUS, self.rank), json.dumps(status))
        keys = [self._key(round_, _STATUS, r) for r in range(self.world_size)]
        self._wait(keys, "the plan status", round_)
        statuses = [json.loads(raw) for raw in self._get_all(keys)]
        self._forget(round_ - 2)
        questions: dict[str, list[int]] = {}
        for r, s in enumerate(statuses):
            questions.setdefault(s.get("question", ""), []).append(r)
        if len(questions) > 1:
            # adopting one rank's plan would hand the others a plan of the wrong shape; every
            # rank read the same statuses, so every rank raises here, none moves weights
            asked = "; ".join(f"ranks {_ranges(r)}: {q or 'not said'}"
                              for q, r in questions.items())
            # a rank of an eplb older than the question says nothing: then the versions
            # differ, which is the thing to fix
            cause = ("some ranks run an eplb that does not say (an older version: install "
                     "one eplb on every node)" if "" in questions else
                     "the engine's ranks disagree on the model or its expert slots")
            raise AgreementError(
                f"eplb: the ranks of {self.namespace} were asked to plan different things at "
                f"rebalance {round_} ({asked}); no one plan fits them all: {cause}"
            )

        out = Outcome(plan=None, unanimous=False)
        for r, s in enumerate(statuses):
            out.tags.setdefault(s["tag"], []).append(r)
            if s["ok"]:
                out.digests.setdefault(s["digest"], []).append(r)
            else:
                out.failed[r] = s["error"] or "unknown error"
        if not out.digests:
            return out  # nobody planned: every rank takes the caller's fallback
        if len(out.digests) == 1 and not out.failed:
            out.plan, out.unanimous = plan, len(out.tags) == 1
            return out
        # a failure or a divergence: everyone adopts the lowest successful rank's plan
        out.source = min(r for ranks in out.digests.values() for r in ranks)
        plan_key = self._key(round_, _PLAN)
        if self.rank == out.source:
            assert plan is not None
            self.store.set(plan_key, _encode_plan(plan))
            out.plan = plan
            return out
        self._wait([plan_key], f"rank {out.source}'s plan", round_, source=out.source)
        adopted = _decode_plan(self.store.get(plan_key))
        if plan_digest(adopted) != statuses[out.source]["digest"]:
            raise AgreementError(f"eplb: rank {out.source}'s published plan is corrupt")
        out.plan = adopted
        return out

    def _forget(self, round_: int) -> None:
        """Delete this rank's keys of an old round: every rank has read them, because
        every rank published in a later round only after reading that one."""
        if round_ < 0:
            return
        for key in (self._key(round_, _STATUS, self.rank), self._key(round_, _PLAN)):
            if key.endswith(_PLAN) and self.rank != 0:
                continue  # only one rank deletes the shared plan key (absent is fine)
            # stores without delete_key keep a few small keys
            with contextlib.suppress(Exception):
                self.store.delete_key(key)


def agree_and_log(
    agreement: PlanAgreement, plan: torch.Tensor | None, error: BaseException | None, *,
    tag: str, question: str, logger: Any, ranks: str,
) -> Outcome:
    """``agreement.agree(...)``, then the engine's log says what happened, alike for every
    engine plugin (on ``logger``, the plugin's own, so the engine's logging shows it;
    ``ranks`` names them, e.g. ``"EP ranks"``): a failure or divergence repaired from
    another rank's plan (an error, with this rank's failure), or the same plan from
    different settings (a warning). When no rank could plan, the caller says which
    fallback answers."""
    outcome = agreement.agree(plan, error, tag=tag, question=question)
    if outcome.plan is not None and outcome.source is not None:
        logger.error("eplb: %s disagreed at rebalance %d (%s); every rank uses rank %d's "
                     "plan", ranks, agreement.round - 1, outcome.describe(), outcome.source,
                     exc_info=error)
    elif outcome.plan is not None and not outcome.unanimous:
        logger.warning("eplb: %s run different eplb settings (%s); their plans agree", ranks,
                       outcome.describe())
    return outcome
