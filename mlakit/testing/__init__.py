"""Helpers for mlakit's tests and device checks (as ``torch.testing`` is for torch's):
tiny models and tokenizers built in code (``models``) and the kernels' correctness cases
(``kernel_cases``, ``sparse_cases``). Nothing else in mlakit imports them."""
