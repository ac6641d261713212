"""The "shapes" world: procedurally rendered 32x32 scenes with exact labels and varied captions,
the data every shipped noisewise model is trained and measured on."""

from .captions import Request, caption, parse_prompt, scene_for_request
from .dataset import ShapesData, build_dataset, render_scenes, scene_at
from .world import (
    BACKGROUNDS,
    COLORS,
    DEFECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    ObjectSpec,
    Scene,
    labels,
    render,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "DEFECTS", "POSITIONS", "SHAPES", "SIZES", "Obj", "ObjectSpec", "Scene",
    "labels", "render", "sample_scene", "Request", "caption", "parse_prompt", "scene_for_request",
    "ShapesData", "build_dataset", "render_scenes", "scene_at",
]
