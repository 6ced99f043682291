"""Engine integrations: the vLLM policy plugin (:mod:`eplb.integrations.vllm`), the
SGLang runtime plugin and launcher (:mod:`eplb.integrations.sglang`), and the EP ranks'
agreement on one plan (:mod:`eplb.integrations.agreement`).

SGLang's start-up placement and TensorRT-LLM take placement files: write them with
``eplb plan ... --emit sglang|trtllm`` or :func:`eplb.formats.write_placement`.
Submodules import their engine lazily, so importing this package never needs one.
"""
