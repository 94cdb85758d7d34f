import numpy as np
import pytest
import torch

from gts_lum.modeling.behavior_features import BehaviorFeatures, BusinessCodebook
from gts_lum.modeling.qformer import (
    QFormer,
    QFormerConfig,
    TextProjectionAdapter,
    build_adapter,
    load_adapter,
    save_adapter,
    stream_mask,
)

DESCRIPTIONS = [
    "Streams a film on CineBox over 5G",
    "Streams a film on CineBox over 4G",
    "Watches live sports on CineBox over Wi-Fi",
    "Scrolls through short videos on ClipTok over 5G",
    "Sends chat messages on LinkBook over Wi-Fi",
    "Streams music on GrooveRadio over 4G",
    "Video playback fails on QuickCam",
    "Sends an SMS while roaming in France",
    "Makes a voice call while roaming in Germany",
    "Receives a reminder that the monthly bill is overdue",
    "Asks customer care about the monthly bill through social media",
    "Downloads a game update for Rune Saga over 4G",
]
TINY = dict(
    num_queries=3,
    num_layers=2,
    num_heads=2,
    hidden_size=16,
    intermediate_size=32,
    dropout=0.0,
    decoder_hidden_size=24,
    contrast_size=8,
    max_text_len=16,
    max_window=6,
    num_business_codes=4,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def features(business=("graph", "table"), seed=0) -> BehaviorFeatures:
    rng = np.random.default_rng(seed)
    n = len(DESCRIPTIONS)
    dims = {"graph": 8, "table": 6}
    return BehaviorFeatures(
        semantic_ids=np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n)], 1),
        codebook_sizes=[4, 3],
        business={m: rng.normal(size=(n, dims[m])).astype(np.float32) for m in business},
        business_seen={m: rng.random(n) < 0.8 for m in business},
        text_embeddings=rng.normal(size=(n, 10)).astype(np.float32),
        descriptions=list(DESCRIPTIONS),
    )


def model(variant="qformer", feats=None, **kw) -> QFormer:
    torch.manual_seed(0)
    return build_adapter(QFormerConfig(variant=variant, **(TINY | kw)), feats or features())


def test_stream_mask_hand_computed():
    # stream [q | i | t0 t1 t2], the last text token is padding
    item_pad = torch.tensor([[False]])
    text_pad = torch.tensor([[False, False, True]])
    Q, I, T, F_ = 1, 1, 1, 0
    expected = {
        "unimodal": [[Q, I, F_, F_, F_], [Q, I, F_, F_, F_], [F_, F_, T, T, F_], [F_, F_, T, T, F_], [F_, F_, T, T, F_]],
        "bidirectional": [[Q, I, T, T, F_], [Q, I, F_, F_, F_], [Q, F_, T, T, F_], [Q, F_, T, T, F_], [Q, F_, T, T, F_]],
        "causal": [[Q, I, F_, F_, F_], [Q, I, F_, F_, F_], [Q, F_, T, F_, F_], [Q, F_, T, T, F_], [Q, F_, T, T, F_]],
    }
    for kind, grid in expected.items():
        got = stream_mask(1, item_pad, text_pad, kind)
        assert got.shape == (1, 1, 5, 5)
        assert got[0, 0].int().tolist() == grid, kind
    with pytest.raises(ValueError, match="attention mask"):
        stream_mask(1, item_pad, text_pad, "sideways")


def _encode(m: QFormer, ids, kind):
    idx = torch.arange(len(ids))
    return m.encode(m.behavior_side(idx), ids, torch.zeros_like(ids, dtype=torch.bool), kind)


def test_masks_decide_who_sees_text():
    m = model().eval()
    ids, _ = m.descriptions(torch.arange(4))
    ids = ids[:, :6].clone()
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] % (len(m.tokenizer) - 4)) + 4
    changed[:, 3] += (changed[:, 3] == ids[:, 3]).long()
    for kind in ("unimodal", "causal"):  # queries never see text
        q0, _ = _encode(m, ids, kind)
        q1, _ = _encode(m, changed, kind)
        torch.testing.assert_close(q0, q1, rtol=0, atol=0)
    q0, _ = _encode(m, ids, "bidirectional")
    q1, _ = _encode(m, changed, "bidirectional")
    assert (q0 - q1).abs().max() > 1e-4
    # causal: text before the changed position is untouched, from it on it differs
    _, t0 = _encode(m, ids, "causal")
    _, t1 = _encode(m, changed, "causal")
    torch.testing.assert_close(t0[:, :3], t1[:, :3], rtol=0, atol=0)
    assert ((t0[:, 3:] - t1[:, 3:]).abs().amax(dim=(0, 2)) > 1e-4).all()
    # unimodal: text output does not depend on the behaviour either
    side_a, side_b = m.behavior_side(torch.arange(4)), m.behavior_side(torch.arange(4, 8))
    pad = torch.zeros_like(ids, dtype=torch.bool)
    torch.testing.assert_close(m.encode(side_a, ids, pad)[1], m.encode(side_b, ids, pad)[1], rtol=0, atol=0)


def test_fuse_is_the_text_free_query_path_and_batches_consistently():
    m = model().eval()
    out = m.fuse_all(batch_size=5)
    assert out.shape == (len(DESCRIPTIONS), TINY["decoder_hidden_size"]) and out.dtype == np.float32
    with torch.no_grad():
        single = torch.cat([m.fuse(torch.tensor([i])) for i in range(len(DESCRIPTIONS))]).numpy()
        # under the unimodal mask the query outputs ignore the text: fuse == the BTC pass's query path
        ids, pad = m.descriptions(torch.arange(len(DESCRIPTIONS)))
        q, _ = m.encode(m.behavior_side(torch.arange(len(DESCRIPTIONS))), ids, pad, "unimodal")
        via_btc = m.decoder_projection(m.fused_queries(q).mean(1)).numpy()
    np.testing.assert_allclose(out, single, atol=1e-5)
    np.testing.assert_allclose(out, via_btc, atol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-4  # behaviours differ


def test_compress_shape_and_padding_is_ignored():
    m = model().eval()
    windows = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with torch.no_grad():
        out = m.compress(windows, mask)
        other_padding = m.compress(torch.tensor([[0, 1, 2, 3], [4, 5, 9, 11]]), mask)
        reordered = m.compress(torch.tensor([[3, 2, 1, 0], [4, 5, 0, 0]]), mask)
    assert out.shape == (2, TINY["num_queries"], TINY["decoder_hidden_size"]) and m.compressed_tokens == TINY["num_queries"]
    torch.testing.assert_close(out, other_padding)
    assert (out[0] - reordered[0]).abs().max() > 1e-5  # window positions matter
    with pytest.raises(ValueError, match="max_window"):
        m.compress(torch.zeros(1, TINY["max_window"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="holds no behaviour"):
        m.compress(windows, torch.tensor([[True] * 4, [False] * 4]))


@pytest.mark.parametrize("variant", ["qformer", "no_qformer", "text_biz_id", "biz_text"])
@pytest.mark.parametrize("business", [("graph", "table"), ()])
def test_variants_and_missing_modalities_build_and_run(variant, business):
    feats = features(business)
    m = model(variant, feats).eval()
    assert m.modalities_used == ([] if variant == "no_qformer" else sorted(business))
    fused = m.fuse_all()
    assert fused.shape == (len(DESCRIPTIONS), TINY["decoder_hidden_size"]) and np.isfinite(fused).all()
    with torch.no_grad():
        comp = m.compress(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert comp.shape == (2, m.compressed_tokens, TINY["decoder_hidden_size"])
    if variant == "no_qformer":
        assert isinstance(m, TextProjectionAdapter)
        expected = feats.text_embeddings @ m.projection.weight.detach().numpy().T + m.projection.bias.detach().numpy()
        np.testing.assert_allclose(fused, expected, atol=1e-5)
        return
    side = m.behavior_side(torch.arange(3))
    items = {"qformer": 2, "text_biz_id": len(business)}.get(variant)
    if items is not None:
        assert side.items.shape[1] == items
    else:  # biz_text: the description's tokens
        assert side.items.shape[1] == int((~m.descriptions(torch.arange(3))[1]).sum(1).max())
    memory = {"text_biz_id": TINY.get("tokens_per_modality", 2)}.get(variant, 2 * len(business))
    assert (side.memory is None) if memory == 0 else side.memory.shape[1] == memory


def test_business_seen_flag_and_modality_choice():
    feats = features()
    m = model(feats=feats, modalities=["table"]).eval()
    assert m.modalities_used == ["table"]
    before = m.fuse_all()
    flipped = features()
    flipped.business_seen["table"] = ~flipped.business_seen["table"]
    flipped.business["graph"] += 100.0  # an unused modality changes nothing
    after = m.fuse_all(flipped)
    assert np.abs(before - after).max(axis=1).min() > 1e-5  # the fallback flag is read for every behaviour
    with pytest.raises(ValueError, match="lacks business modality 'table'"):
        m.set_catalog(features(("graph",)))
    with pytest.raises(ValueError, match="modalities"):
        model(modalities=["location"])


def test_save_load_roundtrip(tmp_path):
    for variant in ("qformer", "text_biz_id", "no_qformer"):
        m = model(variant).eval()
        save_adapter(m, tmp_path / variant)
        again = load_adapter(tmp_path / variant, features())
        np.testing.assert_array_equal(m.fuse_all(), again.fuse_all())
    with pytest.raises(FileNotFoundError, match="qformer.yaml"):
        load_adapter(tmp_path, features())


def test_behavior_features_checks_name_the_field():
    good = features()
    with pytest.raises(ValueError, match=r"semantic_ids: behaviour 2 has level-1 code 3 outside \[0, 3\)"):
        ids = good.semantic_ids.copy()
        ids[2, 1] = 3
        BehaviorFeatures(ids, [4, 3], good.business, good.business_seen, good.text_embeddings, good.descriptions)
    with pytest.raises(ValueError, match=r"business\['graph'\]: behaviour 5 has a non-finite"):
        bad = dict(good.business)
        bad["graph"] = bad["graph"].copy()
        bad["graph"][5, 0] = np.nan
        BehaviorFeatures(good.semantic_ids, [4, 3], bad, good.business_seen, good.text_embeddings, good.descriptions)
    with pytest.raises(ValueError, match="business_seen: modalities"):
        BehaviorFeatures(good.semantic_ids, [4, 3], good.business, {}, good.text_embeddings, good.descriptions)
    with pytest.raises(ValueError, match="text_embeddings: expected shape"):
        BehaviorFeatures(good.semantic_ids, [4, 3], good.business, good.business_seen, good.text_embeddings[:3], good.descriptions)


def test_behavior_features_build_subset_save(tmp_path):
    f = BehaviorFeatures.build(
        DESCRIPTIONS[:3],
        np.eye(3, dtype=np.float32),
        semantic_ids=np.array([[0, 2], [1, 0], [1, 1]]),
        business={"graph": np.ones((3, 2), np.float32)},
    )
    assert f.codebook_sizes == [2, 3] and f.business_seen["graph"].all() and f.modalities == ["graph"]
    sub = f.subset(np.array([2, 0]))
    assert sub.descriptions == [DESCRIPTIONS[2], DESCRIPTIONS[0]] and sub.semantic_ids.tolist() == [[1, 1], [0, 2]]
    f.save(tmp_path / "f.npz")
    g = BehaviorFeatures.load(tmp_path / "f.npz")
    assert g.descriptions == f.descriptions and g.codebook_sizes == f.codebook_sizes
    np.testing.assert_array_equal(g.business["graph"], f.business["graph"])


def test_business_codebook_assigns_nearest_centroid():
    emb = np.array([[0, 0], [0.1, 0], [5, 5], [5.2, 5]], np.float32)
    f = BehaviorFeatures.build(["a", "b", "c", "d"], np.zeros((4, 1), np.float32), business={"graph": emb})
    book = BusinessCodebook.fit(f, num_codes=2)
    codes = book.assign(f)[:, 0]
    assert codes[0] == codes[1] != codes[2] == codes[3]


def test_semantic_id_tokens_are_tree_nodes_by_default():
    """`semantic_id_tokens: prefix` (the paper's semantic ID): a token row per tree node, so two behaviours
    with the same code under different parents get different level-2 tokens; `code` shares that row."""
    from gts_lum.tokenizer.semantic_ids import semantic_id_prefixes

    feats = features()
    rows, sizes = semantic_id_prefixes(feats.semantic_ids)
    prefix, code = model(), model(semantic_id_tokens="code")
    assert [t.num_embeddings for t in prefix.item_tokens.tables] == sizes == prefix.spec.semantic_id_rows
    assert [t.num_embeddings for t in code.item_tokens.tables] == feats.codebook_sizes
    np.testing.assert_array_equal(prefix.catalog_semantic_ids.numpy(), rows)
    # same level-2 code, different level-1 parent
    ids = feats.semantic_ids
    a, b = next((i, j) for i in range(len(ids)) for j in range(len(ids)) if ids[i, 1] == ids[j, 1] and ids[i, 0] != ids[j, 0])
    assert prefix.catalog_semantic_ids[a, 1] != prefix.catalog_semantic_ids[b, 1]
    assert code.catalog_semantic_ids[a, 1] == code.catalog_semantic_ids[b, 1]
    other = features(seed=1)  # another tree with the same codebook sizes: other node counts
    if semantic_id_prefixes(other.semantic_ids)[1] != sizes:
        with pytest.raises(ValueError, match="another tree"):
            prefix.set_catalog(other)
    with pytest.raises(ValueError, match="semantic_id_tokens"):
        QFormerConfig(semantic_id_tokens="leaf")
