import sys, time, json
sys.path.insert(0, "src")
import torch, shardlab
from shardlab.probes import allreduce_rank_sum, noop
t=time.perf_counter(); c=shardlab.Cluster(2); cold=time.perf_counter()-t
print("devices", c.devices, "backend", c.backend, "cold", round(cold,2))
print("allreduce", c.run(allreduce_rank_sum))
ts=[]
for i in range(50):
    t=time.perf_counter(); c.run(noop); ts.append(time.perf_counter()-t)
ts.sort(); print("warm run median ms", round(ts[25]*1e3,3))
c.shutdown()
print(torch.__version__, torch.cuda.nccl.version())
