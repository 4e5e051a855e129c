"""A saved dual-encoder folder copied without its tokenizer/ is refused in one line."""
import shutil

import pytest

from desmoe.errors import UserError
from desmoe.models.dual_encoder import load_dual_encoder, save_dual_encoder, tiny_dual_encoder


def test_folder_without_tokenizer_is_refused_in_one_line(tmp_path):
    model, tok = tiny_dual_encoder()
    folder = save_dual_encoder(model, tok, tmp_path / "de")
    load_dual_encoder(folder)
    (folder / "desmoe-manifest.json").unlink()  # a hand-made copy: no manifest to catch what is missing
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(UserError, match=r"de: not a saved dual encoder \(expected config.json, model.safetensors "
                                        r"and tokenizer/\)") as err:
        load_dual_encoder(folder)
    assert "\n" not in str(err.value)
