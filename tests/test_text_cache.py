"""Text-embedding cache: content keys, byte budget, hit/miss counters, pinned entries, thread safety."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from noisewise.pipeline.embcache import EmbeddingCache, tensor_bytes
from noisewise.pipeline.text import TextEncoder, default_text_encoder_path

pytest.importorskip("transformers")
try:
    default_text_encoder_path()
except ImportError:  # pragma: no cover
    pytest.skip("the bundled MiniLM text encoder is not installed", allow_module_level=True)

ML = 8
ENTRY = ML * 384 * 4  # bytes of one prompt's float32 states


@pytest.fixture(scope="module")
def shared_model():
    te = TextEncoder(max_length=ML)
    te.encode_uncached(["warm"])
    return te


def encoder(shared_model, **kw) -> TextEncoder:
    """A fresh encoder (own cache) reusing the loaded network and tokenizer of ``shared_model``."""
    te = TextEncoder(max_length=kw.pop("max_length", ML), **kw)
    te._model, te._tokenizer = shared_model._model, shared_model._tokenizer
    return te


def test_embedding_cache_byte_budget_and_pins():
    c = EmbeddingCache(max_bytes=3 * 400)
    t = [torch.full((10, 10), float(i)) for i in range(5)]  # 400 bytes each
    assert tensor_bytes(t[0]) == 400
    c.put("pin", t[0], pin=True)
    for i in (1, 2, 3):
        c.put(i, t[i])
    info = c.info()
    assert info["bytes"] == 3 * 400 and info["size"] == 3 and info["evictions"] == 1
    r = c.lookup([1, "pin", 3])
    assert r[0] is None
    torch.testing.assert_close(r[1], t[0])
    torch.testing.assert_close(r[2], t[3])
    assert c.misses == 1 and c.hits == 2
    for i in (4, 1, 2):
        c.put(i, t[i])
    assert "pin" in c and c.info()["pinned"] == 1 and c.nbytes <= 3 * 400
    c.put("huge", torch.zeros(1000))  # larger than the whole budget: not stored, nothing evicted
    assert "huge" not in c
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(max_bytes=-1)


def test_fetch_encodes_each_missing_key_once_and_pins():
    """``fetch``: one encode call with each distinct missing key once; cached keys are served; a key
    asked to be pinned is pinned whether it is new or was cached before."""
    c = EmbeddingCache(max_bytes=10 * 400)
    calls = []

    def enc(keys):
        calls.append(list(keys))
        return [torch.full((10, 10), float(len(k))) for k in keys]

    c.put("old", torch.zeros(10, 10))
    out = c.fetch(["aa", "old", "aa", "b"], enc, pinned={"old", "b"})
    assert calls == [["aa", "b"]]
    assert [float(v[0, 0]) for v in out] == [2.0, 0.0, 2.0, 1.0]
    assert c.info()["pinned"] == 2  # "b" stored pinned, "old" pinned now
    assert c.fetch(["b", "aa"], enc) and len(calls) == 1  # all cached: no encode
    with pytest.raises(ValueError, match="2 keys"):
        c.fetch(["x", "y"], lambda keys: [torch.zeros(1)])


def test_hits_misses_and_byte_eviction(shared_model):
    te = encoder(shared_model, cache_bytes=2 * ENTRY)
    s = te.encode(["a", "b", "a"])
    info = te.cache_info()
    assert (info["misses"], info["hits"], info["size"], info["bytes"]) == (3, 0, 2, 2 * ENTRY)
    te.encode(["a", "b"])
    assert te.cache_info()["hits"] == 2 and te.hits == 2 and te.misses == 3
    te.encode(["c"])  # evicts the least recently used ("a")
    assert te.cache_info()["evictions"] == 1 and te.cache_info()["bytes"] == 2 * ENTRY
    before = te.misses
    again = te.encode(["a"])
    assert te.misses == before + 1
    torch.testing.assert_close(again[0], s[0])
    torch.testing.assert_close(again[0], te.encode_uncached(["a"])[0])


def test_pinned_negative_prompt_survives(shared_model):
    te = encoder(shared_model, cache_bytes=2 * ENTRY)
    te.pinned_prompts.add("blurry, watermark")
    te.encode("blurry, watermark")
    for p in ["x", "y", "z", "w"]:
        te.encode(p)
    before = te.hits
    te.encode("blurry, watermark")
    assert te.hits == before + 1 and te.cache_info()["pinned"] == 1
    # warm(): encodes and pins ahead of the first request
    te2 = encoder(shared_model, cache_bytes=ENTRY)
    te2.warm(["", "blurry, watermark"])
    te2.encode(["q", "r"])
    h = te2.hits
    te2.encode(["", "blurry, watermark"])
    assert te2.hits == h + 2


def test_keys_depend_on_encoder_identity(shared_model, tmp_path):
    cache = EmbeddingCache()
    a = encoder(shared_model, cache=cache)
    b = encoder(shared_model, cache=cache, max_length=16)
    assert a.encoder_id != b.encoder_id
    sa = a.encode("a red circle")
    sb = b.encode("a red circle")  # same prompt, other max_length: a miss, its own shape
    assert cache.misses == 2 and sa.shape == (1, 8, 384) and sb.shape == (1, 16, 384)
    # another encoder folder (a copy of the same files elsewhere) and a quantized variant: other keys
    other = tmp_path / "enc"
    shutil.copytree(default_text_encoder_path(), other)
    c = encoder(shared_model, cache=cache)
    c.path = str(other)
    assert c.encoder_id != a.encoder_id
    a2 = encoder(shared_model, cache=cache)
    assert a2.encoder_id == a.encoder_id
    a2.encode("a red circle")
    assert cache.hits == 1  # the same encoder configuration shares entries
    a2.variant = "int8-dynamic"
    a2._id = None
    assert a2.encoder_id != a.encoder_id
    a3 = encoder(shared_model, cache=cache, dtype=torch.bfloat16)
    assert a3.encoder_id != a.encoder_id


def test_disabled_cache(shared_model):
    te = encoder(shared_model, cache_bytes=0)
    te.encode(["a", "a"])
    assert te.cache_info()["size"] == 0 and te.hits == 0
    te = encoder(shared_model, cache_size=0)
    te.encode(["a"])
    assert te.cache_info()["size"] == 0


def test_concurrent_tokenize_does_not_error(shared_model):
    te = encoder(shared_model)
    prompts = [f"a {c} {s}" + " big" * (i % 7) for i, (c, s) in
               enumerate((c, s) for c in ("red", "green", "blue") for s in ("circle", "square", "triangle"))]
    expect = {p: te.tokenize([p])[0]["input_ids"] for p in prompts}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(k: int) -> None:
        try:
            start.wait()
            for i in range(40):
                p = prompts[(k + i) % len(prompts)]
                ids = te.tokenize([p], check=bool(i % 2))[0]["input_ids"]
                assert torch.equal(ids, expect[p])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_embedding_cache_holds_dicts_of_tensors():
    """SD3 states are several named tensors per prompt: counted in bytes together, stored as copies."""
    c = EmbeddingCache(max_bytes=1000)
    v = {"a": torch.zeros(10), "b": torch.zeros(5, dtype=torch.float64)}
    assert tensor_bytes(v) == 10 * 4 + 5 * 8
    c.put("p", v)
    v["a"] += 1  # the caller's tensors are not the cached ones
    (got,) = c.lookup(["p"])
    assert c.nbytes == 80 and torch.equal(got["a"], torch.zeros(10))
    c.put("q", {"a": torch.zeros(250)})  # 1000 bytes: room only by evicting "p"
    assert c.lookup(["p"]) == [None] and c.evictions == 1
