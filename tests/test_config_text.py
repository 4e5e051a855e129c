"""A text key given what YAML reads as another type (yes, 1.50, 2024-01-01, an empty value) is refused
with the key, what YAML made of it and the way out (quote it); a mapping's keys likewise."""
from dataclasses import dataclass, field

import pytest

from desmoe.config import load_config
from desmoe.errors import ConfigError
from desmoe.recipes.lm.recipe import LMExperiment


@pytest.mark.parametrize("written,message", [
    ("yes", "got True (YAML reads an unquoted yes/no/on/off/true/false as a boolean); quote it"),
    ("off", "got False (YAML reads an unquoted yes/no/on/off/true/false as a boolean); quote it"),
    ("1.50", "got 1.5 (YAML reads an unquoted number as a number); quote it"),
    ("0x1F", "got 31 (YAML reads an unquoted number as a number); quote it"),
    ("2024-01-01", "got 2024-01-01 (YAML reads an unquoted date as a date); quote it"),
    ("", "got None (YAML reads an empty value, null or ~ as null); quote it"),
])
def test_text_key_in_a_file_names_what_yaml_read(tmp_path, written, message):
    path = tmp_path / "exp.yaml"
    path.write_text(f"run:\n  name: {written}\n")
    with pytest.raises(ConfigError) as err:
        load_config(LMExperiment, path)
    assert str(err.value) == f"{path}: key 'run.name': expected a string, {message}"


@pytest.mark.parametrize("item", ["run.name=on", "run.name=3.0", "run.name=2024-01-01", "run.name=null"])
def test_text_key_in_an_override_is_refused_the_same_way(item):
    with pytest.raises(ConfigError, match=r"^defaults: key 'run.name': expected a string, got .*\); quote it$"):
        load_config(LMExperiment, overrides=[item])


@pytest.mark.parametrize("written", ["'yes'", "'1.50'", "'2024-01-01'", "1e3", "0123", "run-1"])
def test_text_that_yaml_keeps_or_that_is_quoted_is_taken_as_written(tmp_path, written):
    path = tmp_path / "exp.yaml"
    path.write_text(f"run:\n  name: {written}\n")
    assert load_config(LMExperiment, path).run.name == written.strip("'")


@dataclass
class Named:
    weights: dict[str, float] = field(default_factory=dict)


@pytest.mark.parametrize("written,shown", [("on", "True"), ("1.50", "1.5"), ("2024-01-01", "2024-01-01")])
def test_mapping_key_yaml_reads_as_another_type_is_refused(tmp_path, written, shown):
    path = tmp_path / "exp.yaml"
    path.write_text(f"weights:\n  {written}: 1.0\n  b: 2\n")
    with pytest.raises(ConfigError, match=rf"key 'weights\.{shown}': expected a text key, got .*; quote it$"):
        load_config(Named, path)
    path.write_text(f"weights:\n  '{written}': 1.0\n  b: 2\n")
    assert load_config(Named, path).weights == {written: 1.0, "b": 2.0}


@pytest.mark.parametrize("text,key,reading", [
    ("train:\n  yes: 1\n  foo: 2\n", "train.True", "an unquoted yes/no/on/off/true/false as a boolean"),
    ("train:\n  1: 2\n  x: 3\n", "train.1", "an unquoted number as a number"),
    ("on: 1\n", "True", "an unquoted yes/no/on/off/true/false as a boolean"),
])
def test_unknown_key_yaml_reads_as_another_type_is_one_line(tmp_path, text, key, reading):
    """Beside a string key, such a key ended in a TypeError (sorting True with 'foo')."""
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(LMExperiment, path)
    assert str(err.value).startswith(f"{path}: unknown key '{key}' (YAML reads {reading}; known here: ")
