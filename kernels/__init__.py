"""Triton kernels and their launchers (installed as ``vljepa_fast._kernels``; no autograd, no nn).

One module per op (``attention``, ``infonce``, ``rotary``, ``topk_similarity``) plus
``_common`` (running kernels on CPU tensors through Triton's interpreter, ahead-of-time compile
reports).
"""
