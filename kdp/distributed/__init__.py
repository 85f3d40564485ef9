"""The Ray layer: the core's stages as Ray Train trainers, Ray tasks and one job.

Only this subpackage imports Ray. Worker loops (`loops`) are the core's step functions plus
the Ray lines (device, DDP, sharded batches, report with a checkpoint); `pipeline` runs
the stages on a cluster: classifier -> AEs -> both teachers at once -> students at once ->
sharded evaluation -> parquet.
"""
from kdp.distributed.pipeline import run_distributed

__all__ = ["run_distributed"]
