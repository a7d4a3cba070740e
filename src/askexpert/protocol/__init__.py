"""What the edge and the near-edge server share, with no dependency on either side.

`answers`: the "other" sentinel, the combination rules and abstain → fallback.
`wire`: the binary image format of a predict request.
Both sides (and the cached evaluation and the testbed) import these. The edge
imports nothing from `serving`; the server still imports the in-process expert
backend from `inference.backend` (LocalExpertBackend, reply_from_logits).
"""

from askexpert.protocol.answers import (
    COMBINE_RULES,
    OTHER,
    expert_answer,
    expert_full_distribution,
    final_labels,
    softmax,
)

__all__ = [
    "COMBINE_RULES",
    "OTHER",
    "expert_answer",
    "expert_full_distribution",
    "final_labels",
    "softmax",
]
