"""A test-time variant a resumed TRGE run no longer asks for keeps its rows, labelled with the tasks they follow
(2 real ranks): they were labelled as rows of the last tasks, the label of a variant added on resume."""
import pytest

from test_trge_run import case_config, run_case  # noqa: F401  (the same small 2-rank digit run)


@pytest.fixture(scope="module", autouse=True)
def digits_cached():
    from desmoe.recipes.trge.data import load_mnist_5k

    load_mnist_5k()


def test_a_dropped_variant_keeps_the_tasks_its_rows_follow(ranks, tmp_path):
    first = ranks.run(run_case, str(tmp_path), "trge", ("eval.variants=[oracle,no_fusion]",))[0]
    full = first["variants"]["no_fusion"]["accuracy_matrix"]
    assert len(full) == 3 and "avg" in first["variants"]["no_fusion"]
    ckpts = tmp_path / "trge" / "checkpoints"
    # back to the checkpoint after the second task (3 steps a task, saved at task ends), as after a preemption
    assert (ckpts / "step00000006").is_dir()
    (ckpts / "latest").write_text("step00000006")
    again = ranks.run(run_case, str(tmp_path), "trge", ("eval.variants=[oracle]",))[0]
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    dropped = again["variants"]["no_fusion"]
    assert dropped["accuracy_matrix"] == full[:2]  # its rows after tasks 1 and 2, taken before the resume
    assert dropped["after_tasks"] == [1, 2] and "avg" not in dropped  # not [2, 3]
    kept = again["variants"]["oracle"]
    assert kept["accuracy_matrix"] == first["variants"]["oracle"]["accuracy_matrix"] and "avg" in kept
