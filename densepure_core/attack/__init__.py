"""Attack evaluation of diffusion purification (reference.md section 4).

One module per job: ``threat`` (the L_inf / L_2 balls and PGD's moves), ``defense`` (classifier,
or purifier + classifier with K votes; exact, checkpointed, BPDA or no gradients; keyed noise),
``pgd`` (PGD-EOT, deterministic white-box and BPDA in one loop), ``scoring`` (mean, majority
and worst case over M purifications of the last iterate; DiffBreak's any-iterate check). Pure
library code: the pipeline (``densepure attack``) lives in ``tasks/attack/worker.py`` and ``flows/attack.py``.

Imports :mod:`densepure_core.diffusion` (the reverse process), :mod:`densepure_core.rng` and
:mod:`densepure_core.smoothing` (the majority vote with its tie rule).
"""

from .defense import GRADIENTS, Defense, attack_seed, majority_labels, purification_noise
from .pgd import ATTACK_KINDS, AttackSpec, AttackStats, eot_samples, run_attack
from .scoring import NEVER, RULES, IterateCheck, Scores, predict, score
from .threat import NORMS, ThreatModel, perturbation_norms

__all__ = ["GRADIENTS", "Defense", "attack_seed", "majority_labels", "purification_noise", "ATTACK_KINDS",
           "AttackSpec", "AttackStats", "eot_samples", "run_attack", "RULES", "NEVER", "Scores", "predict", "score",
           "IterateCheck", "NORMS", "ThreatModel", "perturbation_norms"]
