"""TRGE's config values a run cannot honour: refused when the config loads, in one line naming the key,
not met as a traceback at set-up nor read as a silent no-op."""
import pytest
import torch

from desmoe.config import load_config
from desmoe.errors import ConfigError

DIGITS = "configs/trge_digits.yaml"


def _load(*overrides):
    from desmoe.recipes.trge.recipe import TRGEExperiment

    return load_config(TRGEExperiment, DIGITS, list(overrides))


def _refused(*overrides):
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    return str(err.value)


@pytest.mark.parametrize("seed", [-1, 2**40])
def test_seed_outside_the_generators_range_is_refused(seed):
    assert _refused(f"train.seed={seed}") == (f"{DIGITS}: key 'train.seed': expected an integer in [0, 2**32), "
                                              f"got {seed}")


def test_largest_seed_still_seeds_every_generator():
    seed = _load(f"train.seed={2**32 - 1}").train.seed
    # the largest products the recipe and setup_groups form (experts: (seed * 1000 + block) * 1_000_003 + id)
    torch.Generator().manual_seed((seed * 1000 + 99) * 1_000_003 + 999)
    torch.Generator().manual_seed(seed * 10**6 + 1009 * 99 + 17 * 10**4 + 99)
    with pytest.raises((RuntimeError, ValueError)):  # why 2**40 is refused: past torch's 64-bit seed
        torch.Generator().manual_seed(2**40 * 1000 * 1_000_003)


@pytest.mark.parametrize("override,line", [
    ("groups.scale=0", "key 'groups.scale': expected a nonzero number (0: the adapters add nothing and never "
                       "learn), got 0.0"),
    # task_anchored admits groups with prototype distance <= tau: below 0 only the own group, silently
    ("inter.tau=-0.5", "key 'inter.tau': expected a number >= 0 (a cosine distance between prototypes), got -0.5"),
])
def test_value_that_silently_changes_nothing_is_refused(override, line):
    extra = ["inter.reading=task_anchored"] if override.startswith("inter.tau") else []
    assert _refused(*extra, override) == f"{DIGITS}: {line}"


def test_zero_adapter_scale_leaves_the_model_and_its_gradients_at_zero():
    """Why groups.scale=0 is refused: the adapter's output and every gradient through it are exactly 0."""
    from desmoe.moe.experts import AdapterExpert

    expert = AdapterExpert(8, 4, 0.0)
    x = torch.randn(3, 8)  # random values: a shape test of the scaling, no data meaning
    out = expert(x)
    out.sum().backward()
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in expert.parameters())


@pytest.mark.parametrize("tokens", [0, -3])
def test_mllm_description_length_below_one_is_refused(tokens):
    """HF's generate() refused it (ValueError) only after the MLLM had loaded and the first task trained."""
    from transformers import GenerationConfig

    assert _refused("identifier.backend=mllm", "identifier.mllm_path=m", f"identifier.mllm_max_new_tokens={tokens}") \
        == f"{DIGITS}: key 'identifier.mllm_max_new_tokens': expected an integer >= 1, got {tokens}"
    with pytest.raises(ValueError):
        GenerationConfig(max_new_tokens=tokens).validate()


CNN_ONLY = "(it applies to the CNN image towers of embedded, towers and tiny_dual only)"


@pytest.mark.parametrize("override,shown", [
    ("train.cache_image_features=true", "True"),  # the transformer tower kept its crops: no speed-up, no word
    ("train.feature_cache=", "''"),
    ("placement.cnn_blocks=3", "3"),
])
def test_cnn_tower_key_with_a_transformer_image_tower_is_refused(override, shown):
    key = override.split("=")[0]
    assert _refused(override) == f"{DIGITS}: key '{key}': expected unset with backbone.kind=tiny_clip {CNN_ONLY}, " \
                                 f"got {shown}"


def test_cnn_tower_keys_still_load_with_a_cnn_tower():
    cfg = _load("backbone.kind=tiny_dual", "train.cache_image_features=true", "train.feature_cache=",
                "placement.cnn_blocks=3")
    assert cfg.train.cache_image_features and cfg.placement.cnn_blocks == 3


def test_pool_freezing_with_another_method_is_refused():
    assert _refused("groups.pool_freeze_per_task=1") == (
        f"{DIGITS}: key 'groups.pool_freeze_per_task': expected unset with method=trge (it applies to shared_pool "
        f"only), got 1")
    assert _load("method=shared_pool", "groups.pool_freeze_per_task=1").groups.pool_freeze_per_task == 1


@pytest.mark.parametrize("overrides,line", [
    # a minimum cosine above 1 called every sample unseen; the Gaussian read a negative limit as 0 (never)
    (["identifier.threshold=1.5"], "key 'identifier.threshold': expected a cosine in [-1, 1] with "
                                   "identifier.backend=prototype, got 1.5"),
    (["identifier.backend=description", "identifier.threshold=-2"],
     "key 'identifier.threshold': expected a cosine in [-1, 1] with identifier.backend=description, got -2.0"),
    (["identifier.backend=gaussian", "identifier.threshold=-1"],
     "key 'identifier.threshold': expected a distance per dimension >= 0 with identifier.backend=gaussian "
     "(0: never unseen), got -1.0"),
    # round(0.001 * 200) = 0 rows held out: split_for_calibration calibrated on the fitting rows, silently
    (["identifier.threshold_quantile=0.05", "identifier.calibration_split=0.001"],
     "key 'identifier.calibration_split': expected a share holding out at least 1 of train.proto_samples=200 and "
     "leaving 2 to fit, got 0.001"),
    (["train.proto_samples=3", "identifier.threshold_quantile=0.05", "identifier.calibration_split=0.5"],
     "key 'identifier.calibration_split': expected a share holding out at least 1 of train.proto_samples=3 and "
     "leaving 2 to fit, got 0.5"),
])
def test_identifier_value_it_would_read_another_way_is_refused(overrides, line):
    assert _refused(*overrides) == f"{DIGITS}: {line}"


def test_calibration_split_too_small_is_refused_by_the_identifier():
    """Why: with no row to hold out, the identifier would fit and calibrate on the same rows (it did, silently)."""
    from desmoe.errors import UserError
    from desmoe.recipes.trge.task_id import split_for_calibration

    feats = torch.arange(200.0).reshape(200, 1)
    with pytest.raises(UserError, match="holds out 0 and leaves 200 to fit"):
        split_for_calibration(feats, 0.001)
    fit, held = split_for_calibration(feats, 0.005)  # round(1.0) = 1 row held out: still accepted
    assert len(held) == 1 and len(fit) == 199
    assert _load("identifier.threshold_quantile=0.05", "identifier.calibration_split=0.005").identifier.calibration_split


def test_thresholds_at_their_bounds_still_load():
    assert _load("identifier.threshold=-1").identifier.threshold == -1
    assert _load("identifier.threshold=1").identifier.threshold == 1
    assert _load("identifier.backend=gaussian", "identifier.threshold=0").identifier.threshold == 0


@pytest.mark.parametrize("method", ["zero_shot", "continual_ft", "shared_pool"])
def test_fusion_setting_with_a_baseline_is_refused(method):
    """Only TRGE's predict reads lambda: fusion.* changed no baseline's accuracy, without a word."""
    assert _refused(f"method={method}", "fusion.schedule=constant") == (
        f"{DIGITS}: key 'fusion.schedule': expected unset with method={method} (it applies to trge only), "
        f"got 'constant'")
    assert _refused(f"method={method}", "fusion.lam_max=0.5") == (
        f"{DIGITS}: key 'fusion.lam_max': expected unset with method={method} (it applies to trge only), got 0.5")
    assert _load(f"method={method}").fusion.schedule == "progress"  # the shipped configs' value still loads
