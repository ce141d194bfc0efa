"""The per-device memory plan of `peftkit train --fsdp` over N GPUs (`peftkit estimate --gpus N
--fsdp`), from the one-device plan (`memory.Plan`) and the parameter census.

FSDP2 as `peftkit.train.fsdp` applies it: one unit per decoder layer, the rest (embeddings, final
norm, output head) in the root unit, FULL_SHARD (weights freed after each layer's forward).
Per device:
- shards: weights, gradients and optimizer states / N (rounded up); in CPU memory instead with
  `--fsdp-cpu-offload`;
- gathered weights: the root unit's (unsharded from the forward to the end of backward) and two
  layers' (the one computing and the next one, prefetched);
- gathered gradients: the same units' trainable gradients, whole until their reduce-scatter;
  they replace the one-device plan's "all gradients" in its backward moment;
- activations, the loss, QLoRA's dequantized weight: as on one device at the per-device batch.
Not counted: communication buffers beyond the gathered units, the CUDA context, fragmentation.
"""

from __future__ import annotations

import dataclasses
import re

from .memory import Plan, Settings, weight_bytes

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ShardedPlan:
    gpus: int
    cpu_offload: bool
    shards: int  # this device's part of weights + gradients + optimizer states
    gathered_weights: int
    gathered_gradients: int
    peak_moment: int  # activations, loss, dequantized weight and gathered gradients at the peak

    @property
    def gpu_total(self) -> int:
        return (0 if self.cpu_offload else self.shards) + self.gathered_weights + self.peak_moment

    @property
    def cpu_total(self) -> int:
        """Bytes each process holds in CPU memory for the model (offloaded shards)."""
        return self.shards if self.cpu_offload else 0


def sharded_plan(census, plan: Plan, settings: Settings, gpus: int, cpu_offload: bool,
                 method_full: bool) -> ShardedPlan:
    """Split `plan` (one device) over `gpus` devices (module docstring)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    units: dict[str | int, list[int]] = {}  # unit -> [weight bytes, trainable gradient bytes]
    for t in census.tensors:
        m = _LAYER.search(t.name)
        unit = units.setdefault(int(m.group(1)) if m else "root", [0, 0])
        size = weight_bytes(t, settings, method_full)
        unit[0] += size
        unit[1] += size if t.trainable else 0
    root = units.pop("root", [0, 0])
    layer = [max((u[i] for u in units.values()), default=0) for i in (0, 1)]
    state = plan.weight_bytes + plan.gradients + plan.optimizer
    gathered_grads = root[1] + 2 * layer[1]
    a = plan.activations
    kept = a.fixed + (a.checkpoints if plan.checkpointing else 0)
    start = (kept if plan.checkpointing else a.plain) + plan.logits
    backward = kept + a.largest_layer + gathered_grads + plan.dequant
    return ShardedPlan(gpus, cpu_offload, -(-state // gpus), root[0] + 2 * layer[0],
                       gathered_grads, max(start, backward))
