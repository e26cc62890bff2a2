"""The Ray engine: the same run on a Ray cluster, with Ray Data doing the computing.

`executor.RayExecutor` computes, `global_ops` sorts and groups a global step's keys,
`envelope` carries a batch and its row accounting, `cluster` joins or starts the cluster.
Importing this package loads none of them (`mmtools --help` reads the cluster options).
"""

from mmtools.engines.ray.cluster import ENV_ADDRESS, RETRIES, RayOptions

__all__ = ["ENV_ADDRESS", "RETRIES", "RayOptions"]
