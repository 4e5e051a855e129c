"""TRGE's TensorBoard accuracy matrix after task 1 of 2: the row of the task not yet learned has no accuracy
yet and must show as blank, not as 0 % (the colour of the scale's bottom: a model that forgot everything)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np


def _pixels_near(rgb: np.ndarray, colour) -> int:
    return int((np.abs(rgb - np.asarray(colour[:3])) < 4 / 255).all(axis=-1).sum())


def test_the_row_of_a_task_not_yet_learned_is_blank(tmp_path):
    import matplotlib
    import matplotlib.image as mpimg
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    from desmoe.monitor import Monitor
    from desmoe.recipes.trge.results import log_stage

    tasks = [SimpleNamespace(name="aircraft"), SimpleNamespace(name="caltech101")]
    progress = {"rows": [[60.0, 40.0]], "control_rows": [[]], "id_rows": [[100.0, 0.0]], "gw_rows": [[[1.0, 0.0]] * 2]}
    mon = Monitor(tmp_path, total_steps=2)
    log_stage(mon, SimpleNamespace(method="zero_shot"), tasks, [], progress, 0, 1)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("accuracy_matrix")
    rgb = mpimg.imread(io.BytesIO(event.tensor_proto.string_val[2]))[..., :3]
    viridis = matplotlib.colormaps["viridis"]
    zero, cell = _pixels_near(rgb, viridis(0.0)), _pixels_near(rgb, viridis(0.6))  # vmin 0, vmax 100
    assert cell > 100, cell  # the 60 % cell is drawn
    # the colour bar holds 0 % in a sliver; the unlearned row (two cells) drawn as 0 % would be twice a cell
    assert zero < cell / 4, (zero, cell)
