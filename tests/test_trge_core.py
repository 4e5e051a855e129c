"""TRGE pieces in one process: metrics, fusion, inter-group weights, fixed group
sizes and in-group routing, per-sequence routing in the core, task identifiers
on real digits, and the one-line errors for bad input."""
import numpy as np
import pytest
import torch

from desmoe.recipes.trge import metrics
from desmoe.recipes.trge.fusion import fuse, fuse_where, fusion_weight
from desmoe.recipes.trge.inter_group import UNSEEN, InterGroupConfig, group_weights
from tolerance import assert_close, module_terms


def test_metrics_match_hand_computation():
    A = np.array([[80.0, 30.0, 20.0],
                  [70.0, 90.0, 40.0],
                  [60.0, 85.0, 95.0]])
    # Transfer: col 1 -> mean(30) = 30; col 2 -> mean(20, 40) = 30; mean = 30
    # Avg: column means (70, 68.333.., 51.666..) -> 63.333..; Last: (60 + 85 + 95) / 3 = 80
    assert metrics.transfer(A) == pytest.approx(30.0)
    assert metrics.avg(A) == pytest.approx(190.0 / 3)
    assert metrics.last(A) == pytest.approx(80.0)
    assert metrics.mtil_metrics(A) == {"transfer": 30.0, "avg": 63.3, "last": 80.0}
    B = np.array([[10.0, 50.0, 70.0, 20.0], [0, 0, 10.0, 40.0], [0, 0, 0, 60.0], [0, 0, 0, 0]])
    # column 3 mixes three rows: mean(20, 40, 60) = 40; transfer = mean(50, 40, 40)
    assert metrics.transfer(B) == pytest.approx((50 + 40 + 40) / 3)
    with pytest.raises(ValueError):
        metrics.transfer(np.ones((2, 3)))


def test_fusion_by_training_progress():
    assert fusion_weight("progress", 3, 10) == pytest.approx(0.3)
    assert fusion_weight("progress", 12, 10) == 1.0
    assert fusion_weight("frozen", 5, 10) == 0.0
    z0, za = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p = fuse(z0, za, 0.25)
    assert_close(p, 0.75 * z0.softmax(-1) + 0.25 * za.softmax(-1), terms=2 + 2)
    seen = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    out = fuse_where(torch.tensor([False, True]), seen, z0.repeat(2, 1), za.repeat(2, 1), 0.25)
    assert torch.equal(out[0], seen[0]) and torch.equal(out[1], p[0])  # the same computation on the same row
    with pytest.raises(ValueError):
        fusion_weight("nope", 1, 2)


@pytest.mark.parametrize("reading", ["own", "task_anchored", "sample_anchored"])
def test_inter_group_weights(reading):
    gen = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=-1)  # 4 learned tasks
    f0 = torch.nn.functional.normalize(protos[[0, 1, 2, 3, 1]] + 0.3 * torch.randn(5, 16, generator=gen), dim=-1)
    ids = torch.tensor([0, 3, 2, UNSEEN, UNSEEN])
    cfg = InterGroupConfig(reading=reading, max_groups=2, tau=2.0)
    w = group_weights(cfg, ids, f0, protos, num_groups=6)
    assert w.shape == (5, 6)
    assert_close(w.sum(1), torch.ones(5), terms=6)
    assert (w[:, 4:] == 0).all()  # groups of tasks not learned yet get nothing
    assert ((w > 0).sum(1) <= 2).all()
    for b, k in enumerate(ids.tolist()):
        if k != UNSEEN:
            assert w[b].argmax().item() == k and w[b, k] > 0.5  # the identified group dominates
    if reading == "own":
        assert ((w > 0).sum(1) == 1).all()
    else:
        assert ((w > 0).sum(1) == 2).all()  # collaboration: a second group joins


def _tiny(T=3, NG=2, k=1, max_groups=2):
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.groups import GroupSpec, setup_groups
    from desmoe.recipes.trge.model import Placement, TRGEModel

    bb = load_backbone(BackboneConfig(hidden_size=32, layers=2))
    model = TRGEModel(bb.model, GroupSpec(num_tasks=T, experts_per_group=NG, top_k=k, bottleneck=8,
                                          max_groups=max_groups), Placement())
    setup_groups(model, seed=1)
    return model, bb


@pytest.fixture(scope="module")
def digits():
    from desmoe.recipes.trge.data import digit_sequence

    return digit_sequence(n_train=120, n_test=60)


def test_groups_fixed_size_and_routes_stay_in_selected_groups(digits):
    from desmoe.moe.layer import moe_blocks

    T, NG, k = 3, 2, 1
    model, bb = _tiny(T, NG, k)
    tasks, _ = digits
    px = bb.pixels(tasks[0].test_x[:6])
    blocks = [b for b in moe_blocks(model) if b.router.context is model.contexts["image"]]
    assert len(blocks) == 2 and len(moe_blocks(model)) == 4  # 2 vision + 2 text layers
    for t in range(T):
        w = torch.zeros(6, T)
        w[:, t] = 1.0
        model.image_features(px, w)
        for block in blocks:
            assert block.layout.group(f"task{t}") == tuple(range(t * NG, (t + 1) * NG))
            ids = block.last_routing.expert_ids
            assert ids.shape[1] == k  # one group, k experts: routed work per sample stays k
            assert ((ids // NG) == t).all()
    w = torch.tensor([[0.7, 0.3, 0.0]] * 6)
    model.image_features(px, w)
    ids = blocks[0].last_routing.expert_ids.view(6, -1, 2 * k)[:, 0]
    assert ids.shape[1] == 2 * k and sorted(set((ids // NG).flatten().tolist())) == [0, 1]
    for block in moe_blocks(model):
        assert block.num_experts == T * NG and all(len(g) == NG for g in block.layout.groups.values())
    # adapters off: exactly the frozen base model
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.base.get_image_features(pixel_values=px).pooler_output, dim=-1)
        assert torch.equal(model.image_features(px), ref)


def test_core_per_sequence_routing_uses_first_token():
    from desmoe.moe import LinearRouter, MLPExpert, MoEBlock

    torch.manual_seed(0)
    router = LinearRouter(8, 4, 2)
    block = MoEBlock(8, MLPExpert(8, 16), router, route_per_sequence=True)
    block.init_experts(seed=3)
    x = torch.randn(3, 5, 8)
    y = block(x)
    ids = block.last_routing.expert_ids.view(3, 5, 2)
    assert (ids == ids[:, :1]).all()  # every token of a sequence follows its first token
    # reference: route each token with the router applied to its sequence's first token
    ref_routing = router(x[:, 0])
    manual = torch.zeros_like(x)
    for b in range(3):
        for e, wgt in zip(ref_routing.expert_ids[b].tolist(), ref_routing.weights[b]):
            manual[b] += wgt * block.local_experts[e](x[b])
    assert_close(y, manual, terms=module_terms(block))


def test_identifiers_on_real_digits(digits):
    from desmoe.recipes.trge.task_id import (BatchVote, GaussianIdentifier, IdBatch, OracleIdentifier,
                                     PrototypeIdentifier, TaskInfo, identification_accuracy)

    model, bb = _tiny()
    tasks, control = digits
    with torch.no_grad():
        feats = [model.image_features(bb.pixels(t.train_x)) for t in tasks]
        test = [model.image_features(bb.pixels(t.test_x)) for t in tasks]
    idents = [PrototypeIdentifier(threshold=0.0), GaussianIdentifier(threshold=0.0, shrinkage=0.5), OracleIdentifier()]
    for ident in idents:
        for t, task in enumerate(tasks[:2]):  # learn 2 of 3 tasks
            ident.fit_task(TaskInfo(task.name, task.classnames, feats[t]))
        for t in range(3):
            truth = torch.full((len(test[t]),), t if t < 2 else UNSEEN)
            pred = ident.identify(IdBatch(test[t], true_task=truth))
            assert pred.shape == truth.shape and ((pred >= UNSEEN) & (pred < 2)).all()
            if t < 2:  # inverted vs upright digits: even frozen random features tell them apart
                assert identification_accuracy(pred, truth) > 90.0, (ident.name, t)
            elif ident.name == "oracle":
                assert (pred == UNSEEN).all()
    # a per-task threshold (5% quantile of a task's own training similarities) sends the
    # rotated domain to "unseen" more often than the learned ones
    proto = PrototypeIdentifier(threshold=0.0, quantile=0.05)
    for t in range(2):
        proto.fit_task(TaskInfo(tasks[t].name, tasks[t].classnames, feats[t]))
    unseen_rate = [(proto.identify(IdBatch(test[t])) == UNSEEN).float().mean().item() for t in range(3)]
    assert unseen_rate[2] > max(unseen_rate[:2]) and max(unseen_rate[:2]) < 0.3, unseen_rate
    # the same with thresholds calibrated on held-out training samples (prototype and Gaussian)
    for ident in (PrototypeIdentifier(0.0, quantile=0.05, calibration_split=0.25),
                  GaussianIdentifier(0.0, 0.5, quantile=0.05, calibration_split=0.25)):
        for t in range(2):
            ident.fit_task(TaskInfo(tasks[t].name, tasks[t].classnames, feats[t]))
        rate = [(ident.identify(IdBatch(test[t])) == UNSEEN).float().mean().item() for t in range(3)]
        assert rate[2] > max(rate[:2]) and max(rate[:2]) < 0.3, (ident.name, rate)
    vote = BatchVote(PrototypeIdentifier(0.0))
    for t in range(2):
        vote.fit_task(TaskInfo(tasks[t].name, tasks[t].classnames, feats[t]))
    out = vote.identify(IdBatch(test[1]))
    assert (out == out[0]).all() and "batch-vote" in vote.name


def test_mllm_parse_choice():
    from desmoe.recipes.trge.task_id import parse_choice

    assert parse_choice("2", 3) == 1
    assert parse_choice("It is collection 3.", 3) == 2
    assert parse_choice("none", 3) == UNSEEN
    assert parse_choice("7", 3) == UNSEEN


@pytest.mark.parametrize("case,expect", [
    ("mllm-missing", "not a folder with a config.json"),
    ("mllm-broken", "not a usable image-text-to-text model"),
    ("clip-missing", "expected a local HF CLIPModel"),
])
def test_bad_model_paths_one_line(tmp_path, case, expect):
    from desmoe.errors import UserError
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.task_id import IdentifierConfig, build_identifier

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "nothing-like-this"}')
    with pytest.raises(UserError) as err:
        if case == "mllm-missing":
            build_identifier(IdentifierConfig(backend="mllm", mllm_path=str(tmp_path / "none")))
        elif case == "mllm-broken":
            build_identifier(IdentifierConfig(backend="mllm", mllm_path=str(tmp_path / "broken")))
        else:
            load_backbone(BackboneConfig(kind="hf_clip", path=str(tmp_path / "none")))
    msg = str(err.value)
    assert expect in msg and "\n" not in msg and str(tmp_path) in msg


def test_embedded_architecture_adapters_in_bert_layers_and_on_cnn_features(digits, tmp_path):
    """The embedded encoder's layout: groups in every BERT layer and in residual blocks on the CNN feature."""
    from desmoe.moe.layer import moe_blocks
    from desmoe.recipes.trge.adapters import AdaptedBertOutput, FeatureAdapters
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.recipes.trge.groups import GroupSpec, setup_groups
    from desmoe.recipes.trge.model import Placement, TRGEModel

    bb = load_backbone(BackboneConfig(kind="tiny_dual", hidden_size=16, image_size=32))
    with torch.no_grad():
        tasks, _ = digits
        px = bb.pixels(tasks[0].test_x[:4])
        ids, mask = bb.tokenize(tasks[0].prompts())
        ref_img = torch.nn.functional.normalize(bb.model.get_image_features(px), dim=-1)
        ref_txt = torch.nn.functional.normalize(bb.model.get_text_features(ids, mask), dim=-1)
    model = TRGEModel(bb.model, GroupSpec(num_tasks=2, bottleneck=4, scale=1.0), Placement(cnn_blocks=2))
    setup_groups(model, seed=0)
    model.eval()
    assert isinstance(model.feature_adapters, FeatureAdapters) and len(model.feature_adapters.blocks) == 2
    bert_layers = model.base.text_model.encoder.layer
    assert all(isinstance(layer.output, AdaptedBertOutput) for layer in bert_layers)
    assert len(moe_blocks(model)) == 2 + len(bert_layers)
    for block in moe_blocks(model):  # visible adapters so the adapted path differs
        for e in block.local_experts:
            torch.nn.init.normal_(e.up.weight, std=0.5)
    with torch.no_grad():
        # adapters off = the frozen model
        assert_close(model.image_features(px), ref_img, terms=module_terms(model.base.vision_model))
        assert_close(model.text_features(ids, mask), ref_txt,
                     terms=module_terms(model.base.text_model, attention=2 * ids.shape[1] * len(bert_layers)))
        w = torch.tensor([[1.0, 0.0]] * 4)
        assert (model.image_features(px, w) - ref_img).abs().max() > 1e-3
        cached = model.cnn_features(px)  # evaluation reuses the frozen CNN features across stages
        assert torch.equal(model.image_features(None, w, cnn_features=cached), model.image_features(px, w))
        wt = torch.tensor([[0.0, 1.0]] * len(ids))
        assert (model.text_features(ids, mask, wt) - ref_txt).abs().max() > 1e-3
    # the run's table of frozen CNN features: the same features, computed once, then read from disk
    from desmoe.recipes.trge.features import frozen_cnn_table, key

    cache = tmp_path / "features"
    table = frozen_cnn_table(model, bb, tasks[:2], 64, str(cache))
    with torch.no_grad():
        # other batch shapes may take other convolution kernels
        assert_close(table[key(tasks[1].name, "test")], model.cnn_features(bb.pixels(tasks[1].test_x)),
                     terms=module_terms(model.base.vision_model))
    (stored,) = cache.glob("*.pt")
    torch.save({k: v + 1 for k, v in table.items()}, stored)  # a later run reads the file, not the CNN
    assert torch.equal(frozen_cnn_table(model, bb, tasks[:2], 64, str(cache))[key(tasks[0].name, "train")],
                       table[key(tasks[0].name, "train")] + 1)
    assert torch.equal(frozen_cnn_table(model, bb, tasks[:1], 64, str(cache))[key(tasks[0].name, "train")],
                       table[key(tasks[0].name, "train")])  # other images: another key, computed afresh


def test_bad_dataset_folders_one_line(tmp_path):
    from desmoe.errors import UserError
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    (tmp_path / "aircraft").mkdir()
    (tmp_path / "aircraft" / "notes.txt").write_text("not a dataset")
    with pytest.raises(UserError) as err:
        load_sequence(DataConfig(sequence="mtil", root=str(tmp_path)))
    assert "unknown dataset folder layout" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        load_sequence(DataConfig(sequence="offline", root=str(tmp_path / "aircraft")))
    assert "tasks.json" in str(err.value) and "\n" not in str(err.value)


def test_text_routing_by_vocabulary(digits):
    """``vocabulary``: a group re-embeds only the class names it was trained on."""
    from desmoe.recipes.trge.evaluate import TextBank, group_class_embeddings

    model, bb = _tiny(T=2)
    model.eval()  # no gate noise
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # give the adapters weights (their up-projections start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    task = digits[0][0]
    bank = TextBank(model, bb.tokenize, num_groups=2)
    W0 = bank.get(task, -1, 2)
    by_image = group_class_embeddings(bank, task, 2, 0, "image")
    assert not torch.allclose(by_image[0], W0, atol=1e-3) and not torch.allclose(by_image[1], W0, atol=1e-3)
    names = list(task.classnames)
    trained = [set(names[:3]), set()]  # group 0 learned three of these names, group 1 none
    by_vocab = group_class_embeddings(bank, task, 2, 0, "vocabulary", trained)
    assert torch.equal(by_vocab[0, :3], by_image[0, :3]) and torch.equal(by_vocab[0, 3:], W0[3:])
    assert torch.equal(by_vocab[1], W0)
    with pytest.raises(ValueError, match="trained on"):
        group_class_embeddings(bank, task, 2, 0, "vocabulary", None)


def test_unseen_if_the_identified_task_never_learned_these_names():
    from desmoe.recipes.trge.evaluate import unseen_if_names_unknown

    trained = [{"cat", "dog"}, {"pizza", "apple"}, {"cat", "car"}]
    ids = torch.tensor([0, 1, 2, UNSEEN, 1])
    assert unseen_if_names_unknown(ids, ["cat", "cow"], trained).tolist() == [0, UNSEEN, 2, UNSEEN, UNSEEN]
    assert unseen_if_names_unknown(ids, ["apple"], trained).tolist() == [UNSEEN, 1, UNSEEN, UNSEEN, 1]
    with pytest.raises(ValueError, match="trained on"):
        unseen_if_names_unknown(ids, ["cat"], None)


def test_group_filter_keeps_only_groups_that_know_the_names():
    gen = torch.Generator().manual_seed(1)
    protos = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    f0 = torch.nn.functional.normalize(protos[[0, 1, 2, 0]] + 0.3 * torch.randn(4, 16, generator=gen), dim=-1)
    ids = torch.tensor([0, 1, UNSEEN, UNSEEN])
    cfg = InterGroupConfig(reading="sample_anchored", max_groups=2)
    full = group_weights(cfg, ids, f0, protos, num_groups=4)
    assert (full[:, :3] > 0).sum(1).tolist() == [2, 2, 2, 2]
    w = group_weights(cfg, ids, f0, protos, num_groups=4, usable=torch.tensor([True, False, True]))
    assert (w[:, 1] == 0).all()
    assert_close(w.sum(1), torch.ones(4), terms=4)
    assert w[0, 0] > 0.5  # the identified, usable group still dominates
    none = group_weights(cfg, ids, f0, protos, num_groups=4, usable=torch.zeros(3, dtype=torch.bool))
    assert (none == 0).all()  # nobody knows the names: all-zero rows, the adapted path is the frozen model


@pytest.mark.parametrize("group_filter", ["novel_set", "none"])
def test_new_label_set_is_served_by_the_frozen_model(digits, group_filter):
    """An unseen sample of a label set no group was trained on: with ``novel_set`` the fused output
    is the frozen model's even at lambda = 1 (no group weight at all); without the filter it is not."""
    from desmoe.recipes.trge.evaluate import TextBank, evaluate_task
    from desmoe.recipes.trge.task_id import OracleIdentifier, TaskInfo

    model, bb = _tiny(T=2)
    model.eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    tasks, _ = digits
    oracle = OracleIdentifier()
    feats = model.image_features(bb.pixels(tasks[0].train_x[:16]))
    oracle.fit_task(TaskInfo(tasks[0].name, tasks[0].classnames, feats))
    protos = torch.nn.functional.normalize(feats.mean(0, keepdim=True), dim=-1)
    bank = TextBank(model, bb.tokenize, num_groups=2)
    inter = InterGroupConfig(group_filter=group_filter)

    def run(method):
        return evaluate_task(method, model, bank, bb.pixels, tasks[2], -1, 1, oracle, protos, inter, 1.0,
                             batch_size=32, rank=0, world=1, trained_names=[set(tasks[0].classnames)])

    out, frozen = run("trge"), run("zero_shot")
    if group_filter == "novel_set":
        assert out["acc"] == frozen["acc"] and sum(out["group_weights"]) == 0
    else:
        assert sum(out["group_weights"]) == pytest.approx(1.0)
