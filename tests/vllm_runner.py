"""Runs vLLM (the real engine, CPU backend) in a fresh process on a JSON spec; writes JSON results.

Each engine gets its own process so tests never share vLLM's global state.
spec: {"model", "llm_kwargs", "prompts", "max_tokens", "logprobs", "mode": "batch"|"each"|"both",
       "report": bool (also: every worker's stacked-layout flags per expert layer)}
"""

import json
import sys


def generate(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [
        {"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
         "logprobs": [step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
        for o in outs
    ]


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    from d2dmoe_vllm.stats import engine_compute_report, reset_engine_counters, stacked_layouts

    kwargs = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    kwargs.update(spec.get("llm_kwargs", {}))
    try:
        llm = LLM(model=spec["model"], **kwargs)
    except Exception as err:  # reported to the test, which checks the message
        json.dump({"error": f"{type(err).__name__}: {err}"}, open(out_path, "w"))
        return
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=1, ignore_eos=True)
    prompts = spec["prompts"]
    result = {}
    if spec.get("report"):
        reset_engine_counters(llm)
    mode = spec.get("mode", "batch")
    if mode in ("batch", "both"):
        result["batch"] = generate(llm, prompts, params)
    if spec.get("report"):
        result["report"] = engine_compute_report(llm)
        result["stacked"] = llm.apply_model(stacked_layouts)
    if mode in ("each", "both"):
        result["each"] = [generate(llm, [p], params)[0] for p in prompts]
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
