"""`python -m fastkd demo llm`: the text, the windows, the batches from a teacher cache, and a quick run whose
distilled students beat the student alone."""
import math
import re
from dataclasses import replace

import pytest
import torch

from fastkd import demo_llm
from fastkd.__main__ import main
from fastkd.teacher_cache import storage_report


def test_corpus_splits_every_file_and_names_its_source(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x" * 100)
    (tmp_path / "b.py").write_bytes(b"y" * 50)
    corpus = demo_llm.load_corpus(("a", "b"), stdlib=tmp_path)
    # The last tenth of each file is held out, so validation has every module's style.
    assert bytes(corpus.train.tolist()) == b"x" * 90 + b"y" * 45
    assert bytes(corpus.validation.tolist()) == b"x" * 10 + b"y" * 5
    assert corpus.train.dtype == torch.uint8 and corpus.files == ("a", "b")
    assert "2 modules" in corpus.describe() and "PSF License" in corpus.describe()
    assert corpus.digest == demo_llm.load_corpus(("a", "b"), stdlib=tmp_path).digest
    (tmp_path / "b.py").write_bytes(b"z" * 50)
    assert corpus.digest != demo_llm.load_corpus(("a", "b"), stdlib=tmp_path).digest


def test_a_missing_module_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match=r"standard library's source.*missing\.py"):
        demo_llm.load_corpus(("missing",), stdlib=tmp_path)


def test_every_module_is_in_this_pythons_standard_library():
    corpus = demo_llm.load_corpus()
    assert len(corpus.train) > 1_000_000 and 0.09 < len(corpus.validation) / len(corpus.train) < 0.12


def test_windows_predict_each_byte_once():
    tokens = torch.arange(11, dtype=torch.uint8)
    w = demo_llm.windows(tokens, 4)
    assert w.dtype == torch.int64 and w.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    labels = w[:, 1:].flatten().tolist()
    assert labels == list(range(1, 9))  # no byte predicted twice, none skipped before the dropped tail
    with pytest.raises(ValueError, match="no window"):
        demo_llm.windows(tokens[:3], 4)


def test_batch_labels_are_ignored_where_the_cache_has_no_teacher():
    """collate pads a shorter cached sequence with id 0 / -inf; those tokens must not count."""
    k = 3
    full = (torch.zeros(4, k, dtype=torch.int64), torch.full((4, k), -1.0, dtype=torch.float16))
    short = (torch.ones(2, k, dtype=torch.int64), torch.full((2, k), -2.0, dtype=torch.float16))
    windows = torch.arange(10).view(2, 5)
    inputs, labels, (indices, logprobs) = demo_llm.batch_of([(windows[0], full), (windows[1], short)])
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert labels.tolist() == [[1, 2, 3, 4], [6, 7, demo_llm.IGNORE_INDEX, demo_llm.IGNORE_INDEX]]
    assert indices.shape == logprobs.shape == (2, 4, k) and logprobs.dtype == torch.float32
    assert torch.isinf(logprobs[1, 2:]).all() and (indices[1, 2:] == 0).all()
    assert demo_llm.batch_of([(windows[0], None)])[2] is None


def test_model_returns_hidden_states_for_the_fused_loss():
    model = demo_llm.ByteLM(demo_llm.Size(layers=1, width=16, heads=2), context=8)
    hidden = model(torch.randint(0, 256, (3, 8)))
    assert hidden.shape == (3, 8, 16) and model.head.weight.shape == (demo_llm.VOCAB, 16)
    # Causal: a later byte changes nothing before it.
    a, b = torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64)
    b[0, 5] = 7
    torch.testing.assert_close(model(a)[:, :5], model(b)[:, :5])


def test_progress_bar():
    assert demo_llm.bar(0, 10, width=10) == "[..........]"
    assert demo_llm.bar(5, 10, width=10) == "[#####.....]"
    assert demo_llm.bar(10, 10, width=10) == "[##########]"


@pytest.fixture(scope="module")
def quick_run():
    lines = []
    results = demo_llm.run(quick=True, seed=0, device="cpu", log=lines.append)
    return results, lines


def test_quick_run_distilled_students_beat_the_student_alone(quick_run):
    results, _ = quick_run
    alone = results["alone"]["loss"]
    assert results["teacher"]["loss"] < alone
    for mode in ("full_kd", "topk_renormalize", "topk_bucket", "sampled"):
        assert results[mode]["loss"] < alone, (mode, results[mode]["loss"], alone)
    # A byte model far from uniform (ln 256 = 5.5 nats), so the comparison is between trained models.
    assert all(results[key]["loss"] < 3.5 for key in ("teacher",) + demo_llm.MODES)


def test_quick_run_reports_the_caches_sizes(quick_run):
    results, _ = quick_run
    topk = storage_report(demo_llm.VOCAB, k=demo_llm.QUICK.k)
    sampled = storage_report(demo_llm.VOCAB, mode="sampled", samples=demo_llm.QUICK.samples)
    tokens = demo_llm.QUICK.transfer_windows * demo_llm.QUICK.context
    for mode, report in (("topk_renormalize", topk), ("topk_bucket", topk), ("sampled", sampled)):
        assert results[mode]["bytes_per_token"] == report.bytes_per_token
        assert results[mode]["full_bytes_per_token"] == 2 * demo_llm.VOCAB  # bfloat16 logits
        assert report.bytes_per_token * tokens < results[mode]["cache_bytes"] < 1.01 * report.bytes_per_token * tokens
    assert "cache_bytes" not in results["alone"] and "cache_bytes" not in results["full_kd"]


def test_quick_run_logs_one_line_per_model_and_the_table(quick_run):
    _, lines = quick_run
    assert re.search(r"\d+ threads?, torch ", lines[0])  # the machine, for whoever compares numbers
    assert "standard library" in lines[1] and "PSF License" in lines[1]
    model_lines = [line for line in lines if "steps (" in line and "validation" in line]
    assert len(model_lines) == 6 and all(line.endswith(" s)") for line in model_lines)
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| model | trained with | validation loss (nats/byte) | bits/byte |")
    assert len(table) == 2 + 6
    rows = {row.split(" | ")[1]: row for row in table[2:]}
    assert set(rows) == {"-", "alone (CE)", "full-logit KD", f"top-{demo_llm.QUICK.k} renormalize",
                         f"top-{demo_llm.QUICK.k} bucket", f"sampled ({demo_llm.QUICK.samples} draws)"}
    for row in table[2:]:
        nats, bits = (float(cell) for cell in row.split(" | ")[2:4])
        assert bits == pytest.approx(nats / math.log(2), abs=2e-3)
    assert "B/token" in rows[f"sampled ({demo_llm.QUICK.samples} draws)"] and "B/token" not in rows["full-logit KD"]
    assert any("differ with the CPU model and the thread count" in line for line in lines)
    assert lines[-1].startswith("(quick mode")


def test_runs_repeat_with_the_same_seed():
    tiny = replace(demo_llm.QUICK, modules=("heapq",), teacher_steps=3, student_steps=2, transfer_windows=32)
    first = demo_llm.run(preset=tiny, seed=3, device="cpu", log=lambda line: None)
    again = demo_llm.run(preset=tiny, seed=3, device="cpu", log=lambda line: None)
    assert {key: r["loss"] for key, r in first.items()} == {key: r["loss"] for key, r in again.items()}


def test_steps_are_checked():
    with pytest.raises(ValueError, match="steps"):
        demo_llm.run(quick=True, steps_student=0, log=lambda line: None)


def test_cli_runs_the_llm_demo_with_the_shared_options(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_llm, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append({"threads": n}))
    assert main(["demo", "llm", "--quick", "--seed", "2", "--threads", "1", "--steps-student", "7"]) == 0
    assert calls == [{"threads": 1}, {"quick": True, "seed": 2, "device": None, "backend": None,
                                      "steps_teacher": None, "steps_student": 7}]


def test_cli_demo_defaults_to_mnist_and_refuses_the_other_demos_options(monkeypatch):
    from fastkd import demo
    calls = []
    monkeypatch.setattr(demo, "run", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--quick"]) == 0
    assert main(["demo", "mnist", "--epochs-student", "3"]) == 0
    assert [c["epochs_student"] for c in calls] == [None, 3]
    for argv in (["demo", "--steps-teacher", "3"], ["demo", "llm", "--epochs-teacher", "3"], ["demo", "gpt"]):
        with pytest.raises(SystemExit):
            main(argv)
