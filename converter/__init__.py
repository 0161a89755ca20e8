"""d2dmoe_converter: dense Hugging Face checkpoint -> D2DMoE checkpoint (folder ``converter/``).

Import name ``d2dmoe_converter``; console script ``d2dmoe-convert``.
"""

from d2dmoe_converter.convert import ConvertOptions, convert

__all__ = ["ConvertOptions", "convert"]
