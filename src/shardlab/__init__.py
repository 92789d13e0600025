"""shardlab: split large language models across GPUs, for real.

Real sharded computations on NCCL GPUs when present, on mock devices (one CPU process per
rank, gloo) otherwise. Start with `shardlab.launch` and `shardlab.Cluster`; the arithmetic
lives in `shardlab.memory`, `shardlab.hardware`, `shardlab.cost` and `shardlab.pipeline`.
"""

from .runtime import (  # noqa: F401
    Cluster,
    RankError,
    RankTimeout,
    backend,
    context,
    device,
    device_name,
    launch,
    rank,
    world_size,
)

__version__ = "0.1.0"
