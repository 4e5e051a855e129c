"""Run-time side of the multi-domain data: prepared folders, tokenizers, packed domain batches.

Imports are lazy so that tokenizer worker processes do not pay for torch.
"""
__all__ = ["PreparedData", "EvalSets", "MCQItem", "MathItem"]


def __getattr__(name):
    if name in __all__:
        from desmoe.data import prepared
        return getattr(prepared, name)
    raise AttributeError(name)
