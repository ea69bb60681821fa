"""lort: low-rank + ternary weight decomposition (W ~ alpha*T + A @ B.T).

The decomposition, the .lort file and the lort-compress / lort-infer tools
are built on memboost's ops and containers; see the project's open issues.
"""
