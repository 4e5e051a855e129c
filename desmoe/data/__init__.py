"""Run-time side of the multi-domain data: prepared folders, tokenizers, packed domain batches."""
from desmoe.data.prepared import EvalSets, MathItem, MCQItem, PreparedData  # noqa: F401
