"""The serving export holds no raw user id: profile rows named by pseudonym, found by the scorer (issue 27, item 12)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from gts_lum.data.pseudonym import PSEUDONYM_KEY_ENV, pseudonymize_all
from gts_lum.serving.export import head_input_parts, head_inputs
from tests.serving.conftest import TINY_GTS_LUM, Offline
from tests.serving.test_scorer import predict_v1

KEY = "export-test-key-0123456789abcdef-0123456789"


@dataclass
class Profiled:
    model_dir: Path
    export: Path
    user_ids: np.ndarray  # raw ids of the training log


@pytest.fixture(scope="module")
def profiled(tiny_serving, tmp_path_factory) -> Profiled:
    """The tiny model trained again with a user profile table (a profile token), exported under KEY."""
    import torch

    from gts_lum.sequence.dataset import SequenceDataset
    from gts_lum.serving.export import export_model
    from gts_lum.stages.tables import encode_tables
    from gts_lum.stages.train import train_model

    root = tmp_path_factory.mktemp("profiled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_tables(tiny_serving.clean, root / "tables", behaviors=None)
        # profiles only: no semantic IDs among the artifacts
        overrides = {
            **TINY_GTS_LUM,
            "artifacts": {"tables": str(root / "tables")},
            "net": {**TINY_GTS_LUM["net"], "semantic_id_embedding": "none"},
        }
        train_model(tiny_serving.sequences, "gts_lum", None, overrides, root / "model")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(PSEUDONYM_KEY_ENV, KEY)
            export_model(root / "model", root / "export")
    finally:
        torch.set_num_threads(threads)
    return Profiled(root / "model", root / "export", SequenceDataset.load(tiny_serving.sequences).event_log.user_ids.astype(str))


def _users(folder: Path) -> dict:
    with np.load(folder / "assets" / "users.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_the_export_holds_no_raw_user_id(profiled, tiny_serving, monkeypatch):
    assert "vectors" in _users(profiled.model_dir), "the model under test has profile rows"
    files = [p for p in profiled.export.rglob("*") if p.is_file()]
    for user in profiled.user_ids[:50]:
        found = [str(p.relative_to(profiled.export)) for p in files if user.encode() in p.read_bytes()]
        assert not found, f"raw user id in {found}"
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, KEY)
    users = _users(profiled.export)
    assert users["user_ids"].tolist() == pseudonymize_all(profiled.user_ids).astype(str).tolist()
    assert yaml.safe_load((profiled.export / "serving.yaml").read_text())["users"] == {"ids": "pseudonyms", "rows": len(profiled.user_ids)}
    # a model without profile rows never looks a user up: its export holds no id at all, and needs no key
    assert _users(tiny_serving.export)["user_ids"].size == 0
    assert yaml.safe_load((tiny_serving.export / "serving.yaml").read_text())["users"] == {"ids": "none", "rows": 0}


def test_a_profiled_export_needs_its_key(profiled, monkeypatch):
    from gts_lum.serving.export import export_model, load_export

    monkeypatch.delenv(PSEUDONYM_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{PSEUDONYM_KEY_ENV} is not set"):
        load_export(profiled.export)
    with pytest.raises(
        ValueError, match=f"the model has user profile rows, which the export names by pseudonym: {PSEUDONYM_KEY_ENV} is not set"
    ):
        export_model(profiled.model_dir, profiled.export.parent / "again")
    assert not (profiled.export.parent / "again").exists()
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "another-key-of-at-least-32-bytes-0123456789")
    with pytest.raises(ValueError, match=f"users.npz: its users are pseudonyms made with another {PSEUDONYM_KEY_ENV}"):
        load_export(profiled.export)


def test_the_scorer_finds_a_users_profile_row_by_pseudonym(profiled, tiny_serving, tmp_path, monkeypatch):
    """A request's user id finds the profile row it had in training: the scorer's scores equal the training
    folder's (raw ids) on the same history, and differ from those of the same history without a user."""
    import torch

    from gts_lum.recommenders.registry import load_model
    from gts_lum.sequence.dataset import SequenceDataset
    from gts_lum.sequence.splits import EvalSet
    from gts_lum.serving.scorer import ServerProcess, launch_server

    log_ = SequenceDataset.load(tiny_serving.sequences).event_log
    monkeypatch.delenv(PSEUDONYM_KEY_ENV, raising=False)
    failed = ServerProcess(profiled.export, tmp_path / "nokey.log")
    assert failed.proc.wait(120) == 2 and f"{PSEUDONYM_KEY_ENV} is not set" in failed.log_tail()
    failed.stop()

    monkeypatch.setenv(PSEUDONYM_KEY_ENV, KEY)
    server = launch_server(profiled.export, tmp_path / "server.log")
    u = 3
    s, e = int(log_.offsets[u]), int(log_.offsets[u + 1])
    events = {"behavior_ids": log_.behavior_ids[log_.behavior[s:e]].astype(str).tolist(), "timestamps": log_.timestamp[s:e].tolist()}
    candidates = log_.behavior_ids[:6].astype(str).tolist()
    try:
        with_user = predict_v1(server, [{"user_id": str(log_.user_ids[u]), "events": events, "candidates": candidates}])
        without = predict_v1(server, [{"events": events, "candidates": candidates}])
    finally:
        server.stop()
    assert with_user.status_code == 200 and without.status_code == 200, with_user.text
    served = {r["behavior_id"]: r["score"] for r in with_user.json()["predictions"][0]["ranking"]}
    anonymous = {r["behavior_id"]: r["score"] for r in without.json()["predictions"][0]["ranking"]}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server: comparable scores
    try:
        model = load_model(profiled.model_dir)
        model.cfg.rerank_depth = len(candidates)  # request candidates are all scored target-aware
        case = EvalSet(np.array([u]), np.array([e]), np.zeros(1, np.int32), np.array([log_.timestamp[e - 1]]))
        offline = model.score(log_, case, np.arange(len(candidates)))[0]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose([served[c] for c in candidates], offline, rtol=1e-5, atol=1e-6)
    # re-ranked scores carry the offset 4 x scale (~57): a relative tolerance would hide the profile's effect
    assert not np.allclose([anonymous[c] for c in candidates], offline, rtol=0, atol=1e-6), "the profile row changed nothing"


def test_the_catalog_cache_scores_as_plain_scoring(tiny_serving, offline):
    """Issue 30: what the server computes once per load (b^F, P b^F, projected descriptors) gives the scores,
    rankings and head embeddings of plain `GTSLUM.score` / `user_embeddings`, two-stage and with candidates."""
    serving, model = offline.serving, offline.serving.model
    some = serving.default_candidates[::3]
    for u in range(0, offline.log.num_users, max(offline.log.num_users // 6, 1)):
        case = offline.case(u)
        for cand in (serving.default_candidates, some):
            plain = model.score(offline.log, case, cand)
            cached = model.score(offline.log, case, cand, serving.catalog_cache)
            np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-5)
        depth = model.cfg.rerank_depth
        model.cfg.rerank_depth = len(some)  # every candidate target-aware, as the scorer scores request candidates
        try:
            np.testing.assert_allclose(
                model.score(offline.log, case, some, serving.catalog_cache), model.score(offline.log, case, some), rtol=1e-5, atol=1e-5
            )
        finally:
            model.cfg.rerank_depth = depth
        idx, _ = serving.rank(offline.log, case)  # the server's path
        plain = model.score(offline.log, case, serving.default_candidates)[0]
        assert idx[0].tolist() == serving.default_candidates[np.argsort(-plain, kind="stable")[:10]].tolist()
        np.testing.assert_allclose(
            model.user_embeddings(offline.log, case, catalog=serving.catalog_cache),
            model.user_embeddings(offline.log, case),
            rtol=1e-5,
            atol=1e-5,
        )


def test_the_history_summary_is_the_mean_fused_embedding_of_the_whole_history(offline):
    """Label heads read [state ; mean b^F over every event of the history], not only the decoder's window."""
    model = offline.serving.model
    fused = model.net.catalog_cache().fused.numpy()
    case = offline.case(3)
    events = offline.log.behavior[offline.log.offsets[3] : case.history_end[0]]
    assert len(events) > 0
    np.testing.assert_allclose(model.history_summary(offline.log, case)[0], fused[events].mean(0), rtol=1e-5, atol=1e-6)
    both = head_inputs(head_input_parts(model, offline.log, case, ["state", "summary"], None))["state+summary"]
    np.testing.assert_allclose(both[:, : model.net.hidden_size], model.user_embeddings(offline.log, case), rtol=1e-5, atol=1e-6)
    assert both.shape == (1, 2 * model.net.hidden_size)
    assert offline.serving.heads["churn"].inputs == "state+summary"  # the fixture's head reads both, through the export


def test_each_head_reads_the_input_it_was_fitted_on(offline):
    """A head saved with inputs "summary" is served from the history summary alone, "state" from the state alone."""
    import dataclasses

    import torch

    serving, model = offline.serving, offline.serving.model
    churn = serving.heads["churn"]
    case = offline.case(4)
    hidden = model.net.hidden_size
    for inputs, expected_input in (
        ("summary", model.history_summary(offline.log, case)),
        ("state", model.user_embeddings(offline.log, case)),
    ):
        head = type(churn.head)(hidden, churn.task)  # an unfitted head of the input's width
        with torch.no_grad():
            head.net.weight.normal_()
        serving.heads["probe"] = dataclasses.replace(churn, head=head.eval(), inputs=inputs)
        try:
            got = serving.head_outputs(offline.log, case, ["probe"])[0]["probe"]["probability"]
        finally:
            del serving.heads["probe"]
        assert got == pytest.approx(float(head.predict_proba(torch.as_tensor(expected_input))[0]), abs=1e-6)


def test_a_head_on_the_profile_row_is_served_from_the_users_training_row(profiled, tiny_serving, monkeypatch):
    """Inputs "profile" / "summary+profile": the user's row of the profile table (the table encoder's
    embedding), found through the export's pseudonyms as in training; a user the table lacks gets its mean row."""
    import torch

    from gts_lum.modeling.heads import LabelHead, LabelTask
    from gts_lum.recommenders.registry import load_model
    from gts_lum.sequence.dataset import SequenceDataset
    from gts_lum.serving.export import ServingHead, history_log, load_export

    monkeypatch.setenv(PSEUDONYM_KEY_ENV, KEY)
    serving, trained = load_export(profiled.export), load_model(profiled.model_dir)
    log_ = SequenceDataset.load(tiny_serving.sequences).event_log
    u = 3
    case = Offline(serving, log_).case(u)
    raw = trained.profile_vectors(log_, case)
    row = int(np.flatnonzero(trained.assets.user_ids.astype(str) == str(log_.user_ids[u]))[0])
    np.testing.assert_array_equal(raw[0], trained.assets.user_vectors[row])
    stranger, stranger_case = history_log("nobody", log_.behavior[:5], log_.timestamp[:5], log_.behavior_ids)
    np.testing.assert_allclose(trained.profile_vectors(stranger, stranger_case)[0], np.nanmean(trained.assets.user_vectors, 0), rtol=1e-6)

    task = LabelTask("probe", "binary", 2, (0.0, 1.0))
    summary = serving.model.history_summary(log_, case)
    for inputs, expected_input in (("profile", raw), ("summary+profile", np.hstack([summary, raw]))):
        head = LabelHead(expected_input.shape[1], task)
        with torch.no_grad():
            head.net.weight.normal_()
        serving.heads["probe"] = ServingHead(task, head.eval(), None, inputs)
        got = serving.head_outputs(log_, case, ["probe"])[0]["probe"]["probability"]
        assert got == pytest.approx(float(head.predict_proba(torch.as_tensor(expected_input))[0]), abs=1e-6)
        other = serving.head_outputs(stranger, stranger_case, ["probe"])[0]["probe"]["probability"]
        assert other != pytest.approx(got, abs=1e-6)
    del serving.heads["probe"]


def test_a_compiled_server_model_scores_as_the_eager_one(tiny_serving, offline):
    """`--compile` (ScorerConfig.compile): the export's decoder compiled at load, warmed up on a one-case
    request (no attention mask) and a two-case one (padded, masked); both kinds then score as eagerly."""
    import torch

    from gts_lum.serving.export import load_export

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compiled = load_export(tiny_serving.export, compile=True)
        assert compiled.model.cfg.net.decoder.compile and not offline.serving.model.cfg.net.decoder.compile
        users = np.arange(0, offline.log.num_users, max(offline.log.num_users // 3, 1))
        two = offline.case(int(users[0])).concat(offline.case(int(users[1])))
        for cases in [offline.case(int(u)) for u in users] + [two]:
            for cand in (None, offline.serving.default_candidates[::4]):
                # the top-k scores, best first (near-ties may swap places under the compiled kernels' rounding)
                (_, got), (_, want) = (s.rank(offline.log, cases, cand) for s in (compiled, offline.serving))
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
