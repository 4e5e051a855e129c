"""placement.* keys the adapted towers never read: refused in one line naming the key, not ignored."""
from test_trge_config_values import DIGITS, _load, _refused  # noqa: F401  (the same loader and refusal reader)

TINY_DUAL = ["backbone.kind=tiny_dual", "backbone.hidden_size=64"]  # a CNN image tower, a transformer text tower


def _dual(*overrides):
    return TINY_DUAL + list(overrides)


def test_layers_are_refused_with_only_a_cnn_image_tower_adapted():
    """tiny_dual's image tower is a CNN: its adapters are cnn_blocks blocks on the pooled features, so layers
    chose nothing when no text tower is adapted (two runs with layers [0] and [] were the same run)."""
    assert _refused(*_dual("placement.towers=[image]", "placement.layers=[0]")) == (
        f"{DIGITS}: key 'placement.layers': expected unset with backbone.kind=tiny_dual and placement.towers=[image] "
        f"(the CNN image tower takes placement.cnn_blocks; layers apply to a transformer tower), got [0]")
    assert _load(*_dual("placement.towers=[image, text]", "placement.layers=[0]")).placement.layers == [0]  # text
    assert _load("placement.towers=[image]", "placement.layers=[0]").placement.layers == [0]  # a transformer tower


def test_cnn_blocks_are_refused_without_an_adapted_image_tower():
    assert _refused(*_dual("placement.towers=[text]", "placement.cnn_blocks=3")) == (
        f"{DIGITS}: key 'placement.cnn_blocks': expected unset without image in placement.towers (it sizes the image "
        f"tower's adapters), got 3")
    assert _load(*_dual("placement.towers=[image]", "placement.cnn_blocks=3")).placement.cnn_blocks == 3


def test_why_they_are_unread():
    """The model a refused key was set on is the model without it: the same adapted sites, the same shapes."""
    from desmoe.recipes.trge.backbones import load_backbone
    from desmoe.recipes.trge.model import Placement, TRGEModel

    cfg = _load(*_dual(), "groups.num_tasks=3")

    def shapes(placement):
        model = TRGEModel(load_backbone(cfg.backbone).model, cfg.groups, placement)
        return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}

    assert shapes(Placement(towers=["image"], layers=[0])) == shapes(Placement(towers=["image"]))
    assert shapes(Placement(towers=["text"], cnn_blocks=3)) == shapes(Placement(towers=["text"]))
    assert shapes(Placement(towers=["image"], cnn_blocks=3)) != shapes(Placement(towers=["image"]))
