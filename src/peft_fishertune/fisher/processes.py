"""Process view of an estimate: rank, world size and sum-reduction (accelerate or torch.distributed)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Ranks:
    """Rank/world size and sum-reduction, from an `accelerate.Accelerator` or torch.distributed."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        if accelerator is not None:
            self.world_size = int(accelerator.num_processes)
            self.rank = int(accelerator.process_index)
            self.is_main = bool(accelerator.is_main_process)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size()
            self.rank = torch.distributed.get_rank()
            self.is_main = self.rank == 0
        else:
            self.world_size, self.rank, self.is_main = 1, 0, True

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """In-place all-reduce (sum) of each tensor across processes; no-op on one process."""
        if self.world_size == 1:
            return
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)

    def sum_scalars(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


