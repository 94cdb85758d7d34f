"""Semantic IDs on real catalogues (simulator, MovieLens) with the real MiniLM: prefix sharing, uniqueness,
determinism, new behaviours, the saved artifact and its summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gts_lum.config import load_config
from gts_lum.data.ingest import prepare_dataset
from gts_lum.tokenizer.semantic_ids import SemanticIds, TokenizerConfig, build_semantic_ids, tokenize_dataset
from gts_lum.tokenizer.spectral_tree import SpectralTreeConfig, unit_rows
from gts_lum.tokenizer.text_encoder import TextEncoder, TextEncoderConfig

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def encoder_cfg(pytestconfig) -> TextEncoderConfig:
    # The pytest cache keeps vectors between runs: only the first run of the suite pays for encoding.
    return TextEncoderConfig(cache_dir=str(pytestconfig.cache.mkdir("gts-lum-text-embeddings")), device="cpu")


@pytest.fixture(scope="module")
def encoder(encoder_cfg) -> TextEncoder:
    return TextEncoder(encoder_cfg)


@pytest.fixture(scope="module")
def synth_clean(tmp_path_factory) -> Path:
    return prepare_dataset("synth:tiny", tmp_path_factory.mktemp("synth"), progress=False)


@pytest.fixture(scope="module")
def catalogue(synth_clean) -> pd.DataFrame:
    return pd.read_parquet(synth_clean / "behaviors.parquet")


@pytest.fixture(scope="module")
def built(catalogue, encoder) -> tuple[SemanticIds, np.ndarray]:
    return build_semantic_ids(catalogue, load_config(TokenizerConfig, "pkg:tokenizer/default.yaml"), encoder, progress=False)


def first_level_sharing(codes: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """P(same first code | same group), P(same first code | different groups), over distinct pairs."""
    same_group = groups[:, None] == groups[None, :]
    same_code = codes[:, None, 0] == codes[None, :, 0]
    off_diagonal = ~np.eye(len(groups), dtype=bool)
    return same_code[same_group & off_diagonal].mean(), same_code[~same_group].mean()


def test_behaviours_of_a_family_share_the_first_code(built, catalogue):
    ids, _ = built
    family = catalogue.set_index("behavior_id").loc[ids.behavior_ids, "family"].to_numpy()
    within, across = first_level_sharing(ids.codes, family)
    assert within >= 0.8 and across <= 0.25 and within >= 4 * across, (within, across)


@pytest.mark.skipif(not (DATA / "movielens-latest-small").is_dir(), reason=f"real data set {DATA / 'movielens-latest-small'} is absent")
def test_movies_of_a_genre_share_the_first_code(tmp_path, encoder):
    clean = prepare_dataset(DATA / "movielens-latest-small", tmp_path, mapping="pkg:adapters/movielens.yaml", progress=False)
    movies = pd.read_parquet(clean / "behaviors.parquet")
    # Single-genre movies of six genres, 50 each at most: big enough to mean something, small enough to encode fast.
    genres = ["Documentary", "Horror", "Comedy", "Drama", "Western", "Sci-Fi"]
    subset = movies[movies["genres"].isin(genres)].groupby("genres", group_keys=False).head(50)
    cfg = TokenizerConfig(encoder=encoder.cfg, tree=SpectralTreeConfig(branching=6, depth=2))
    ids, _ = build_semantic_ids(subset, cfg, encoder, progress=False)
    genre = subset.set_index(subset["behavior_id"].astype(str)).loc[ids.behavior_ids, "genres"].to_numpy()
    within, across = first_level_sharing(ids.codes, genre)
    assert within >= 0.6 and within >= 3 * across, (within, across)


def test_ids_are_unique_fixed_length_within_codebooks(built):
    ids, _ = built
    n, length = ids.codes.shape
    assert length == ids.id_length == 4 and ids.codes.dtype == np.int32
    assert len(np.unique(ids.codes, axis=0)) == n
    sizes = ids.codebook_sizes
    assert sizes[:3] == [8, 8, 8] and sizes[3] == ids.codes[:, 3].max() + 1
    assert (ids.codes >= 0).all() and (ids.codes < np.array(sizes)).all()
    # the suffix numbers each leaf's behaviours 0..m-1, most central first
    for leaf in np.unique(ids.leaf)[:20]:
        np.testing.assert_array_equal(np.sort(ids.codes[ids.leaf == leaf, 3]), np.arange((ids.leaf == leaf).sum()))
    np.testing.assert_array_equal(ids.lookup(ids.behavior_ids[[5, 0]]), ids.codes[[5, 0]])
    with pytest.raises(KeyError, match="no.such.behaviour"):
        ids.lookup(["no.such.behaviour"])


def test_build_is_deterministic_and_ignores_row_order(built, catalogue, encoder):
    ids, _ = built
    shuffled = catalogue.sample(frac=1.0, random_state=3)
    again, _ = build_semantic_ids(shuffled, load_config(TokenizerConfig, "pkg:tokenizer/default.yaml"), encoder, progress=False)
    assert again.version == ids.version
    np.testing.assert_array_equal(again.codes, ids.codes)
    np.testing.assert_array_equal(again.behavior_ids, ids.behavior_ids)


def test_new_behaviours_descend_next_to_their_nearest_neighbours(built, catalogue, encoder):
    _, x_all = built
    order = np.argsort(catalogue["behavior_id"].to_numpy())  # build_semantic_ids sorts by id: x_all is in that order
    table = catalogue.iloc[order].reset_index(drop=True)
    held = np.random.default_rng(0).choice(len(table), 60, replace=False)
    train = np.setdiff1d(np.arange(len(table)), held)
    ids, _ = build_semantic_ids(table.iloc[train], TokenizerConfig(encoder=encoder.cfg), encoder, progress=False)
    x = unit_rows(x_all)
    new_ids = table["behavior_id"].to_numpy()[held]
    grown = ids.extend_texts(new_ids, table["description"].iloc[held].tolist(), encoder)

    np.testing.assert_array_equal(grown.codes[: len(train)], ids.codes)  # old IDs never move
    assert len(np.unique(grown.codes, axis=0)) == len(grown.codes) and grown.version != ids.version
    new_codes = grown.lookup(new_ids)
    nearest = train[np.argmax(x[held] @ x[train].T, axis=1)]
    neighbour_codes = ids.lookup(table["behavior_id"].to_numpy()[nearest])
    assert (new_codes[:, 0] == neighbour_codes[:, 0]).mean() >= 0.9
    assert (new_codes[:, :2] == neighbour_codes[:, :2]).all(axis=1).mean() >= 0.7
    # known ids are left alone: extending with them changes nothing
    assert grown.extend(new_ids[:3], x[held[:3]]).version == grown.version


def test_new_behaviours_in_one_leaf_take_the_next_free_suffixes(built):
    ids, x = built
    twin = np.stack([x[10], x[10]])  # two new behaviours with the description of behaviour 10
    grown = ids.extend(["new.a", "new.b"], twin)
    leaf = grown.leaf[-2:]
    assert leaf[0] == leaf[1]
    top = ids.codes[ids.leaf == leaf[0], 3].max()
    np.testing.assert_array_equal(grown.codes[-2:, 3], [top + 1, top + 2])
    np.testing.assert_array_equal(grown.codes[-2:, :3], ids.tree.path_codes(leaf))


def test_extend_texts_refuses_another_encoder(built, encoder):
    ids, _ = built
    other = TextEncoder(dataclasses.replace(encoder.cfg, normalize=False))
    with pytest.raises(ValueError, match="differs from the tree's"):
        ids.extend_texts(["x"], ["Sends an SMS"], other)


def test_save_load_round_trip_without_pickle_and_tamper_check(built, tmp_path):
    ids, _ = built
    ids.save(tmp_path / "sid")
    loaded = SemanticIds.load(tmp_path / "sid")
    assert loaded.version == ids.version and loaded.codebook_sizes == ids.codebook_sizes
    np.testing.assert_array_equal(loaded.codes, ids.codes)
    np.testing.assert_array_equal(loaded.behavior_ids, ids.behavior_ids)
    for name in ("semantic_ids.npz", "tree.npz"):
        with np.load(tmp_path / "sid" / name, allow_pickle=False) as data:
            assert all(data[k].dtype != object for k in data.files)
    codes = ids.codes.copy()
    codes[0, 3] += 1
    np.savez(tmp_path / "sid" / "semantic_ids.npz", behavior_ids=ids.behavior_ids, codes=codes, leaf=ids.leaf)
    with pytest.raises(ValueError, match="does not match the recorded version"):
        SemanticIds.load(tmp_path / "sid")


def test_tokenize_dataset_writes_artifact_summary_and_counts_cache_hits(built, synth_clean, encoder_cfg, tmp_path):
    ids, _ = built  # built first: every description is already in the cache folder
    card = tokenize_dataset(
        synth_clean, tmp_path / "out", overrides={"encoder": {"cache_dir": encoder_cfg.cache_dir, "device": "cpu"}}, progress=False
    )
    assert card["cache_hits"] == len(ids.behavior_ids) and card["version"] == ids.version
    assert yaml.safe_load((tmp_path / "out" / "tokenizer.yaml").read_text())["version"] == ids.version
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"# Semantic IDs `{ids.version}`" in summary and "## Level 1" in summary and "## Level 2" in summary
    level1 = summary.split("## Level 1")[1].split("## Level 2")[0]
    assert sum(line.startswith("| `") for line in level1.splitlines()) == 8
    assert "over 5G" in level1  # example descriptions of the catalogue


def test_bad_behaviour_tables_are_named(encoder):
    good = pd.DataFrame({"behavior_id": ["a", "b"], "description": ["Sends an SMS", "Makes a call"]})
    with pytest.raises(ValueError, match="missing column 'description'"):
        build_semantic_ids(good[["behavior_id"]], encoder=encoder)
    with pytest.raises(ValueError, match="behaviour 'b' has no description"):
        build_semantic_ids(good.assign(description=["Sends an SMS", None]), encoder=encoder)
    with pytest.raises(ValueError, match="behaviour id 'a' appears 2 times"):
        build_semantic_ids(good.assign(behavior_id=["a", "a"]), encoder=encoder)
