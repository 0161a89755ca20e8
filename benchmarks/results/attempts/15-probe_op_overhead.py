"""Host time per call of the D2DMoE layer: torch.library.custom_op vs a directly registered op
(torch.library.Library define + CUDA impl, as vLLM's direct_register_custom_op) vs the Triton body
called directly, Gemma-2B FFN shape, 30% executed, T = 1 and 1024."""
import sys, time, json, os
from pathlib import Path
src = Path(__file__).with_name("13-probe_host.py").read_text().split("rows = []")[0]
ns = {"__file__": str(Path(__file__).with_name("13-probe_host.py"))}
exec(compile(src, "probe", "exec"), ns)
import torch
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton

lib = torch.library.Library("d2dmoe_probe", "DEF")
lib.define("dyn(Tensor x, Tensor router_in, Tensor router_out, float tau, int top_k, int expert_offset, Tensor w_in, "
           "Tensor? w_up, Tensor w_out, Tensor? b_in, Tensor? b_out, str activation, Tensor(a!) counters) -> Tensor")
def body(x, router_in, router_out, tau, top_k, expert_offset, w_in, w_up, w_out, b_in, b_out, activation, counters):
    return dynamic_k_experts_triton(x, router_in, router_out, tau, top_k, w_in, w_up, w_out, b_in, b_out, activation,
                                    counters, expert_offset=expert_offset)
lib.impl("dyn", body, "CUDA")
lib2 = torch.library.Library("d2dmoe_probe2", "DEF")
lib2.define("noop(Tensor x, Tensor(a!) counters) -> Tensor")
lib2.impl("noop", lambda x, c: x, "CUDA")
@torch.library.custom_op("d2dmoe_probe3::noop", mutates_args=("counters",))
def noop3(x: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)

L, layers, tau, counters = ns["L"], ns["layers"], ns["tau"], ns["counters"]
def args(x, l):
    return (x, l["router_in"], l["router_out"], tau, 0, 0, l["w_in"], l["w_up"], l["w_out"], None, None, "gelu_tanh", counters)
variants = {
    "custom_op": lambda x, l: torch.ops.d2dmoe.dynamic_k_experts(*args(x, l)),
    "direct_op": lambda x, l: torch.ops.d2dmoe_probe.dyn(*args(x, l)),
    "body_only": lambda x, l: body(*args(x, l)),
    "noop_direct": lambda x, l: torch.ops.d2dmoe_probe2.noop(x, counters),
    "noop_custom_op": lambda x, l: torch.ops.d2dmoe_probe3.noop(x, counters),
}
rows = []
for T in (1, 1024):
    x = torch.randn(T, 2048, device="cuda").bfloat16()
    for name, fn in variants.items():
        for _ in range(3):
            for l in layers: fn(x, l)
        torch.cuda.synchronize()
        best = 1e9
        for rep in range(5):
            big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            for _ in range(40): big @ big   # GPU busy: host time is pure issue time
            t0 = time.perf_counter()
            for l in layers: fn(x, l)
            best = min(best, (time.perf_counter() - t0) / L * 1e6)
            torch.cuda.synchronize()
        rows.append({"T": T, "variant": name, "host_us_per_call": best}); print(rows[-1], flush=True)
# triton launch cost alone: the router tail kernel launched directly
from d2dmoe_kernels.router_tail import router_hidden, router_tail
from d2dmoe_kernels.configs import kernel_config
cfg = kernel_config(torch.cuda.get_device_name())
x = torch.randn(1, 2048, device="cuda").bfloat16(); l = layers[0]
hid = router_hidden(x, l["router_in"])
for _ in range(5): router_tail(hid, l["router_out"], cfg["router"], rowmax=True)
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(200): router_tail(hid, l["router_out"], cfg["router"], rowmax=True)
rows.append({"T": 1, "variant": "router_tail wrapper (1 triton launch)", "host_us_per_call": (time.perf_counter() - t0) / 200 * 1e6})
print(rows[-1])
Path(os.environ.get("OUT", "/tmp")).joinpath("15-probe-op-overhead.json").write_text(json.dumps(rows, indent=1))
