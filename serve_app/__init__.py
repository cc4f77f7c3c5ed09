"""Ray Serve layer: the OpenAI-compatible ingress, the tokenizer and LoRA model deployments, and
`build_app(args)`. A thin shim over `jaxlora`; everything testable without Ray lives there."""
