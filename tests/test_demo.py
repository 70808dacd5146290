import gzip

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


def test_quick_run_logs_each_epoch_and_the_table(quick_run):
    _, lines = quick_run
    epochs_teacher, epochs_student = demo.QUICK_EPOCHS_TEACHER, demo.QUICK_EPOCHS_STUDENT
    expected_epochs = {"teacher": epochs_teacher, "student ": epochs_student, "student+KD": epochs_student}
    for name, epochs in expected_epochs.items():
        epoch_lines = [line for line in lines if line.startswith(name) and "epoch" in line]
        assert len(epoch_lines) == epochs
        assert f"epoch {epochs:>3}/{epochs}" in epoch_lines[-1]
        assert "train loss" in epoch_lines[-1] and "test accuracy" in epoch_lines[-1]
    assert sum("/ 1000" in line for line in lines) == 3


def test_quick_run_is_deterministic_on_cpu(quick_run):
    results, _ = quick_run
    again = demo.run(quick=True, seed=0, device="cpu", log=lambda line: None)
    assert again == results


def test_epoch_arguments_are_checked():
    with pytest.raises(ValueError, match="epochs"):
        demo.run(epochs_teacher=0, log=lambda line: None)
