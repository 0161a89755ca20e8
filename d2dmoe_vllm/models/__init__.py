"""vLLM model skeletons: the base model's layers from vLLM, the FFN replaced by ``DynamicKMLP``."""
