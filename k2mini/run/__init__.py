"""Run-keeping: what a training run keeps besides the step's math (training.py).

    resume_state.py    what a checkpoint holds (checksummed), save with last.pt/prev.pt rotation, load,
                       the settings check, `resume_from`
    checkpoint_dir.py  the directory a run owns (lock file, across ranks), which checkpoint is still good
    divergence.py      NonFiniteLossError; stop or raise on a non-finite step, never save non-finite state
    history.py         the history rows and the DataFrame `train` returns

None of these imports training.py: `train` there strings the step and these together.
"""

from .checkpoint_dir import LOCK, checkpoint_path, existing_checkpoints, newest_good, own_checkpoint_dir, owning
from .divergence import NonFiniteLossError, problem_reason, save_or_stop, stop_on_nonfinite
from .history import history_frame, history_row, nonfinite_row
from .resume_state import LAST, PREV, CheckpointDamagedError, load_checkpoint, resume_from, save_checkpoint

__all__ = [
    "CheckpointDamagedError",
    "LAST",
    "LOCK",
    "NonFiniteLossError",
    "PREV",
    "checkpoint_path",
    "existing_checkpoints",
    "history_frame",
    "history_row",
    "load_checkpoint",
    "newest_good",
    "nonfinite_row",
    "own_checkpoint_dir",
    "owning",
    "problem_reason",
    "resume_from",
    "save_checkpoint",
    "save_or_stop",
    "stop_on_nonfinite",
]
