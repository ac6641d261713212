"""The shapes world: deterministic renders, exact labels, captions and their parsing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from noisewise.shapes import (
    BACKGROUNDS,
    COLORS,
    DEFECTS,
    POSITIONS,
    SHAPES,
    ObjectSpec,
    build_dataset,
    caption,
    labels,
    parse_prompt,
    render,
    sample_scene,
    scene_for_request,
)
from noisewise.shapes.world import BACKGROUND_RGB, COLOR_RGB, POSITION_XY, RESOLUTION, shape_mask


def scene(i: int):
    return sample_scene(np.random.default_rng([7, i]))


def test_render_is_a_pure_function_of_the_seed():
    for i in range(20):
        a, b = render(scene(i)), render(scene(i))
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(render(scene(0)), render(scene(1)))


def test_dataset_does_not_depend_on_workers_or_chunking():
    a = build_dataset(60, seed=3, workers=1, chunk=60)
    b = build_dataset(60, seed=3, workers=2, chunk=7)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    for k in a.labels:
        np.testing.assert_array_equal(a.labels[k], b.labels[k])


def test_labels_match_the_pixels():
    """Exact labels: the background colour fills the corners, each object's colour sits at its
    position, the empty positions show background, and objects never overlap."""
    for i in range(200):
        s = sample_scene(np.random.default_rng([11, i]), defects=[])
        img = render(s).astype(int)
        assert np.abs(img[0, 0] - np.array(s.background_rgb)).max() <= 1
        assert 1 <= len(s.objects) <= 2
        lab = labels(s)
        assert lab["background"] == BACKGROUNDS.index(s.background)
        for o in s.objects:
            p = POSITIONS.index(o.position)
            assert lab["shape"][p] == SHAPES.index(o.shape) and lab["color"][p] == COLORS.index(o.color)
            y, x = int(o.cy * RESOLUTION), int(o.cx * RESOLUTION)
            # the centre pixel is the object's colour (triangles: a bit below the centre)
            y = y + 1 if o.shape == "triangle" else y
            assert np.abs(img[y, x] - np.array(o.rgb)).max() <= 3, (i, o)
            assert np.abs(np.array(o.rgb) - np.array(COLOR_RGB[o.color])).max() <= 12
        for p in POSITIONS:
            if s.object_at(p) is None and all(np.hypot(*(np.array(POSITION_XY[p]) - (o.cx, o.cy))) > 0.3
                                               for o in s.objects):
                x, y = (np.array(POSITION_XY[p]) * RESOLUTION).astype(int)
                assert np.abs(img[y, x] - np.array(s.background_rgb)).max() <= 1
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.position != b.position
            assert not (shape_mask(a.shape, a.cx, a.cy, a.radius) & shape_mask(b.shape, b.cx, b.cy, b.radius)).any()
        assert not lab["defects"].any()


def test_defects_change_the_image_as_named():
    rng = np.random.default_rng(0)
    base = sample_scene(rng, objects=[ObjectSpec("circle", "red", "large", "center")], background="gray", defects=[])
    clean = render(base).astype(float)
    for d in DEFECTS:
        s = type(base)(base.background, base.objects, {d: {"blurry": 1.2, "noisy": 0.08, "watermark": 0.45}[d]},
                       base.background_rgb, base.noise_seed)
        img = render(s).astype(float)
        diff = np.abs(img - clean)
        if d == "watermark":  # only the bottom-right corner changes
            assert diff[:24].max() == 0 and diff[24:, 20:].max() > 40
        elif d == "blurry":  # edges soften: less high-frequency energy, same mean
            hf = lambda x: (np.diff(x, axis=0) ** 2).mean()  # noqa: E731
            assert hf(img) < 0.6 * hf(clean) and abs(img.mean() - clean.mean()) < 1.0
        else:  # grain everywhere, about the named strength
            assert 0.06 * 255 < (img - clean).std() < 0.10 * 255


def test_defect_and_object_frequencies():
    n = 3000
    scenes = [sample_scene(np.random.default_rng([5, i])) for i in range(n)]
    for d in DEFECTS:
        rate = np.mean([d in s.defects for s in scenes])
        assert 0.10 <= rate <= 0.25, (d, rate)
    two = np.mean([len(s.objects) == 2 for s in scenes])
    assert 0.25 < two < 0.45
    for name, values in (("background", BACKGROUNDS),):
        counts = [sum(s.background == v for s in scenes) for v in values]
        assert min(counts) > n / len(values) * 0.8, (name, counts)


def _consistent(spec: ObjectSpec, o) -> bool:
    return all(getattr(spec, k) in (None, getattr(o, k)) for k in ("shape", "color", "size", "position"))


def test_parse_of_every_caption_agrees_with_the_labels():
    n, empty, named = 3000, 0, 0
    for i in range(n):
        rng = np.random.default_rng([9, i])
        s = sample_scene(rng)
        c = caption(s, rng)
        r = parse_prompt(c)
        empty += c == ""
        assert r.background in (None, s.background), c
        assert set(r.defects) <= set(s.defects), c
        if r.objects:
            named += 1
            assert len(r.objects) == len(s.objects), c
            assert any(all(_consistent(a, b) for a, b in zip(r.objects, p))
                       for p in itertools.permutations(s.objects)), c
    assert 0.07 < empty / n < 0.13  # the unconditional share classifier-free guidance needs
    assert named > 0.8 * n


@pytest.mark.parametrize(
    "prompt, objects, background, defects",
    [
        ("a large red circle on the left on a white background", [("circle", "red", "large", "left")], "white", ()),
        ("red disc", [("circle", "red", None, None)], None, ()),
        ("a blurry blue square at the top", [("square", "blue", None, "top")], None, ("blurry",)),
        ("two shapes: a green cross and a yellow triangle",
         [("cross", "green", None, None), ("triangle", "yellow", None, None)], None, ()),
        ("a tiny violet plus sign in the middle against a grey background, watermarked",
         [("cross", "purple", "small", "center")], "gray", ("watermark",)),
        ("a big orange box on the right and a small green disk at the bottom",
         [("square", "orange", "large", "right"), ("circle", "green", "small", "bottom")], None, ()),
        ("a red shape on the left", [(None, "red", None, "left")], None, ()),
        ("", [], None, ()),
        ("blurry, noisy, watermark", [], None, ("blurry", "noisy", "watermark")),
    ],
)
def test_parse_prompt_examples(prompt, objects, background, defects):
    r = parse_prompt(prompt)
    assert [(o.shape, o.color, o.size, o.position) for o in r.objects] == objects
    assert r.background == background and r.defects == defects


def test_captions_are_varied():
    caps = {caption(scene(i), np.random.default_rng([1, i])) for i in range(500)}
    assert len(caps) > 400
    text = " ".join(caps)
    for word in ("disc", "box", "plus", "big", "little", "middle", "background", "two shapes"):
        assert word in text


def test_scene_for_request_satisfies_it():
    for i, p in enumerate(["a large red circle on the left", "a green cross and a yellow triangle on black",
                           "a blurry blue square at the top on a white background", "a small shape"]):
        r = parse_prompt(p)
        for j in range(20):
            s = scene_for_request(r, np.random.default_rng([i, j]))
            assert len(s.objects) == len(r.objects)
            assert r.background in (None, s.background) and set(s.defects) == set(r.defects)
            assert any(all(_consistent(a, b) for a, b in zip(r.objects, perm))
                       for perm in itertools.permutations(s.objects))


def test_bad_constraints_teach():
    with pytest.raises(ValueError, match="known: circle"):
        sample_scene(np.random.default_rng(0), objects=[ObjectSpec(shape="hexagon")])
    with pytest.raises(ValueError, match="share a position"):
        sample_scene(np.random.default_rng(0), objects=[ObjectSpec(position="left"), ObjectSpec(position="left")])
    with pytest.raises(ValueError, match="overlap"):
        sample_scene(np.random.default_rng(0), objects=[ObjectSpec(size="large", position="left"),
                                                         ObjectSpec(size="large", position="center")])


def test_background_colours_are_distinct():
    assert len({BACKGROUND_RGB[b] for b in BACKGROUNDS}) == 3
    assert len({COLOR_RGB[c] for c in COLORS}) == 6


def test_share_of_two_object_scenes():
    """``p_two_objects`` moves the share of two-object scenes; the default repeats the prior's draws exactly."""
    n_objects = lambda d: (d.labels["shape"] >= 0).sum(axis=1)  # noqa: E731
    base = build_dataset(300, seed=4, n_captions=1)
    same = build_dataset(300, seed=4, n_captions=1, p_two_objects=0.35)
    assert np.array_equal(base.images, same.images) and base.captions == same.captions
    assert set(n_objects(build_dataset(60, seed=4, n_captions=1, p_two_objects=1.0))) == {2}
    assert set(n_objects(build_dataset(60, seed=4, n_captions=1, p_two_objects=0.0))) == {1}
    share = float((n_objects(build_dataset(300, seed=4, n_captions=1, p_two_objects=0.6)) == 2).mean())
    assert 0.5 < share < 0.7 and float((n_objects(base) == 2).mean()) < 0.45
    with pytest.raises(ValueError, match="probability in"):
        sample_scene(np.random.default_rng(0), p_two_objects=1.5)
