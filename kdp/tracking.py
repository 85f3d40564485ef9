"""Per-epoch metrics as TensorBoard event files, beside the run's own event log:

    <run>/tensorboard/<stage>/events.out.tfevents.*      one TensorBoard run per stage

(a sweep trial's student under the trial's directory). Written by rank 0 only, one scalar per
numeric metric of each finished epoch, the epoch as the step, flushed at each epoch's end so
`tensorboard --logdir <run>/tensorboard` follows a stage as it trains. An attempt that resumes
a stage (or trains it again) starts its file with TensorBoard's purge marker at its first
epoch: TensorBoard drops the steps an earlier attempt wrote from there on, so no step is shown
twice and nothing before it is lost. With a bucket output the files are published as plain
objects at the stage's end (kdp.scheduler, kdp.distributed.loops).
"""
from __future__ import annotations

import time
from pathlib import Path

TENSORBOARD = "tensorboard"


def board_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage's TensorBoard files go."""
    return Path(run_dir) / TENSORBOARD / stage


class EpochBoard:
    """An on_epoch hook's TensorBoard half: the first finished epoch opens the stage's writer
    (its purge marker at that epoch), each finished epoch adds its metrics, the last closes it."""

    def __init__(self, run_dir: Path, stage: str, epochs: int):
        self.dir, self.epochs, self.writer = board_dir(run_dir, stage), epochs, None

    def __call__(self, epoch: int, metrics: dict) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            # a nanosecond suffix: two attempts within one second get two files, in their order
            self.writer = SummaryWriter(str(self.dir), purge_step=epoch, flush_secs=3600,
                                        filename_suffix=f".{time.time_ns()}")
        for name, value in metrics.items():
            if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, epoch)
        self.writer.flush()
        if epoch + 1 >= self.epochs:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def board_files(run_dir: Path, stage: str) -> list[Path]:
    """A stage's TensorBoard files (what a bucket output publishes)."""
    d = board_dir(run_dir, stage)
    return sorted(p for p in d.glob("events.out.tfevents.*") if p.is_file()) if d.is_dir() else []
