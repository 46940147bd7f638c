import math

import pytest
import torch

from pcvit import Listener, Run, StopReason, images, load_data, train
from pcvit.config import IMPLEMENTATIONS, ConfigError

from tests.helpers import tiny_config


def make_run(**changes) -> Run:
    config = tiny_config(**changes)
    return Run(config, load_data(config))


def test_early_stopping_counts_as_the_original():
    run = make_run(early_stopping_patience=2, early_stopping_min_delta=0.001)
    # first epoch counts +1; improvement only below best - 0.001 (absolute)
    assert [run.early_stop(m) for m in (0.5, 0.4, 0.3995, 0.3992)] == [False, False, False, True]
    run = make_run(early_stopping_patience=1)
    assert run.early_stop(0.5) is True  # the first epoch alone reaches patience 1


def test_training_lowers_the_train_mse_on_structured_images():
    config = tiny_config(train_subset=128, batch_size=16, epochs=4, inference_steps=5, peak_lr_weights=3e-3,
                         linear_probe_every_n_epochs=0, use_early_stopping=False)
    result = train(config)
    mses = [h["train_mse"] for h in result.history]
    assert result.stop_reason == "completed" and result.epochs_run == 4
    assert mses[-1] < 0.8 * mses[0], mses


@pytest.mark.parametrize("other", [impl for impl in IMPLEMENTATIONS if impl != "plain"])
def test_every_implementation_agrees_with_plain_over_several_training_batches(other):
    runs = [make_run(implementation=impl, intermediate_l1_coeff=1e-3, warmup_steps=2) for impl in ("plain", other)]
    data = runs[0].data
    for b in range(3):
        x = data.normalise(data.train_images[b * 8:(b + 1) * 8])
        outs = [run.train_on_batch(x) for run in runs]
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(runs[0].states.hidden, runs[1].states.hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[0].states.top, runs[1].states.top, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class Poison(Listener):
    """Puts a NaN into the carried states after the first epoch: the run must end as 'diverged'."""

    def on_epoch(self, run, epoch, metrics):
        if epoch == 1:
            run.states.top[0, 0, 0] = math.nan


def test_nan_states_end_the_run_as_diverged_not_a_crash():
    result = train(tiny_config(epochs=4), listeners=[Poison()])
    assert result.diverged and result.stop_reason == "diverged"
    assert result.divergence_epoch == 2 and result.epochs_run == 2
    assert math.isnan(result.final_train_mse) and math.isfinite(result.best_train_mse)


class StopAtFirstProbe(Listener):
    def __init__(self):
        self.probes = []

    def on_probe(self, run, epoch, accuracy):
        self.probes.append((epoch, accuracy))
        run.request_stop(StopReason.PRUNED, "the test's pruner")


def test_a_listener_can_stop_the_run_after_a_probe():
    listener = StopAtFirstProbe()
    result = train(tiny_config(epochs=5), listeners=[listener])
    assert (result.stop_reason, result.stop_detail, result.epochs_run) == (StopReason.PRUNED, "the test's pruner", 1)
    assert listener.probes == [(1, result.best_probe_accuracy)]


class CheckpointAndStop(Listener):
    def __init__(self, at):
        self.at, self.saved = at, None

    def on_epoch(self, run, epoch, metrics):
        if epoch == self.at:
            self.saved = run.checkpoint()
            run.request_stop(StopReason.STOPPED, "simulated crash")


def test_resume_from_a_checkpoint_continues_exactly():
    config = tiny_config(epochs=3, validation_every_n_epochs=2, use_early_stopping=False)
    full = train(config)
    crash = CheckpointAndStop(at=1)
    train(config, listeners=[crash])
    ckpt = torch.load(_roundtrip(crash.saved), weights_only=False)
    resumed = train(config, resume=ckpt)
    assert resumed.epochs_run == 3 and resumed.stop_reason == "completed"
    assert [h["train_mse"] for h in resumed.history] == pytest.approx([h["train_mse"] for h in full.history], rel=1e-6)
    assert resumed.probe_accuracies == pytest.approx(full.probe_accuracies)
    assert resumed.best_val_mse == pytest.approx(full.best_val_mse, rel=1e-6)


def test_resume_refuses_a_checkpoint_of_another_config():
    crash = CheckpointAndStop(at=1)
    train(tiny_config(epochs=2), listeners=[crash])
    with pytest.raises(ValueError, match="hidden_size"):
        train(tiny_config(epochs=2, hidden_size=32), resume=crash.saved)


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_interrupt_stops_within_the_epoch_and_keeps_completed_epochs():
    class InterruptInEpoch2(Listener):
        wants_batches = True

        def on_batch(self, run, epoch, batch, metrics):
            if epoch == 2 and batch == 1:
                run.interrupt("SIGINT")

    result = train(tiny_config(epochs=5), listeners=[InterruptInEpoch2()])
    assert (result.stop_reason, result.stop_detail, result.epochs_run) == ("interrupted", "SIGINT", 1)
    assert len(result.history) == 1


def test_keyboard_interrupt_returns_a_result():
    class CtrlC(Listener):
        def on_epoch(self, run, epoch, metrics):
            raise KeyboardInterrupt

    result = train(tiny_config(epochs=3), listeners=[CtrlC()])
    assert result.stop_reason == "interrupted" and result.epochs_run == 1


def test_outputs_written_to_out_dir(tmp_path):
    result = train(tiny_config(epochs=2, reconstruction_every_n_epochs=1), out_dir=tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["reconstruction_epoch001.png", "reconstruction_epoch002.png"]
    assert result.image_paths == [str(tmp_path / p) for p in pngs]


def test_the_run_records_its_matmul_precision_on_the_cpu():
    assert make_run().precision == "float32" and make_run(precision="bf16").result.precision == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, tf32", [("auto", True), ("tf32", True), ("float32", False)])
def test_a_cuda_run_trains_with_tf32_as_its_precision_says_and_restores_it(precision, tf32):
    seen = []

    class Spy(Listener):
        def on_start(self, run):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    before = torch.backends.cuda.matmul.allow_tf32
    run = make_run(device="cuda", precision=precision, epochs=1)
    run.listeners.append(Spy())
    result = run.run()
    assert seen == [(tf32, tf32)] and result.precision == ("tf32" if tf32 else "float32")
    assert torch.backends.cuda.matmul.allow_tf32 is before  # building or running a Run leaves no global behind


@pytest.mark.parametrize("early_stopping, best", [(True, 0.3), (False, 0.5)])
def test_best_val_mse_follows_the_originals_rule_and_min_val_mse_is_the_lowest(monkeypatch, early_stopping, best):
    """Set by the first validation; replaced only by a gain above min_delta, only with early stopping on."""
    run = make_run(epochs=4, validation_every_n_epochs=1, linear_probe_every_n_epochs=0,
                   use_early_stopping=early_stopping, early_stopping_patience=100, early_stopping_min_delta=0.01)
    values = iter([0.5, 0.495, 0.3, 0.2999])
    monkeypatch.setattr(run, "validate", lambda: {"val_mse": next(values)})
    result = run.run()
    assert result.epochs_run == 4
    assert (result.best_val_mse, result.min_val_mse) == (best, 0.2999)


def test_best_val_mse_is_inf_when_never_validated():
    result = train(tiny_config(epochs=5, validation_every_n_epochs=0), listeners=[StopAtFirstProbe()])
    assert result.epochs_run == 1 and result.best_val_mse == math.inf == result.min_val_mse


def test_the_reconstruction_image_runs_reconstruction_steps_and_validation_eval_inference_steps(monkeypatch):
    run = make_run(eval_inference_steps=2, reconstruction_steps=5, inference_steps=3)
    steps = []
    settle = run.settle
    monkeypatch.setattr(run, "settle", lambda x, states, T, **kw: steps.append(T) or settle(x, states, T, **kw))
    run.validate()
    assert set(steps) == {2}
    steps.clear()
    run.save_reconstruction(1)
    assert steps == [5]


def test_the_reconstruction_grid_has_one_row_per_image_and_the_batch_tiles_them(tmp_path):
    import PIL.Image

    run = Run(tiny_config(num_images=3), load_data(tiny_config()), out_dir=tmp_path)
    seen = {}
    original = run.settle_and_reconstruct
    run.settle_and_reconstruct = lambda x, slots, steps: seen.setdefault("x", x) * 0 + original(x, slots, steps)
    path = run.save_reconstruction(1)
    shown = run.data.normalise(run.data.test_images[:3])
    assert torch.equal(seen["x"][4], shown[1]) and torch.equal(seen["x"][6], shown[0])  # slot i: image i mod 3
    width, height = PIL.Image.open(path).size
    panel = 32 * (images.TARGET_PANEL // 32)  # enlarged by a whole factor
    columns = 2  # nothing is masked: "original = input" | reconstruction
    assert (height, width) == (images.LABEL_HEIGHT + 3 * (panel + images.PAD) + images.PAD,
                               columns * (panel + images.PAD) + images.PAD)  # three rows, one per image
    with pytest.raises(ConfigError, match="num_images"):
        tiny_config(num_images=9)  # more than the batch of 8
