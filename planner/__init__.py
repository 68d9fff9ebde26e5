"""braid.planner: predict TTFT and TPOT of a disaggregated deployment and pick one.

model.py (config -> operator counts), hardware.py (peaks + fitted factors),
cost.py (seconds per prefill batch / decode step / KV transfer, parallelism as
transforms), sim.py (discrete-event cluster simulation), search.py (enumerate,
Pareto frontier, recommendation), fit.py and calibrate.py (the factors),
overlay.py and report.py (what `braid plan` writes), cli.py (the command).
The planner is control plane: plain Python; only calibrate.py touches torch.
"""
