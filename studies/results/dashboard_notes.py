"""What optuna-dashboard shows beside the plots: the study's note and each trial's note (Markdown).

The study note holds what a person needs to read the study: its description, the study file (whole, as
written), the questions and the latest report. Workers rewrite it as trials finish, and
`pcvit-study report --to-dashboard` on demand. A trial's note says in a few lines what happened to it.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from studies.running.records import glossary
from studies.studyfile.spec import StudySpec

log = logging.getLogger("pcvit.notes")


def save_note(study_or_trial: Any, body: str) -> None:
    from optuna_dashboard import save_note as dashboard_save_note

    dashboard_save_note(study_or_trial, body)


def study_note(spec: StudySpec, report_markdown: str) -> str:
    lines = [f"# {spec.name}", "", spec.description or "(no description in the study file)", ""]
    if spec.questions:
        lines += ["Questions:", ""] + [f"{i}. {q['question']} ({', '.join(q['params'])})"
                                       for i, q in enumerate(spec.questions, 1)] + [""]
    lines += [report_markdown.rstrip(), "", "## What a trial's attributes mean", ""] + glossary()
    lines += ["", "The rest of each trial's record (checkpoint, versions, MSEs, device) is kept in its `pcvit:` "
              "system attributes: `pcvit-study show-trial --study-name NAME N` prints it.", "",
              "## The study file", ""]
    text = spec.text or _yaml_of(spec.document)
    lines += ["```yaml", text.rstrip(), "```", ""]
    return "\n".join(lines)


def _yaml_of(document: dict) -> str:
    import yaml

    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=110)


def write_study_note(study: optuna.Study, spec: StudySpec, summary: dict | None = None) -> None:
    from studies.results.report import render_markdown, study_summary

    summary = summary if summary is not None else study_summary(study, spec)
    save_note(study, study_note(spec, render_markdown(summary)))


def update_study_note(study: optuna.Study, spec: StudySpec) -> None:
    """Best effort from a worker: a note that cannot be written must not cost the study a trial."""
    try:
        write_study_note(study, spec)
    except Exception as exc:  # noqa: BLE001 - the note is a convenience; the trial's record is already stored
        log.warning("could not update the study's note: %s", exc)


def trial_note(number: int, summary: dict[str, Any], resumed_after: int | None,
               pictures: dict[str, str] | None = None) -> str:
    """A few lines: how the trial ended, divergence, resume, best probe and when, MSEs, time."""
    reason, detail = summary.get("stop_reason"), summary.get("stop_detail")
    lines = [f"### Trial {number}: {reason}" + (f" ({detail})" if detail and detail != reason else "")]
    if summary.get("diverged"):
        lines.append(f"- diverged in epoch {summary.get('divergence_epoch')}")
    if resumed_after is not None:
        lines.append(f"- resumed from its checkpoint after epoch {resumed_after}")
    history = summary.get("history") or []
    probes = [(h["epoch"], h["probe_accuracy"]) for h in history if isinstance(h.get("probe_accuracy"), float)]
    if probes:
        epoch, best = max(probes, key=lambda p: p[1])
        lines.append(f"- best probe accuracy {best:.4f} in epoch {epoch} ({len(probes)} probes)")
    lines.append(f"- epochs run {summary.get('epochs_run')}, best train MSE {_short(summary.get('best_train_mse'))}, "
                 f"best validation MSE {_short(summary.get('best_val_mse'))}")
    lines.append(f"- {_short(summary.get('wall_time_s'))} s on {summary.get('device')}")
    if summary.get("untrained_baseline") is not None:  # short lines: the dashboard does not wrap a note's lines
        lines += ["- its controls (same probe, same images):",
                  f"    - untrained network {_short(summary['untrained_baseline'])}",
                  f"    - PCA-{summary.get('pca_components')} of the pixels {_short(summary.get('pca_baseline'))}",
                  f"    - raw patches {_short(summary.get('raw_patch_baseline'))}"]
    if summary.get("probe_converged") is False:
        lines += ["- probe head not converged (its loss still fell):", "    raise linear_probe_epochs or use lbfgs"]
    for name, url in sorted((pictures or {}).items()):  # the newest reconstruction and the curves, full width
        lines += ["", f"![{name}]({url})"]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
