"""Running a training stage on several processes (``accelerate launch``, ``torchrun``).

The Trainer already speaks accelerate (DDP, DeepSpeed, FSDP); this module holds the few
pieces prefrec adds around it:

- :func:`process_state` starts the process group *before* the Trainer exists, so the
  reference log-probs can be split over the ranks (:func:`score_sharded`).
- :func:`rank_device` puts each rank's model on its own GPU (``cuda:LOCAL_RANK``).
- :func:`forward_through` runs a custom forward (shared-prefix scoring) *inside* the
  wrapper's ``forward``: DDP arms its gradient all-reduce there, so a loss computed by
  calling the inner model directly would silently train each rank on its own gradients.
- :func:`sum_across_processes` adds logged metrics over the ranks.

In a single process every function degrades to the plain computation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


def local_rank() -> int:
    """This process's rank on its machine (-1 outside a distributed launch)."""
    return int(os.environ.get("LOCAL_RANK", -1))


def is_main_process() -> bool:
    """True in a single process and on global rank 0 of a distributed launch."""
    return int(os.environ.get("RANK", 0)) == 0


def rank_device(device: str | None) -> str | None:
    """The device this rank loads its model onto: ``cuda`` becomes ``cuda:LOCAL_RANK``.

    ``load(device="cuda")`` would put every rank's copy on GPU 0. Outside a distributed
    launch, or for any other device, ``device`` is returned unchanged.
    """
    from prefrec.model import resolve_device

    rank = local_rank()
    if rank < 0:
        return device
    resolved = resolve_device(device)
    return f"cuda:{rank}" if resolved == "cuda" else resolved


def process_state(cpu: bool) -> PartialState:
    """accelerate's process state; joins the process group (gloo on CPU, NCCL on GPU).

    ``TrainingArguments`` later rebuilds the same state; the process group, once joined,
    is reused.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def score_sharded(
    state: PartialState, items: Sequence[Any], score: Callable[[list[Any]], list[T]]
) -> list[T]:
    """``score(items)`` computed as contiguous shards, one per rank, gathered in order.

    Every rank returns the full list. Contiguous shards keep neighbouring items (sorted
    keys of one user history) together, so shared-prefix scoring loses little.
    """
    if state.num_processes == 1:
        return score(list(items))
    from accelerate.utils import gather_object

    with state.split_between_processes(list(items)) as shard:
        mine = score(shard) if shard else []
    gathered = gather_object([mine])
    return [value for part in gathered for value in part]


def on_every_rank(state: PartialState, flag: bool) -> bool:
    """True when ``flag`` is true on every rank (e.g. "I see the cache file").

    All ranks get the same answer, so they take the same branch: ranks deciding alone could
    disagree (another run writes the file in between, or a node-local cache holds it on
    one machine only) and would then wait on different collectives forever.
    """
    if state.num_processes == 1:
        return flag
    from accelerate.utils import gather_object

    return all(gather_object([bool(flag)]))


def forward_through(wrapped: torch.nn.Module, fn: Callable[[torch.nn.Module], T]) -> T:
    """``fn(inner_model)`` run as the forward pass of ``wrapped`` (DDP, DeepSpeed, FSDP).

    Wrappers do their work around ``self.module(...)``: DDP prepares the gradient
    all-reduce after it, DeepSpeed and FSDP gather sharded weights. ``fn`` is installed as
    the inner model's ``forward`` for one call, so a forward that is not the model's own
    (the shared-prefix scorer calls the decoder and the head separately) gets the same
    treatment. An unwrapped model just runs ``fn(wrapped)``.
    """
    inner = getattr(wrapped, "module", None)
    if not isinstance(inner, torch.nn.Module):
        return fn(wrapped)
    # accelerate may already have put an instance-level forward (autocast) on the inner
    # model; it is restored afterwards, not deleted.
    saved = inner.__dict__.get("forward")
    inner.forward = lambda *args, **kwargs: fn(inner)
    try:
        return wrapped()
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def sum_across_processes(accelerator, values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64; a no-op on one process)."""
    local = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="sum")
    return local.tolist()
