"""PyTorch backend (Hugging Face Trainer). Imported only when chosen: ``clm.get_backend("pt")``."""
