"""Host (CPU) time vs GPU time of one D2DMoE layer call in eager mode (what vLLM runs for token counts
above its largest CUDA graph), Gemma-2B FFN shape, 30% executed; dense FFN beside it."""
import sys, time, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
import torch.nn.functional as F
import d2dmoe_kernels.op  # registers torch.ops.d2dmoe
from synthetic_gemma2b import random_router, tau_for_fraction

d, f, e = 2048, 16384, 256
E = f // e
L = 18
dev = "cuda"
g = torch.Generator().manual_seed(0)
router = random_router(d, E, g)
tau = tau_for_fraction(router, 0.3)
layers = []
for i in range(L):
    layers.append(dict(
        router_in=router["router.in_proj.weight"].to(dev, torch.bfloat16),
        router_out=router["router.out_proj.weight"].to(dev, torch.bfloat16),
        w_in=(torch.randn(E, e, d, device=dev) / d**0.5).bfloat16(), w_up=(torch.randn(E, e, d, device=dev) / d**0.5).bfloat16(),
        w_out=(torch.randn(E, e, d, device=dev) / f**0.5).bfloat16(),
        wgu=(torch.randn(2 * f, d, device=dev) / d**0.5).bfloat16(), wd=(torch.randn(d, f, device=dev) / f**0.5).bfloat16()))
counters = torch.zeros(3, dtype=torch.int64, device=dev)

def moe(x, l):
    return torch.ops.d2dmoe.dynamic_k_experts(x, l["router_in"], l["router_out"], tau, 0, 0, l["w_in"], l["w_up"],
                                             l["w_out"], None, None, "gelu_tanh", counters)

def dense(x, l):
    gu = F.linear(x, l["wgu"])
    a, b = gu.chunk(2, -1)
    return F.linear(F.gelu(a, approximate="tanh") * b, l["wd"])

rows = []
for T in [1, 8, 64, 128, 512, 1024, 2048, 8192]:
    x = torch.randn(T, d, device=dev).bfloat16()
    for name, fn in (("dense", dense), ("d2dmoe", moe)):
        for _ in range(3):
            for l in layers: fn(x, l)
        torch.cuda.synchronize()
        # host: issue time of 18 calls while the GPU is kept busy ahead (a big matmul queued first)
        big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(30): big @ big
        t0 = time.perf_counter()
        for l in layers: fn(x, l)
        host = (time.perf_counter() - t0) / L * 1e6
        torch.cuda.synchronize()
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for l in layers: fn(x, l)
        t.record(); torch.cuda.synchronize()
        gpu_plus = s.elapsed_time(t) * 1e3 / L
        rows.append({"T": T, "path": name, "host_us_per_layer": host, "eager_us_per_layer": gpu_plus})
        print(rows[-1], flush=True)
    if T in (1024, 8192):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for l in layers[:4]: moe(x, l)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
import os
Path(os.environ.get("OUT", "/tmp")).joinpath("13-probe-host.json").write_text(json.dumps(rows, indent=1))
