"""GGUF sources as users bring them: a folder or wheel often holds several quantisations of one model."""
import zipfile

import pytest

from desmoe.errors import UserError
from desmoe.models.gguf import dequantize_gguf


@pytest.mark.parametrize("packed", [False, True])
def test_several_gguf_files_are_refused_not_the_first_taken(tmp_path, packed):
    """Before the fix the first name in sorted order was dequantised (here the Q4_1 one, never read
    because the refusal comes first), whichever of the two the user meant."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("smol-Q4_1.gguf", "smol-Q8_0.gguf"):
        (folder / name).write_bytes(b"GGUF")
    source = folder
    if packed:
        source = tmp_path / "model.whl"
        with zipfile.ZipFile(source, "w") as archive:
            for f in sorted(folder.iterdir()):
                archive.write(f, f"pkg/{f.name}")
    with pytest.raises(UserError) as err:
        dequantize_gguf(source, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and str(source) in msg and "2 .gguf files" in msg and "smol-Q8_0.gguf" in msg, msg
    assert not (tmp_path / "out").exists()


def _embed(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")["model.embed_tokens.weight"]


def test_the_cached_folder_is_reused_only_for_the_same_gguf_and_dtype(tmp_path):
    """launcher/upcycle.py caches the dequantised model at <out>.dense: a second run with another GGUF and
    the same out got the first model back (any folder with config.json and safetensors was reused)."""
    import torch

    from gguf_tiny import write_tiny_gguf

    a, b = (write_tiny_gguf(tmp_path / f"{n}.gguf", seed) for n, seed in (("a", 0), ("b", 1)))
    out = tmp_path / "out.dense"
    first = _embed(dequantize_gguf(a, out))
    second = _embed(dequantize_gguf(b, out))
    assert not torch.equal(first, second)
    assert torch.equal(second, _embed(dequantize_gguf(b, tmp_path / "fresh")))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    dequantize_gguf(b, out)  # the same bytes: reused, not remade
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert _embed(dequantize_gguf(b, out, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("vocab_size_key", [True, False])
def test_a_token_list_longer_than_the_embedding_is_one_line(tmp_path, vocab_size_key):
    """8 tokens past the embedding's 32 rows.  With ``llama.vocab_size`` the folder was written and its
    tokenizer produced ids 32..39, which no embedding row holds; without it transformers' size mismatch
    ended in a traceback.  Both are now one line naming the GGUF."""
    from gguf_tiny import write_tiny_gguf

    source = write_tiny_gguf(tmp_path / "long.gguf", 0, extra_tokens=8, vocab_size_key=vocab_size_key)
    with pytest.raises(UserError) as err:
        dequantize_gguf(source, tmp_path / "out")
    msg = " ".join(str(err.value).split())
    assert str(err.value) == msg and "long.gguf" in msg, msg
    if vocab_size_key:
        assert "40 tokens" in msg and "vocab_size is 32" in msg, msg
    assert not (tmp_path / "out").exists()
