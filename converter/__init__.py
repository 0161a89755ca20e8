"""d2dmoe_converter: dense Hugging Face checkpoint -> D2DMoE checkpoint (folder ``converter/``).

Import name ``d2dmoe_converter``; console script ``d2dmoe-convert``.
"""

__all__ = ["ConvertOptions", "convert"]


def __getattr__(name):  # lazy: ``python -m d2dmoe_converter.<module>`` must not import the whole pipeline first
    if name in __all__:
        from d2dmoe_converter import convert as _convert

        return getattr(_convert, name)
    raise AttributeError(name)
