"""Triton kernels and their launchers (installed as ``vljepa_fast._kernels``; no autograd, no nn).

One module per op: ``attention`` (dense and varlen GQA attention, forward and backward),
``infonce`` (InfoNCE loss statistics and gradients), ``topk_similarity`` (batched similarity
top-k) and ``rotary`` (rotary position embedding of q and k), plus ``_common`` (the launch
helper; kernels run compiled on CUDA tensors, or on CPU tensors in a process started with
``TRITON_INTERPRET=1``). No module here imports the ``vljepa_fast`` package: constants such as
the normalisation epsilon arrive as arguments.
"""
