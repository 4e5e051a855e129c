"""A task's prompt templates the classifier cannot be built from: refused in one line naming the task."""
import pytest
import torch

from desmoe.errors import UserError


def _offline(folder, templates):
    from desmoe.vision.tasks import ImageTask, save_index, save_task, task_entry

    tasks = []
    for i, tpl in enumerate((["a photo of a {}."], templates)):
        y = torch.arange(8) % 2
        x = torch.zeros(8, 16, 16, 3, dtype=torch.uint8)
        tasks.append(ImageTask(f"t{i}", ["cat", "dog"], tpl, x, y, x.clone(), y.clone()))
        save_task(folder, tasks[-1])
    save_index(folder, [task_entry(t) for t in tasks])


@pytest.mark.parametrize("templates", [["a photo."], ["a {} photo.", "a photo of a thing."], [],
                                       ["a {} or a {}."], ["a {0} photo."]])
def test_templates_without_one_placeholder_are_refused(tmp_path, templates):
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, templates)
    with pytest.raises(UserError) as err:
        load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))
    assert str(err.value) == (f"task 't1': templates {templates!r}; expected a list of at least one prompt template, "
                              f"each with one '{{}}' for the class name")


def test_why_a_template_without_a_placeholder_is_refused():
    """Its prompts are the same for every class: one text embedding, so argmax always picks the first label."""
    from desmoe.vision.tasks import ImageTask

    x, y = torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.arange(2)
    task = ImageTask("t", ["cat", "dog"], ["a photo."], x, y, x, y)
    assert len(set(task.prompts())) == 1
    assert task.prompts("a photo of a {}.") == ["a photo of a cat.", "a photo of a dog."]


def test_usable_templates_load(tmp_path):
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, ["a photo of a {}.", "itap of the {}"])
    tasks, _ = load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))
    assert tasks[1].prompts() == ["a photo of a cat.", "a photo of a dog."]
