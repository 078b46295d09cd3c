"""GQA-family (MHA/GQA/MQA) -> MLA conversion without training: calibrate, pick the
shared RoPE key, factorise NoPE keys and values jointly, allocate ranks."""

from mlakit.convert.api import ConvertOptions, ConvertSummary, analyse, convert, convert_model

__all__ = ["ConvertOptions", "ConvertSummary", "analyse", "convert", "convert_model"]
