"""Sharded checkpoints whose files hold tensors the index does not give them: transformers 5 reads every
tensor of every shard the index names (the last file's copy wins), desmoe reads the index's; such a folder
is refused in one line instead of loading a model other than transformers'."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_tiny import save_tiny

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    src = save_tiny("qwen3_moe", tmp_path_factory.mktemp("hf") / "qwen3_moe", seed=5)
    out = tmp_path_factory.mktemp("hf") / "sharded"
    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).save_pretrained(str(out), max_shard_size="20KB")
    return out


def _refused(path, *fragments):
    from desmoe.errors import UserError
    from desmoe.models.hf_moe import load_hf_moe

    with pytest.raises(UserError) as err:
        load_hf_moe(path)
    msg = str(err.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


@pytest.mark.parametrize("listed", [True, False])
def test_a_tensor_stored_in_a_shard_the_index_does_not_give_it_is_refused(sharded, tmp_path, listed):
    """``listed``: a second copy of the embedding in the last shard (transformers took that copy: measured
    here, before the fix desmoe took the index's); not ``listed``: the tensor is in no index entry."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = shutil.copytree(sharded, tmp_path / "model")
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    key = "model.embed_tokens.weight"
    home, last = weight_map[key], sorted(set(weight_map.values()))[-1]
    assert home != last
    copy = load_file(path / home)[key] + 1
    if not listed:
        index = json.loads((path / INDEX).read_text())
        del index["weight_map"][key]
        (path / INDEX).write_text(json.dumps(index))
    state = load_file(path / last)
    save_file({**state, key: copy}, str(path / last), metadata={"format": "pt"})
    if listed:
        ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        assert torch.equal(ref.model.embed_tokens.weight, copy)  # the stray copy, not the index's
    _refused(path, INDEX, "'weight_map'", key, *((last, home) if listed else ("no file",)))


def test_a_well_formed_sharded_folder_still_loads(sharded):
    from desmoe.models.hf_moe import load_hf_moe

    assert load_hf_moe(sharded) is not None


def test_a_tensor_under_its_old_and_its_new_name_is_refused(tmp_path):
    """Mixtral's ``block_sparse_moe.`` keys are read as ``mlp.``: a file holding both spellings of the router
    (e.g. a partly converted checkpoint, the new one with other values) loaded whichever key came last, without a word, before the fix."""
    path = save_tiny("mixtral", tmp_path / "mixtral", seed=3)
    state = load_file(path / "model.safetensors")
    old = "model.layers.0.block_sparse_moe.gate.weight"  # transformers 5 writes Mixtral's old names
    new = old.replace(".block_sparse_moe.", ".mlp.")
    save_file({**state, new: state[old] + 1}, str(path / "model.safetensors"), metadata={"format": "pt"})
    _refused(path, str(path), old, new)
