"""The Ray layer: the core's stage graph run on a cluster.

Only this subpackage imports Ray, and only its `executor`, `loops` and `sweep` modules do:
`config` (ScaleConfig and the cluster flags) is importable without Ray. `executor` places
`kdp.scheduler`'s stages: Ray Train runs (training stages), Ray tasks (the training AEs and
evaluation shards) and driver-side work (JPEG), starting each when its inputs exist and the
cluster has room; `loops` is what runs inside the workers; `sweep` drives Ray Tune.
"""
