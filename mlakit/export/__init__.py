"""Export MLA models to the engines people already run.

- ``hf_deepseek``: a stock DeepSeek-V3 Hugging Face directory (transformers; vLLM and SGLang
  for the shapes their MLA backends take: ``engines``);
- ``gguf``: a ``deepseek2`` GGUF file for llama.cpp.

Both start from ``to_deepseek``, which rewrites the model into DeepSeek-V3's
function exactly (see ``hf_deepseek``'s docstring and docs/export.md).
"""

from mlakit.export.hf_deepseek import DeepseekForm, export_hf_deepseek, to_deepseek

__all__ = ["DeepseekForm", "export_hf_deepseek", "to_deepseek", "export_gguf"]


def export_gguf(*args, **kwargs):
    """See ``mlakit.export.gguf.export_gguf`` (imported lazily: it needs the ``gguf`` package)."""
    from mlakit.export.gguf import export_gguf as _export

    return _export(*args, **kwargs)
