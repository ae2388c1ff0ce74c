"""Byte units, named so that nobody has to guess which "MB" is meant.

- Memory (device budgets in profiles, predicted and measured peaks, model sizes) is in
  mebibytes: `MIB` = 2^20 bytes. Results and profiles call the unit "MB" for brevity
  (`memory_mb`, `peak_memory_mb`) and the README says it is 2^20 bytes.
- Traffic (bytes down and up, the console's "down ... MB") is in decimal megabytes,
  `MB` = 10^6 bytes, as bandwidth (Mbit/s) is counted.
"""

MIB = 2**20  # memory: bytes per mebibyte
MB = 10**6  # traffic: bytes per (decimal) megabyte
