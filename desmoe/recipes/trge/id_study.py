"""Task identification alone, stage by stage, on frozen features (no training needed).

    python -m desmoe.recipes.trge.id_study [--config configs/trge_offline.yaml] [key=value ...]

Identifiers depend only on the frozen image features, so every backend can be
compared on the run's protocol (``train.proto_samples`` training images per task,
the same seeded pick) in seconds once the feature table is cached.  Prints, per
backend: mean identification accuracy on learned test sets (lower triangle incl.
the diagonal), the share of not-yet-learned test sets called unseen (upper
triangle, incl. the control) and the per-test-set accuracy after the last task.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from desmoe.errors import UserError, run_cli

CANDIDATES = {  # name -> IdentifierConfig overrides
    "prototype, no threshold": dict(backend="prototype", threshold=0.0, threshold_quantile=0.0, calibration_split=0.0),
    "prototype, q=0.05 in-sample": dict(backend="prototype", threshold_quantile=0.05, calibration_split=0.0),
    "prototype, q=0.05 held-out": dict(backend="prototype", threshold_quantile=0.05, calibration_split=0.25),
    "gaussian, no threshold": dict(backend="gaussian", threshold=0.0, threshold_quantile=0.0, calibration_split=0.0),
    "gaussian, q=0.05 held-out": dict(backend="gaussian", threshold_quantile=0.05, calibration_split=0.25),
}


def study(cfg) -> dict:
    from desmoe.recipes.trge.backbones import load_backbone
    from desmoe.recipes.trge.data import load_sequence
    from desmoe.recipes.trge.features import frozen_cnn_table, key
    from desmoe.recipes.trge.inter_group import UNSEEN
    from desmoe.recipes.trge.model import TRGEModel
    from desmoe.recipes.trge.task_id import IdBatch, TaskInfo, build_identifier

    tasks, controls = load_sequence(cfg.data)
    cfg.groups.num_tasks = cfg.groups.num_tasks or len(tasks)
    cfg.groups.ep_size = 1
    backbone = load_backbone(cfg.backbone)
    model = TRGEModel(backbone.model, cfg.groups, cfg.placement)
    table = frozen_cnn_table(model, backbone, tasks + controls, cfg.train.eval_batch, cfg.train.feature_cache)
    if table is None:
        raise UserError(f"backbone.kind '{cfg.backbone.kind}': id_study needs a CNN image tower (embedded, towers)")
    with torch.no_grad():
        f = {k: model.image_features(None, cnn_features=v) for k, v in table.items()}
    names = [t.name for t in tasks + controls]
    out = {}
    for label, over in CANDIDATES.items():
        ident = build_identifier(dataclasses.replace(cfg.identifier, **over))
        M = np.zeros((len(tasks), len(names)))
        for t, task in enumerate(tasks):  # the run's pick: same seed, same count
            pick = torch.randperm(len(task.train_y), generator=torch.Generator().manual_seed(t))[:cfg.train.proto_samples]
            ident.fit_task(TaskInfo(task.name, task.classnames, f[key(task.name, "train")][pick]))
            for j, n in enumerate(names):
                ids = ident.identify(IdBatch(f[key(n, "test")]))
                M[t, j] = 100.0 * float((ids == (j if j <= t else UNSEEN)).float().mean())
        seen = float(np.mean([M[i, j] for i in range(len(tasks)) for j in range(i + 1)]))
        unseen = float(np.mean([M[i, j] for i in range(len(tasks)) for j in range(i + 1, len(names))]))
        out[label] = {"seen": round(seen, 1), "unseen": round(unseen, 1), "last": [round(v) for v in M[-1]]}
    print("| identifier | learned sets: correct task % | unlearned sets: called unseen % | after the last task: "
          + " / ".join(names) + " |")
    print("|---|---|---|---|")
    for label, r in out.items():
        print(f"| {label} | {r['seen']} | {r['unseen']} | {' / '.join(map(str, r['last']))} |")
    return out


@run_cli
def main() -> None:
    from desmoe.config import load_config
    from desmoe.recipes.trge.recipe import TRGEExperiment

    import argparse

    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/trge_offline.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    study(load_config(TRGEExperiment, args.config, args.overrides))


if __name__ == "__main__":
    main()
