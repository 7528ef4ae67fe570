"""Interleaved timing of InfoNCE fwd+bwd on CPU: eager reference vs vf cpu, N=8192, D=1536 fp32."""

import statistics
import time

import torch

import vljepa_fast as vf
from vljepa_fast import reference

torch.manual_seed(0)
N, D = 8192, 1536
a = torch.randn(N, D, requires_grad=True)
b = torch.randn(N, D, requires_grad=True)


def run(backend):
    a.grad = b.grad = None
    t = time.perf_counter()
    if backend:
        loss = vf.infonce_loss(a, b, temperature=0.07, backend=backend)
    else:
        loss = reference.infonce_loss(a, b, temperature=0.07)
    loss.backward()
    return time.perf_counter() - t


run("cpu")  # warm-up
run(None)
times = {"cpu": [], "eager": []}
for _ in range(5):
    times["cpu"].append(run("cpu"))
    times["eager"].append(run(None))
for k, v in times.items():
    print(k, "median", round(statistics.median(v), 3), "all", [round(x, 2) for x in v])
ratio = statistics.median(times["cpu"]) / statistics.median(times["eager"])
print("vf cpu / eager (median):", round(ratio, 3))
print("torch", torch.__version__, "threads", torch.get_num_threads())
