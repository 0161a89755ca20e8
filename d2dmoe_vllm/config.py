"""The ``d2dmoe`` block of a checkpoint's config.json, parsed and validated into a frozen dataclass.

Every error names the field, what was found and how to fix it. Deployment-time overrides use flat
keys (``d2dmoe_tau``, ``d2dmoe_layer_tau``, ``d2dmoe_top_k``) so they pass through vLLM's
``hf_overrides`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from d2dmoe_kernels.reference import ACTIVATIONS, REFERENCES

FORMAT_VERSION = 1
TAU_OVERRIDE_KEY = "d2dmoe_tau"
LAYER_TAU_OVERRIDE_KEY = "d2dmoe_layer_tau"
TOP_K_OVERRIDE_KEY = "d2dmoe_top_k"
# Attention projections that may be expert layers (``expert_modules``), per family: name -> the
# attention module's attribute prefix. Each is a 2-layer ReLU MLP split into experts (METHOD step 5).
PROJECTIONS = {"gpt2": ("attn.", ("c_attn", "c_proj")),
               "gemma": ("self_attn.", ("q_proj", "k_proj", "v_proj", "o_proj"))}
PROJECTION_ACTIVATION = "relu"


def projection_family(model_type: str) -> str:
    return "gpt2" if model_type == "gpt2" else "gemma"


def projection_dims(hf: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Input and output width of each attention projection of a base config."""
    if hf.get("model_type") == "gpt2":
        d = hf.get("n_embd") or hf.get("hidden_size")
        return {"c_attn": (d, 3 * d), "c_proj": (d, d)}
    d, hd = hf.get("hidden_size"), hf.get("head_dim") or hf.get("hidden_size") // hf.get("num_attention_heads")
    q, kv = hf.get("num_attention_heads") * hd, hf.get("num_key_value_heads", hf.get("num_attention_heads")) * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}


@dataclass(frozen=True)
class ProjectionExperts:
    """One attention projection run as experts: ``d_in -> hidden (ReLU, split into experts) -> d_out``,
    with biases, routed like an FFN with the checkpoint's tau and router width."""
    name: str
    d_in: int
    d_out: int
    hidden: int
    num_experts: tuple[int, ...]    # per layer
    expert_size: tuple[int, ...]    # per layer

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "num_experts": list(self.num_experts), "expert_size": list(self.expert_size)}

# D2DMoE architecture name -> (base model_type, "module:Class" for lazy registration).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "D2DMoEGPT2LMHeadModel": ("gpt2", "d2dmoe_vllm.models.gpt2:D2DMoEGPT2LMHeadModel"),
    "D2DMoEGemmaForCausalLM": ("gemma", "d2dmoe_vllm.models.gemma:D2DMoEGemmaForCausalLM"),
    "D2DMoEGemma2ForCausalLM": ("gemma2", "d2dmoe_vllm.models.gemma:D2DMoEGemma2ForCausalLM"),
    "D2DMoEGemma3ForCausalLM": ("gemma3_text", "d2dmoe_vllm.models.gemma:D2DMoEGemma3ForCausalLM"),
}
GATED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array"}


class CheckpointError(ValueError):
    """A D2DMoE checkpoint or its configuration is malformed; the message says what to fix."""


def _fail(field: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"D2DMoE checkpoint: {field}: {problem}. Fix: {fix}")


def valid_tau(tau: Any) -> bool:
    """tau is a fraction of the largest router score: a number in [0, 1] (0 runs every expert)."""
    return not isinstance(tau, bool) and isinstance(tau, (int, float)) and 0.0 <= float(tau) <= 1.0


def check_tau(tau: Any, field: str = "d2dmoe.tau") -> float:
    if not valid_tau(tau):
        raise _fail(field, f"{tau!r} is not a number in [0, 1]",
                    "use 0 to run every expert, 1 to run only the highest-scoring one, or a value between")
    return float(tau)


def check_layer_tau(vals: Any, n_layers: int, field: str = "d2dmoe.layer_tau") -> tuple[float, ...]:
    """Per-layer FFN thresholds: one tau in [0, 1] per transformer layer."""
    if not isinstance(vals, (list, tuple)) or len(vals) != n_layers or not all(valid_tau(t) for t in vals):
        raise _fail(field, f"needs {n_layers} numbers in [0, 1] (one tau per layer's FFN), got {vals!r}",
                    "write one tau per transformer layer, or leave the key out to use d2dmoe.tau everywhere")
    return tuple(float(t) for t in vals)


@dataclass(frozen=True)
class D2DMoEConfig:
    format_version: int
    tau: float
    top_k: int                      # 0: dynamic-k (tau); > 0: fixed top-k (MoEfication baseline)
    activation: str
    gated: bool
    expert_modules: tuple[str, ...]
    d_ff: int
    num_experts: tuple[int, ...]    # per layer
    expert_size: tuple[int, ...]    # per layer
    router_width: int
    projections: tuple[ProjectionExperts, ...] = ()   # attention projections run as experts (may be none)
    layer_tau: tuple[float, ...] = ()   # per-layer FFN tau (calibrated per layer); empty: ``tau`` everywhere
    reference: str = "max"              # what tau is a fraction of: the top router score (the paper's) or their sum

    def mlp_tau(self, layer: int) -> float:
        """The FFN threshold of ``layer`` (attention-projection experts always use ``tau``)."""
        return self.layer_tau[layer] if self.layer_tau else self.tau

    def describe_tau(self) -> str:
        if not self.layer_tau:
            return f"tau = {self.tau:.4g}"
        per = f"tau per layer {min(self.layer_tau):.4g}..{max(self.layer_tau):.4g}"
        return per + (f" (attention experts {self.tau:.4g})" if self.projections else "")

    def projection(self, name: str) -> ProjectionExperts | None:
        return next((p for p in self.projections if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "tau": self.tau,
            "top_k": self.top_k,
            "activation": self.activation,
            "gated": self.gated,
            "expert_modules": list(self.expert_modules),
            "d_ff": self.d_ff,
            "num_experts": list(self.num_experts),
            "expert_size": list(self.expert_size),
            "router_width": self.router_width,
        }
        if self.layer_tau:
            out["layer_tau"] = list(self.layer_tau)
        if self.reference != "max":   # absent: the paper's rule (checkpoints from before read the same)
            out["reference"] = self.reference
        if self.projections:
            out["projection_experts"] = {p.name: p.to_dict() for p in self.projections}
        return out

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "D2DMoEConfig":
        """Parse and validate from a config.json dict (deployment overrides applied)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if len(archs) != 1 or not known:
            raise _fail("architectures", f"{archs!r} names no D2DMoE architecture",
                        f"set it to one of {sorted(ARCHITECTURES)} (convert the dense model with d2dmoe-convert)")
        want_type = ARCHITECTURES[known[0]][0]
        if model_type != want_type:
            raise _fail("model_type", f"{model_type!r} does not match architecture {known[0]}",
                        f"keep the base model_type {want_type!r}")
        block = hf.get("d2dmoe")
        if not isinstance(block, Mapping):
            raise _fail("d2dmoe", "missing or not an object", "re-export the checkpoint with d2dmoe-convert")

        def need(key: str, kind: type) -> Any:
            if key not in block:
                raise _fail(f"d2dmoe.{key}", "missing", "re-export the checkpoint with d2dmoe-convert")
            val = block[key]
            if isinstance(val, bool) and kind is not bool or not isinstance(val, kind):
                raise _fail(f"d2dmoe.{key}", f"{val!r} is not a JSON {_JSON_TYPES[kind]}",
                            f"write a {_JSON_TYPES[kind]} (see docs/checkpoint-format.md)")
            return val

        version = need("format_version", int)
        if version != FORMAT_VERSION:
            raise _fail("d2dmoe.format_version", f"{version} is not supported (this plugin reads {FORMAT_VERSION})",
                        "upgrade d2dmoe-vllm or re-export the checkpoint")
        n_layers = hf.get("num_hidden_layers", hf.get("n_layer"))
        # A deployment tau replaces the checkpoint's thresholds, per-layer ones included: one tau everywhere.
        if TAU_OVERRIDE_KEY in hf:
            tau, layer_tau = check_tau(hf[TAU_OVERRIDE_KEY], TAU_OVERRIDE_KEY), ()
        else:
            tau = check_tau(block["tau"] if "tau" in block else need("tau", float))
            layer_tau = check_layer_tau(block["layer_tau"], n_layers) if "layer_tau" in block else ()
        if LAYER_TAU_OVERRIDE_KEY in hf:
            layer_tau = check_layer_tau(hf[LAYER_TAU_OVERRIDE_KEY], n_layers, LAYER_TAU_OVERRIDE_KEY)
        top_k = hf.get(TOP_K_OVERRIDE_KEY, block.get("top_k", 0))
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise _fail("d2dmoe.top_k", f"{top_k!r} is not an integer >= 0", "use 0 for dynamic-k or k > 0 for top-k")
        reference = block.get("reference", "max")
        if reference not in REFERENCES:
            raise _fail("d2dmoe.reference", f"{reference!r} is unknown",
                        f"use one of {list(REFERENCES)} (or leave it out: max), as d2dmoe-convert --reference writes it")
        activation = need("activation", str)
        if activation not in ACTIVATIONS:
            raise _fail("d2dmoe.activation", f"{activation!r} is unknown", f"use one of {list(ACTIVATIONS)}")
        gated = need("gated", bool)
        if gated != (model_type in GATED_MODEL_TYPES):
            raise _fail("d2dmoe.gated", f"{gated} is wrong for model_type {model_type!r}",
                        f"set it to {model_type in GATED_MODEL_TYPES}")
        modules = tuple(need("expert_modules", list))
        allowed = ["mlp", *PROJECTIONS[projection_family(model_type)][1]]
        bad = [m for m in modules if m not in allowed] or ([] if "mlp" in modules else ["(no mlp)"])
        if bad:
            raise _fail("d2dmoe.expert_modules", f"{bad} not supported for {model_type}",
                        f"list \"mlp\" plus any subset of {allowed[1:]} (a subset of {allowed})")
        d_ff = need("d_ff", int)
        if model_type == "gpt2":
            base_d_ff = hf.get("n_inner") or 4 * hf.get("n_embd", 0)
        else:
            base_d_ff = hf.get("intermediate_size")
        if d_ff <= 0 or d_ff != base_d_ff:
            raise _fail("d2dmoe.d_ff", f"{d_ff} does not match the model's FFN width {base_d_ff}",
                        "set it to the dense model's intermediate size")
        per_layer = {}
        for key in ("num_experts", "expert_size"):
            vals = need(key, list)
            if len(vals) != n_layers or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
                raise _fail(f"d2dmoe.{key}", f"needs {n_layers} positive integers (one per layer), got {vals!r}",
                            "write one value per transformer layer")
            per_layer[key] = tuple(vals)
        for i, (n, size) in enumerate(zip(per_layer["num_experts"], per_layer["expert_size"])):
            if d_ff % size or n * size != d_ff:
                raise _fail(f"d2dmoe.expert_size[{i}]", f"{n} experts of {size} neurons do not tile d_ff = {d_ff}",
                            "choose an expert size that divides d_ff and num_experts = d_ff / expert_size")
        router_width = need("router_width", int)
        if router_width <= 0:
            raise _fail("d2dmoe.router_width", f"{router_width} is not positive", "use the trained router's hidden width")
        projections = _parse_projections(hf, block, [m for m in modules if m != "mlp"], n_layers)
        return cls(version, tau, top_k, activation, gated, modules, d_ff,
                   per_layer["num_experts"], per_layer["expert_size"], router_width, projections, layer_tau, reference)


def partial_qkv(names) -> list[str]:
    """The q/k/v projections among ``names`` when some but not all three are there (an error: vLLM
    runs q, k and v as one fused projection, so they become experts together); [] otherwise."""
    qkv = sorted({"q_proj", "k_proj", "v_proj"} & set(names))
    return qkv if 0 < len(qkv) < 3 else []


def _parse_projections(hf: Mapping[str, Any], block: Mapping[str, Any], names: list[str],
                       n_layers: int) -> tuple[ProjectionExperts, ...]:
    """``d2dmoe.projection_experts``: one entry per projection listed in ``expert_modules``."""
    qkv = partial_qkv(names)
    if qkv:
        raise _fail("d2dmoe.expert_modules", f"lists {qkv} but not all of q_proj, k_proj, v_proj",
                    "convert q, k and v together (vLLM runs them as one fused projection)")
    table = block.get("projection_experts", {})
    if not isinstance(table, Mapping) or set(table) != set(names):
        raise _fail("d2dmoe.projection_experts", f"has entries {sorted(table) if isinstance(table, Mapping) else table!r} "
                    f"but expert_modules lists projections {sorted(names)}",
                    "give one {hidden, num_experts, expert_size} entry per projection in expert_modules")
    dims, out = projection_dims(hf), []
    for name in names:
        entry, field = table[name], f"d2dmoe.projection_experts.{name}"
        if not isinstance(entry, Mapping):
            raise _fail(field, f"{entry!r} is not an object", "write {hidden, num_experts, expert_size}")
        hidden = entry.get("hidden")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
            raise _fail(f"{field}.hidden", f"{hidden!r} is not a positive integer", "write the MLP's hidden width")
        per_layer = []
        for key in ("num_experts", "expert_size"):
            vals = entry.get(key)
            if (not isinstance(vals, list) or len(vals) != n_layers
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals)):
                raise _fail(f"{field}.{key}", f"needs {n_layers} positive integers (one per layer), got {vals!r}",
                            "write one value per transformer layer")
            per_layer.append(tuple(vals))
        for i, (n, size) in enumerate(zip(*per_layer)):
            if n * size != hidden:
                raise _fail(f"{field}.expert_size[{i}]", f"{n} experts of {size} neurons do not tile hidden = {hidden}",
                            "choose num_experts x expert_size = hidden")
        out.append(ProjectionExperts(name, *dims[name], hidden, *per_layer))
    return tuple(out)


def d2dmoe_config_from_vllm(hf_config: Any) -> D2DMoEConfig:
    """Parse from the transformers config object vLLM hands a model (overrides already merged in)."""
    return D2DMoEConfig.from_hf(hf_config.to_dict())
