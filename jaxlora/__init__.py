"""jaxlora: the core library of multi-tenant LoRA serving and training on JAX.

Model, checkpoint and tokenizer loading, LoRA math, the adapter store and the generation engine.
Nothing in this package imports Ray; the Ray layers (`serve_app`, `training`) sit on top of it.
"""
