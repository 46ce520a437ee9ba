"""Limits a rollout checks before it does any work for a request: message sizes, ids, names.

Every bound here is decided from a length (of the raw request, of a string) alone, so a hostile
request is refused before it is parsed, tokenized or echoed anywhere.
"""

from __future__ import annotations

import re

from weightsync.errors import BadRequest
from weightsync.logs import shown

__all__ = [
    "GENERATE_REQUEST_BYTES",
    "MAX_VERSION",
    "MAX_TENSOR_NAME_BYTES",
    "MAX_UPDATE_ID_BYTES",
    "PARSE_INLINE_BYTES",
    "SMALL_REQUEST_BYTES",
    "check_update_id",
    "version_problem",
    "weight_sync_request_limits",
]

# A GenerateRequest: a prompt of a few hundred thousand tokens fits; a prompt beyond the model's
# length is refused by the character count before tokenizing anyway.
GENERATE_REQUEST_BYTES = 4 << 20
# Requests up to this size are parsed on the event loop (microseconds); larger ones on a thread.
PARSE_INLINE_BYTES = 64 << 10
# Weight versions run from 1 to below 2^53: every one is then an integer a JSON (JavaScript) client reads
# exactly, though the wire's field is uint64. The trainer refuses a larger one before sending it, the
# rollout at BeginUpdate (docs/design.md, Versions).
MAX_VERSION = (1 << 53) - 1
# GetStatus, AbortUpdate and any method without its own bound.
SMALL_REQUEST_BYTES = 64 << 10
MAX_UPDATE_ID_BYTES = 128
# Hugging Face names are well under 100 characters; a longer name cannot belong to a model.
MAX_TENSOR_NAME_BYTES = 512
# Per manifest entry besides its name: dtype, shape (8 dims), offset, size, checksum, its transfer-plan
# entry and the protobuf framing of both, rounded up; plus a fixed allowance for the rest of the
# request (version, fingerprints, a relay tree of a few thousand rollouts).
_PER_TENSOR_BYTES = MAX_TENSOR_NAME_BYTES + 256
_FIXED_BYTES = 256 << 10
_UPDATE_ID = re.compile(r"[A-Za-z0-9._:-]*")


def weight_sync_request_limits(tensor_count: int) -> dict[str, int]:
    """Largest raw request, per WeightSync method, for a model of `tensor_count` names (aliases included).

    BeginUpdate carries one manifest entry per tensor, Commit one checksum per tensor; PushChunks is
    bounded by the server's message limit (one chunk).
    """
    per_model = _FIXED_BYTES + tensor_count * _PER_TENSOR_BYTES
    return {"BeginUpdate": per_model, "Commit": per_model}


def check_update_id(update_id: str) -> None:
    """Refuses (BadRequest) an update id that is too long or holds characters beyond [A-Za-z0-9._:-]."""
    if len(update_id) > MAX_UPDATE_ID_BYTES:
        raise BadRequest(f"update_id is {len(update_id)} characters; at most {MAX_UPDATE_ID_BYTES}")
    if not _UPDATE_ID.fullmatch(update_id):
        raise BadRequest(f"update_id {shown(update_id)} may hold only letters, digits and . _ : -")


def version_problem(version: int) -> str:
    """Why `version` cannot be a weight version ("" if it can): versions run from 1 to MAX_VERSION."""
    if version < 1:
        return f"versions start at 1 (0 means nothing committed yet), got {version}"
    if version > MAX_VERSION:
        return f"versions stay below 2**53 (integers JSON clients read exactly): at most {MAX_VERSION}, got {version}"
    return ""
