"""The serving export and the KServe scorer, through real HTTP against `python -m gts_lum.serving.scorer`
on 127.0.0.1: health and metrics routes, v1 and v2 requests, parity with offline scoring (inline and
through Feast), label heads, and bad input (a table of cases and a few hundred fuzzed requests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gts_lum.data.events import EventLog
from gts_lum.data.pseudonym import PSEUDONYM_KEY_ENV
from gts_lum.serving.export import ASSET_SUFFIXES, export_model, head_input_parts, head_inputs, history_log

REPO = Path(__file__).resolve().parents[2]


def predict_v1(server, instances, client=httpx) -> httpx.Response:
    return client.post(f"{server.url}/v1/models/{server.name}:predict", json={"instances": instances}, timeout=60)


def infer_v2(server, instances, datatype: str = "BYTES") -> httpx.Response:
    data = [json.dumps(i) for i in instances] if datatype == "BYTES" else instances
    body = {"id": "req-1", "inputs": [{"name": "request", "shape": [len(data)], "datatype": datatype, "data": data}]}
    return httpx.post(f"{server.url}/v2/models/{server.name}/infer", json=body, timeout=60)


def v2_predictions(response: httpx.Response) -> list[dict]:
    (output,) = response.json()["outputs"]
    assert output["name"] == "response" and output["datatype"] == "BYTES"
    return [json.loads(item) for item in output["data"]]


def assert_same_ranking(prediction: dict, expected) -> None:
    """Identical ranking and scores within 1e-5 of offline scoring."""
    ranking = prediction["ranking"]
    assert [r["behavior_id"] for r in ranking] == expected["behavior_id"].tolist()
    np.testing.assert_allclose([r["score"] for r in ranking], expected["score"].to_numpy(), rtol=0, atol=1e-5)


# -- the export -------------------------------------------------------------------------------------


def test_export_holds_the_catalog_the_time_settings_and_a_content_version(tiny_serving, tmp_path):
    export = tiny_serving.export
    card = yaml.safe_load((export / "serving.yaml").read_text())
    training_log = EventLog.load(tiny_serving.sequences / "event_log.npz")
    assert card["catalog"]["behavior_ids"] == training_log.behavior_ids.astype(str).tolist()  # catalog order
    # the split's targets (OTT services): what a request without candidates ranks
    ott = [i for i, b in enumerate(card["catalog"]["behavior_ids"]) if b.startswith("ott.")]
    assert card["catalog"]["target_filter"] == "type=ott" and card["catalog"]["targets"] == ott and 0 < len(ott) < card["catalog"]["size"]
    # the timestamp-process settings of the training sequences (Feast parity reads them from here)
    assert card["sequence_config"] == yaml.safe_load((tiny_serving.sequences / "sequence_config.yaml").read_text())
    assert card["sequence_config"]["timezone"] == "Asia/Shanghai" and card["sequence_config"]["interval_minutes"] == 15
    assert card["heads"] == {"churn": {"kind": "binary", "classes": [0.0, 1.0]}}
    files = [p for p in export.rglob("*") if p.is_file()]
    assert all(p.suffix in ASSET_SUFFIXES for p in files), files  # safetensors, npz, yaml: no pickle
    assert {"weights.safetensors", "model.yaml", "heads/churn.safetensors", "assets/features.npz"} <= {
        str(p.relative_to(export)) for p in files
    }

    # the default version is a content hash: the same model and heads give the same version
    again = export_model(tiny_serving.model_dir, tmp_path / "again", heads_dir=tiny_serving.heads_dir)
    assert again["version"] == card["version"] and len(card["version"]) == 12
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(tiny_serving.model_dir, tmp_path / "again")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_serving.model_dir, pickled)
    (pickled / "assets" / "extra.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="extra.pkl"):
        export_model(pickled, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_heads_of_every_kind_round_trip_through_safetensors(tmp_path):
    import torch

    from gts_lum.evaluation.labels import LabelTask
    from gts_lum.modeling.heads import HeadsConfig, build_head
    from gts_lum.serving.export import load_heads, save_head

    tasks = [LabelTask("churn", "binary"), LabelTask("tier", "multiclass", 3, (1.0, 2.0, 5.0)), LabelTask("campaign", "uplift")]
    emb = torch.randn(6, 8)
    heads = {t.name: build_head(t, 8, HeadsConfig(mlp_hidden=4 if t.kind == "uplift" else 0)).eval() for t in tasks}
    for task in tasks:
        save_head(tmp_path, task, heads[task.name], task_token=None)
    loaded = load_heads(tmp_path)
    assert sorted(loaded) == ["campaign", "churn", "tier"] and loaded["tier"].task == tasks[1]
    for name, head in heads.items():
        torch.testing.assert_close(loaded[name].head.predict_proba(emb), head.predict_proba(emb))
    with pytest.raises(ValueError, match="use letters"):
        save_head(tmp_path, LabelTask("../escape", "binary"), heads["churn"])


# -- routes -------------------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on `port` (Linux /proc/net/tcp, hex little-endian IPv4)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":
                addresses.add(address)
    return addresses


def test_health_metadata_and_the_bound_host(scorer_server):
    url, name = scorer_server.url, scorer_server.name
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v1/models/{name}").json() == {"name": name, "ready": True}
    assert httpx.get(f"{url}/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    meta = httpx.get(f"{url}/v2/models/{name}").json()
    assert meta["inputs"] == [{"name": "request", "datatype": "BYTES", "shape": [-1]}]
    assert httpx.get(f"{url}/v1/models/no-such-model").status_code == 404
    assert f"Uvicorn running on http://127.0.0.1:{scorer_server.port}" in scorer_server.log_tail(200)
    listening = _listening_addresses(scorer_server.port)
    if listening:  # 0100007F is 127.0.0.1; kserve's own server would listen on 00000000
        assert listening == {"0100007F"}


# -- scoring parity -----------------------------------------------------------------------------------


def test_inline_histories_score_exactly_as_offline(scorer_server, offline):
    """The done-when test: served scores equal `GTSLUM.score` on the same history, ranking identical."""
    users = [0, 57, 123]
    response = predict_v1(scorer_server, [{"user_id": str(offline.log.user_ids[u]), "events": offline.events(u)} for u in users])
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    version = yaml.safe_load((offline.serving.root / "serving.yaml").read_text())["version"]
    for u, prediction in zip(users, predictions):
        assert prediction["user_id"] == str(offline.log.user_ids[u]) and prediction["version"] == version
        assert prediction["history"] == {"source": "inline", "events": int(offline.log.lengths()[u]), "dropped_unknown": 0}
        assert len(prediction["ranking"]) == 10  # the default top_k over the export's targets
        assert all(r["behavior_id"].startswith("ott.") for r in prediction["ranking"])
        assert_same_ranking(prediction, offline.ranking(u, None, 10))
        # two-stage: the top rerank_depth (5) were re-ranked target-aware
        assert [r["target_aware"] for r in prediction["ranking"]] == [True] * 5 + [False] * 5

    # v2 (Open Inference), request candidates: every candidate ranked; BYTES and JSON tensors agree
    rng = np.random.default_rng(0)
    candidates = offline.serving.catalog[rng.choice(len(offline.serving.catalog), 60, replace=False)].astype(str).tolist()
    instance = {"events": offline.events(57), "candidates": candidates}
    as_bytes = infer_v2(scorer_server, [instance])
    assert as_bytes.status_code == 200, as_bytes.text
    assert as_bytes.json()["id"] == "req-1" and as_bytes.json()["model_version"] == version
    (prediction,) = v2_predictions(as_bytes)
    assert prediction["user_id"] is None and len(prediction["ranking"]) == 60
    assert all(r["target_aware"] for r in prediction["ranking"])  # request candidates: every one target-aware
    assert_same_ranking(prediction, offline.ranking(57, candidates, 60))
    assert v2_predictions(infer_v2(scorer_server, [{**instance, "top_k": 7}], datatype="JSON"))[0]["ranking"] == prediction["ranking"][:7]


def test_label_heads_on_request(scorer_server, offline):
    import torch

    u = 10
    response = predict_v1(scorer_server, [{"events": offline.events(u), "heads": ["churn"], "top_k": 1}])
    assert response.status_code == 200, response.text
    churn = response.json()["predictions"][0]["heads"]["churn"]
    parts = head_input_parts(offline.serving.model, offline.log, offline.case(u), ["state", "summary"], None)
    emb = torch.as_tensor(head_inputs(parts)["state+summary"])
    expected = float(offline.serving.heads["churn"].head.predict_proba(emb)[0])
    assert churn["kind"] == "binary" and churn["probability"] == pytest.approx(expected, abs=1e-5)
    missing = predict_v1(scorer_server, [{"events": offline.events(u), "heads": ["churn", "upgrade"]}])
    assert missing.status_code == 400 and "'upgrade' is not in this export (it has ['churn'])" in missing.json()["error"]


@pytest.fixture(scope="module")
def feature_repo(tiny_serving, tmp_path_factory):
    """A copy of feature_repo/ published with every event of the tiny data set; the key set for the module."""
    features = pytest.importorskip("gts_lum.serving.features", reason="the Feast side (gts_lum.serving.features) is not there yet")
    root = tmp_path_factory.mktemp("feast")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PSEUDONYM_KEY_ENV, "serving-test-key-0123456789abcdef")
        repo = root / "repo"
        repo.mkdir()
        for path in [*(REPO / "feature_repo").glob("*.py"), REPO / "feature_repo" / "feature_store.yaml"]:
            shutil.copy(path, repo / path.name)
        # last_n above the longest tiny history: the store holds every event, as the training log does
        features.export_feature_sources(tiny_serving.clean, root / "sources", last_n=4096, snapshot_days=None)
        features.publish_features(repo, root / "sources")
        yield repo


def test_feature_store_histories_score_as_offline(tiny_serving, offline, feature_repo, tmp_path):
    from gts_lum.serving import features
    from gts_lum.serving.scorer import launch_server

    repo = feature_repo
    client = features.FeatureClient(repo)
    u, user = 42, str(offline.log.user_ids[42])
    assert client.get_history(user)["behavior_ids"] == offline.events(u)["behavior_ids"]

    server = launch_server(tiny_serving.export, tmp_path / "server.log", feature_repo=repo)
    try:
        response = predict_v1(server, [{"user_id": user, "top_k": 10}])
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        assert prediction["history"]["source"] == "feature_store" and prediction["history"]["events"] == int(offline.log.lengths()[u])
        assert_same_ranking(prediction, offline.ranking(u, None, 10))

        unknown = predict_v1(server, [{"user_id": "nobody-at-all"}])
        assert unknown.status_code == 404 and unknown.json()["error"] == "instances[0].user_id: this user is not in the feature store"

        # events pushed online are in the next score
        new_ids = offline.serving.catalog[:2].astype(str).tolist()
        new_ts = [
            int(offline.log.timestamp[offline.log.offsets[u + 1] - 1]) + 60,
            int(offline.log.timestamp[offline.log.offsets[u + 1] - 1]) + 120,
        ]
        client.push_events(user, new_ids, new_ts)
        after = predict_v1(server, [{"user_id": user, "top_k": 10}]).json()["predictions"][0]
        assert after["history"]["events"] == prediction["history"]["events"] + 2
        events = offline.events(u)
        log_, cases = history_log(
            user,
            np.array([offline.serving.index[b] for b in events["behavior_ids"] + new_ids]),
            np.array(events["timestamps"] + new_ts),
            offline.serving.catalog,
        )
        idx, scores = offline.serving.rank(log_, cases, None, 10)
        assert [r["behavior_id"] for r in after["ranking"]] == offline.serving.catalog[idx[0]].astype(str).tolist()
        np.testing.assert_allclose([r["score"] for r in after["ranking"]], scores[0], atol=1e-5, rtol=0)
    finally:
        server.stop()


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_requests_are_4xx_naming_the_problem(scorer_server, offline):
    url, name = scorer_server.url, scorer_server.name
    catalog = offline.serving.catalog.astype(str).tolist()
    events = offline.events(3)
    one = {"behavior_ids": events["behavior_ids"][:1], "timestamps": events["timestamps"][:1]}
    v1_cases = [
        (b"{not json", 400, "Unrecognized request format"),
        ({"instances": [{"user_id": "U000001"}]}, 400, "no feature store"),
        ({"instances": [{"events": {"behavior_ids": ["no.such.behaviour"], "timestamps": [1_700_000_000]}}]}, 400, "unknown behaviour id"),
        ({"instances": [{"events": one, "candidates": [catalog[0], "nope"]}]}, 400, "instances[0].candidates: 1 unknown"),
        ({"instances": [{"events": one, "candidates": [catalog[0], catalog[0]]}]}, 400, "duplicate candidate"),
        ({"instances": [{"events": one, "top_k": "10"}]}, 400, "instances[0].top_k"),
        ({"instances": [{"events": one, "top_k": 0}]}, 400, "instances[0].top_k"),
        ({"instances": [{"events": {**one, "timestamps": ["1700000000"]}}]}, 400, "timestamps[0]"),
        ({"instances": [{"events": {**one, "timestamps": [1_700_000_000_000]}}]}, 400, "unix seconds"),
        ({"instances": [{"events": {**one, "timestamps": []}}]}, 400, "one per behaviour id"),
        ({"instances": [{"events": {"behavior_ids": [], "timestamps": []}}]}, 400, "empty history"),
        ({"instances": [{"events": one, "candidates": catalog[:301]}]}, 400, "--max-candidates"),
        ({"instances": [{"events": {"behavior_ids": [catalog[0]] * 3001, "timestamps": [1] * 3001}}]}, 400, "--max-events"),
        ({"instances": [{"events": one}] * 5}, 400, "--max-instances"),
        ({"instances": [{"events": one, "colour": "red"}]}, 400, "unknown field(s) ['colour']"),
        ({"instances": [{"user_id": 7, "events": one}]}, 400, "instances[0].user_id"),
        ({"instances": []}, 400, "no instances"),
        ({"inputs": []}, 400, 'expected {"instances": [...]}'),
        ([1, 2], 400, "expected a JSON object"),
        (b"x" * 500_000, 413, "--max-body-bytes"),
    ]
    with httpx.Client(timeout=60) as client:
        for body, code, message in v1_cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post(f"{url}/v1/models/{name}:predict", content=content, headers={"content-type": "application/json"})
            assert response.status_code == code and message in response.json()["error"], (
                body if isinstance(body, dict) else body[:40],
                response.text[:300],
            )
        v2 = f"{url}/v2/models/{name}/infer"
        fp32 = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
        assert client.post(v2, json=fp32).status_code == 400 and "datatype 'FP32'" in client.post(v2, json=fp32).json()["error"]
        two = {"inputs": [{"name": "request", "shape": [2], "datatype": "BYTES", "data": ["{}"]}]}
        assert client.post(v2, json=two).status_code == 400
        not_json = {"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES", "data": ["{nope"]}]}
        assert "inputs[0] ('request').data[0]: not valid JSON" in client.post(v2, json=not_json).json()["error"]
        assert client.post(v2, json={"inputs": 3}).status_code == 422  # not an inference request at all
        # the server keeps serving
        assert predict_v1(scorer_server, [{"events": one}], client).status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _requests(catalog: list[str]):
    """(protocol, body bytes, content-type): near-valid requests with one thing or another wrong, junk
    JSON and raw bytes; now and then a valid request by chance (a 200)."""
    ids = st.one_of(st.sampled_from(catalog), st.sampled_from(catalog), st.text(max_size=10))
    stamps = st.integers(0, 2**32) | st.integers(-5, 2**42)
    aligned = st.integers(1, 3).flatmap(
        lambda n: st.fixed_dictionaries(
            {"behavior_ids": st.lists(ids, min_size=n, max_size=n), "timestamps": st.lists(stamps, min_size=n, max_size=n)}
        )
    )
    loose = st.fixed_dictionaries(
        {},
        optional={
            "behavior_ids": st.lists(ids, max_size=3) | JSON_VALUES,
            "timestamps": st.lists(stamps, max_size=3) | JSON_VALUES,
            "more": JSON_VALUES,
        },
    )
    fields = {
        "user_id": st.sampled_from(["U000001", ""]) | JSON_VALUES,
        "candidates": st.lists(ids, max_size=4) | JSON_VALUES,
        "top_k": st.integers(-3, 2000) | JSON_VALUES,
        "heads": st.lists(st.sampled_from(["churn", "upgrade"]), max_size=2) | JSON_VALUES,
    }
    instance = st.one_of(
        st.fixed_dictionaries({"events": aligned}, optional=fields),  # near-valid: one field or another wrong
        st.fixed_dictionaries({}, optional={**fields, "events": aligned | loose | JSON_VALUES, "extra": JSON_VALUES}),
    )
    instances = st.lists(instance, min_size=1, max_size=3)
    v1 = st.one_of(st.fixed_dictionaries({"instances": instances}), st.fixed_dictionaries({"instances": JSON_VALUES}), JSON_VALUES)
    well_formed_v2 = st.tuples(instances, st.sampled_from(["BYTES", "JSON"])).map(
        lambda x: {
            "inputs": [
                {
                    "name": "request",
                    "shape": [len(x[0])],
                    "datatype": x[1],
                    "data": [json.dumps(i) for i in x[0]] if x[1] == "BYTES" else x[0],
                }
            ]
        }
    )
    tensor = st.fixed_dictionaries(
        {
            "name": st.text(max_size=5),
            "shape": st.lists(st.integers(-2, 4), max_size=2),
            "datatype": st.sampled_from(["BYTES", "JSON", "FP32", "INT64", "FP16"]) | st.text(max_size=5),
            "data": st.lists(instance.map(json.dumps) | instance | JSON_VALUES, max_size=3),
        },
        optional={"parameters": JSON_VALUES},
    )
    v2 = st.one_of(
        well_formed_v2,
        st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=2)}, optional={"id": JSON_VALUES, "parameters": JSON_VALUES}),
        JSON_VALUES,
    )
    encoded = lambda s: s.map(lambda obj: json.dumps(obj).encode())  # noqa: E731
    body = st.one_of(
        st.tuples(st.just("v1"), encoded(v1)),
        st.tuples(st.just("v2"), encoded(v2)),
        st.tuples(st.sampled_from(["v1", "v2"]), st.binary(max_size=64)),
    )
    return st.tuples(body, st.sampled_from(["application/json"] * 4 + ["text/plain"]))


def test_fuzzed_requests_are_never_a_5xx(scorer_server, offline):
    url, name = scorer_server.url, scorer_server.name
    paths = {"v1": f"{url}/v1/models/{name}:predict", "v2": f"{url}/v2/models/{name}/infer"}
    statuses: list[int] = []
    with httpx.Client(timeout=60) as client:

        @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(request=_requests(offline.serving.catalog[:40].astype(str).tolist()))
        def send(request):
            (protocol, body), content_type = request
            response = client.post(paths[protocol], content=body, headers={"content-type": content_type})
            assert response.status_code < 500, (protocol, body[:300], response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert response.json()["error" if "error" in response.json() else "detail"]  # a reason, not an empty body
            statuses.append(response.status_code)

        send()
        assert len(statuses) >= 250 and sum(s >= 400 for s in statuses) >= 200
        # still serving, and the errors are counted
        valid = predict_v1(scorer_server, [{"events": offline.events(1), "top_k": 3}], client)
        assert valid.status_code == 200 and len(valid.json()["predictions"][0]["ranking"]) == 3
        metrics = client.get(f"{url}/metrics").text
    errors = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("gts_lum_request_errors_total{"))
    assert errors >= sum(s >= 400 for s in statuses)
    assert 'request_predict_seconds_count{model_name="gts_lum"}' in metrics  # kserve's latency histograms are there too


# -- v2 bodies, content types, the work bound ---------------------------------------------------------


def _binary_v2(elements: list[bytes], shape: list[int] | None = None, size: int | None = None, tail: bytes = b"") -> tuple[bytes, dict]:
    """A binary-extension v2 body: the JSON header, then one BYTES tensor as 4-byte little-endian lengths + bytes."""
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements) + tail
    header = {
        "inputs": [
            {
                "name": "request",
                "shape": shape or [len(elements)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw) if size is None else size},
            }
        ]
    }
    head = json.dumps(header).encode()
    return head + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}


def test_malformed_v2_bodies_are_4xx_and_the_connection_stays_usable(scorer_server, offline):
    v2 = f"{scorer_server.url}/v2/models/{scorer_server.name}/infer"
    good = json.dumps({"events": offline.events(3), "top_k": 2}).encode()
    deep = "[" * 3000 + "]" * 3000
    cases = [
        (
            json.dumps({"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES", "data": [deep]}]}).encode(),
            {"content-type": "application/json"},
            "data[0]: JSON nested too deep",
        ),
        (*_binary_v2([good], size=len(good) + 100), "past the end of the body"),  # a byte count larger than the data
        (
            *_binary_v2([good], size=4 + len(good), tail=b"\x00" * 7),
            "7 bytes beyond the tensors' binary_data_size",
        ),  # smaller than the data
        (*_binary_v2([good], tail=(1000).to_bytes(4, "little") + b"short"), "element 1's length prefix runs past"),
        (*_binary_v2([good], shape=[2]), "shape [2] holds 2 elements, the binary data 1"),
        (*_binary_v2([b"\xff\xfe{}"]), "element 0 is not UTF-8"),
    ]
    with httpx.Client(timeout=60) as client:
        for body, headers, message in cases:
            response = client.post(v2, content=body, headers=headers)
            assert response.status_code == 400 and message in response.json()["error"], (message, response.status_code, response.text[:300])
            assert response.headers.get("connection") != "close"
            again = client.post(v2, json={"inputs": [{"name": "request", "shape": [1], "datatype": "BYTES", "data": [good.decode()]}]})
            assert again.status_code == 200, again.text[:300]  # the same keep-alive connection serves the next request
        body, headers = _binary_v2([good])
        response = client.post(v2, content=body, headers=headers)
        assert response.status_code == 200 and len(v2_predictions(response)[0]["ranking"]) == 2  # a sound binary body is served


def test_json_content_type_with_parameters_is_json_and_a_wrong_type_says_what_to_send(scorer_server, offline):
    url = f"{scorer_server.url}/v1/models/{scorer_server.name}:predict"
    body = json.dumps({"instances": [{"events": offline.events(3), "top_k": 2}]})
    with httpx.Client(timeout=60) as client:
        for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=UTF-8", "application/json"):
            response = client.post(url, content=body, headers={"content-type": content_type})
            assert response.status_code == 200, (content_type, response.text[:200])
        for content_type in ("application/x-www-form-urlencoded", "text/plain", "application/json; charset=latin-1"):
            response = client.post(url, content=body, headers={"content-type": content_type})
            assert response.status_code == 415 and "Content-Type: application/json" in response.json()["error"], (
                content_type,
                response.text[:200],
            )
    # the README's curl examples send JSON (curl -d alone sends form encoding)
    curls = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("curl") and " -d " in line]
    assert curls and all("-H 'Content-Type: application/json'" in line for line in curls)


def test_work_a_request_asks_for_is_bounded(scorer_server, offline):
    catalog = offline.serving.catalog.astype(str).tolist()
    events = offline.events(3)
    one = {"events": events, "candidates": catalog[:250]}
    assert predict_v1(scorer_server, [one, one]).status_code == 200  # 500 candidate scores: at the limit
    response = predict_v1(scorer_server, [one, one, {**one, "candidates": catalog[:10]}])
    assert (
        response.status_code == 413
        and "510 target-aware candidate scores" in response.json()["error"]
        and "--max-request-candidates" in response.json()["error"]
    )
    readme = (REPO / "README.md").read_text()
    assert "--max-request-candidates" in readme


# -- user ids and the pseudonym key -----------------------------------------------------------------


def test_no_raw_user_id_in_any_log_line_or_error_body(scorer_server, offline, feature_repo, tiny_serving, tmp_path):
    from gts_lum.serving import features
    from gts_lum.serving.scorer import launch_server

    known = str(offline.log.user_ids[7])
    ghost = "ghost-subscriber-0427"  # in the store, but only with behaviours the model does not know
    features.FeatureClient(feature_repo).push_events(ghost, ["no.such.behaviour"], [1_700_000_000])
    one = {"behavior_ids": offline.events(3)["behavior_ids"][:1], "timestamps": offline.events(3)["timestamps"][:1]}
    bad_requests = [
        [{"user_id": known}],  # no feature store (the first server)
        [{"user_id": "nobody-at-all-0427"}],  # not in the store
        [{"user_id": ghost}],  # no events the model knows
        [{"user_id": known, "top_k": "ten"}],
        [{"user_id": known, "candidates": ["nope"]}],
        [{"user_id": known, "heads": ["nope"]}],
        [{"user_id": known, "events": one, "colour": 1}],
    ]
    server = launch_server(tiny_serving.export, tmp_path / "server.log", feature_repo=feature_repo)
    try:
        for target, requests in ((scorer_server, bad_requests), (server, bad_requests[1:])):
            for instances in requests:
                for response in (predict_v1(target, instances), infer_v2(target, instances)):
                    assert 400 <= response.status_code < 500
                    for user in (known, ghost, "nobody-at-all-0427"):
                        assert user not in response.text, (instances, response.text)
        assert predict_v1(server, [{"user_id": known}]).status_code == 200
    finally:
        server.stop()
    logs = (tmp_path / "server.log").read_text(errors="replace") + scorer_server.log_path.read_text(errors="replace")
    assert "404" in logs and "no events the model knows" in logs and "no feature store" in logs
    for user in (known, ghost, "nobody-at-all-0427"):
        assert user not in logs


def test_a_feature_store_without_a_good_key_fails_at_start_and_a_wrong_key_is_noticed(
    tiny_serving, offline, feature_repo, tmp_path, monkeypatch
):
    from gts_lum.serving.scorer import UNKNOWN_USER_WINDOW, launch_server

    monkeypatch.delenv(PSEUDONYM_KEY_ENV)
    with pytest.raises(RuntimeError, match=rf"exited with 2 before it was ready(.|\n)*{PSEUDONYM_KEY_ENV} is not set"):
        launch_server(tiny_serving.export, tmp_path / "nokey.log", feature_repo=feature_repo)
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "short")
    with pytest.raises(RuntimeError, match="needs at least 32"):
        launch_server(tiny_serving.export, tmp_path / "short.log", feature_repo=feature_repo)

    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "a-strong-key-but-not-the-one-the-store-was-published-with")
    server = launch_server(tiny_serving.export, tmp_path / "wrong.log", feature_repo=feature_repo)
    users = [str(u) for u in offline.log.user_ids]  # all in the store, under the right key
    try:
        with httpx.Client(timeout=60) as client:
            for i in range(UNKNOWN_USER_WINDOW + 20):  # a request stops at its first unknown user: one lookup each
                assert predict_v1(server, [{"user_id": users[i % len(users)]}], client).status_code == 404
    finally:
        server.stop()
    log_text = (tmp_path / "wrong.log").read_text(errors="replace")
    assert log_text.count(f"of the last {UNKNOWN_USER_WINDOW} feature-store users were unknown") == 1
    assert not any(u in log_text for u in users)


def test_slow_clients_are_cut_off_past_their_deadline_and_the_connection_cap_holds(tiny_serving, offline, tmp_path):
    """Clients trickling a request (headers never finished, a body that stops) are closed after the header /
    body timeout (a late header gets a 408); past --max-connections a request gets a 503; normal requests are
    served before, beside and after them."""
    import socket
    import time

    from gts_lum.serving.scorer import launch_server

    timeout = 3
    server = launch_server(
        tiny_serving.export,
        tmp_path / "slow.log",
        extra_args=["--header-timeout", str(timeout), "--body-timeout", str(timeout), "--max-connections", "6"],
    )
    instance = [{"events": offline.events(0)}]
    head = f"POST /v1/models/{server.name}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    partial_body = head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"instances": ['
    slow: list[tuple[socket.socket, bool, float]] = []  # socket, late in its headers, opened at

    def open_slow(n: int) -> None:
        for _ in range(n):
            sock = socket.create_connection((server.host, server.port), timeout=timeout + 10)
            headers_late = len(slow) % 2 == 0
            sock.sendall(head if headers_late else partial_body)
            slow.append((sock, headers_late, time.monotonic()))

    try:
        open_slow(3)
        assert predict_v1(server, instance).status_code == 200  # 4 connections of 6
        open_slow(2)
        capped = predict_v1(server, instance)  # the 6th connection: at the cap
        assert capped.status_code == 503, capped.text
        for sock, headers_late, opened in slow:
            received = b""
            while chunk := sock.recv(4096):  # ends at the server's close (or the socket's timeout raises)
                received += chunk
            waited = time.monotonic() - opened
            assert timeout - 0.5 < waited < timeout + 5, f"closed after {waited:.1f} s"
            assert received.startswith(b"HTTP/1.1 408") if headers_late else b"200 OK" not in received
            sock.close()
        assert predict_v1(server, instance).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        for sock, _, _ in slow:
            sock.close()
        server.stop()
    assert 'gts_lum_slow_clients_total{late="headers"} 3.0' in metrics and 'gts_lum_slow_clients_total{late="body"} 2.0' in metrics
    assert "no complete request headers within 3 s (--header-timeout)" in server.log_path.read_text()


def test_workers_each_load_the_model_and_serve_the_bound_host(tiny_serving, offline, tmp_path):
    """--workers 2: uvicorn binds the port once and spawns two processes, each loading the export; requests are
    answered with offline's scores on the bound host; stopping the parent (by its PID) ends the workers."""
    import re
    import time

    from gts_lum.serving.scorer import launch_server

    server = launch_server(tiny_serving.export, tmp_path / "workers.log", extra_args=["--workers", "2"])
    try:
        deadline = time.monotonic() + 120
        while server.log_tail(400).count("Started server process") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        log_text = server.log_tail(400)
        workers = {int(p) for p in re.findall(r"Started server process \[(\d+)\]", log_text)}
        assert len(workers) == 2 and server.pid not in workers and log_text.count("loaded gts_lum") == 2, log_text
        with httpx.Client() as client:
            for _ in range(4):
                response = predict_v1(server, [{"events": offline.events(57)}], client=client)
                assert response.status_code == 200, response.text
                assert_same_ranking(response.json()["predictions"][0], offline.ranking(57, None, 10))
        listening = _listening_addresses(server.port)
        if listening:
            assert listening == {"0100007F"}
    finally:
        server.stop()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), f"worker {pid} outlived the server"


def test_load_bench_reports_percentiles_by_shape_and_concurrency(tiny_serving, offline, feature_repo, tmp_path):
    """`gts-lum load-bench` on the tiny export: each shape (the Feast one included) at concurrency 1 and 2, every
    request a 200, p50 <= p90 <= p99; the profile holds the stages and preprocess (the Feast read) p50 / p99."""
    from gts_lum.stages.load_bench import load_bench

    users = [str(u) for u in offline.log.user_ids[:5]]
    shapes = ("top10", "top10_feast", "candidates")
    out = load_bench(
        tiny_serving.export,
        requests=4,
        concurrency=(1, 2),
        shapes=shapes,
        seconds_limit=60,
        candidates=20,
        history_events=20,
        warmup=1,
        feature_repo=feature_repo,
        users=users,
        out_dir=tmp_path,
        rerank_depth=3,  # the server's and the profile's (the export's is 5)
    )
    assert out["rerank_depth"] == 3 and out["compile"] is None
    for shape in shapes:
        row = out["shapes"][shape]
        profile = row["profile"]
        assert profile["stages_ms"]["aware_passes"] > 0 and profile["preprocess_ms"]["p50"] <= profile["preprocess_ms"]["p99"]
        for c in ("1", "2"):
            cell = row["by_concurrency"][c]
            latency = cell["latency_ms"]
            assert cell["status_codes"] == {"200": 4} and latency["p50"] <= latency["p90"] <= latency["p99"]
    assert isinstance(out["shapes"]["top10_feast"]["by_concurrency"]["1"]["meets_goal"], bool)
    assert out["shapes"]["candidates"]["by_concurrency"]["1"]["share_of_machine_fp32"] > 0
    assert json.loads((tmp_path / "load_bench.json").read_text())["shapes"].keys() == set(shapes)


def test_publish_bench_store_serves_the_longest_histories(tiny_serving, tmp_path, monkeypatch, capsys):
    """`python -m gts_lum.stages.load_bench` (`make load-bench`'s store step): a copy of feature_repo/ published
    with the clean data set's latest events; users.txt names the users with the longest histories, which the
    store serves (their last 512 events)."""
    from gts_lum.data.validate import load_event_log
    from gts_lum.serving.features import FeatureClient
    from gts_lum.stages.load_bench import main

    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "load-bench-test-key-0123456789abcdef")
    main(["--clean", str(tiny_serving.clean), "--out", str(tmp_path), "--feature-repo", str(REPO / "feature_repo"), "--users", "3"])
    assert "3 users" in capsys.readouterr().out
    users = (tmp_path / "users.txt").read_text().strip().split(",")
    log_ = load_event_log(tiny_serving.clean)
    lengths = dict(zip(log_.user_ids.astype(str), log_.lengths()))
    assert len(users) == 3 and min(lengths[u] for u in users) == sorted(lengths.values())[-3]
    client = FeatureClient(tmp_path / "repo")
    for user in users:
        history = client.get_history(user)
        u = int(np.flatnonzero(log_.user_ids.astype(str) == user)[0])
        stop = int(log_.offsets[u + 1])
        start = max(int(log_.offsets[u]), stop - 512)
        assert history["timestamps"] == log_.timestamp[start:stop].tolist()
