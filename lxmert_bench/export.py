"""``lxmert-bench export RUN --hf DIR``: a finished stage's weights as a ``transformers`` directory.

RUN is a run directory (``<workdir>/runs/<kind>/<hash>``) or a stage id (``finetune/0123abcd4567``)
under the workdir. A pretraining stage exports its final ``checkpoints/model.pt`` as
``LxmertForPreTraining``; a VQA / GQA fine-tuning its best epoch (``checkpoints/best.pt``, the
weights its dev metrics and predictions come from) as ``LxmertForQuestionAnswering``, with the
answer table as ``id2label``; an NLVR² fine-tuning as ``LxmertModel`` plus ``nlvr2_head.safetensors``
(``transformers`` has no NLVR² model; see :mod:`lxmert_bench.model.hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lxmert_bench.store import RunDir


class ExportError(ValueError):
    """A RUN that cannot be exported (not a finished pretraining / fine-tuning run)."""


def resolve_run(run: str, workdir: Path) -> RunDir:
    """RUN as a run directory path, else as a stage id under ``workdir``."""
    path = Path(run)
    if (path / "config.json").is_file():
        return RunDir.at(path.resolve())
    if run.count("/") == 1 and not path.is_absolute():
        by_id = RunDir(workdir, run.strip("/"))
        if by_id.config_path.is_file():
            return by_id
    raise ExportError(f"{run}: neither a run directory (no config.json in it) nor a stage id under "
                      f"{workdir / 'runs'} (e.g. finetune/0123abcd4567; `lxmert-bench plan SPEC` "
                      "lists them)")


def _checkpoint_answers(path: Path, key: str) -> int | None:
    from lxmert_bench.model.weights import canonical_state_dict

    weight = canonical_state_dict(path).tensors.get(key)
    return None if weight is None else int(weight.shape[0])


def trained_model(run_dir: RunDir) -> tuple[nn.Module, Path, list[str] | None]:
    """The finished stage's model with its exported weights loaded (strictly), the weights file,
    and the answer strings of a VQA / GQA head (None when the data root's table is not readable)."""
    from lxmert_bench.model.weights import QA_HEAD, TASK_HEAD, load_weights

    if run_dir.read_result() is None:
        raise ExportError(f"{run_dir.path}: not finished (state {run_dir.disk_state()!r}): only a "
                          "finished stage's weights are exported")
    config = run_dir.read_config()
    label2ans: list[str] | None = None
    if config.kind == "pretrain":
        from lxmert_bench.train.pretrain import build_model

        path = run_dir.checkpoint_dir / "model.pt"
        _need(path)
        answers = _checkpoint_answers(path, f"{QA_HEAD}3.weight") or config.model.num_qa_labels
        model: nn.Module = build_model(config, answers)
    elif config.kind == "finetune" and config.finetune is not None:
        from lxmert_bench.train.finetune import build_model as build_task_model

        path = run_dir.checkpoint_dir / "best.pt"
        _need(path)
        answers = None
        if config.finetune.task != "nlvr2":
            answers = _checkpoint_answers(path, f"{TASK_HEAD}3.weight")
            label2ans = _answer_strings(config.data.root, config.finetune.task, answers)
        model = build_task_model(config, answers)
    else:
        raise ExportError(f"{run_dir.path}: a {config.kind} stage; export --hf takes a pretraining "
                          "or fine-tuning run (a BERT stage's model.pt is already in HF "
                          "BertForPreTraining names)")
    load_weights(model, path, strict=True)
    return model.eval(), path, label2ans


def _need(path: Path) -> None:
    if not path.is_file():
        raise ExportError(f"{path}: missing (removed by hand? `clean` keeps it); nothing to export")


def _answer_strings(root: str, task: str, answers: int | None) -> list[str] | None:
    from lxmert_bench.data.answers import load_task_answers

    try:
        label2ans = load_task_answers(root, task)[1]
    except (OSError, ValueError):
        return None  # the export still works; HF's default id2label names LABEL_i
    return label2ans if len(label2ans) == answers else None


def export_run(run: str, out: str | Path, workdir: Path) -> dict[str, Any]:
    """Export the stage RUN names into ``out``; returns what was written (for the CLI)."""
    from lxmert_bench.model.hf import ExportDirError, export_dir_problem, export_hf, hf_architecture

    problem = export_dir_problem(out)  # before loading anything
    if problem:
        raise ExportDirError(problem)
    run_dir = resolve_run(run, workdir)
    model, weights, label2ans = trained_model(run_dir)
    files = export_hf(model, out, id2label=label2ans,
                      source={"stage_id": run_dir.stage_id, "run_dir": str(run_dir.path),
                              "weights": str(weights)})
    return {"stage_id": run_dir.stage_id, "architecture": hf_architecture(model),
            "weights": str(weights), "files": [str(f) for f in files],
            "id2label": label2ans is not None}
