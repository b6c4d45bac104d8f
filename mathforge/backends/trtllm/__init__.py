"""The trtllm backend: TensorRT-LLM command lines, config files and the runner that executes them.

Modules: `versions` (what each release can do), `recipes` (what each artifact's key depends on),
`commands` (argv builders), `llmapi` (the PyTorch-backend YAML), `host` (is TensorRT-LLM here?),
`runner` (run commands, stream output), `build` (run them for an artifact and check the result).
Facts: reference/trtllm_redrafter.md. TensorRT-LLM cannot run on development machines; the builders are
pure and golden-tested, and the runner executes them on GPU workers in NVIDIA's container.
"""
