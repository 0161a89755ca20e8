"""CUDA body of the expert op: picks the path from host-known facts only (T, tau, top_k, shapes, config).

- every expert selected for sure (tau == 0, or top_k >= E): no router; up to
  ``masked.fallback_max_tokens`` the masked kernel with every expert on (one Triton up launch + the
  cuBLAS down GEMM, counters on the device), above it the dense cuBLAS GEMMs;
- router: cuBLAS first layer + one Triton tail launch (``router_tail.py``: ReLU, second layer, |.|,
  row max) up to ``router.tail_max_tokens``; the tail inside the fused / masked kernels where the
  config says ``own_router`` (small routers); the torch router above; the one-launch Triton router
  for up to ``router.max_tokens`` tokens (off by default: slower on the H100, see the kernels note);
- ``choice.min_tokens`` <= T <= ``choice.max_tokens`` (off in every shipped config), the stacked layout, and a
  CUDA graph being captured: both the gemm path and the skipping path below are captured, each under a CUDA
  graph IF node, and the device picks one per replay from the executed pair count (above ``choice.fraction``
  of T x E: gemm). The host knows T, not how many experts a batch selects; eager calls keep the host rule;
- ``gemm.min_tokens`` <= T <= ``gemm.max_tokens`` and the plugin's stacked weight layout
  (``layout.py``): the dense MLP's cuBLAS GEMMs with the router's first layer stacked into the up
  GEMM, the router tail, and the selection + activation in one elementwise Triton launch
  (``expert_masked_gemm.py``; large T where selections cover nearly every expert and Triton tiles lose);
- T <= persistent max_tokens (decoding one sequence or a few): the whole layer -- router, selection,
  experts, reduction -- in one launch of one program per SM, phases separated by grid barriers
  (``expert_decode_persistent.py``);
- T <= fused max_tokens (decoding a few sequences): one fused expert kernel + a reduction; with
  T <= ``balanced.max_tokens`` (and the router outside the kernel) the balanced kernel instead, whose
  fixed grid spreads the selected experts' neurons evenly over the SMs;
- masked min_tokens <= T <= masked max_tokens (the union of independent selections is nearly every
  expert): the masked dense path, GEMM-shaped, selection applied to the hidden units;
- T <= decode max_tokens: the two-kernel decode path (streams only selected experts' weights);
- otherwise: the grouped path (FLOPs of selected token-expert pairs only).
Paths and configs are keyed by the input width d_in (x's) and the expert size; the output width
d_out = w_out.shape[2] may differ (attention projections as experts).
Path configs may carry ``by_tokens`` tiers (blocks per token count). No host synchronisation:
selection, counts and tile schedules stay on the device.
"""

import functools

import torch

from d2dmoe_kernels.configs import kernel_config, path_config, token_tier
from d2dmoe_kernels.expert_decode import decode_experts
from d2dmoe_kernels.expert_decode_balanced import balanced_decode_experts
from d2dmoe_kernels.expert_decode_fused import fused_decode_experts
from d2dmoe_kernels.expert_decode_persistent import persistent_decode_experts
from d2dmoe_kernels.expert_grouped import grouped_experts
from d2dmoe_kernels.expert_masked import masked_dense_experts
from d2dmoe_kernels.expert_masked_gemm import gemm_masked_experts
from d2dmoe_kernels.layout import stacked_up_view
from d2dmoe_kernels.reference import apply_activation, router_scores, selection_rule
from d2dmoe_kernels.router import fused_router, fused_router_fits
from d2dmoe_kernels.router_tail import router_hidden, router_tail

OWN_MAX_MAX_EXPERTS = 256  # the fused decode kernels take the row max themselves up to this many experts


def dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation):
    """All experts at once: the dense FFN on the expert weights viewed as [E*e, d_in] and [E*e, d_out]."""
    E, ES, D = w_in.shape
    h = torch.nn.functional.linear(x, w_in.reshape(E * ES, D), None if b_in is None else b_in.reshape(E * ES))
    h = apply_activation(h, activation)
    if w_up is not None:
        h = h * torch.nn.functional.linear(x, w_up.reshape(E * ES, D))
    w2 = w_out.reshape(E * ES, w_out.shape[2])
    return h @ w2 if b_out is None else torch.addmm(b_out, h, w2)  # bias in the GEMM epilogue


def route(x, router_in, router_out, tau, top_k, counters, cfg, own_max, reference="max"):
    """(scores [T, E], per-token reference [T] fp32 or None, factor): expert e runs iff
    scores >= factor * ref; ref None means the fused decode kernels take the row max themselves. The Triton
    router tails take the row max (the "max" reference), or the "sum" reference in the one-program-per-token-block
    tail; larger T and top-k take the torch router."""
    T = x.shape[0]
    if top_k == 0 and reference == "sum" and T <= cfg["router"]["tail_max_tokens"]:  # first layer + one Triton tail
        scores, ref = router_tail(router_hidden(x, router_in, cfg["router"]), router_out, cfg["router"],
                                  sum_tau=float(tau))
        return scores, ref, 1.0
    if top_k == 0 and reference != "max":
        scores = router_scores(x, router_in, router_out)
        return (scores, *selection_rule(scores, tau, 0, reference))
    if top_k == 0 and T <= cfg["router"]["max_tokens"] and fused_router_fits(router_out.shape[0], router_out.shape[1]):
        scores, rowmax = fused_router(x, router_in, router_out, counters[2:3], cfg["router"])
        return scores, rowmax, float(tau)
    if top_k == 0 and T <= cfg["router"]["tail_max_tokens"]:  # cuBLAS first layer + one Triton tail
        # own_max: the tail's expert blocks spread over programs, the fused kernel takes the row max
        scores, rowmax = router_tail(router_hidden(x, router_in, cfg["router"]), router_out, cfg["router"],
                                     rowmax=not own_max)
        return scores, rowmax, float(tau)
    scores = router_scores(x, router_in, router_out)
    if own_max:
        return scores, None, float(tau)
    return (scores, *selection_rule(scores, tau, top_k))


def capturing_graph(x):
    """The CUDA graph this stream is capturing, where the torch build can branch inside it (IF nodes); else
    None (eager, CPU, or a torch without the API)."""
    if not x.is_cuda or not conditional_nodes() or not torch.cuda.is_current_stream_capturing():
        return None
    return torch.cuda.CUDAGraph.get_currently_capturing_graph()


@functools.cache
def conditional_nodes() -> bool:
    """Whether this torch can capture CUDA graph IF nodes: the API, a CUDA (not ROCm) build, CUDA >= 12.4."""
    cuda = torch.version.cuda
    return (hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph") and torch.version.hip is None
            and cuda is not None and tuple(int(v) for v in cuda.split(".")[:2]) >= (12, 4))


_WARMED = set()  # (device, shapes, T, dtype, ...) whose two choice paths have run eagerly: their kernels are built


def warm_both_paths(key, run_gemm, run_skipping, scratch):
    """Eager calls in the choice range run the host rule's path; a graph captured later at this T holds both
    choice paths, and no Triton kernel may compile during a capture (launch parameters follow T: tiles, grouped
    chunks, the decode kernels' specialization). So the first eager call per shape and T also runs both, into scratch counters (vLLM runs
    every capture size eagerly before capturing it): two extra layer runs once per T in the choice range. The
    key holds no config: a process serves with one (a benchmark that switches configs warms per shape and T)."""
    run_gemm(scratch)
    run_skipping(scratch)
    _WARMED.add(key)


def device_chosen_experts(graph, pred, run_gemm, run_skipping, out_shape, x):
    """Both paths captured into ``graph``, each under an IF node (``pred``, then not ``pred``), writing one
    output buffer: the graph after the nodes reads fixed addresses."""
    out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    for cond, run in ((pred, run_gemm), (torch.logical_not(pred), run_skipping)):
        graph.begin_capture_to_if_node(cond)
        try:
            out.copy_(run())
        finally:
            graph.end_capture_to_conditional_node()
    return out


def executed_pairs_above(scores, ref, factor, fraction):
    """Device predicate: more than ``fraction`` of the T x E (token, expert) pairs selected (the selection
    rule: score >= factor * the token's reference). No host synchronisation."""
    T, E = scores.shape
    return (scores.float() >= factor * ref.unsqueeze(1)).sum() > int(fraction * T * E)


def skipping_experts(x, scores, ref, factor, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, masked,
                     in_masked):
    """The paths that skip unselected experts' work, on given scores (T above the fused decode range)."""
    D, ES = x.shape[1], w_in.shape[1]
    if in_masked:
        return masked_dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation, counters, masked, "scores",
                                    scores=scores, ref=ref, tau=factor)
    args = (x, scores, ref, factor, w_in, w_up, w_out, b_in, b_out, activation, counters)
    decode = path_config(cfg, "decode", D, ES)
    if x.shape[0] <= decode["max_tokens"]:
        return decode_experts(*args, decode)
    return grouped_experts(*args, path_config(cfg, "grouped", D, ES))


def selection(x, router_in, router_out, tau, top_k, counters, cfg, own_max, route_override, sharded, expert_offset,
              E, reference="max"):
    """(scores, ref, factor) the kernels select with: the router's (``route``) unless a benchmark overrides
    them; sharded, a strided view of the local experts' columns (the kernels index scores by local expert
    with the full row stride)."""
    routing = route(x, router_in, router_out, tau, top_k, counters, cfg, own_max, reference)
    scores, ref, factor = routing if route_override is None else route_override
    return (scores[:, expert_offset : expert_offset + E] if sharded else scores), ref, factor


def in_kernel_routing(route_override, tau, sharded, expert_offset, E):
    """(scores, ref, factor) for paths that run the router's tail themselves: none given (they select
    from their own tail) unless a benchmark overrides them; sharded scores as the local experts' view."""
    if route_override is None:
        return None, None, float(tau)
    sc, ref, factor = route_override
    return (sc[:, expert_offset : expert_offset + E] if sharded else sc), ref, factor


def dynamic_k_experts_triton(x, router_in, router_out, tau, top_k, w_in, w_up, w_out, b_in, b_out, activation,
                             counters, cfg=None, route_override=None, expert_offset=0, reference="max"):
    """``expert_offset``: the local experts are experts [offset, offset + E_local) of the router
    (tensor parallelism; selection still uses the reference over all experts).
    ``reference``: what tau is a fraction of (``selection_rule``); the paths that run the router's tail in
    their own kernels (fused router, own_router, persistent, gemm, choice) take the row max, so the "sum"
    reference selects as top-k does: ``route`` (the Triton tail's sum reference up to tail_max_tokens, else the
    torch router), then the kernels on its (scores, reference, factor).
    ``route_override`` (benchmarks only): (scores, ref, factor) used for selection after the router
    has run, so a benchmark pays the router's cost but controls which experts run."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    sharded = E != router_out.shape[0]
    if cfg is None:
        cfg = kernel_config(torch.cuda.get_device_name(x.device) if x.is_cuda else None)
    if f"router@d{D}" in cfg or f"router@d{D}e{ES}" in cfg:  # router keys per shape (H200: prefetch at d2048)
        cfg = {**cfg, "router": path_config(cfg, "router", D, ES)}
    x = x.contiguous()
    masked_all_t = path_config(cfg, "masked", D, ES)
    masked = token_tier(masked_all_t, T)
    if (top_k == 0 and tau == 0.0) or top_k >= router_out.shape[0]:
        if T <= masked["fallback_max_tokens"]:  # up kernel + cuBLAS down: 2 launches, counters on the device
            fb = token_tier(masked_all_t, T, "fallback_by_tokens") if "fallback_by_tokens" in masked_all_t else masked
            return masked_dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation, counters, fb, "all")
        counters[0] += T
        counters[1] += T * E
        return dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation)
    max_rule = top_k == 0 and reference == "max"  # the paths with the router's tail in their kernels take the row max
    gemm = token_tier(path_config(cfg, "gemm", D, ES), T) if "gemm" in cfg else None  # older configs: off
    fused = token_tier(path_config(cfg, "fused", D, ES), T)  # blocks per token count (H200: bigger slices at T=3)
    in_fused = T <= fused["max_tokens"]
    in_masked = not in_fused and masked["min_tokens"] <= T <= masked["max_tokens"]
    choice = token_tier(path_config(cfg, "choice", D, ES), T) if "choice" in cfg else None
    stacked = None
    if (choice is not None and gemm is not None and max_rule and choice["min_tokens"] <= T <= choice["max_tokens"]
            and not in_fused and x.is_cuda):
        stacked = stacked_up_view(w_in, w_up, router_in)
    if stacked is not None:
        graph = capturing_graph(x)
        key = (x.device.index, D, ES, E, T, x.dtype, activation, w_up is not None, b_in is not None,
               b_out is not None, router_in.shape[0])  # T, not tiers: chunks and decode kernels follow T too
        # a capture without IF nodes (older torch) keeps the host rule and warms nothing into the graph
        if graph is not None or (key not in _WARMED and not torch.cuda.is_current_stream_capturing()):
            c = counters if graph is not None else torch.zeros_like(counters)  # warm-up: scratch counters
            scores, ref, factor = selection(x, router_in, router_out, tau, 0, c, cfg, False, route_override, sharded,
                                            expert_offset, E)
            run_gemm = lambda c=c: gemm_masked_experts(  # noqa: E731
                x, stacked, router_out, factor, w_in, w_up, w_out, b_in, b_out, activation, c, gemm, cfg["router"],
                scores=scores, ref=ref, expert_offset=expert_offset)
            run_skipping = lambda c=c: skipping_experts(  # noqa: E731
                x, scores, ref, factor, w_in, w_up, w_out, b_in, b_out, activation, c, cfg, masked, in_masked)
            if graph is not None:
                return device_chosen_experts(graph, executed_pairs_above(scores, ref, factor, choice["fraction"]),
                                             run_gemm, run_skipping, (T, w_out.shape[2]), x)
            warm_both_paths(key, run_gemm, run_skipping, c)
        # eager: the host rule below
        stacked = None
    if gemm is not None and max_rule and gemm["min_tokens"] <= T <= gemm["max_tokens"]:
        stacked = stacked_up_view(w_in, w_up, router_in)
    if stacked is not None:  # up GEMM (router's first layer stacked in), router tail, select + act, down GEMM
        sc, ref, factor = in_kernel_routing(route_override, tau, sharded, expert_offset, E)
        return gemm_masked_experts(x, stacked, router_out, factor, w_in, w_up, w_out, b_in, b_out, activation,
                                   counters, gemm, cfg["router"], scores=sc, ref=ref, expert_offset=expert_offset)
    persistent = token_tier(path_config(cfg, "persistent", D, ES), T) if "persistent" in cfg else None
    if (persistent is not None and T <= persistent["max_tokens"] and max_rule and not sharded
            and E <= OWN_MAX_MAX_EXPERTS and router_in.stride() == (D, 1) and router_out.is_contiguous()
            and x.dtype == router_in.dtype):  # the whole layer in one launch (router inside, grid barriers)
        sc, ref, factor = in_kernel_routing(route_override, tau, sharded, expert_offset, E)
        return persistent_decode_experts(x, sc, ref, factor, w_in, w_up, w_out, b_in, b_out, activation, counters,
                                         persistent, router_in=router_in, router_out=router_out)
    own_router = max_rule and ((in_fused and fused.get("own_router", False)) or
                                 (in_masked and masked.get("own_router", False)))
    if own_router:  # the router's tail runs inside the expert kernel: router GEMM + 2 launches
        # full_router: the kernel computes the router's first layer too (small routers: one launch fewer)
        full = (fused if in_fused else masked).get("full_router", False)
        hid = None if full else router_hidden(x, router_in, cfg["router"])
        sc, ref, factor = in_kernel_routing(route_override, tau, sharded, expert_offset, E)
        if in_fused:
            return fused_decode_experts(x, sc, ref, factor, w_in, w_up, w_out, b_in, b_out, activation, counters,
                                        fused, hid=hid, router_out=router_out, expert_offset=expert_offset,
                                        router_in=router_in)
        return masked_dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation, counters, masked,
                                    "router" if sc is None else "router+override", scores=sc, ref=ref, tau=factor,
                                    hid=hid, router_out=router_out, expert_offset=expert_offset, router_in=router_in)
    own_max = (in_fused and max_rule and E <= OWN_MAX_MAX_EXPERTS and not sharded
               and (T > cfg["router"]["tail_max_tokens"] or fused.get("split_tail", False)))
    scores, ref, factor = selection(x, router_in, router_out, tau, top_k, counters, cfg, own_max, route_override,
                                    sharded, expert_offset, E, reference)
    if in_fused:
        own = ref is None
        balanced = path_config(cfg, "balanced", D, ES)
        if T <= balanced["max_tokens"]:
            return balanced_decode_experts(x, scores, ref, factor, w_in, w_up, w_out, b_in, b_out,
                                           activation, counters, balanced, own_max=own)
        return fused_decode_experts(x, scores, scores if own else ref, factor, w_in, w_up, w_out, b_in, b_out,
                                    activation, counters, fused, own_max=own)
    return skipping_experts(x, scores, ref, factor, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg,
                            masked, in_masked)
