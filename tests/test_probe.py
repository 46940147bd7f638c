import torch

from pcvit.probe import fit_linear_probe, standardise

from tests.helpers import tiny_config


def blobs(n, dim, separation, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    centres = torch.randn(10, dim, generator=torch.Generator().manual_seed(99)) * separation
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_probe_separates_linearly_separable_features():
    config = tiny_config(linear_probe_epochs=5, linear_probe_batch_size=50, linear_probe_lr=1e-2)
    train_x, train_y = blobs(2000, 48, separation=5.0, seed=1)
    test_x, test_y = blobs(500, 48, separation=5.0, seed=2)
    assert fit_linear_probe(train_x, train_y, test_x, test_y, config).accuracy > 0.97


def test_probe_is_at_chance_on_noise():
    config = tiny_config(linear_probe_epochs=3, linear_probe_batch_size=50)
    g = torch.Generator().manual_seed(3)
    accuracy = fit_linear_probe(torch.randn(2000, 48, generator=g), torch.randint(0, 10, (2000,), generator=g),
                                torch.randn(1000, 48, generator=g), torch.randint(0, 10, (1000,), generator=g),
                                config).accuracy
    assert 0.05 < accuracy < 0.16


def test_standardise_uses_training_statistics_with_ddof_0():
    train = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    a, b = standardise(train, torch.tensor([[2.0, 20.0]]))
    torch.testing.assert_close(a, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, torch.zeros(1, 2), rtol=0, atol=1e-6)


def test_probe_reports_chance_for_nan_features():
    config = tiny_config()
    nan = torch.full((20, 4), float("nan"))
    assert fit_linear_probe(nan, torch.zeros(20, dtype=torch.long), nan, torch.zeros(20, dtype=torch.long),
                            config).accuracy == 0.1


def test_lbfgs_probe_converges_where_one_adamw_epoch_does_not():
    train_x, train_y = blobs(2000, 16, separation=1.0, seed=4)  # overlapping classes: the head must be fitted well
    test_x, test_y = blobs(1000, 16, separation=1.0, seed=5)
    short = fit_linear_probe(train_x, train_y, test_x, test_y, tiny_config(linear_probe_batch_size=200))
    lbfgs = fit_linear_probe(train_x, train_y, test_x, test_y, tiny_config(linear_probe_solver="lbfgs"))
    long = fit_linear_probe(train_x, train_y, test_x, test_y,
                            tiny_config(linear_probe_batch_size=200, linear_probe_epochs=300, linear_probe_lr=1e-2))
    assert short.steps == 10 and not short.converged and "NOT converged" in short.describe()
    assert lbfgs.converged and 0 < lbfgs.steps < 1000 and long.converged
    assert lbfgs.accuracy > short.accuracy + 0.1  # ten AdamW steps from a random head measure the start, not the data
    assert abs(lbfgs.accuracy - long.accuracy) < 0.02  # the two solvers agree once both have converged


def test_convergence_is_decided_by_the_loss_not_by_a_step_count():
    """A faithful CIFAR-10 probe takes 250 AdamW steps: a head that has settled by then is converged, and one
    stopped while its loss still falls is not, whatever the count."""
    train_x, train_y = blobs(2000, 16, separation=3.0, seed=4)
    test_x, test_y = blobs(500, 16, separation=3.0, seed=5)
    settled = fit_linear_probe(train_x, train_y, test_x, test_y,
                               tiny_config(linear_probe_batch_size=200, linear_probe_epochs=25, linear_probe_lr=5e-2))
    falling = fit_linear_probe(train_x, train_y, test_x, test_y,
                               tiny_config(linear_probe_batch_size=200, linear_probe_epochs=25, linear_probe_lr=1e-3))
    assert settled.steps == falling.steps == 250
    assert settled.converged and not falling.converged
