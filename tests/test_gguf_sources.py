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
