"""Launched by tests/test_fisher_distributed.py: DR-FIM on 1 or 2 processes, results saved by rank 0.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/dist_fisher.py OUT.pt
    python tests/scripts/dist_fisher.py OUT.pt          (the 1-process reference)

Data: 8 batches. With W processes, rank r takes batches r, r+W, ... (accelerate's
interleaved sharding). Empirical: one batch per step. Variational: one batch per step
and process; the 1-process reference takes W = 2 micro-batches per step.
"""

import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from peft_fishertune.fisher import EmpiricalFisherEstimator, VariationalFisherEstimator


class Softmax2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, pixel_values, labels):
        return {"loss": F.cross_entropy(self.mix(torch.tanh(self.conv(pixel_values))), labels)}


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Softmax2d()
    g = torch.Generator().manual_seed(1)
    data = [{"pixel_values": torch.randn(3, 3, 6, 6, generator=g) + 0.5,
             "labels": torch.randint(0, 4, (3, 6, 6), generator=g)} for _ in range(8)]
    world, rank = acc.num_processes, acc.process_index
    params = dict(model.named_parameters())
    results = {}
    for mode in ("per_sample", "batch"):
        est = EmpiricalFisherEstimator(model, params=params, accelerator=acc, mode=mode, seed=5)
        for b in data[rank::world]:
            est.step(b)
        results[f"empirical/{mode}"] = est.result()
    for method in ("natural", "reparam"):
        est = VariationalFisherEstimator(model, params=params, accelerator=acc, method=method, seed=5,
                                         data_scale=50.0, lr=0.1, mode="per_sample")
        steps = len(data) // 2
        for s in range(steps):
            if world == 2:
                est.step(data[2 * s + rank])
            else:
                est.step([data[2 * s], data[2 * s + 1]])
        results[f"variational/{method}"] = est.result()
    if acc.is_main_process:
        torch.save({k: {"scores": r.scores, "fisher_x": r.fisher_x, "delta_f": r.delta_f, "w": r.w,
                        "num_samples": r.num_samples, "world": world} for k, r in results.items()}, out_path)
    acc.wait_for_everyone()
    # tear the gloo process group down before interpreter exit: without it a rank was seen aborting at exit
    # ("terminate called without an active exception", SIGABRT) once in a CI run, after the work was done
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
