"""LoRA training (SFT and DPO with JAX + Optax) and its thin Ray task/job entry. Uses the core
library's model and LoRA code; only the entry module imports Ray."""
