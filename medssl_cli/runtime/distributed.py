"""Several processes, one training run: launcher detection, process group, DDP, shared decisions.

Stops, requeueing and the fixed run directory a requeued job returns to: ``lifecycle.py``.

Launchers (first match wins; ``MEDSSL_DIST=off`` ignores them all and runs one process):

- ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- ``srun`` (one task per GPU): SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID,
  the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST as master (``node[01-03,07]``
  -> ``node01``), MASTER_PORT if set, else 15000 + SLURM_JOB_ID mod 17000 (one job, one port, below
  Linux's ephemeral ports from 32768).

Backends: NCCL when the training device is CUDA (each rank on ``cuda:<local rank>``), gloo on CPU.
BatchNorm layers become synchronised (global-batch statistics): ``torch.nn.SyncBatchNorm`` on CUDA,
``GlobalBatchNorm`` (below) elsewhere, since torch's SyncBatchNorm runs on GPUs only.

Errors. Setup (run directory, data, checks) runs through ``from_main`` / ``check_all``: an error on
any rank is raised on every rank with the failing rank's message, and all exit. An error inside a
training step (e.g. out of memory on one GPU) cannot be announced: the other ranks sit in a collective.
There the launcher stops the job: torchrun terminates all workers when one fails, and the sbatch
scripts run ``srun --kill-on-bad-exit=1``; the failing rank's message is on the terminal (``srun
--label`` prefixes the rank) and in its ``log.rank<k>.txt``; rank 0 marks the run ``failed`` when it
sees the collective break (gloo), or is killed and leaves ``running`` without a lock: resumable
either way. The process-group timeout is MEDSSL_DIST_TIMEOUT minutes (default 30).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from medssl_cli.errors import UserError, short
from medssl_cli.runtime.launch import Dist, env_minutes
from medssl_cli.runtime.preempt import StopFlag

LOG = logging.getLogger("medssl")
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Process group


def rank_device(d: Dist, device: torch.device) -> torch.device:
    """Under DDP on CUDA each rank takes ``cuda:<local rank>`` (modulo the GPUs it can see: with
    ``--gpus-per-task=1`` every task sees one GPU, cuda:0)."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank % torch.cuda.device_count())
    return device


def join_store(d: Dist) -> tdist.TCPStore:
    """The job's TCP store, once every rank has joined: said at once, and bounded by
    MEDSSL_DIST_JOIN_TIMEOUT minutes (default 5) rather than the 30-minute collective timeout, so a
    stray RANK/WORLD_SIZE in the environment (no peers coming) is one line, not a silent half hour."""
    minutes = env_minutes("MEDSSL_DIST_JOIN_TIMEOUT", 5)
    LOG.info(
        f"Rank {d.rank}: waiting up to {minutes:g} min for {d.world_size} ranks ({d.launcher}) at "
        f"{d.master_addr}:{d.master_port}"
    )
    try:
        return tdist.TCPStore(
            d.master_addr,
            d.master_port,
            d.world_size,
            is_master=d.rank == 0,
            timeout=datetime.timedelta(minutes=minutes),
            wait_for_workers=True,
        )
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"Rank {d.rank}: the {d.world_size} ranks of this {d.launcher} job did not all meet at "
            f"{d.master_addr}:{d.master_port} within {minutes:g} min ({short(first, 160)}).",
            "Start every rank (torchrun --nproc-per-node N, or srun), raise MEDSSL_DIST_JOIN_TIMEOUT, or "
            "unset RANK/WORLD_SIZE (MEDSSL_DIST=off runs one process).",
        ) from None


@contextlib.contextmanager
def session(d: Dist, device: torch.device) -> Iterator[Dist]:
    """Initialise the process group for ``d`` (NCCL on CUDA, gloo otherwise) and destroy it on exit.

    No-op with one process, or when the caller already initialised torch.distributed (tests).
    Ranks > 0 show only warnings on the terminal (their full log goes to the run's log.rank<k>.txt)
    and no progress bar.
    """
    if not d.enabled or tdist.is_initialized():
        yield d
        return
    device = rank_device(d, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=env_minutes("MEDSSL_DIST_TIMEOUT", 30))
    if d.launcher == "torchrun" and os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun's agent already serves a store on MASTER_PORT and handles the rendezvous: join it.
        tdist.init_process_group(
            backend, init_method="env://", rank=d.rank, world_size=d.world_size, timeout=timeout
        )
    else:  # srun, or RANK/WORLD_SIZE set without torchrun's agent: rank 0 hosts the store
        store = join_store(d)
        store.set_timeout(timeout)
        tdist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world_size, timeout=timeout)
    if device.type == "cpu" and d.local_world_size > 1 and not os.environ.get("OMP_NUM_THREADS"):
        # N processes x all cores each would oversubscribe the node.
        from medssl_cli.runtime.compute import cpu_count

        torch.set_num_threads(max(1, cpu_count() // d.local_world_size))
    if not d.is_main:
        os.environ["MEDSSL_NO_PROGRESS"] = "1"
        for h in LOG.handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
    try:
        yield d
    finally:
        tdist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        tdist.barrier()


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if tdist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def agree_signal(d: Dist, signum: int) -> int:
    """The pending stop signal of all ranks (0: none), so every rank stops at the same step: SIGINT if
    any rank has it (a stop for good wins over USR1/TERM, which requeue), else the largest."""
    if not d.enabled:
        return signum
    t = torch.tensor([int(signum == signal.SIGINT), signum], dtype=torch.int64, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(signal.SIGINT) if t[0].item() else int(t[1].item())


def agreed_stop(d: Dist, stop: StopFlag | None) -> int:
    """The stop handshake of every training loop: this rank's pending signal (``stop``), agreed on by
    all ranks (``agree_signal``); 0 when none. Called at the same steps on every rank."""
    return agree_signal(d, (stop.signum or 0) if stop else 0)


def _failure(exc: BaseException) -> tuple[str, str | None, bool]:
    if isinstance(exc, UserError):
        return exc.message, exc.hint, True
    return f"{type(exc).__name__}: {exc}", None, False


def _reraise_peer(rank: int, failure: tuple[str, str | None, bool]) -> None:
    message, hint, _ = failure
    raise UserError(f"rank {rank}: {message}", hint)


def from_main(d: Dist, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 and its (picklable) result on every rank. If it raised on rank 0, rank 0
    re-raises it and every other rank raises a UserError with the same message."""
    if not d.enabled:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if d.is_main:
        try:
            payload = [("ok", fn())]
        except Exception as exc:
            error, payload = exc, [("error", _failure(exc))]
    tdist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    kind, value = payload[0]
    if kind == "error":
        _reraise_peer(0, value)
    return value


def check_all(d: Dist, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; if it raised anywhere, every rank raises (its own error, or the first
    failing rank's message as a UserError)."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    if d.enabled:
        failures: list[Any] = [None] * d.world_size
        tdist.all_gather_object(failures, _failure(error) if error is not None else None)
        if error is None:
            for rank, failure in enumerate(failures):
                if failure is not None:
                    _reraise_peer(rank, failure)
    if error is not None:
        raise error
    return result


# --------------------------------------------------------------------------------------------
# Model


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward pass sums the ranks' gradients (d/dx_r of sum_r' f_r'(sum x))."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        tdist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        tdist.all_reduce(g)
        return g


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over all ranks (identity with one process)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, on any device (torch's SyncBatchNorm: GPU only).

    Training mode: mean = sum_r sum(x_r) / n, var = sum_r sum((x_r - mean)^2) / n (biased; n = global
    count), y = (x - mean) / sqrt(var + eps) * weight + bias; two differentiable all-reduces, so the
    backward pass also sums over ranks. Running statistics as nn.BatchNorm (unbiased variance,
    ``momentum``), identical on every rank. Same parameters and buffers as the layer it replaces, so
    checkpoints and weight files do not change. Eval mode, or one process: plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        ws = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
        if not self.training or ws == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        local = torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / xf.shape[1]])])
        total = all_reduce_sum(local)
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        return y.to(x.dtype)


def _convert_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias  # the same Parameter objects
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_bn(child))
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer synchronised over the ranks (backbone and projector, as the official
    Barlow Twins code): torch's SyncBatchNorm on CUDA, ``GlobalBatchNorm`` otherwise (or everywhere
    with MEDSSL_SYNCBN=global)."""
    if device.type == "cuda" and os.environ.get("MEDSSL_SYNCBN", "torch") != "global":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_bn(module)


def wrap_ddp(net: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP around ``net`` (gradients averaged over ranks); ``net`` itself with one process.

    Buffers are not broadcast each forward: synchronised BN keeps the running statistics identical.
    """
    if not d.enabled:
        return net
    ids = [device.index] if device.type == "cuda" else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers: renamed in newer torch
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)
