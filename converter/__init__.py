"""d2dmoe_converter: dense Hugging Face checkpoint -> D2DMoE checkpoint (folder ``converter/``).

Import name ``d2dmoe_converter``; console script ``d2dmoe-convert``; Python API
``from d2dmoe_converter.convert import ConvertOptions, convert`` (the function shares its module's
name, so it is not re-exported here).
"""
