"""Engine integrations: vLLM policy plugin (:mod:`eplb.integrations.vllm`).

SGLang and TensorRT-LLM take placement files instead of code: write them with
``eplb plan ... --emit sglang|trtllm`` or :func:`eplb.formats.write_placement`.
Submodules import their engine lazily, so importing this package never needs one.
"""
