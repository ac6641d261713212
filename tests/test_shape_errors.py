"""The error analysis of bench/bench_model_errors.py (noisewise.shapes.errors), the prompt-word
reading it relies on, and the object matching the accuracy is scored with: hand-built prompts and
predictions whose breakdown is known exactly."""

from __future__ import annotations

import pytest

from noisewise.shapes.captions import is_synonym, parse_prompt, prompt_words
from noisewise.shapes.errors import error_breakdown, rate
from noisewise.shapes.evaluator import PredictedObject, Prediction, match_objects, score


def P(*objs: tuple[str, str, str, str], background: str = "black") -> Prediction:
    return Prediction(background, tuple(PredictedObject(*o) for o in objs), ())


def test_prompt_words_name_the_word_behind_every_attribute():
    w = prompt_words("a big violet disc in the middle and a small red plus sign on the left on a grey background")
    assert w.background == "grey"
    assert w.objects == (
        {"shape": "disc", "color": "violet", "size": "big", "position": "middle"},
        {"shape": "plus", "color": "red", "size": "small", "position": "left"},
    )
    assert prompt_words("a blue shape at the top").objects == (
        {"shape": None, "color": "blue", "size": None, "position": "top"},)
    assert is_synonym("color", "violet") and not is_synonym("color", "purple")
    assert is_synonym("shape", "disc") and is_synonym("shape", "plus") and not is_synonym("shape", "cross")
    assert is_synonym("size", "tiny") and not is_synonym("size", "small")
    assert is_synonym("position", "middle") and not is_synonym("position", "center")
    assert is_synonym("background", "grey") and not is_synonym("background", "gray")
    with pytest.raises(ValueError, match="not a color word"):
        is_synonym("color", "teal")


def test_match_objects_is_the_assignment_score_uses():
    req = parse_prompt("a red circle on the left and a blue square on the right")
    # colours swapped: shape + position decide the match (2 hits each), both colours then fail
    pred = P(("circle", "blue", "small", "left"), ("square", "red", "small", "right"))
    m = match_objects(req, pred)
    assert [o.shape for o in m] == ["circle", "square"]
    assert score(req, pred)["color"] == [False, False] and score(req, pred)["shape"] == [True, True]
    # one object drawn: the other requested object is matched to nothing and fails everything
    only = P(("square", "blue", "small", "right"))
    assert match_objects(req, only) == [None, only.objects[0]]
    assert score(req, only) == {"background": [], "shape": [False, True], "color": [False, True],
                                "size": [], "position": [False, True]}


def test_error_breakdown_counts_by_hand():
    prompts = [
        "a red circle on the left and a blue square on the right",  # colours swapped
        "a red circle on the left and a blue square on the right",  # only the square drawn
        "a violet disc",                                            # read as blue
        "a purple circle on a grey background",                     # right
        "an orange cross at the top",                               # read as red, at the centre
    ]
    preds = [
        P(("circle", "blue", "small", "left"), ("square", "red", "small", "right")),
        P(("square", "blue", "small", "right")),
        P(("circle", "blue", "large", "center")),
        P(("circle", "purple", "large", "center"), background="gray"),
        P(("cross", "red", "small", "center")),
    ]
    b = error_breakdown(prompts, preds)
    one, two = b["by_objects"]["1"], b["by_objects"]["2"]
    assert one["n_color"] == 3 and one["color"] == pytest.approx(1 / 3)
    assert two["n_color"] == 4 and two["color"] == pytest.approx(1 / 4)  # only the second image's square
    assert two["shape"] == pytest.approx(3 / 4) and two["all"] == 0.0
    assert one["position"] == 0.0 and one["n_position"] == 1
    c = b["confusion"]["color"]
    assert c["red"] == {"blue": 1, "none": 1}
    assert c["blue"] == {"red": 1, "blue": 1}
    assert c["purple"] == {"blue": 1, "purple": 1} and c["orange"] == {"red": 1}
    assert b["per_value"]["color"]["purple"] == [1, 2] and b["per_value"]["color"]["red"] == [0, 2]
    assert b["confusion"]["position"]["top"] == {"center": 1}
    assert b["confusion"]["shape"]["circle"] == {"circle": 3, "none": 1}
    # words: violet failed, purple succeeded; grey (a synonym) succeeded; disc is a synonym
    assert b["by_word"]["color"]["violet"] == [0, 1] and b["by_word"]["color"]["purple"] == [1, 1]
    assert b["synonyms"]["color"] == {"own name": [2, 6], "synonym": [0, 1]}
    assert b["synonyms"]["shape"]["synonym"] == [1, 1] and b["by_word"]["background"] == {"grey": [1, 1]}
    # binding: 4 colour reads in two-object prompts with different colours; 3 wrong, 2 swapped
    assert b["binding"]["color"] == {"pairs": 4, "errors": 3, "swapped": 2}
    assert b["binding"]["shape"] == {"pairs": 4, "errors": 1, "swapped": 0}
    assert b["binding"]["position"] == {"pairs": 4, "errors": 1, "swapped": 0}
    assert b["binding_images"]["color"] == {"images": 1, "both right": 0, "exchanged": 1, "same value": 0, "other": 0}
    assert b["binding_images"]["shape"]["both right"] == 1 and b["binding_images"]["size"]["images"] == 0
    assert b["synonyms_by_objects"]["1"]["color"] == {"own name": [1, 2], "synonym": [0, 1]}
    assert b["synonyms_by_objects"]["2"]["color"] == {"own name": [1, 4], "synonym": [0, 0]}
    assert b["missing"] == {"1": [0, 3], "2": [1, 4]}
    assert b["missing_by_size"] == {"1": {"unnamed": [0, 3]}, "2": {"unnamed": [1, 4]}}
    sized = error_breakdown(["a tiny red circle on the left and a big blue square on the right"] * 2,
                            [P(("square", "blue", "large", "right")),
                             P(("circle", "red", "small", "left"), ("square", "blue", "large", "right"))])
    assert sized["missing_by_size"] == {"2": {"large": [0, 2], "small": [1, 2]}}
    assert rate([1, 4]) == 0.25 and rate([0, 0]) != rate([0, 0])  # NaN for no data


def test_error_breakdown_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="one prediction per prompt"):
        error_breakdown(["a red circle"], [])
