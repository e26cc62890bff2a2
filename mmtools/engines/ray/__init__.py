"""The Ray engine: the same run on a Ray cluster, with Ray Data doing the computing."""

from mmtools.engines.ray.cluster import ENV_ADDRESS, RETRIES, RayOptions
from mmtools.engines.ray.executor import portable, run

__all__ = ["ENV_ADDRESS", "RETRIES", "RayOptions", "portable", "run"]
