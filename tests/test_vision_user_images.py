"""The CLIP folders and image datasets users bring, outside the TRGE recipe: zero-shot scoring of a local CLIP
folder with its own pixel statistics and scale, and MTIL class folders holding hidden files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from desmoe.errors import UserError


def _clip_folder(folder, processor=None):
    from desmoe.models.dual_encoder import load_clip, tiny_clip

    model, tok = tiny_clip()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return load_clip(folder)


def test_zero_shot_features_use_the_clip_folders_own_normalisation(tmp_path):
    """zeroshot.image_features normalised with OpenAI CLIP's mean/std whatever the folder's preprocessor said."""
    from desmoe.vision.transforms import to_pixel_values
    from desmoe.vision.zeroshot import as_features, image_features

    model, _ = _clip_folder(tmp_path / "c", {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        want = as_features(model.get_image_features(
            pixel_values=to_pixel_values(images, 32, (0.5,) * 3, (0.5,) * 3)))
    # the same model, the same pixels and the same batch: only the normalisation can differ
    assert torch.equal(image_features(model, images), torch.nn.functional.normalize(want.float(), dim=-1))
    # a folder that is gone leaves the statistics unknown: one line, not OpenAI's numbers
    model.config._name_or_path = str(tmp_path / "moved")
    with pytest.raises(UserError, match=r"moved: the folder this CLIPModel was read from is not there; expected it"):
        image_features(model, images)



@pytest.mark.parametrize("processor", [{"do_rescale": False}, {"rescale_factor": 1 / 127.5}, {"rescale_factor": "x"}])
def test_clip_folder_with_another_pixel_scale_is_refused(tmp_path, processor):
    """Pixels are always uint8 / 255: a processor that rescales otherwise was ignored, features off by the factor."""
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone
    from desmoe.vision.zeroshot import pixel_spec

    model, _ = _clip_folder(tmp_path / "c", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, **processor})
    expect = r"preprocessor_config.json: do_rescale=.*; expected pixels scaled by 1/255"
    with pytest.raises(UserError, match=expect):
        pixel_spec(model)
    with pytest.raises(UserError, match=expect):
        load_backbone(BackboneConfig(kind="hf_clip", path=str(tmp_path / "c")))
    # the factor transformers writes (1/255 as a float) is the one this reader applies
    (tmp_path / "c" / "preprocessor_config.json").write_text(json.dumps({"rescale_factor": 0.00392156862745098}))
    assert pixel_spec(model)[1] == (0.48145466, 0.4578275, 0.40821073)


def test_hidden_files_in_mtil_class_folders_are_not_images_of_the_dataset(tmp_path):
    """macOS's ._x.png forks were counted as failed decodes, and a viewer's .thumbnails/ were trained on."""
    from desmoe.vision.mtil import load_mtil_task

    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / "dtd" / split / cls
            (folder / ".thumbnails").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "x.png")
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / ".thumbnails" / "x.png")
            (folder / "._x.png").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")  # an AppleDouble header, not a PNG
    task = load_mtil_task("dtd", tmp_path / "dtd", size=16)
    assert task.meta["skipped"] == 0 and task.train_y.tolist() == [0, 1] and task.test_y.tolist() == [0, 1]
    with Image.open(tmp_path / "dtd" / "train" / "b" / "x.png") as img:
        assert torch.equal(task.train_x[1], torch.from_numpy(np.array(img)))
