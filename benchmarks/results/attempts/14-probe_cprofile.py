"""Python-level profile (cProfile) of the D2DMoE op's host work, eager, Gemma-2B FFN shape, T = 1 and 1024."""
import cProfile, pstats, sys, io, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import importlib.util
spec = importlib.util.spec_from_file_location("probe", Path(__file__).with_name("13-probe_host.py"))
src = Path(__file__).with_name("13-probe_host.py").read_text().split("rows = []")[0]
ns = {"__file__": str(Path(__file__).with_name("13-probe_host.py"))}
exec(compile(src, "probe", "exec"), ns)
import torch
for T in (1, 1024):
    x = torch.randn(T, 2048, device="cuda").bfloat16()
    for _ in range(3):
        for l in ns["layers"]: ns["moe"](x, l)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        for l in ns["layers"]: ns["moe"](x, l)
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    print(f"==== T={T}: 90 calls"); print(s.getvalue()[:9000])
