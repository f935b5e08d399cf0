"""How many Ray workers a run starts and what each asks for, from what the cluster has.

Asking for a GPU that no node has leaves Ray Data waiting forever without a word, so requests are built
from the cluster's own resources and a request that cannot fit is refused before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatterbox_cli.errors import UsageError


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    num_gpus: int  # per worker: 1 on a GPU cluster, else 0
    num_cpus: int  # per worker (Ray sets OMP_NUM_THREADS to it, so it is also torch's thread count)

    def describe(self) -> str:
        if self.num_gpus:
            return f"{self.count} Ray worker(s), one GPU each"
        return f"{self.count} Ray CPU worker(s), {self.num_cpus} CPU(s) each"


def plan_workers(nodes: list[dict[str, float]], workers: int | None, device: str) -> WorkerPlan:
    """The workers for `nodes` (each alive node's resources, as `ray.nodes()` lists them).

    GPUs present and --device not cpu: one GPU (and one CPU) per worker, as many workers as GPUs unless
    --workers says fewer. Otherwise CPU workers (--workers, default 1), each with the most CPUs that still
    lets all of them be placed."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {workers}")
    gpu_slots = sum(min(int(n.get("GPU", 0)), int(n.get("CPU", 0))) for n in nodes)
    if device != "cpu" and gpu_slots:
        count = workers or gpu_slots
        if count > gpu_slots:
            raise UsageError(
                f"--workers {count}: the Ray cluster has room for {gpu_slots} GPU worker(s) "
                "(one GPU and one CPU each); give fewer, or --device cpu for CPU workers"
            )
        return WorkerPlan(count, 1, 1)
    if device.startswith("cuda"):
        raise UsageError(f"--device {device}: the Ray cluster has no GPU; use --device auto or cpu")
    cpus = [int(n.get("CPU", 0)) for n in nodes]
    count = workers or 1
    if sum(cpus) < count:
        raise UsageError(f"--workers {count}: the Ray cluster has {sum(cpus)} CPU(s); give at most that many")
    per_worker = max(c for c in range(1, max(cpus) + 1) if sum(n // c for n in cpus) >= count)
    return WorkerPlan(count, 0, per_worker)


def items_per_batch(items: int, workers: int) -> int:
    """Items per Ray batch: several per worker call on long runs (less overhead), down to one on short
    ones, so every worker gets some and a batch redone after a crash is small."""
    return max(1, min(16, items // (4 * workers)))
