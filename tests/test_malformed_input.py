"""What a newcomer gets wrong first: each mistake is one line naming it and the right form, exit 2, nothing written."""

from __future__ import annotations

import pytest
import yaml

import objective
import storage
from studies import cli
from tests.helpers import REPO


@pytest.mark.parametrize("url, words", [
    ("sqlite:/x.db", "did you mean sqlite:///x.db (relative) or sqlite:////x.db (absolute)?"),
    ("sqlite:x.db", "did you mean sqlite:///x.db"),
    ("journal:/j.log", "did you mean journal:///j.log"),
    ("postgresql://pcvit:s3cret@db:5432/pcvit", "postgresql+psycopg2://pcvit:***@db:5432/pcvit"),
    ("postgres://pcvit@db/pcvit", "postgresql+psycopg2://pcvit@db/pcvit"),
    ("grpc:db:13000", "did you mean grpc://HOST:PORT?"),
])
def test_a_malformed_storage_url_is_one_line_with_the_right_form(url, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "--storage", url, "--study-name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and "s3cret" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing created, not even a journal file named after the scheme
    with pytest.raises(storage.StorageError, match="psycopg2|did you mean"):
        storage.open_storage(url)


def test_a_study_name_that_does_not_exist_is_named_with_the_closest_packaged_one(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    assert objective.main(["--storage", url, "--study-name", "smoek", "--artifact-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "study 'smoek'" in err and "does not exist" in err and "did you mean 'smoke'?" in err


@pytest.mark.parametrize("where, key, value, words", [
    ("fixed", "epochs", "4", "fixed.epochs: must be an integer, got '4' (str)"),
    ("fixed", "use_noise", "yes", "fixed.use_noise: must be true or false, got 'yes'"),
    ("fixed", "peak_lr_hidden", True, "fixed.peak_lr_hidden: must be a number, got True"),
    ("fixed", "peak_lr_hidden", "fast", "fixed.peak_lr_hidden"),
    ("fixed", "linear_probe_vode_indices", "zero", "fixed.linear_probe_vode_indices"),
    ("top", "n_trials", "500", "n_trials: expected int, got '500'"),
    ("top", "n_trial", 5, "n_trial: unknown key (did you mean 'n_trials'?)"),
    ("fixed", "num_block", 2, "fixed.num_block: unknown parameter (did you mean 'num_blocks'?)"),
])
def test_every_wrong_value_in_a_study_file_is_refused_naming_file_key_and_value(where, key, value, words, tmp_path,
                                                                                 capsys):
    document = yaml.safe_load((REPO / "studies" / "smoke.yaml").read_text())
    (document if where == "top" else document["fixed"])[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and words in err, err
    url = f"sqlite:///{tmp_path}/s.db"
    assert objective.main(["--storage", url, "--study-file", str(path), "--artifact-dir", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "s.db").exists()  # refused before the storage is touched


def test_a_worker_whose_database_does_not_answer_exits_75_for_the_launcher_to_retry(tmp_path, monkeypatch, capsys):
    from tests import pg

    monkeypatch.setattr(storage, "STARTUP_PATIENCE_S", 1)
    url = f"postgresql+psycopg2://pcvit@127.0.0.1:{pg.free_port()}/pcvit"  # nothing listens there
    for study in (["--study-name", "smoke"], ["--study-file", str(REPO / "studies" / "smoke.yaml")]):
        assert objective.main(["--storage", url, *study, "--artifact-dir", str(tmp_path / "a")]) == 75
        assert "storage unreachable" in capsys.readouterr().err
