"""The general-ability probes: items are well formed, and the harness scores their YAMLs as intended
(an oracle gets every item, a constant answer gets the choice tasks at chance and no exact match)."""
import random

import pytest

PROSE = ("The old man walked slowly along the river every morning. He liked to watch the boats pass by the "
         "bridge. Sometimes he talked to the fishermen about the weather. They told him stories of the sea "
         "and the storms. In winter the river froze and nobody could sail anymore. ") * 3
GCIDE = [{"prompt": f"{w}:", "choices": [d], "answer": 0, "source": "dictionary-gcide"} for w, d in
         [("Harp", "A stringed instrument played by plucking."), ("Anvil", "An iron block used by smiths."),
          ("Lantern", "A case for carrying a light."), ("Meadow", "A tract of grassland."),
          ("Frost", "Ice crystals formed on a cold surface."), ("Kettle", "A pot to boil water in; a kettle")]]


@pytest.fixture(scope="module")
def sets():
    from desmoe.evaluation.probes import arith_items, cloze_items, copy_items, define_items

    rng = random.Random(0)
    return {"probe_prose": [{"text": PROSE}], "probe_cloze": cloze_items([PROSE], 4, rng),
            "probe_define": define_items(GCIDE, 6, rng), "probe_arith": arith_items(5, rng),
            "probe_copy": copy_items(["apple", "river", "stone"], 3, rng)}


def test_items(sets):
    for item in sets["probe_cloze"] + sets["probe_define"]:
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
    for item in sets["probe_define"]:
        assert item["choices"][item["answer"]].lower() not in item["prompt"].lower()
    # an item whose definition names the word is dropped (the answer would be in the question)
    assert [i for i in sets["probe_define"] if "Kettle" in i["choices"][i["answer"]]] == []
    for item in sets["probe_arith"]:
        a, op, b = item["prompt"].splitlines()[-1].rstrip(" =").split()
        assert int(item["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def _lm(oracle: bool, answers: dict):
    from lm_eval.api.model import LM

    class Fake(LM):
        def loglikelihood(self, requests):
            # the oracle prefers the right choice; the constant model ties (the harness takes the first)
            return [(0.0 if oracle and answers.get(r.args[0]) == r.args[1] else -5.0, False) for r in requests]

        def loglikelihood_rolling(self, requests):
            return [-float(len(r.args[0])) for r in requests]  # 1 nat per character

        def generate_until(self, requests):
            return [f" {answers[r.args[0]]}\nmore" if oracle else " 0" for r in requests]

    return Fake()


def test_harness_scores_the_yamls(sets, tmp_path):
    import math

    from desmoe.evaluation.harness import run
    from desmoe.evaluation.probes import write_tasks

    info = write_tasks(sets, tmp_path)
    assert set(info) == set(sets) and info["probe_cloze"]["chance"] == 0.25
    answers = {}
    for task, rows in sets.items():
        for r in rows[1:] if task == "probe_prose" else rows:
            if "choices" in r:
                answers[r["prompt"]] = " " + r["choices"][r["answer"]]
            elif "answer" in r:
                answers[r["prompt"]] = r["answer"]
    # one task per template (rolling, multiple choice, exact match): each harness run costs seconds
    good = run(_lm(True, answers), ["probe_prose", "probe_define", "probe_arith"], tmp_path)
    assert good["probe_define"]["acc"] == 1.0 and good["probe_arith"]["exact_match"] == 1.0
    # 1 nat per character = 1/ln 2 bits per byte on ASCII text
    assert good["probe_prose"]["bits_per_byte"] == pytest.approx(1 / math.log(2))
    bad = run(_lm(False, answers), ["probe_define"], tmp_path)
    assert bad["probe_define"]["acc"] < 1
