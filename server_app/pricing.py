"""What one planned task costs its device: model size, training FLOPs, predicted peak memory, device time.

The round loop records it for every task it sent (`server_app.server_app.client_record`) and the
planner (`server_app.plan`) predicts it before anything trains. Both call `price_task`, so a plan and
the run it predicts price a task with the same cost-model routines (fl_app.cost).
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_app.cost import compute_time_s, job_train_flops, transfer_time_s
from fl_app.job import Job
from fl_app.units import MIB
from server_app.strategies.base import Device, Federation, TrainTask


@dataclass(frozen=True)
class TaskPrice:
    """One task on one device, priced by the cost model."""

    model_params: int
    model_size_mb: float  # parameters and buffers, fp32, MB = 2^20 bytes
    train_flops_per_sample: float  # forward + backward of the trained part
    train_flops: float  # the whole job: training, distillation on the public slice, public logits
    predicted_peak_memory_mb: float  # MB = 2^20 bytes, at the job's batch size (teacher included)
    fits_memory: bool  # predicted peak within the device's memory budget
    compute_s: float  # train_flops at the device's sustained GFLOPS
    transfer_s: float  # bytes down and up at the device's link rates

    @property
    def device_time_s(self) -> float:
        """Emulated seconds on the device: compute plus transfers (fl_app.cost.device_time_s)."""
        return self.compute_s + self.transfer_s


def planned_examples(device: Device, job: Job) -> int:
    """Examples a job trains on when it runs to its end: the node's data times the job's epochs."""
    return device.num_examples * job.train.epochs


def price_task(federation: Federation, device: Device, task: TrainTask, examples: int, bytes_down: int,
               bytes_up: int) -> TaskPrice:
    """Price `task` on `device`: `examples` private samples trained on (epochs included), and the
    message's `bytes_down` / the reply's `bytes_up` (exact serialized sizes) over its links.

    FLOPs count training on `examples`, distilling soft labels on the public slice when the task
    carries them (REFT), and the forward passes of public logits when the job returns them."""
    job = task.job
    cost = federation.job_cost(job)
    public = federation.config.public_size
    flops = job_train_flops(cost, examples,
                            distilled_examples=job.distill_epochs * public if "soft-labels" in task.extra else 0,
                            predicted_examples=public if job.returns == "logits" else 0)
    peak = federation.job_peak_memory_mb(job)
    return TaskPrice(cost.params, cost.state_bytes / MIB, cost.train_flops_per_sample, flops, peak,
                     peak <= device.profile.memory_mb, compute_time_s(device.profile, flops),
                     transfer_time_s(device.profile, bytes_down, bytes_up))
