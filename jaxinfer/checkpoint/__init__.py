from jaxinfer.checkpoint.hf import CheckpointError, load_hf, load_tokenizer, read_config, save_hf

__all__ = ["CheckpointError", "load_hf", "load_tokenizer", "read_config", "save_hf"]
