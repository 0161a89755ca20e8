"""d2dmoe_vllm: serve Dense-to-Dynamic-k MoE checkpoints with vLLM.

``register()`` is the ``vllm.general_plugins`` entry point; it registers the D2DMoE architectures
lazily by "module:Class" string, so importing the plugin does not import the model files.
"""

from d2dmoe_vllm.config import ARCHITECTURES, CheckpointError, D2DMoEConfig


def register() -> None:
    from vllm import ModelRegistry

    for arch, (_, target) in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)


__all__ = ["ARCHITECTURES", "CheckpointError", "D2DMoEConfig", "register"]
