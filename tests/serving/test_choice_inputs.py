"""Multiple-choice prediction inputs without a model: the v1 and v2 request shapes (kubetune.serving.protocol,
driven by the task's input_fields / list_fields / optional_fields / input_problem), the server's
metadata, metrics and request log on (question, choices, context) items with a stand-in classifier,
and the rows batch inference and drift read (kubetune.storage.inputs) from JSONL, wide CSV and Parquet."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune import tasks
from kubetune.errors import InputError
from kubetune.serving.protocol import (
    RequestError,
    TextLimits,
    apply_limits,
    check_binary_request,
    input_spec,
    texts_from_v1,
    texts_from_v2,
    v2_outputs,
)
from kubetune.storage.inputs import columns_problem, read_rows

MC = tasks.get("multiple-choice")
PAIR = tasks.get("pair-classification")
SEQ = tasks.get("sequence-classification")


def v1(*instances):
    return texts_from_v1({"instances": list(instances)}, MC)


def tensor(name: str, data, shape: list[int], datatype: str = "BYTES"):
    return SimpleNamespace(name=name, data=data, shape=shape, datatype=datatype)


# ---- v1 -------------------------------------------------------------------------------------------


def test_v1_items_are_question_choices_context_tuples():
    assert v1({"question": "2 + 2?", "choices": ["3", "4"]},
              {"question": "Capital?", "choices": ["Paris", "Rome", "Oslo"], "context": "Europe"},
              {"question": "q", "choices": ["a", "b"], "context": None},
              {"question": "q", "choices": ["a", "b"], "context": "  "}) == [
        ("2 + 2?", ("3", "4"), None), ("Capital?", ("Paris", "Rome", "Oslo"), "Europe"), ("q", ("a", "b"), None), ("q", ("a", "b"), None)]
    # the server passes the task; a bytes body is parsed as JSON as for texts
    assert texts_from_v1(b'{"instances": [{"question": "q", "choices": ["a", "b"]}]}', MC) == [("q", ("a", "b"), None)]
    assert v1(*[{"question": "q", "choices": [str(k) for k in range(16)]}])[0][1] == tuple(map(str, range(16)))


@pytest.mark.parametrize("item, words", [
    ({"question": "q", "choices": ["only"]}, "instances[1]: has 1 choices; give 2 to 16"),
    ({"question": "q", "choices": [str(k) for k in range(17)]}, "instances[1]: has 17 choices; give 2 to 16"),
    ({"question": "q", "choices": []}, "instances[1]: has 0 choices"),
    ({"question": "q", "choices": ["a", ""]}, "instances[1]: has an empty choice"),
    ({"question": "q", "choices": ["a", "   "]}, "instances[1]: has an empty choice"),
    ({"question": "q", "choices": ["a", None]}, "instances[1].choices[1]: expected a string, got a JSON null"),
    ({"question": "q", "choices": ["a", 3]}, "instances[1].choices[1]: expected a string, got a JSON int"),
    ({"question": "q", "choices": "a, b"}, "instances[1].choices: expected a list of strings, got a JSON string"),
    ({"question": "q", "choices": {"A": "a"}}, "instances[1].choices: expected a list of strings, got a JSON object"),
    ({"choices": ["a", "b"]}, "instances[1]: expected an object with the fields question, choices and optionally context, got fields"),
    ({"question": "q"}, "instances[1]: expected an object with the fields question, choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 1}, "got fields ['answer', 'choices', 'question']"),
    ("just a question", "instances[1]: expected an object with the fields question, choices and optionally context, got a JSON string"),
    ({"question": None, "choices": ["a", "b"]}, "instances[1].question: expected a string, got a JSON null"),
    ({"question": "q", "choices": ["a", "b"], "context": 7}, "instances[1].context: expected a string, got a JSON int"),
    ({"question": "q", "choices": ["a", "b\ud800"]}, "instances[1].choices[1]: not valid Unicode"),
])
def test_v1_bad_items_are_400_naming_the_item(item, words):
    with pytest.raises(RequestError) as e:
        v1({"question": "fine", "choices": ["a", "b"]}, item)
    assert e.value.status == 400 and e.value.reason == "bad_item" and words in e.value.message, e.value.message


def test_v1_request_shape_errors_show_the_multiple_choice_shape():
    with pytest.raises(RequestError, match=r'"choices": \["...", "..."\], "context": "..." \(optional\)') as e:
        texts_from_v1({"instances": "q"}, MC)
    assert e.value.reason == "bad_shape"


def test_pair_and_single_text_requests_are_unchanged_when_the_task_is_passed():
    pair = {"instances": [{"text": "q", "text_pair": "p"}]}
    assert texts_from_v1(pair, PAIR) == texts_from_v1(pair, PAIR.input_fields) == [("q", "p")]
    assert texts_from_v1({"instances": ["a", {"text": "b"}]}, SEQ) == ["a", "b"]
    with pytest.raises(RequestError, match=r"instances\[0\]: expected an object with exactly the fields text, text_pair"):
        texts_from_v1({"instances": ["just a text"]}, PAIR)
    assert texts_from_v2([tensor("text", ["a"], [1])], SEQ) == ["a"]
    assert input_spec(SEQ).plain and input_spec(PAIR).plain and not input_spec(MC).plain


# ---- v2 -------------------------------------------------------------------------------------------


def test_v2_choices_as_rows_or_flattened_with_counts():
    question = tensor("question", ["q1", "q2"], [2])
    assert texts_from_v2([question, tensor("choices", ["a", "b", "c", "d"], [2, 2])], MC) == [("q1", ("a", "b"), None),
                                                                                           ("q2", ("c", "d"), None)]
    # nested rows (JSON), binary-data items (bytes), and the inputs in any order
    assert texts_from_v2([tensor("choices", [["a", "b"], ["c", "d"]], [2, 2]), question], MC)[1] == ("q2", ("c", "d"), None)
    assert texts_from_v2([question, tensor("choices", [b"a", b"caf\xc3\xa9", b"c", b"d"], [2, 2])], MC)[0] == ("q1", ("a", "café"), None)
    for datatype in ("INT32", "INT64"):
        items = texts_from_v2([question, tensor("choices", list("abcde"), [5]), tensor("choice_count", [2, 3], [2], datatype),
                               tensor("context", ["", "a passage"], [2])], MC)
        assert items == [("q1", ("a", "b"), None), ("q2", ("c", "d", "e"), "a passage")]


@pytest.mark.parametrize("inputs, reason, words", [
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abc"), [2, 2])], "bad_shape",
     "input 'choices': shape [2, 2] says 4 texts (2 items of 2), data holds 3"),
    ([tensor("question", ["q1"], [1]), tensor("choices", list("abcd"), [2, 2])], "bad_shape",
     "inputs 'question' holds 1, 'choices' holds 2: they must be the same length"),
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abcd"), [2, 2]), tensor("context", ["x"], [1])], "bad_shape",
     "'context' holds 1: they must be the same length"),
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abcde"), [5]), tensor("choice_count", [2, 2], [2], "INT64")],
     "bad_shape", "input 'choice_count': the counts sum to 4, input 'choices' holds 5 texts"),
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abcde"), [5]), tensor("choice_count", [2, 3, 0], [3], "INT64")],
     "bad_shape", "inputs 'question' holds 2, 'choices' holds 3"),
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abcde"), [5]), tensor("choice_count", [2, 3], [1], "INT64")],
     "bad_shape", "input 'choice_count': shape [1] says 1 counts, data holds 2"),
    ([tensor("question", ["q1"], [1]), tensor("choices", list("ab"), [2]), tensor("choice_count", [-1], [1], "INT32")],
     "bad_item", "input 'choice_count', item 0: expected a count"),
    ([tensor("question", ["q1"], [1]), tensor("choices", list("ab"), [2]), tensor("choice_count", [2.0], [1], "FP32")],
     "bad_shape", "input 'choice_count': datatype must be INT32 or INT64"),
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abcd"), [4])], "bad_shape",
     "input 'choices': shape [4] is flattened: give each item's count in an INT32/INT64 input 'choice_count'"),
    ([tensor("question", ["q1"], [1]), tensor("choices", list("ab"), [1, 2]), tensor("choice_count", [2], [1], "INT32")], "bad_shape",
     "which needs no 'choice_count' input"),
    ([tensor("question", ["q1"], [1]), tensor("choices", list("ab"), [1, 1, 2])], "bad_shape", "input 'choices': shape must be"),
    ([tensor("question", ["q1"], [1]), tensor("choices", [1, 2], [1, 2], "INT32")], "bad_shape",
     "input 'choices': datatype must be BYTES"),
    ([tensor("choices", list("ab"), [1, 2])], "bad_shape", "expected the inputs question (BYTES [N]), choices (BYTES [N, C], or [M] "
                                                          "with choice_count INT32/INT64 [N]), context (BYTES [N], optional), got"),
    ([tensor("question", ["q1"], [1]), tensor("choices", list("ab"), [1, 2]), tensor("text", ["x"], [1])], "bad_shape",
     "expected the inputs question"),
    ([tensor("question", ["q1", "q2"], [2]), tensor("choices", list("abc"), [3]), tensor("choice_count", [1, 2], [2], "INT32")],
     "bad_item", "input 'choices', item 0: has 1 choices; give 2 to 16"),
    ([tensor("question", ["q1"], [1]), tensor("choices", ["a", " "], [1, 2])], "bad_item", "input 'choices', item 0: has an empty choice"),
    ([tensor("question", ["q1"], [1]), tensor("choices", ["a", b"\xff"], [1, 2])], "bad_item", "input 'choices', item 0, text 1: not valid UTF-8"),
    ([tensor("question", [7], [1]), tensor("choices", list("ab"), [1, 2])], "bad_item", "input 'question', item 0: expected a string"),
])
def test_v2_bad_requests_name_the_input_and_item(inputs, reason, words):
    with pytest.raises(RequestError) as e:
        texts_from_v2(inputs, MC)
    assert e.value.status == 400 and e.value.reason == reason and words in e.value.message, e.value.message


def test_binary_numbers_must_fill_their_shape():
    """KServe reads an INT input's bytes with numpy, which raises (a 500) on a buffer of another size."""
    header = json.dumps({"inputs": [{"name": "choice_count", "datatype": "INT64", "shape": [2],
                                     "parameters": {"binary_data_size": 9}}]}).encode()
    with pytest.raises(RequestError, match="shape \\[2\\] of INT64 takes 16 bytes, binary_data_size is 9") as e:
        check_binary_request(header + bytes(9), len(header))
    assert e.value.reason == "bad_binary"
    good = header.replace(b'"binary_data_size": 9', b'"binary_data_size": 16')
    check_binary_request(good + np.array([2, 3], dtype=np.int64).tobytes(), len(good))


def test_limits_cut_each_text_of_an_item_and_count_questions():
    item = ("q" * 12, ("a" * 12, "b"), None)
    assert apply_limits([item, ("q", ("a", "b"), "c" * 12)], TextLimits(4, 8, "truncate")) == (
        [("q" * 8, ("a" * 8, "b"), None), ("q", ("a", "b"), "c" * 8)], 2)
    with pytest.raises(RequestError, match="text 0 has 12 characters; the limit is 8"):
        apply_limits([item], TextLimits(4, 8, "reject"))
    with pytest.raises(RequestError, match="2 texts in one request; the limit is 1"):
        apply_limits([item, item], TextLimits(1, 100, "truncate"))


def test_v2_outputs_of_multiple_choice_predictions():
    results = [{"answer": 1, "letter": "B", "choice": "4", "score": 0.7, "scores": [0.3, 0.7]},
               {"answer": 0, "letter": "A", "choice": "Paris", "score": 0.5, "scores": [0.5, 0.25, 0.25]}]
    out = {o["name"]: o for o in v2_outputs(results)}
    assert out["answer"] == {"name": "answer", "datatype": "FP64", "shape": [2], "data": [1.0, 0.0]}
    assert out["letter"]["data"] == ["B", "A"] and out["choice"]["data"] == ["4", "Paris"]
    assert out["scores"]["datatype"] == "BYTES" and out["scores"]["parameters"] == {"content_type": "application/json"}
    assert [json.loads(d) for d in out["scores"]["data"]] == [[0.3, 0.7], [0.5, 0.25, 0.25]]


# ---- the server with a stand-in classifier --------------------------------------------------------


class FakeTokenizer:
    unk_token_id, all_special_ids = 100, [100, 101, 102, 0]


def fake_scored(items: list) -> list:
    from kubetune.tasks.predictor import Scored

    out = []
    for question, choices, _ in items:
        p = [1.0 / len(choices)] * len(choices)
        out.append(Scored({"answer": 0, "letter": "A", "choice": choices[0], "score": p[0], "scores": p},
                          [101] + [1000 + len(question)] * 3 + [100, 102], False))
    return out


@pytest.fixture
def mc_server(tmp_path):
    from prometheus_client import CollectorRegistry

    from kubetune.serving import serve
    from kubetune.serving.requestlog import RequestLog
    from kubetune.serving.serve import ServeConfig
    from kubetune.storage.store import LocalStore

    with serve.kserve_argv():
        from kubetune.serving import server
    cfg = ServeConfig(request_log="texts", request_log_rate=1.0)
    registry = CollectorRegistry()
    metrics = server.ServeMetrics("mcq", "v1", MC.name, registry)
    model = server.TextModel("mcq", tmp_path, "v1", cfg, metrics)
    model.classifier = SimpleNamespace(task=MC, labels=list("ABCD"), tokenizer=FakeTokenizer(), truncation="head")

    class Batcher:
        queued = 0

        async def submit(self, items):
            return fake_scored(items)

    model.batcher = Batcher()
    model.request_log = RequestLog(LocalStore(tmp_path / "log"), "mcq", "v1", model.classifier, cfg,
                                   (metrics.logged, metrics.log_dropped))
    yield model, registry, tmp_path / "log"
    model.request_log.close()


def test_server_answers_v1_and_v2_and_describes_its_inputs(mc_server):
    from kserve.protocol.infer_type import InferInput, InferRequest

    model, registry, log_dir = mc_server
    assert model.get_input_types() == [{"name": "question", "datatype": "BYTES", "shape": [-1]},
                                       {"name": "choices", "datatype": "BYTES", "shape": [-1, -1]},
                                       {"name": "context", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in model.get_output_types()] == ["answer", "letter", "choice", "score", "scores"]
    assert all(set(o) == {"name", "datatype", "shape"} for o in model.get_output_types())  # what the metadata schemas hold

    answer = asyncio.run(model.predict({"instances": [{"question": "2 + 2?", "choices": ["4", "5"], "context": "sums"},
                                                      {"question": "Capital?", "choices": ["Paris", "Rome", "Oslo"]}]}))
    assert [p["choice"] for p in answer["predictions"]] == ["4", "Paris"]
    with pytest.raises(RequestError, match=r"instances\[0\]: has 1 choices"):
        asyncio.run(model.predict({"instances": [{"question": "q", "choices": ["a"]}]}))

    counts = InferInput("choice_count", [2], "INT64")
    counts.set_data_from_numpy(np.array([2, 3], dtype=np.int64), binary_data=True)  # the binary-data extension
    request = InferRequest("mcq", [InferInput("question", [2], "BYTES", ["q1", "q2"]),
                                   InferInput("choices", [5], "BYTES", list("abcde")), counts])
    response = asyncio.run(model.predict(request))
    outputs = {o.name: o for o in response.outputs}
    assert outputs["choice"].data == ["a", "c"] and [json.loads(s) for s in outputs["scores"].data] == [[0.5, 0.5], [1 / 3] * 3]

    def sample(name, **labels):
        return registry.get_sample_value(name, {"model_name": "mcq", **labels})

    assert sample("kubetune_serve_texts_total") == 4
    assert sample("kubetune_serve_predictions_total", label="A") == 4
    assert sample("kubetune_serve_predictions_total", label="2") is None  # choice counts are not predictions
    assert sample("kubetune_serve_rejected_requests_total", reason="bad_item") == 1
    assert sample("kubetune_serve_input_tokens_count") == 4

    model.request_log.close()
    # a part file per flush, named by the second and a random token: the records' order across parts is not kept
    logged = sorted((json.loads(line) for f in log_dir.rglob("*.jsonl") for line in f.read_text().splitlines()),
                    key=lambda r: r["text"][0])
    assert [r["text"] for r in logged] == [["2 + 2?", ["4", "5"], "sums"], ["Capital?", ["Paris", "Rome", "Oslo"], None],
                                           ["q1", ["a", "b"], None], ["q2", ["c", "d", "e"], None]]
    assert logged[0]["features"]["token_length"] == 6 and logged[0]["prediction"]["scores"] == [0.5, 0.5]


# ---- batch inference and drift rows ---------------------------------------------------------------


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def outcome(rows) -> list:
    return [r.text if r.text is not None else r.reason for r in rows]


def test_jsonl_rows_are_items_or_rejects_with_the_reason(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        {"question": "2 + 2?", "choices": ["3", "4"], "passage": "sums", "qid": "a"},
        {"question": "Capital?", "choices": ["Paris", "Rome", "Oslo"], "passage": "  ", "qid": "b"},
        {"question": "one", "choices": ["only"]},
        {"question": "many", "choices": [str(k) for k in range(17)]},
        {"question": "blank", "choices": ["a", ""]},
        {"question": "null", "choices": ["a", None]},
        {"question": "not a list", "choices": "a"},
        {"question": "", "choices": ["a", "b"]},
        {"choices": ["a", "b"]},
        {"question": "no choices"},
        "not json",
        {"question": "long", "choices": ["a", "x" * 50]},
        {"question": "numbers", "choices": [1, 2]},
    ])
    rows = read_rows(path, "q.jsonl", "text", "qid", 40, task=MC, context_column="passage")
    got = outcome(rows)
    assert got[:2] == [("2 + 2?", ("3", "4"), "sums"), ("Capital?", ("Paris", "Rome", "Oslo"), None)]
    assert got[2] == "has 1 choices; give 2 to 16" and got[3] == "has 17 choices; give 2 to 16"
    assert got[4] == got[5] == "has an empty choice (null, empty or whitespace)"
    assert got[6] == "column 'choices' must hold a list of choices, got str"
    assert got[7] == "question: empty text" and got[8] == "question: null text"
    assert got[9].startswith("no choices: no column 'choices' and no choice_0 .. choice_N columns")
    assert got[10].startswith("malformed row: invalid JSON")
    assert got[11] == "choice 1: over-long: 50 characters > max_chars 40"
    assert got[12] == ("numbers", ("1", "2"), None)
    assert [r.id for r in rows[:3]] == ["a", "b", "q.jsonl:3"] and [r.source_row for r in rows] == list(range(1, 14))
    assert rows[2].head == "only" and rows[0].head == ""
    # the question column is --text-column when the file has it
    renamed = write_lines(tmp_path / "t.jsonl", [{"text": "q", "choices": ["a", "b"]}])
    assert outcome(read_rows(renamed, "t.jsonl", "text", "", 100, task=MC)) == [("q", ("a", "b"), None)]


def test_wide_csv_and_parquet_rows(tmp_path):
    csv = tmp_path / "q.csv"
    csv.write_text("question,choice_0,choice_1,choice_2,choice_3,passage\n"
                   "2 + 2?,3,4,,,sums\n"                # trailing empty cells: absent choices
                   "Capital?,Paris,Rome,Oslo,Bern,\n"
                   "one,only,,,,\n"
                   "gap,a,,c,,\n"
                   "short row,a\n", encoding="utf-8")
    rows = read_rows(csv, "q.csv", "text", "", 1000, task=MC, context_column="passage")
    assert outcome(rows) == [("2 + 2?", ("3", "4"), "sums"), ("Capital?", ("Paris", "Rome", "Oslo", "Bern"), None),
                             "has 1 choices; give 2 to 16", "has an empty choice (null, empty or whitespace)",
                             "malformed row: expected 6 fields, found 2"]
    listed = tmp_path / "l.csv"
    listed.write_text('q,opts\nWhich?,"[""x"", ""y""]"\nBroken?,"[""x"""\n', encoding="utf-8")
    got = outcome(read_rows(listed, "l.csv", "q", "", 1000, task=MC, choices_column="opts"))
    assert got[0] == ("Which?", ("x", "y"), None) and got[1].startswith("column 'opts' is not a JSON list")

    table = pa.table({"question": ["2 + 2?", "one", None], "choices": [["3", "4"], ["only"], ["a", "b"]], "id": ["p1", "p2", "p3"]})
    pq.write_table(table, tmp_path / "q.parquet")
    rows = read_rows(tmp_path / "q.parquet", "q.parquet", "text", "id", 1000, task=MC)
    assert outcome(rows) == [("2 + 2?", ("3", "4"), None), "has 1 choices; give 2 to 16", "question: null text"]
    assert [r.id for r in rows] == ["p1", "p2", "p3"]


def test_missing_columns_are_errors_for_the_file(tmp_path):
    csv = tmp_path / "q.csv"
    csv.write_text("question,a,b\nq,x,y\n", encoding="utf-8")
    with pytest.raises(InputError, match="q.csv: no choices: no column 'choices' and no choice_0 .. choice_N columns; columns are: "
                                         "question, a, b. Name the list column with --choices-column"):
        read_rows(csv, "q.csv", "text", "", 100, task=MC)
    with pytest.raises(InputError, match="q.csv: column 'prompt' not found; columns are: question, a, b. Pick one with --text-column"):
        read_rows(csv, "q.csv", "prompt", "", 100, task=MC, choices_column="a")
    with pytest.raises(InputError, match="column 'passage' not found.*--context-column"):
        read_rows(csv, "q.csv", "text", "", 100, task=MC, choices_column="a", context_column="passage")
    pq.write_table(pa.table({"text": ["q"], "choices": [["a", "b"]]}), tmp_path / "q.parquet")
    with pytest.raises(InputError, match="column 'qid' not found.*--id-column"):
        read_rows(tmp_path / "q.parquet", "q.parquet", "text", "qid", 100, task=MC)
    # other tasks read as before
    assert read_rows(csv, "q.csv", "question", "", 100, task=SEQ)[0].text == "q"
    assert read_rows(csv, "q.csv", "question", "", 100, "a", task=PAIR)[0].text == ("q", "x")


def test_column_options_must_fit_the_model():
    assert columns_problem(MC, "") == "" and columns_problem(MC, "", "opts", "passage") == ""
    assert columns_problem(MC, "second") == "drop --text-pair-column"
    assert columns_problem(PAIR, "") == "give the second text's column with --text-pair-column"
    assert columns_problem(PAIR, "second") == "" and columns_problem(SEQ, "") == ""
    assert columns_problem(SEQ, "", "opts") == "drop --choices-column"
    assert columns_problem(SEQ, "", context_column="passage") == "drop --context-column"


def publish_settings(tmp_path: Path, task: str):
    """A registry version holding only a settings file: enough for a batch plan (it reads no model)."""
    from kubetune.release import registry
    from kubetune.storage.contracts import ModelInputs, ModelSettings
    from kubetune.storage.store import LocalStore

    store, version = LocalStore(tmp_path / "registry"), "v20261201-000000-mc"
    folder = tmp_path / "model"
    folder.mkdir()
    ModelSettings(task, ModelInputs(64)).write(folder)
    store.publish_dir(folder, registry.version_prefix("mcq", version))
    registry.set_alias(store, "mcq", registry.PRODUCTION, version, "test")
    return store


def test_batch_plan_reads_multiple_choice_rows_and_checks_the_columns(tmp_path):
    from kubetune.steps.batch_infer import BatchConfig, make_plan
    from kubetune.storage.store import LocalStore

    store = publish_settings(tmp_path, MC.name)
    data = tmp_path / "in"
    data.mkdir()
    write_lines(data / "q.jsonl", [{"question": f"q{i}", "choices": ["a", "b"]} for i in range(5)])
    (data / "w.csv").write_text("question,choice_0,choice_1\nq,a,b\nr,c,d\n", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    plan = make_plan(store, "mcq", str(data), LocalStore(tmp_path / "out"), BatchConfig(shard_rows=2), None, work)
    assert [(Path(s["file"]).name, s["start"], s["stop"]) for s in plan["shards"]] == [
        ("q.jsonl", 0, 2), ("q.jsonl", 2, 4), ("q.jsonl", 4, 5), ("w.csv", 0, 2)]
    # the new settings stay out of the plan at their defaults (a plan written before them keeps its fingerprint)
    assert "choices_column" not in plan["config"] and "context_column" not in plan["config"]
    assert BatchConfig(**plan["config"]) == BatchConfig(shard_rows=2)
    given = make_plan(store, "mcq", str(data / "q.jsonl"), LocalStore(tmp_path / "out2"), BatchConfig(context_column="passage"), None,
                      work)
    assert given["config"]["context_column"] == "passage" and given["fingerprint"] != plan["fingerprint"]
    with pytest.raises(InputError, match="model mcq is a multiple-choice model, which reads question and choices and context: "
                                         "drop --text-pair-column"):
        make_plan(store, "mcq", str(data), LocalStore(tmp_path / "out3"), BatchConfig(text_pair_column="x"), None, work)


def test_drift_reads_multiple_choice_rows(tmp_path):
    from kubetune.steps.drift import DriftConfig, read_texts

    write_lines(tmp_path / "q.jsonl", [{"question": "q", "choices": ["a", "b"], "ctx": "c"}, {"question": "bad", "choices": ["a"]}])
    assert read_texts(str(tmp_path / "q.jsonl"), DriftConfig(context_column="ctx"), None, tmp_path, MC) == [("q", ("a", "b"), "c")]
