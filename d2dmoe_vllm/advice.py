"""Engine settings that decide whether a D2DMoE model is faster than its dense original on a GPU.

Measured on an H200 (Gemma-2B shape, 30% executed; ``benchmarks/results/attempts/12-16``,
``serve-nvidia-h200*.json``):
- without async scheduling a batch-1 decode step waits ~1 ms on the CPU, which hides the expert
  layers' GPU savings (ITL 2.55 vs 2.95 ms sync, 1.56 vs 1.96 ms async);
- token counts above the largest captured CUDA graph (prefill chunks) run the expert op eagerly:
  ~0.3 ms of host time per layer call (about ten Triton launches), more than its GPU time up to
  ~1024 tokens; prefill of 8 x 128 tokens went from 0.37x to 1.03x dense with graphs up to 8192.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("d2dmoe_vllm")
_logged = False


def serving_advice(vllm_config) -> list[str]:
    """Hints for a CUDA engine whose settings leave D2DMoE's speed-up unused (empty when none apply)."""
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    device = getattr(device, "value", device)
    if device != "cuda" or getattr(vllm_config.model_config, "enforce_eager", False):
        return []
    hints = []
    sched, comp = vllm_config.scheduler_config, vllm_config.compilation_config
    if not getattr(sched, "async_scheduling", False):
        hints.append("async scheduling is off: a decode step then waits on the CPU (about 1 ms at batch 1 on an "
                     "H200), which hides the expert layers' savings. Fix: `vllm serve ... --async-scheduling` "
                     "(or LLM(..., async_scheduling=True))")
    sizes = getattr(comp, "cudagraph_capture_sizes", None) or []
    largest = getattr(comp, "max_cudagraph_capture_size", None) or (max(sizes) if sizes else 0)
    chunk = getattr(sched, "max_num_batched_tokens", 0) or 0
    if largest and chunk > largest:
        hints.append(f"CUDA graphs are captured up to {largest} tokens but prefill chunks reach {chunk}: larger "
                     "chunks run the expert op eagerly (about 0.3 ms of host time per layer). For prefill-heavy "
                     "traffic capture larger sizes, e.g. --compilation-config "
                     "'{\"cudagraph_capture_sizes\": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]}'")
    return hints


def log_serving_advice(vllm_config) -> None:
    """Log the hints once per process (every layer's model build calls this)."""
    global _logged
    if _logged:
        return
    _logged = True
    for hint in serving_advice(vllm_config):
        logger.warning("D2DMoE: %s", hint)
