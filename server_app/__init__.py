"""The ServerApp: queries devices, runs a strategy round by round, evaluates and records."""
