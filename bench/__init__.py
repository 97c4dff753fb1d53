"""The benchmarks, run as ``ssd bench ...``: serving under load, overload and soak beside the peers,
training and export speed. Every report names the machine, the date and the command that made it."""
