"""Training-framework integrations (Lightning, Hugging Face ``transformers``), imported lazily."""
