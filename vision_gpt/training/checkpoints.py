"""Which `Trainer` checkpoints a run can resume from.

`Trainer` writes a checkpoint in order: the model (`model.safetensors`, configs), the optimizer, scheduler and RNG
states, and `trainer_state.json` last. A run killed during a save leaves a folder with the model but not the rest, and
`transformers.trainer_utils.get_last_checkpoint` still returns it, because it only looks at the folder names. Here a
checkpoint is complete when every file a resume reads is there and `trainer_state.json` parses.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CheckpointCheck:
    """One checkpoint folder and what it lacks for a resume (`problems` is empty when it is complete)."""

    path: Path
    step: int
    problems: list[str]

    @property
    def complete(self) -> bool:
        return not self.problems


def checkpoint_problems(folder: str | Path, optimizer_state: bool = True, num_processes: int = 1) -> list[str]:
    """
    What `folder` lacks for `Trainer` to resume from it, as short phrases naming the files; empty when complete.

    `optimizer_state=False` is for runs with `--save_only_model`, whose checkpoints hold no optimizer, scheduler or
    RNG state. `num_processes` > 1 expects one RNG file per process (`rng_state_0.pth`, ...).
    """
    folder = Path(folder)
    problems = []
    state = folder / TRAINER_STATE
    if not state.is_file():
        problems.append(f"{TRAINER_STATE} is missing")
    else:
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (ValueError, OSError) as error:  # a save cut short mid-write leaves truncated JSON
            problems.append(f"{TRAINER_STATE} is unreadable ({error})")
    if not any((folder / name).is_file() for name in WEIGHTS):
        problems.append(f"no model weights ({' or '.join(WEIGHTS[:2])})")
    else:
        index = folder / "model.safetensors.index.json"
        if index.is_file() and not (folder / "model.safetensors").is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, OSError) as error:
                problems.append(f"{index.name} is unreadable ({error})")
            else:
                problems += [f"{shard} is missing" for shard in sorted(shards) if not (folder / shard).is_file()]
    if optimizer_state:
        rng = ["rng_state.pth"] if num_processes == 1 else [f"rng_state_{rank}.pth" for rank in range(num_processes)]
        problems += [f"{name} is missing" for name in ("optimizer.pt", "scheduler.pt", *rng)
                     if not (folder / name).is_file()]
    return problems


def list_checkpoints(output_dir: str | Path, **expect) -> list[CheckpointCheck]:
    """The `checkpoint-N` folders in `output_dir`, newest (highest step) first, each with its problems."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append(CheckpointCheck(path, int(match.group(1)), checkpoint_problems(path, **expect)))
    return sorted(found, key=lambda check: check.step, reverse=True)


def describe(check: CheckpointCheck) -> str:
    return f"{check.path.name} ({'; '.join(check.problems)})"


def resolve_resume(requested: str, output_dir: str | Path, **expect) -> tuple[str, list[str]]:
    """
    The checkpoint folder to resume from, and notes for the log.

    `requested` is "latest" (or "true", Trainer's spelling): the newest complete checkpoint in `output_dir`, with a
    note naming each newer, incomplete one passed over and why. Otherwise it is a folder, which must be complete.
    Raises `ValueError` naming what is missing and, where there is one, the newest complete checkpoint.
    """
    if requested.lower() in ("latest", "true"):
        checks = list_checkpoints(output_dir, **expect)
        newest_complete = next((check for check in checks if check.complete), None)
        if newest_complete is None:
            found = f" Incomplete: {', '.join(describe(c) for c in checks)}." if checks else ""
            raise ValueError(f"--resume_from_checkpoint {requested}: no complete checkpoint in {output_dir}.{found}")
        passed_over = [check for check in checks if check.step > newest_complete.step]
        notes = [f"Resuming from {newest_complete.path}; passed over the newer {describe(check)}: a run stopped during "
                 "its save (Trainer writes trainer_state.json last)." for check in passed_over]
        return str(newest_complete.path), notes
    folder = Path(requested)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {requested}: no such folder.")
    problems = checkpoint_problems(folder, **expect)
    if problems:
        newest_complete = next((check for check in list_checkpoints(folder.parent, **expect) if check.complete), None)
        hint = (f" The newest complete checkpoint is {newest_complete.path}." if newest_complete is not None
                and newest_complete.path.resolve() != folder.resolve() else "")
        raise ValueError(f"--resume_from_checkpoint {requested} is incomplete (a run stopped during its save?): "
                         f"{'; '.join(problems)}.{hint} `--resume_from_checkpoint latest` picks the newest complete "
                         "one.")
    return str(folder), []


__all__ = ["CheckpointCheck", "checkpoint_problems", "list_checkpoints", "resolve_resume"]
