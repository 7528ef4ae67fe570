"""Peak extra memory of vf.infonce_loss fwd+bwd (cpu backend) at N=16384, D=1536, fp32.

Run: python bench/infonce_memory_check.py (a fresh process: the resident high-water mark is
reset through /proc/self/clear_refs, so it sees every allocation, torch's and BLAS').
"""

import ctypes

import torch

import vljepa_fast as vf


def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


N, D = 16384, 1536
g = torch.Generator().manual_seed(0)
p = torch.randn(N, D, generator=g, requires_grad=True)
t = torch.randn(N, D, generator=g, requires_grad=True)
vf.infonce_loss(p[:64], t[:64], backend="cpu").backward()  # load the library, warm up
p.grad = t.grad = None
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS")
vf.infonce_loss(p, t, backend="cpu").backward()
peak = rss("VmHWM") - before
inputs = grads = 2 * N * D * 4  # the two [N, D] fp32 gradients are outputs of the step
extra = peak - grads
print(
    f"N={N} D={D} fp32: inputs {inputs / 2**20:.1f} MiB; peak growth {peak / 2**20:.1f} MiB, of "
    f"which gradients {grads / 2**20:.1f} MiB; extra {extra / 2**20:.1f} MiB = "
    f"{100 * extra / inputs:.1f}% of the inputs"
)
