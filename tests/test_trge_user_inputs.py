"""TRGE with the models and image tasks users bring: a local HF CLIP folder in bf16, with a weight missing or
with its own pixel normalisation, and task sequences whose class names cannot make a classifier.  Each is
either read exactly or refused in one line."""
import json

import pytest
import torch

from desmoe.errors import UserError


def _save_clip(folder, dtype=torch.float32, processor=None):
    from desmoe.models.dual_encoder import tiny_clip

    model, tok = tiny_clip()
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return model


def _backbone(folder):
    from desmoe.recipes.trge.backbones import BackboneConfig, load_backbone

    return load_backbone(BackboneConfig(kind="hf_clip", path=str(folder)))


def test_bf16_clip_folder_is_read_exactly_in_fp32(tmp_path):
    """transformers keeps a bf16 folder in bf16; the fp32 adapters then met bf16 activations (RuntimeError
    'mat1 and mat2 must have the same dtype' in the first step).  The upcast is exact."""
    saved = _save_clip(tmp_path / "clip", torch.bfloat16)
    bb = _backbone(tmp_path / "clip")
    params = dict(bb.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    for name, p in saved.named_parameters():
        assert torch.equal(params[name], p.float()), name


def test_clip_folder_missing_a_weight_is_refused(tmp_path):
    """transformers fills a missing weight with random values and only prints a table: silent wrong numbers."""
    from safetensors.torch import load_file, save_file

    _save_clip(tmp_path / "clip")
    path = tmp_path / "clip" / "model.safetensors"
    weights = load_file(path)
    del weights["visual_projection.weight"]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"clip: 1 CLIPModel weight\(s\) missing from the checkpoint "
                                        r"\(visual_projection.weight\); expected a complete CLIPModel$"):
        _backbone(tmp_path / "clip")


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.update(projection_dim=8), r"weight text_projection.weight is \[16, 32\] in the checkpoint but "
                                           r"config.json makes it \[8, 32\] \(2 weight\(s\) disagree"),
    (lambda c: c["vision_config"].update(image_size=64), r"weight vision_model.embeddings.position_embedding.weight "
                                                         r"is \[17, 32\] in the checkpoint but config.json makes it "
                                                         r"\[65, 32\] \(1 weight\(s\) disagree"),
])
def test_clip_folder_whose_config_disagrees_with_its_weights_names_the_weight(tmp_path, edit, expect):
    """transformers' error said only 'look at the above report' (a table on stdout)."""
    _save_clip(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    edit(config)
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=expect):
        _backbone(tmp_path / "clip")


def test_clip_tokenizer_without_pad_token_is_refused(tmp_path):
    """class prompts are padded to the longest: a tokenizer without pad_token stopped with a ValueError
    traceback at the first prompts."""
    _save_clip(tmp_path / "clip")
    path = tmp_path / "clip" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("pad_token")
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"clip': its tokenizer has no pad_token \(tokenizer_config.json\); "
                                        r"expected one, as CLIP's tokenizers have$"):
        _backbone(tmp_path / "clip").tokenize(["a cat", "a big dog"])


def test_clip_folder_normalisation_comes_from_its_preprocessor_config(tmp_path):
    """OpenAI's mean/std were used whatever the folder's preprocessor_config.json said."""
    _save_clip(tmp_path / "a", processor={"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.5]})
    bb = _backbone(tmp_path / "a")
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.25, 0.5, 0.5)
    px = bb.pixels(torch.full((1, 32, 32, 3), 255, dtype=torch.uint8))
    assert torch.equal(px[0, :, 0, 0], torch.tensor([2.0, 1.0, 1.0]))  # (1 - 0.5) / std, exact in fp32
    _save_clip(tmp_path / "b", processor={"image_mean": [0.5, 0.5, 0.5], "do_normalize": False})
    assert _backbone(tmp_path / "b").std == (1.0, 1.0, 1.0)
    _save_clip(tmp_path / "v5")  # transformers 5 saves a CLIPProcessor as processor_config.json
    from transformers import CLIPImageProcessor, CLIPProcessor

    from desmoe.models.dual_encoder import tiny_tokenizer

    CLIPProcessor(image_processor=CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
                  tokenizer=tiny_tokenizer()).save_pretrained(tmp_path / "v5")
    assert not (tmp_path / "v5" / "preprocessor_config.json").exists()
    assert _backbone(tmp_path / "v5").std == (0.5, 0.5, 0.5)
    _save_clip(tmp_path / "c")  # no preprocessor_config.json: OpenAI CLIP's statistics, as before
    from desmoe.recipes.trge.backbones import CLIP_MEAN

    assert _backbone(tmp_path / "c").mean == CLIP_MEAN
    _save_clip(tmp_path / "d", processor={"image_std": [0.5, 0.5]})
    with pytest.raises(UserError, match=r"preprocessor_config.json: 'image_std' is \[0.5, 0.5\], expected three "
                                        r"numbers \(one per RGB channel, each > 0\)$"):
        _backbone(tmp_path / "d")


def _offline(folder, classes_per_task):
    from desmoe.vision.tasks import ImageTask, save_index, save_task, task_entry

    tasks = []
    for i, classes in enumerate(classes_per_task):
        y = torch.arange(8) % len(classes)
        x = torch.zeros(8, 16, 16, 3, dtype=torch.uint8)
        tasks.append(ImageTask(f"t{i}", classes, ["a photo of a {}."], x, y, x.clone(), y.clone()))
        save_task(folder, tasks[-1])
    save_index(folder, [task_entry(t) for t in tasks])


@pytest.mark.parametrize("classes,expect", [
    # one class: 100 % at every stage, cross-entropy 0, the group never trains
    (["only"], r"task 't1': 1 class name\(s\) \['only'\]; expected at least 2 \(a one-class test set scores "
               r"100 % and trains nothing\)$"),
    # class folders "striped_dark" and "striped dark": one prompt, argmax always the first label
    (["striped dark", "dotted", "Striped  Dark"],
     r"task 't1': labels 0 and 2 have the same class name 'striped dark' / 'Striped  Dark' \(up to case and "
     r"spaces\); expected distinct class names \(their prompts would be identical\)$"),
])
def test_class_names_that_cannot_make_a_classifier_are_refused(tmp_path, classes, expect):
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, [["cat", "dog"], classes])
    with pytest.raises(UserError, match=expect):
        load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))


def test_odd_but_usable_class_names_load(tmp_path):
    """unicode names, a class present in two tasks: read as they are."""
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, [["café ☕", "dog"], ["dog", "straße"]])
    tasks, _ = load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))
    assert [t.classnames for t in tasks] == [["café ☕", "dog"], ["dog", "straße"]]


def test_task_arrays_that_are_not_uint8_rgb_per_label_are_refused(tmp_path):
    """A user-built <task>.npz with float pixels in [0, 1] was divided by 255 again (black images, a silent
    accuracy); more images than labels paired them wrongly."""
    import numpy as np

    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, [["cat", "dog"], ["red", "blue"]])
    with np.load(tmp_path / "t1.npz") as z:
        arrays = dict(z)
    for change, expect in (({"test_x": arrays["test_x"].astype(np.float32) / 255}, r"test_x is torch.float32 "
                            r"\[8, 16, 16, 3\] for 8 labels; expected uint8 RGB \[N, H, W, 3\] with N = the number "
                            r"of labels$"),
                           ({"train_x": arrays["train_x"][:6]}, r"train_x is torch.uint8 \[6, 16, 16, 3\] for 8 "
                                                                r"labels")):
        np.savez(tmp_path / "t1.npz", **{**arrays, **change})
        with pytest.raises(UserError, match=r"^task 't1': " + expect):
            load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))


def test_task_listed_twice_is_refused(tmp_path):
    """tasks.json naming one task twice read (and trained) the same <name>.npz twice without a word."""
    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, [["cat", "dog"], ["red", "blue"]])
    index = json.loads((tmp_path / "tasks.json").read_text())
    index["tasks"].append(dict(index["tasks"][0]))
    (tmp_path / "tasks.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"tasks.json: task 't0' is listed twice; expected distinct task names "
                                        r"\(one <name>.npz each\)$"):
        load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))


def test_non_square_photos_are_resized_and_centre_cropped_as_clip_does(tmp_path):
    """MTIL images were resized straight to a square (squashed); CLIP's test transform, which ZSCL's numbers
    use, resizes the shorter side and takes the centre crop."""
    import numpy as np
    from PIL import Image

    from desmoe.vision.mtil import load_mtil_task

    rng = np.random.default_rng(0)
    photos = {}
    for split in ("train", "test"):
        for cls, shape in (("a", (20, 40)), ("b", (45, 30))):  # wide and tall, H x W
            folder = tmp_path / "dtd" / split / cls
            folder.mkdir(parents=True)
            photos[split, cls] = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
            photos[split, cls].save(folder / "x.png")
    task = load_mtil_task("dtd", tmp_path / "dtd", size=16)
    # by hand: wide 40x20 -> 32x16, columns 8..24; tall 30x45 -> 16x24, rows round(4.0) = 4..20
    wide = photos["train", "a"].resize((32, 16), Image.BICUBIC).crop((8, 0, 24, 16))
    tall = photos["test", "b"].resize((16, 24), Image.BICUBIC).crop((0, 4, 16, 20))
    assert torch.equal(task.train_x[0], torch.from_numpy(np.asarray(wide)))
    assert torch.equal(task.test_x[1], torch.from_numpy(np.asarray(tall)))


def _tiny_mllm(folder):
    """A random image-text-to-text model (LLaVA layout at toy width) with its processor: a local MLLM folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from desmoe.models.dual_encoder import tiny_tokenizer

    tok = tiny_tokenizer(max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                         "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                         "{% if add_generation_prompt %}:{% endif %}")
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                              image_token_index=tok.convert_tokens_to_ids("<image>"),
                                              vision_feature_select_strategy="default")).save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=16, vision_feature_select_strategy="default", chat_template=tok.chat_template,
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)


def _mllm_run(run_dir, mllm):
    from desmoe.config import load_config
    from desmoe.recipes.trge.recipe import TRGEExperiment, run_trge

    cfg = load_config(TRGEExperiment, "configs/trge_digits.yaml", [
        f"run.dir={run_dir}", "run.name=mllm", "backbone.hidden_size=16", "groups.bottleneck=4",
        "train.steps_per_task=1", "train.micro_batch=4", "train.eval_batch=16", "train.proto_samples=8",
        "data.n_train=16", "data.n_test=8", "identifier.backend=mllm", f"identifier.mllm_path={mllm}",
        "identifier.mllm_images=2", "identifier.mllm_max_new_tokens=2", "eval.variants=[no_inter,oracle]"])
    return run_trge(cfg, "configs/zero2.json")


def test_mllm_identifier_with_test_time_variants(ranks, tmp_path):
    """identifier.backend=mllm with eval.variants: the variants' evaluation gave the MLLM no images
    (ValueError 'the MLLM identifier needs the images' after task 1).  A random local MLLM, 2 ranks."""
    _tiny_mllm(tmp_path / "mllm")
    s = ranks.run(_mllm_run, str(tmp_path), str(tmp_path / "mllm"))[0]
    assert len(s["accuracy_matrix"]) == 3 and set(s["variants"]) == {"no_inter", "oracle"}
    assert all(len(s["variants"][v]["accuracy_matrix"]) == 3 for v in s["variants"])


def test_gaussian_identifier_without_shrinkage_on_fewer_samples_than_dims_is_refused():
    """shrinkage 0 with N <= D samples: the covariance is singular and inv() returned huge values, so the
    identifier picked tasks at random without a word (a small task of a user's sequence)."""
    from desmoe.recipes.trge.task_id import GaussianIdentifier, TaskInfo

    feats = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    GaussianIdentifier(0.0, shrinkage=0.5).fit_task(TaskInfo("small", ["a", "b"], feats))  # shrunk: invertible
    with pytest.raises(UserError, match=r"^identifier.shrinkage=0: task 'small' has 8 fitting samples for 16 "
                                        r"feature dims, so its covariance is singular; expected shrinkage > 0"):
        GaussianIdentifier(0.0, shrinkage=0.0).fit_task(TaskInfo("small", ["a", "b"], feats))


def test_task_files_with_other_label_types_or_missing_arrays(tmp_path):
    """int32 labels (what many tools write) stopped inside the first step (cross_entropy takes int64); float
    labels, a missing array and a file that is not an npz were tracebacks."""
    import numpy as np

    from desmoe.recipes.trge.data import DataConfig, load_sequence

    _offline(tmp_path, [["cat", "dog"], ["red", "blue"]])
    with np.load(tmp_path / "t1.npz") as z:
        arrays = dict(z)
    np.savez(tmp_path / "t1.npz", **{**arrays, "train_y": arrays["train_y"].astype(np.int32)})
    tasks, _ = load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))
    assert tasks[1].train_y.dtype == torch.int64 and tasks[1].train_y.tolist() == arrays["train_y"].tolist()
    for write, expect in ((lambda p: np.savez(p, **{**arrays, "test_y": arrays["test_y"].astype(np.float32)}),
                           r"t1.npz: 'test_y' is torch.float32; expected integer class labels$"),
                          (lambda p: np.savez(p, **{k: v for k, v in arrays.items() if k != "test_x"}),
                           r"t1.npz: no 'test_x' array \(has: .*\); expected train_x, train_y, test_x, test_y$"),
                          (lambda p: p.write_bytes(b"not a zip"), r"t1.npz: not a readable task file \(")):
        write(tmp_path / "t1.npz")
        with pytest.raises(UserError, match=expect):
            load_sequence(DataConfig(sequence="offline", root=str(tmp_path)))
