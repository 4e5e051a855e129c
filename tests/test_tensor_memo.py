"""desmoe.moe.tensor_memo: a value derived from a tensor is reused only while that tensor is the same object at
the same version, and never for an inference tensor (which has no version counter: reading it raised inside
DeviceCopies before the shared helper)."""
import torch

from desmoe.moe.device_copies import DeviceCopies
from desmoe.moe.tensor_memo import TensorMemo


def test_fresh_only_for_the_same_tensor_unchanged():
    t = torch.tensor([1, 2, 3])
    memo = TensorMemo.of(t, "derived")
    assert memo.fresh(t) and memo.value == "derived"
    assert not memo.fresh(t.clone())  # equal values, another tensor: its values may change apart from t's
    t.add_(0)  # an in-place change, even one that leaves the values as they were, is a new version
    assert not memo.fresh(t)


def test_an_inference_tensor_is_never_memoised():
    with torch.inference_mode():
        t = torch.ones(2)
    assert TensorMemo.of(t, 1) is None
    other = TensorMemo.of(torch.ones(2), 1)
    assert not other.fresh(t)  # another entry's test does not read t's (missing) version


def test_device_copies_reuse_and_refresh():
    """To the meta device: a real copy without an accelerator (``to`` the tensor's own device returns it)."""
    copies, table, meta = DeviceCopies(), torch.tensor([0, 1]), torch.device("meta")
    first = copies.get("table", table, meta)
    assert first is not table and copies.get("table", table, meta) is first  # reused
    table[0] = 5  # changed in place: copied again
    assert copies.get("table", table, meta) is not first
    with torch.inference_mode():
        frozen = torch.tensor([7, 8])
    a, b = copies.get("frozen", frozen, meta), copies.get("frozen", frozen, meta)
    assert a is not b and a.device == meta  # copied each time (was a RuntimeError on the version counter)
