"""TRGE settings a method does not honour: refused in one line naming the key when the config loads, instead of
being overwritten or ignored without a word."""
import pytest

from test_trge_config_values import DIGITS, _load, _refused  # noqa: F401  (the same loader and refusal reader)


def test_shared_pool_refuses_a_conflicting_layout():
    """shared_pool runs on the pool: groups.layout=groups was overwritten by the recipe's set-up, silently."""
    assert _refused("method=shared_pool", "groups.layout=groups") == (
        f"{DIGITS}: key 'groups.layout': expected pool or unset with method=shared_pool (the layout it runs on), "
        f"got 'groups'")


@pytest.mark.parametrize("method", ["trge", "continual_ft", "zero_shot"])
def test_the_pool_is_refused_with_a_method_that_does_not_run_on_it(method):
    """trge and continual_ft train task groups the pool does not define (a KeyError at the first task)."""
    assert _refused(f"method={method}", "groups.layout=pool") == (
        f"{DIGITS}: key 'groups.layout': expected groups or unset with method={method} (the layout it runs on), "
        f"got 'pool'")


@pytest.mark.parametrize("method,layout", [("shared_pool", ""), ("shared_pool", "pool"), ("trge", ""),
                                           ("trge", "groups")])
def test_the_methods_own_or_unset_layout_loads(method, layout):
    assert _load(f"method={method}", f"groups.layout={layout}").groups.layout == layout


@pytest.mark.parametrize("layout", ["", "pool"])
def test_max_groups_is_refused_where_the_pool_ignores_it(layout):
    """The pool's routers take no max_groups (baselines.PoolRouter): with the pool layout it changed nothing."""
    assert _refused("method=shared_pool", f"groups.layout={layout}", "groups.max_groups=3") == (
        f"{DIGITS}: key 'groups.max_groups': expected unset with groups.layout=pool (the pool's routers do not read "
        f"it; it applies to the groups layout only), got 3")
    assert _load("method=trge", "groups.max_groups=3").groups.max_groups == 3  # the groups layout reads it


def test_a_baseline_run_records_the_sections_it_did_not_use(tmp_path):
    """zero_shot identifies no task and routes no group: the shipped config's identifier.* and inter.* (kept for
    method=<baseline> on the same config) are recorded as not used, and the table shows no reading for it, nor a
    fusion schedule (only trge fuses; a baseline's results.json carries the default one).  A combined variant's
    row shows what each of its atoms changes (oracle+no_fusion: before, neither, as it was not "oracle")."""
    import json

    from desmoe.recipes.trge.baselines import METHODS_BY_NAME, ZeroShot
    from desmoe.recipes.trge.report import rows
    from desmoe.recipes.trge.results import NOT_READ, summarize

    assert set(NOT_READ) == set(METHODS_BY_NAME)  # every method says what it leaves unread
    cfg = _load("method=zero_shot")
    progress = {"rows": [[10.0]], "control_rows": [[]], "id_rows": [[0.0]], "seconds": [1.0]}
    summary = summarize(cfg, [], [], progress, None, ZeroShot(cfg, None))
    assert summary["config_not_used"] == ["identifier.*", "inter.*"]
    assert summarize(_load(), [], [], progress, None, ZeroShot(cfg, None))["config_not_used"] == []  # trge
    metrics = {"transfer": None, "avg": 10.0, "last": 10.0}
    variants = {"ours": {v: metrics for v in ("oracle+no_fusion", "no_inter")}, "base": {}}
    for name, method in (("base", "zero_shot"), ("ours", "trge")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {**summary, **metrics, "method": method, "tasks": ["a"], "trainable_params_per_task": 0,
             "variants": variants[name]}))
    assert summary["fusion"] == "progress"  # what the baseline's results.json says, and the table must not
    assert [(r["run"], r["identifier"], r["reading"], r["fusion"]) for r in rows(tmp_path)] == [
        ("base", "-", "-", "-"), ("ours", "prototype", "sample_anchored", "progress"),
        ("ours [oracle+no_fusion]", "oracle", "sample_anchored", "frozen"),
        ("ours [no_inter]", "prototype", "own", "progress")]
