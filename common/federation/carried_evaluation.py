"""A round's evaluation carried by the next round's TRAIN message: one message per site and round.

The aggregate of round r is what every site evaluates (round r's score) and what round r + 1 trains
from, so one message can do both: the server sends round r + 1's TRAIN with `evaluate-first` (the
part to score), and the site evaluates the received model with its own state as it stands (its
BatchNorm under fedbn and silobn) before it trains. The reply carries the evaluation beside the
update: its MetricRecord under `evaluation` and the site's ConfigRecord `site`, or, where the site's
evaluation policy refuses it, the reason under `evaluation-refused`. A deployed message costs a new
ClientApp process and its imports, seconds on a hospital's node, so this halves a round's
messaging; the last round's model (and every round's under SecAgg+, whose protocol owns the TRAIN
messages) is evaluated by an EVALUATE message of its own.
"""

from __future__ import annotations

EVALUATE_FIRST = "evaluate-first"  # TRAIN config: the part to score the received model on before training
EVALUATION = "evaluation"  # TRAIN reply: the MetricRecord of that evaluation
EVALUATION_REFUSED = "evaluation-refused"  # TRAIN reply: ConfigRecord {"reason": ...} of a refused one
