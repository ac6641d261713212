#!/usr/bin/env python
"""Pack what train/device_retrain.sh needs besides the repository into ``.devpack/`` so that the
device tool's 64 MiB limit on what travels (tracked files, ~42 MiB with the shipped weights, plus
the carried paths) holds:

- the MiniLM text encoder (``.minilm``, fp16, 44 MiB) without the rows of its 30,522 x 384 word
  embedding that no caption, benchmark prompt or negative prompt of the shapes world uses, and with
  its fp16 weights stored losslessly as lzma-compressed byte planes (~16 MiB). ``unpack`` rebuilds a
  ``.minilm`` folder whose token states are bit-identical for every text made of the kept tokens
  (unused rows become zeros; the pooler, unused by the token states, too);
- the diffusers wheel without its ~200 model-specific pipelines (noisewise loads only models,
  schedulers and configs from diffusers): 5.9 -> ~2 MiB.

    python train/pack_for_device.py pack                        # .minilm + .whl -> .devpack/
    python train/pack_for_device.py unpack --dest .minilm       # on the device (device_retrain.sh does it)
    python train/pack_for_device.py check --run /tmp/retrain    # every caption's tokens were kept?
    python train/pack_for_device.py size                        # what a run with carry=[".devpack"] sends
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WORD_EMB = "embeddings.word_embeddings.weight"
ZEROED = ("pooler.dense.weight", "pooler.dense.bias")  # BertModel's pooler: not part of the token states


def caption_texts(n_random: int = 20_000) -> list[str]:
    """Every word the shapes captions and prompts can contain (the grammar's word lists and
    templates), ``n_random`` random captions (with two-object scenes and defects), the benchmark
    and probe prompts, and the default negative prompt."""
    from noisewise.shapes import captions as C
    from noisewise.shapes.evaluator import benchmark_prompts
    from noisewise.shapes.world import BACKGROUNDS, COLORS, DEFECTS, POSITIONS, SHAPES, SIZES, sample_scene

    words: list[str] = [*BACKGROUNDS, *COLORS, *DEFECTS, *POSITIONS, *SHAPES, *SIZES, *C.GENERIC_WORDS]
    for table in (C.SHAPE_WORDS, C.SIZE_WORDS, C.COLOR_WORDS, C.POSITION_PHRASES):
        for ws in table.values():
            words += ws
    words += [*C.POSITION_WORDS, *C.BACKGROUND_WORDS, *C.DEFECT_WORDS]
    words += ["a", "an", "and", "two shapes:", ",", "on a background", "on", "against a background",
              "a blurry photo of", "blurry:", "blurred,", "a noisy image of", "grainy:", "noisy,",
              "with a watermark", ", watermarked", "(watermark)", "a and image", "low quality,", "grey gray"]
    texts = list(words)
    for i in range(n_random):
        rng = np.random.default_rng([77, i])
        texts.append(C.caption(sample_scene(rng, p_two_objects=0.5), rng))
    texts += benchmark_prompts(256, seed=30_000) + benchmark_prompts(200)
    sys.path.insert(0, str(ROOT / "train"))
    from train_shapes import SAMPLE_PROMPTS  # noqa: PLC0415

    texts += [*SAMPLE_PROMPTS, "blurry, watermark", "blurry, noisy, watermark", "noisy, watermark", ""]
    return texts


def token_ids(tokenizer_dir: Path, texts: list[str], max_length: int = 32) -> set[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids: set[int] = set(tok.all_special_ids)
    for i in range(0, len(texts), 4096):
        enc = tok(texts[i : i + 4096], padding="max_length", truncation=True, max_length=max_length)
        for row in enc["input_ids"]:
            ids.update(row)
    return ids


def pack_minilm(src: Path, dst: Path, texts: list[str]) -> dict:
    from safetensors.numpy import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    keep = sorted(token_ids(src, texts))
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    half, other, meta = [], {}, []
    for name, arr in state.items():
        if name in ZEROED:
            meta.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "zero": True})
            continue
        if name == WORD_EMB:
            other["kept_rows"] = arr[keep]
            meta.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "rows": True})
            continue
        if arr.dtype == np.float16:
            half.append(np.ascontiguousarray(arr).reshape(-1))
            meta.append({"name": name, "shape": list(arr.shape), "dtype": "float16", "planes": True})
        else:
            other[name] = arr
            meta.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype)})
    flat = np.concatenate(half).view(np.uint8).reshape(-1, 2)
    for k, plane in (("lo", flat[:, 0]), ("hi", flat[:, 1])):
        data = np.ascontiguousarray(plane).tobytes()
        (dst / f"{k}.xz").write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    save_file(other, str(dst / "rest.safetensors"))
    info = {"tensors": meta, "kept_ids": keep, "source": str(src)}
    (dst / "pack.json").write_text(json.dumps(info) + "\n")
    return info


def unpack_minilm(src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file, save_file

    info = json.loads((src / "pack.json").read_text())
    rest = load_file(str(src / "rest.safetensors"))
    lo = np.frombuffer(lzma.decompress((src / "lo.xz").read_bytes()), np.uint8)
    hi = np.frombuffer(lzma.decompress((src / "hi.xz").read_bytes()), np.uint8)
    flat = np.stack([lo, hi], axis=1).reshape(-1).view(np.float16)
    state, pos = {}, 0
    for t in info["tensors"]:
        shape, dtype = tuple(t["shape"]), np.dtype(t["dtype"])
        if t.get("zero"):
            state[t["name"]] = np.zeros(shape, dtype)
        elif t.get("rows"):
            emb = np.zeros(shape, dtype)
            emb[info["kept_ids"]] = rest["kept_rows"]
            state[t["name"]] = emb
        elif t.get("planes"):
            n = int(np.prod(shape))
            state[t["name"]] = flat[pos : pos + n].reshape(shape).copy()
            pos += n
        else:
            state[t["name"]] = rest[t["name"]]
    if pos != flat.size:
        raise ValueError(f"{src} is inconsistent: {flat.size} packed values, {pos} used")
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


def missing_tokens(packed: Path, texts: list[str]) -> list[str]:
    """The texts that use a token whose embedding row was not kept (their states would differ)."""
    kept = set(json.loads((packed / "pack.json").read_text())["kept_ids"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(packed))
    bad = []
    for i in range(0, len(texts), 4096):
        chunk = texts[i : i + 4096]
        for t, row in zip(chunk, tok(chunk, truncation=True, max_length=32)["input_ids"]):
            if not set(row) <= kept:
                bad.append(t)
    return bad


def slim_wheel(src: Path, dst_dir: Path) -> Path:
    """A copy of the diffusers wheel without ``diffusers/pipelines/<model>/`` and
    ``diffusers/modular_pipelines/<model>/`` (their package ``__init__`` files and shared modules stay)."""

    def dropped(name: str) -> bool:
        parts = name.split("/")
        return len(parts) > 3 and parts[0] == "diffusers" and parts[1] in ("pipelines", "modular_pipelines")

    dst_dir.mkdir(parents=True, exist_ok=True)
    out = dst_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for item in zin.infolist():
            if dropped(item.filename):
                continue
            data = zin.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(ln for ln in lines if not dropped(ln.split(",", 1)[0])) + "\n").encode()
            zout.writestr(item, data)
    return out


def travel_size(carry: list[str]) -> dict[str, float]:
    """MiB the device tool sends: tracked files, untracked files git does not ignore, carried paths."""
    import subprocess

    def files(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, check=True).stdout
        return [f for f in out.decode().split("\0") if f]

    def mib(paths: list[Path]) -> float:
        return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20

    sizes = {"tracked": mib([ROOT / f for f in files()]),
             "untracked, not ignored": mib([ROOT / f for f in files("--others", "--exclude-standard")])}
    for c in carry:
        sizes[f"carry {c}"] = mib([f for f in (ROOT / c).rglob("*")])
    sizes["total"] = sum(sizes.values())
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--minilm", default=str(ROOT / ".minilm"))
    p.add_argument("--wheels", default=str(ROOT / ".whl"))
    p.add_argument("--out", default=str(ROOT / ".devpack"))
    p.add_argument("--random-captions", type=int, default=20_000)
    p = sub.add_parser("unpack")
    p.add_argument("--src", default=str(ROOT / ".devpack" / "minilm"))
    p.add_argument("--dest", default=str(ROOT / ".minilm"))
    p = sub.add_parser("check", help="report captions of a rendered run whose tokens were not kept")
    p.add_argument("--run", required=True)
    p.add_argument("--src", default=str(ROOT / ".devpack" / "minilm"))
    p = sub.add_parser("size", help="MiB a device run would send (limit 64)")
    p.add_argument("--carry", nargs="*", default=[".devpack"])
    a = ap.parse_args()
    if a.cmd == "size":
        sizes = travel_size(a.carry)
        for k, v in sizes.items():
            print(f"{v:6.1f} MiB  {k}")
        print("fits the 64 MiB limit" if sizes["total"] < 64 else
              "OVER the 64 MiB limit: send the MiniLM in a call of its own first (docs/benchmarks/models.md, "
              "'Next GPU run')")
        return
    if a.cmd == "pack":
        out = Path(a.out)
        info = pack_minilm(Path(a.minilm), out / "minilm", caption_texts(a.random_captions))
        for w in sorted(Path(a.wheels).glob("diffusers-*.whl")):
            slim_wheel(w, out / "whl")
        for w in sorted(Path(a.wheels).glob("*.whl")):
            if not w.name.startswith("diffusers-"):
                shutil.copyfile(w, out / "whl" / w.name)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{len(info['kept_ids'])} token rows kept; {out}: {size / 2**20:.1f} MiB")
    elif a.cmd == "unpack":
        unpack_minilm(Path(a.src), Path(a.dest))
        print(f"rebuilt {a.dest}")
    else:
        from noisewise.shapes.dataset import ShapesData

        caps = sorted({c for cs in ShapesData.load(Path(a.run) / "data", mmap=True).captions for c in cs})
        bad = missing_tokens(Path(a.src), caps)
        print(f"{len(caps)} distinct captions, {len(bad)} with a token that was not kept"
              + (f", e.g. {bad[:3]}" if bad else ""))


if __name__ == "__main__":
    main()
