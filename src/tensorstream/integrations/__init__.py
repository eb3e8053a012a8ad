"""Integrations with the rest of the Hugging Face stack (transformers' ``from_pretrained``)."""
