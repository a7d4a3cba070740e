"""What the edge and the near-edge server share, with no dependency on either side.

`answers`: the "other" sentinel, the combination rules and abstain → fallback.
`wire`: the binary image format of a predict request.
`http`: the HTTP API: paths, headers, the handshake, the reply and the error messages.
`backend`: how a caller asks an expert (`ExpertBackend`, `ExpertReply`), wherever it runs.
Both sides (and the cached evaluation and the testbed) import these; the edge
imports nothing from `serving`, and the server and the evaluation nothing from
`inference`. Nothing here imports torch.
"""

from askexpert.protocol.answers import (
    COMBINE_RULES,
    OTHER,
    POOLED_RULES,
    expert_answer,
    expert_full_distribution,
    final_labels,
    pair_answer,
    replace_pair,
    softmax,
)

__all__ = [
    "COMBINE_RULES",
    "OTHER",
    "POOLED_RULES",
    "expert_answer",
    "expert_full_distribution",
    "final_labels",
    "pair_answer",
    "replace_pair",
    "softmax",
]
