import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pcvit import Config, DatasetError, PCViT, load_data, train
from pcvit.data import FASHION_MNIST_DIR
from pcvit.data import main as data_main


def write_fake_cifar10(root: Path, n_per_batch: int = 20) -> None:
    """A tiny CIFAR-10 in torchvision's on-disk format: pickled dicts with 'data' (n, 3072) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n_per_batch).tolist()
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        data[:, 0] = np.arange(n_per_batch) + (100 if name == "test_batch" else 0)  # a marker pixel: order
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def cifar_config(root: Path, **changes) -> Config:
    return Config(dataset="cifar10", data_dir=str(root), train_subset=60, test_subset=10, validation_subset=12,
                  device="cpu", **changes)


def test_cifar10_reads_torchvision_format_first_n_in_order(tmp_path):
    write_fake_cifar10(tmp_path)
    data = load_data(cifar_config(tmp_path))
    assert data.train_images.shape == (60, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (12, 3, 32, 32)  # max(test_subset, validation_subset)
    assert data.train_images[:20, 0, 0, 0].tolist() == list(range(20))  # first batch file first, in order
    assert data.test_images[:12, 0, 0, 0].tolist() == list(range(100, 112))
    x = data.normalise(data.train_images[:2])
    expected = (data.train_images[:2].float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]) \
        / torch.tensor([0.2023, 0.1994, 0.2010])[:, None, None]
    torch.testing.assert_close(x, expected)


def test_cifar10_trains_end_to_end_on_the_fake_dataset(tmp_path):
    write_fake_cifar10(tmp_path)
    config = cifar_config(tmp_path, num_blocks=1, hidden_size=16, num_heads=2, batch_size=20, epochs=1,
                          inference_steps=2, linear_probe_batch_size=20)
    result = train(config)
    assert result.epochs_run == 1 and 0.0 <= result.best_probe_accuracy <= 1.0


def test_missing_cifar10_names_the_folder_and_the_command_that_fetches_it(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_data(cifar_config(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value)
    assert f"python -m pcvit.data {tmp_path / 'nowhere'}" in str(err.value)  # works for workers and runs alike
    assert "--set" not in str(err.value)  # pcvit-worker has no --set


def test_download_without_a_network_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision

    # no network here either way; a closed local port makes the failure immediate and certain
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert data_main([str(tmp_path / "cifar")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m pcvit.data: error: cannot download CIFAR-10 into {tmp_path / 'cifar'}: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "cifar").exists()  # nothing left behind


def test_the_download_command_prints_no_stray_warning(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    done = subprocess.run([sys.executable, "-W", "default", "-m", "pcvit.data", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr


def test_subset_larger_than_the_dataset_is_a_clear_error(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(DatasetError, match="train_subset asks for 500"):
        load_data(cifar_config(tmp_path, ).replace(train_subset=500))


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    config = Config(dataset="fashion-mnist", train_subset=1000, test_subset=100, validation_subset=100, device="cpu",
                    num_blocks=1, hidden_size=16, num_heads=2)
    data = load_data(config)
    assert data.train_images.shape == (1000, 1, 28, 28) and data.train_labels.max() <= 9
    assert len(set(data.train_labels.tolist())) == 10
    model = PCViT(config, data.channels, data.image_size)
    assert (model.num_patches, model.patch_dim) == (49, 16)  # 7x7 patches of 4x4x1
    x = data.normalise(data.train_images[:4])
    assert abs(float(data.normalise(data.train_images).mean())) < 0.05  # the per-dataset constants centre it
    top = torch.zeros(4, 49, 16)
    _, _, u_s = model.predict(top, model.feedforward(top)[0])
    assert u_s.shape == x.shape


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_data(Config(dataset="fashion-mnist", data_dir=str(tmp_path), device="cpu"))


def test_synthetic_data_is_deterministic_and_class_structured():
    config = Config(dataset="synthetic", train_subset=200, test_subset=50, validation_subset=50, device="cpu")
    a = load_data(config)
    from pcvit.data import synthetic_images

    images, labels = synthetic_images(200, seed=config.seed)
    assert torch.equal(a.train_images, torch.from_numpy(images)) and torch.equal(a.train_labels, torch.from_numpy(labels))
    means = torch.stack([a.train_images[a.train_labels == k].float().mean(0) for k in range(10)])
    assert (means[0] - means[1]).abs().mean() > 10  # classes differ by more than the noise
