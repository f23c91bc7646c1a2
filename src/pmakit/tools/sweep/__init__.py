"""Choose the merge after training: score candidate (rule, window) merges of a run's checkpoints or samples.

A run that kept its checkpoints (``checkpoint-N``) or its PMA samples (``pma-samples/step-N``) can be
merged later with any rule over any window. `sweep` merges each candidate with `pmakit.merge` into a
scratch folder (one candidate on disk and in memory at a time), scores it, and writes a table (markdown
and CSV) and a plot of score against window, one line per rule spec. The best candidate is merged again into
``output_dir/best`` with a model card that records every candidate's score, and pushed when asked. Rule specs
carry their parameters (``ema:0.1``, ``decay:cosine``), an alpha grid (``alphas=``) expands the rules that
take one, and every row shows the parameters its merge used.

Scores come from a user function ``score(folder) -> float``, from a Trainer's ``evaluate`` (`trainer_scorer`),
from the causal-LM loss on a held-out text file (`text_loss_scorer`, what ``pmakit sweep --text`` uses) or from
lm-evaluation-harness (`pmakit.lm_eval_scorer`). Lower is better unless ``greater_is_better`` (by default the
scorer's own ``greater_is_better``, if it has one).

Everything that can be checked is checked before the first merge: the rules, windows, inputs and merge
settings (each candidate is planned from the headers), the output folder, and the scorer (`text_loss_scorer`
reads and tokenises its text then). The scratch folder holds the same writer lock as the merger's temporary
folders, so scratch left by a killed sweep is removed by the next one; an interrupt removes it at once.

Modules: `candidates` (specs, the alpha grid, inputs, planning), `scorers`, `lm_eval`, `reports` (tables, plot,
card words) and `run` (`sweep` itself). Importing the package loads neither torch nor transformers.
"""

from .candidates import Candidate, expand_alphas, parse_rule, sweep_inputs
from .reports import SweepResult, SweepRow
from .reports import write_plot as write_plot  # re-exported, as before the split (not in __all__)
from .run import sweep
from .scorers import Scorer as Scorer
from .scorers import TextLossScorer, text_loss_scorer, trainer_scorer
from .scorers import causal_lm_nats as causal_lm_nats
from .scorers import load_weights_into as load_weights_into


__all__ = [
    "Candidate",
    "SweepResult",
    "SweepRow",
    "TextLossScorer",
    "expand_alphas",
    "parse_rule",
    "sweep",
    "sweep_inputs",
    "text_loss_scorer",
    "trainer_scorer",
]
