import gzip
import io
import re

import pytest
import torch

import fastkd.data
from fastkd import demo
from fastkd.data import load_mnist_5k


def test_mnist_5k_shapes_dtypes_and_balance():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == [500] * 10
    assert int(images.min()) == 0 and int(images.max()) == 255
    # MNIST is ink (up to 255) on a background of 0: some ink in every image, mostly background overall.
    assert (images > 0).flatten(1).any(dim=1).all()
    assert 0.1 < (images > 0).float().mean() < 0.3


def test_damaged_mnist_file_is_reported(tmp_path, monkeypatch):
    truncated = tmp_path / "mnist_5k.u8.gz"
    truncated.write_bytes(gzip.compress(bytes(1000)))
    monkeypatch.setattr(fastkd.data, "MNIST_5K_FILE", truncated)
    with pytest.raises(RuntimeError, match="damaged"):
        load_mnist_5k()

    truncated.write_bytes(b"not gzip")
    with pytest.raises(RuntimeError, match="damaged"):
        load_mnist_5k()


@pytest.fixture(scope="module")
def quick_run():
    lines = []
    results = demo.run(quick=True, seed=0, device="cpu", log=lines.append)
    return results, lines


def test_quick_run_accuracies_are_well_above_chance(quick_run):
    results, _ = quick_run
    assert set(results) == {"teacher", "student", "student_kd"}
    for accuracy in results.values():
        assert isinstance(accuracy, float)
        assert 0.5 < accuracy <= 1.0


def test_quick_run_logs_one_line_per_model_and_the_table(quick_run):
    """One line per trained model (its last epoch, loss, accuracy and time), not one per epoch; the table; the
    machine and the note that the numbers depend on it."""
    _, lines = quick_run
    epochs_teacher, epochs_student = demo.QUICK_EPOCHS_TEACHER, demo.QUICK_EPOCHS_STUDENT
    expected_epochs = {"teacher": epochs_teacher, "student ": epochs_student, "student+KD": epochs_student}
    for name, epochs in expected_epochs.items():
        model_lines = [line for line in lines if line.startswith(name) and "epoch" in line]
        assert len(model_lines) == 1, model_lines
        assert f"epoch {epochs:>3}/{epochs}" in model_lines[0]
        assert "train loss" in model_lines[0] and "test accuracy" in model_lines[0] and model_lines[0].endswith(" s)")
    assert sum("/ 1000" in line for line in lines) == 3
    assert len(lines) <= 12
    assert re.search(r"\d+ threads?, torch ", lines[0])  # the machine, for whoever compares numbers
    assert any("differ with the CPU model and the thread count" in line for line in lines)


def test_progress_is_one_line_rewritten_in_place():
    """On a terminal each epoch rewrites the same line (carriage return), which is erased before the next
    logged line, so the screen keeps one line per model."""
    stream = io.StringIO()
    terminal = demo.TerminalProgress(stream)
    first, second = "teacher    epoch   1/60  train loss 1.0000", "teacher    epoch   2/60"
    terminal(first)
    terminal(second)
    assert stream.getvalue() == "\r" + first + "\r" + second.ljust(len(first))
    terminal.clear()
    assert stream.getvalue().endswith("\r" + " " * len(second) + "\r") and "\n" not in stream.getvalue()


def test_train_reports_every_epoch_to_progress_and_logs_once():
    torch.manual_seed(0)
    images, labels = torch.rand(64, 28, 28), torch.randint(0, 10, (64,))
    statuses, lines = [], []
    demo.train("tiny", demo.mlp(8), lambda logits, batch: torch.nn.functional.cross_entropy(logits, labels[batch]),
               images, images[:16], labels[:16], epochs=3, seed=0, log=lines.append, progress=statuses.append)
    assert [s.split("epoch")[1].split()[0] for s in statuses] == ["1/3", "2/3", "3/3"]
    assert len(lines) == 1 and lines[0].startswith(statuses[-1])


def test_quick_run_is_deterministic_on_cpu(quick_run):
    results, _ = quick_run
    again = demo.run(quick=True, seed=0, device="cpu", log=lambda line: None)
    assert again == results


def test_epoch_arguments_are_checked():
    with pytest.raises(ValueError, match="epochs"):
        demo.run(epochs_teacher=0, log=lambda line: None)
