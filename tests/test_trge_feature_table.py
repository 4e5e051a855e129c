"""The frozen CNN feature table (features.frozen_cnn_table) stays on the device while it is computed.

It used to be a host tensor: on a GPU every batch's features were copied back as they were computed, and the
reduction over ranks sent the whole table to the device and back.  Now the table is filled and reduced where
the features come from, and copied to the host once (the disk cache and the per-batch readers keep a host
table).  Checked with tests/device_ledger's ledger, which tracks which tensors a CUDA run would hold on the
device: a device value written into a host tensor is a transfer, as is ``.cpu()`` of a device tensor.  The
numbers and the cache file are those of one process computing every batch itself.
"""
import torch

from device_ledger import DeviceLedger

BATCH = 8


class _Transfers(DeviceLedger):
    """DeviceLedger that also lists device -> host transfers: ("write", host target shape) for device values
    written into a host tensor, ("cpu", shape) for ``.cpu()`` of a device tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.back: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu and self._on(args[0]):
            self.back.append(("cpu", tuple(args[0].shape)))
        elif func in (torch.Tensor.__setitem__, torch.Tensor.copy_) and not self._on(args[0]):
            src = args[2] if func is torch.Tensor.__setitem__ else args[1]
            if isinstance(src, torch.Tensor) and self._on(src):
                self.back.append(("write", tuple(args[0].shape)))
        return super().__torch_function__(func, types, args, kwargs)


def _setup():
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.data import digit_sequence
    from desmoe.recipes.trge.groups import GroupSpec
    from desmoe.recipes.trge.model import Placement, TRGEModel

    bb = load_backbone(BackboneConfig(kind="tiny_dual", hidden_size=16, image_size=32))
    model = TRGEModel(bb.model, GroupSpec(num_tasks=2, bottleneck=4), Placement(cnn_blocks=1))
    return model, bb, digit_sequence(n_train=20, n_test=12)[0][:2]  # batches of 8, the last of each split short


def table_case(cache_dir):
    """On each rank (or one process): the table, its transfers back to the host, the ledger's findings."""
    import torch.distributed as dist

    from desmoe.recipes.trge.features import frozen_cnn_table

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model, bb, tasks = _setup()
    ledger = _Transfers()
    ledger.mark(model)
    with ledger:
        table = frozen_cnn_table(model, bb, tasks, BATCH, cache_dir, rank, world)
    return {"table": table, "back": ledger.back, "found": ledger.found}


def _check(out, rows: int) -> None:
    dim = next(iter(out["table"].values())).shape[1]
    assert out["found"] == [], out["found"]
    # one copy of the whole table to the host (was one write per batch into a host table); the other
    # transfers are the cache name's hash of the CNN weights, once before any batch
    assert [b for b in out["back"] if b[0] == "write"] == [], out["back"]
    assert out["back"].count(("cpu", (rows, dim))) == 1, out["back"]


def test_table_filled_on_the_device_one_process(tmp_path):
    from desmoe.recipes.trge.features import key

    out = table_case(str(tmp_path / "one"))
    model, bb, tasks = _setup()
    rows = sum(len(t.train_x) + len(t.test_x) for t in tasks)
    _check(out, rows)
    with torch.no_grad():  # the same numbers as the CNN on each batch of the same shape
        for t in tasks:
            x = t.test_x
            ref = torch.cat([model.cnn_features(bb.pixels(x[i:i + BATCH]).contiguous(
                memory_format=torch.channels_last)).float() for i in range(0, len(x), BATCH)])
            assert torch.equal(out["table"][key(t.name, "test")], ref)
    assert all(v.device.type == "cpu" for v in out["table"].values())


def test_table_reduced_on_the_device_two_ranks(ranks, tmp_path):
    one = table_case(str(tmp_path / "one"))
    per_rank = ranks.run(table_case, str(tmp_path / "two"))
    rows = sum(len(v) for v in one["table"].values())
    for out in per_rank:
        _check(out, rows)
        assert out["table"].keys() == one["table"].keys()
        assert all(torch.equal(out["table"][k], v) for k, v in one["table"].items())  # each row from one rank
    # the cache file: the same table as one process writes
    files = [sorted((tmp_path / d).glob("*.pt")) for d in ("one", "two")]
    assert [f.name for f in files[0]] == [f.name for f in files[1]] and len(files[0]) == 1
    a, b = (torch.load(f[0], weights_only=True) for f in files)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
