"""Flower's terse error for a ClientApp that died (OOM-killed, SIGILL) is recorded with what it means."""

from flwr.common.constant import ErrorCode

from server_app.flower_errors import describe


def test_a_dead_clientapp_is_named_with_its_likely_causes():
    text = describe(ErrorCode.CLIENT_APP_CRASHED, "ClientApp stopped responding.")
    assert text.startswith("ClientApp process died before replying")
    assert "out of memory" in text and "SIGILL" in text
    assert "[Flower error 8: ClientApp stopped responding.]" in text  # Flower's own words are kept


def test_a_reply_whose_upload_never_completed_says_the_process_may_have_died():
    reason = ("Reply message objects are unavailable. The sender may not have completed the upload before the "
              "object-push session expired. Object 'ab12': the object could not be found.")
    text = describe(ErrorCode.MESSAGE_UNAVAILABLE, reason)
    assert text.startswith("the reply's upload never completed") and "killed out of memory" in text
    assert text.endswith(f"[Flower error {ErrorCode.MESSAGE_UNAVAILABLE}: {reason}]")


def test_other_errors_pass_through():
    reason = "DeviceOutOfMemory: first step needs 412 MB, the device has 300 MB"
    assert describe(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason) == reason
    assert describe(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable") == "Error: Node Unavailable"
