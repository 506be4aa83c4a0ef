"""Data parallelism for SDFT recovery and CKA alignment on torch.distributed (torchrun).

Everything here is a thin layer over torch's own engine: the process group comes from torchrun's
environment, the student is wrapped in `DistributedDataParallel` or FSDP2 (`fully_shard`), and
checkpoints use `torch.distributed.checkpoint.state_dict` to gather full tensors, so a checkpoint
written by N ranks loads on M ranks (or on one process without torchrun).

The one rule that makes N ranks equal one process (see `data_parallel_loss`): a distillation loss
that is a mean over valid tokens must be divided by the GLOBAL number of valid tokens (summed over
ranks), not each rank's own count, and multiplied by world_size because DDP and FSDP average (not
sum) gradients across ranks. Then the synchronised gradient is exactly the gradient of
sum(all tokens) / count(all tokens) that one process computes on the full batch.

Without torchrun every function degrades to the single-process case (no process group, collectives
are no-ops, wrapping returns the module), so the same script runs both ways.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp", "none")
SHARD_MODES = ("contiguous", "strided")
_CKPT_FORMAT = "sdft-full-state-v1"


@dataclass(frozen=True)
class World:
    """Where this process sits. `is_main` is rank 0: the rank that writes files and logs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009  (immutable, hashable)
    is_distributed: bool = False
    is_main: bool = True
    backend: str | None = None

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"World.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"World.rank must be in [0, {self.world_size}), got {self.rank}")
        if self.is_main != (self.rank == 0):
            raise ValueError(f"World.is_main must be (rank == 0); got is_main={self.is_main}, rank={self.rank}")
        if self.is_distributed != (self.world_size > 1):
            raise ValueError(f"World.is_distributed must be (world_size > 1); got {self.is_distributed} "
                             f"with world_size={self.world_size}")


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def single_process_world(device=None) -> World:
    """The World of a script that was not launched by torchrun."""
    return World(device=torch.device(device) if device is not None else _default_device(0))


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_world(backend: str | None = None, *, device=None, timeout_s: float = 1800.0) -> World:
    """Join the process group described by torchrun's environment and return this process's World.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun for every worker,
    also in multi-node runs with --rdzv-backend c10d). Without WORLD_SIZE (plain `python ...`), or with
    WORLD_SIZE=1, returns a single-process World and creates no process group.
    backend: None -> "nccl" when CUDA is available, else "gloo". nccl places rank r on cuda:LOCAL_RANK;
    gloo works on the CPU. `device` overrides the device (e.g. "cpu" to train on CPU with gloo on a
    machine that has GPUs). Calling it again when the group already exists returns the same World.
    """
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA devices, but torch.cuda.is_available() is False; "
                         "use backend='gloo' on CPU")
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        active = dist.get_backend()
        dev = torch.device(device) if device is not None else (
            torch.device("cuda", local_rank) if "nccl" in active else torch.device("cpu"))
        return World(rank, world_size, local_rank, dev, world_size > 1, rank == 0, active)

    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world_size is None:
        if rank not in (None, 0):
            raise ValueError(f"environment has RANK={rank} but no WORLD_SIZE; launch with torchrun")
        return single_process_world(device)
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        if rank not in (None, 0):
            raise ValueError(f"environment has RANK={rank} but WORLD_SIZE=1 (ranks are 0..WORLD_SIZE-1)")
        return single_process_world(device)

    local_rank = _env_int("LOCAL_RANK")
    missing = [n for n, v in (("RANK", rank), ("LOCAL_RANK", local_rank)) if v is None]
    missing += [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun, "
                         "which sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every worker")
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK must be in [0, {world_size}), got {rank}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if device is not None:
        dev = torch.device(device)
    elif backend == "nccl":
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    kwargs = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator eagerly: no guessing in barrier()
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return World(rank, world_size, local_rank, dev, True, rank == 0, backend)


def destroy_world(world: World) -> None:
    """Leave the process group (no-op for a single-process World). Drop the wrapped models first."""
    if world.is_distributed:
        leave_process_group()


def leave_process_group() -> None:
    """Free unreachable FSDP state, then destroy the default process group if one exists.

    FSDP2 modules (their cycles hold the process group) still alive when the interpreter shuts down
    abort a finished gloo rank with SIGABRT ("terminate called without an active exception") in
    about 1 run in 5 on CPU; collected first, and the group destroyed after, none did in 80 runs.
    """
    import gc

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (no-op for a single-process World)."""
    if not world.is_distributed:
        return
    if world.backend == "nccl":
        dist.barrier(device_ids=[world.device.index])
    else:
        dist.barrier()


def shard(n_items: int, world: World, *, mode: str = "contiguous") -> list[int]:
    """The indices of `n_items` that this rank owns: every index exactly once across ranks.

    mode="contiguous": rank r gets one block; block sizes differ by at most one, the first
    n_items % world_size ranks getting the extra item (so rank order = item order).
    mode="strided": rank r gets r, r + world_size, r + 2 world_size, ...
    When n_items < world_size some ranks get an empty list. The split is deterministic (no RNG), so
    every rank computes the same partition without communication. Uneven shards are fine for the
    loss when it is normalised by the global token count (`data_parallel_loss`).
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"shard: n_items must be a non-negative int, got {n_items!r}")
    if not isinstance(world, World):
        raise TypeError(f"shard: world must be a World, got {type(world).__name__}")
    if mode == "strided":
        return list(range(world.rank, n_items, world.world_size))
    if mode != "contiguous":
        raise ValueError(f"shard: mode must be one of {SHARD_MODES}, got {mode!r}")
    base, extra = divmod(n_items, world.world_size)
    start = world.rank * base + min(world.rank, extra)
    return list(range(start, start + base + (1 if world.rank < extra else 0)))


def all_reduce_sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (no-op for a single-process World).

    A tensor on another device than the backend's (e.g. a CUDA tensor with gloo) goes through a
    temporary copy on `world.device`.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_sum_: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not world.is_distributed:
        return tensor
    if tensor.device == world.device and tensor.is_contiguous():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    tmp = tensor.detach().to(world.device).contiguous()
    dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        tensor.copy_(tmp)
    return tensor


def global_token_count(local_count, world: World) -> torch.Tensor:
    """Number of valid tokens summed over ranks, as an int64 tensor on `world.device`.

    local_count: an int, or a tensor (a count, or a bool/0-1 mask whose True entries are counted).
    """
    if isinstance(local_count, torch.Tensor):
        if local_count.dtype == torch.bool or local_count.numel() != 1:
            local_count = local_count.sum()
        count = local_count.detach().to(device=world.device, dtype=torch.int64).reshape(())
    elif isinstance(local_count, int) and not isinstance(local_count, bool):
        if local_count < 0:
            raise ValueError(f"global_token_count: local_count must be >= 0, got {local_count}")
        count = torch.tensor(local_count, dtype=torch.int64, device=world.device)
    else:
        raise TypeError(f"global_token_count: local_count must be an int or a tensor, got {type(local_count).__name__}")
    # (a tensor count is not inspected here: that would force a device sync every step)
    return all_reduce_sum_(count.clone(), world)


def data_parallel_loss(local_sum: torch.Tensor, global_count, world: World, *,
                       grads_averaged: bool = True) -> torch.Tensor:
    """The per-rank loss to call .backward() on, given this rank's SUM of per-token losses.

    global_count: from `global_token_count`. With DDP/FSDP (which average gradients over ranks,
    grads_averaged=True) the rank loss is local_sum * world_size / global_count, so the averaged
    gradient is d/dθ [sum over all ranks' tokens / global_count]: exactly one process on the full
    batch. grads_averaged=False is for gradients that are summed instead (manual all_reduce).
    A global count of 0 (every token ignored) gives a zero loss, never NaN.
    """
    if not isinstance(local_sum, torch.Tensor) or local_sum.numel() != 1:
        raise ValueError("data_parallel_loss: local_sum must be a one-element tensor (reduction='sum')")
    count = torch.as_tensor(global_count, device=local_sum.device).reshape(())
    factor = world.world_size if grads_averaged else 1
    return local_sum.reshape(()) * (factor / count.clamp_min(1).to(local_sum.dtype))


def global_mean(local_sum: torch.Tensor, global_count, world: World) -> float:
    """The full batch's mean loss (sum over ranks / global count) as a float, for logging.

    A collective: every rank must call it. Accumulates in float64.
    """
    total = all_reduce_sum_(local_sum.detach().reshape(1).to(world.device, torch.float64).clone(), world)
    return float(total) / max(int(global_count), 1)


def prepare_teacher(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """A frozen teacher replica on this rank: eval mode, no gradients, on `world.device`.

    The teacher is never wrapped: each rank runs it under torch.no_grad() on its own shard.
    """
    model.eval().requires_grad_(False)
    return model.to(world.device)


def _fsdp_units(model: torch.nn.Module):
    """Submodules to shard one by one: the no-split blocks (decoder layers) that any Hugging Face
    model inside `model` declares, also when it sits in a wrapper (peft, a loss module). Everything
    else (embeddings, final norm, lm_head) stays in the root unit, gathered for the root's forward."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def wrap_student(model: torch.nn.Module, world: World, strategy: str = "ddp", *,
                 find_unused_parameters: bool = False) -> torch.nn.Module:
    """Move the trainable student to `world.device` and wrap it for data parallelism.

    strategy="ddp": torch DistributedDataParallel (rank 0's weights are broadcast to every rank).
    strategy="fsdp": FSDP2 `fully_shard` on each decoder block (the model's `_no_split_modules`),
    then on the root; works on CPU with gloo and on GPUs with nccl.
    strategy="none": no wrapper; only valid on one process (gradients would silently diverge).
    On a single-process World, ddp/fsdp return the bare module too, so scripts run without torchrun.
    Use `unwrap()` to reach the HF model again and the checkpoint helpers to save it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"wrap_student: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"wrap_student: model must be a torch.nn.Module, got {type(model).__name__}")
    if strategy == "none" and world.is_distributed:
        raise ValueError(f"wrap_student: strategy='none' with world_size={world.world_size} would leave each "
                         "rank's gradients unsynchronised; use strategy='ddp' or 'fsdp'")
    model = model.to(world.device)
    if not world.is_distributed or strategy == "none":
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("wrap_student: the model has no parameter with requires_grad=True")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # FSDP2 is in torch >= 2.6; this project pins a newer torch
        raise RuntimeError(f"wrap_student: strategy='fsdp' needs torch.distributed.fsdp.fully_shard "
                           f"(FSDP2), missing in torch {torch.__version__}") from exc
    # Broadcast rank 0's weights first, as DDP does, so randomly initialised parts (LoRA) agree.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.bool:  # gloo has no bool collectives
                tmp = t.data.to(torch.uint8)
                dist.broadcast(tmp, src=0)
                t.data.copy_(tmp.bool())
            else:
                dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for block in _fsdp_units(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP2 picks its root lazily, at the first forward. Fix it now, so that calling an inner module
    # first (e.g. the CKA trajectory at step 0 runs the bare student) cannot make a decoder layer
    # the root. Private hook of torch's FSDPState; harmless to skip if a future torch renames it.
    state = getattr(model, "_get_fsdp_state", lambda: None)()
    if state is not None and hasattr(state, "_lazy_init"):
        state._lazy_init()
    return model


@contextlib.contextmanager
def gathered_root(model: torch.nn.Module):
    """Run inner modules of an FSDP-wrapped student directly (e.g. `align` on the bare HF model):
    gathers the root unit's parameters (embeddings, final norm, lm_head) for the duration; decoder
    layers gather themselves in their own forward. A no-op for DDP and unwrapped models.
    """
    unshard = getattr(model, "unshard", None)
    if unshard is None or not hasattr(model, "reshard"):
        yield model
        return
    # FSDP refills the same unsharded buffers without bumping their version counters, so a cache
    # keyed on (data_ptr, _version) of a weight (QuantLinear's inference cache) would serve stale
    # values from an earlier gather: drop such caches before every gathered run.
    for m in model.modules():
        if getattr(m, "_cache", None) is not None:
            m._cache = None
    unshard()
    try:
        yield model
    finally:
        model.reshard()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are the model itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------- checkpoints (full, rank-count free)
def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: torch.nn.Module, world: World, optimizer: torch.optim.Optimizer | None = None):
    """Gather the model (and optimizer) state as full CPU tensors keyed by the bare model's names.

    A collective under DDP/FSDP: every rank must call it. Returns (model_state, optim_state) on the
    main rank; other ranks get empty dicts under FSDP (the gather lands on rank 0 only).
    Optimizer state is keyed by parameter name, not position, so it loads under any wrapping.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = _state_options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_state, optim_state


def save_checkpoint(path, world: World, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None):
    """Write one checkpoint file from the main rank (atomic: temp file, then rename); all ranks call.

    extra: JSON-like data (ints, floats, strings, lists, dicts, tensors) such as the step and RNG
    states. The file holds full (unsharded) tensors, so it resumes on any number of ranks.
    Returns the path. Ends with a barrier, so no rank races ahead of the file.
    """
    import io
    import pathlib
    from .io import atomic_torch_save
    path = pathlib.Path(path)
    # load_checkpoint reads with weights_only=True: refuse (before any work) what it could not read back,
    # e.g. NumPy scalars or RNG states, instead of writing a checkpoint that can never be resumed
    buf = io.BytesIO()
    torch.save(extra or {}, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:
        raise ValueError(f"extra: holds values a weights_only load cannot read back (use Python numbers, strings, "
                         f"lists, dicts and tensors; e.g. int(np_value), torch.tensor(rng_state)): {e}") from None
    model_state, optim_state = full_state(model, world, optimizer)
    if world.is_main:
        payload = {"format": _CKPT_FORMAT, "world_size": world.world_size, "model": model_state,
                   "optimizer": optim_state, "extra": extra or {}}
        atomic_torch_save(payload, path)  # temp file removed on failure, fsynced, then renamed
    barrier(world)
    return path


def load_checkpoint(path, world: World, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, shared_filesystem: bool = True,
                    strict: bool = True) -> dict:
    """Load a `save_checkpoint` file into an (already wrapped) model and optimizer on every rank.

    Works whatever the number of ranks that wrote it, and with ddp, fsdp or no wrapper. With
    shared_filesystem=False only the main rank reads the file and broadcasts it (multi-node runs
    without a shared disk). Returns the checkpoint's `extra` dict. All ranks call it.
    """
    import pathlib
    path = pathlib.Path(path)
    payload = None
    if shared_filesystem or world.is_main:
        if not path.is_file():
            raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _CKPT_FORMAT:
            raise ValueError(f"load_checkpoint: {path} is not a {_CKPT_FORMAT} checkpoint")
    if not shared_filesystem and world.is_distributed:
        box = [payload]
        dist.broadcast_object_list(box, src=0, device=world.device if world.backend == "nccl" else None)
        payload = box[0]
    if optimizer is not None and payload["optimizer"] is None:
        raise ValueError(f"load_checkpoint: {path} has no optimizer state, but an optimizer was given")
    load_full_state(model, payload["model"], optimizer, payload["optimizer"], strict=strict)
    return payload["extra"]


def load_full_state(model: torch.nn.Module, model_state: dict,
                    optimizer: torch.optim.Optimizer | None = None, optim_state: dict | None = None, *,
                    strict: bool = True) -> None:
    """Load full (unsharded) state from `full_state` into a model wrapped any way (or not at all):
    FSDP shards it to this rank's slice, DDP/plain modules copy it. Every rank passes the full dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    set_model_state_dict(model, model_state, options=_state_options(strict=strict))
    if optimizer is not None:
        if optim_state is None:
            raise ValueError("load_full_state: optim_state is None but an optimizer was given")
        set_optimizer_state_dict(model, optimizer, optim_state, options=_state_options(strict=strict))


def unshard_into(model: torch.nn.Module, fresh: torch.nn.Module | None, world: World, *,
                 strict: bool = True) -> torch.nn.Module | None:
    """Copy the full weights of `model` (FSDP-sharded, DDP-wrapped or plain) into `fresh`, a plain
    module of the same structure that only the main rank needs (others pass None). A collective:
    every rank calls it. Returns `fresh` on the main rank, None elsewhere. This is how an
    FSDP-trained student becomes an ordinary model again for evaluation and `save_pretrained`.
    """
    state, _ = full_state(model, world)
    if not world.is_main:
        return None
    if fresh is None:
        raise ValueError("unshard_into: the main rank must pass the module to fill (fresh)")
    fresh.load_state_dict(state, strict=strict)
    return fresh
