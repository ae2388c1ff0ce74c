"""Error replies that Flower itself makes on a node's (or a reply's) behalf, said plainly for results.json.

When a ClientApp process dies without replying (SIGKILL from the kernel's OOM killer in a container
or on a board that ran out of memory, SIGILL on a core that lacks an instruction, a segfault), the
SuperNode notices that the process stopped sending heartbeats and answers for it with Flower's
error code 8 (CLIENT_APP_CRASHED) and the reason "ClientApp stopped responding.", which says
neither that the process is gone nor the likely causes. Measured with the compose federation
(scripts/compose_federation.py): a ClientApp container below its job's memory, OOM-killed.
"""

from __future__ import annotations

from flwr.common.constant import ErrorCode

CLIENT_APP_DIED = ("ClientApp process died before replying: killed (out of memory: the kernel's OOM killer, "
                   "exit status 137) or crashed (e.g. SIGILL: an instruction this CPU lacks)")


REPLY_UPLOAD_INCOMPLETE = ("the reply's upload never completed: the node announced its reply but its objects "
                           "(weights, logits) never reached the SuperLink; its ClientApp process may have died "
                           "mid-upload (e.g. killed out of memory while encoding or sending the reply)")


def describe(code: int, reason: str) -> str:
    """The reason to record for an error reply: Flower's own, made explicit where it is terse.

    Two of Flower's errors mean a node's process likely died: CLIENT_APP_CRASHED (the SuperNode stopped
    hearing from it before it replied) and MESSAGE_UNAVAILABLE (the reply was announced but its objects
    never uploaded; seen in the compose federation when the kernel OOM-killed a ClientApp as it replied).
    """
    if code == ErrorCode.CLIENT_APP_CRASHED:
        return f"{CLIENT_APP_DIED} [Flower error {code}: {reason}]"
    if code == ErrorCode.MESSAGE_UNAVAILABLE:
        return f"{REPLY_UPLOAD_INCOMPLETE} [Flower error {code}: {reason}]"
    return reason
