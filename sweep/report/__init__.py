"""Tables and figures from a sweep's MLflow runs, shared by notebooks/compare_policies.ipynb.

    python -m sweep.report --experiment NAME [--tracking-uri URI] [--parent RUN_ID] [--out DIR]
                           [--baseline POLICY] [--miss-rate hbn|refn|...]

writes `runs.csv` (every run with its params and metrics, failed ones included), `index.html`
(self-contained: every figure and table next to the paper's claim, the config fields its runs
differ in and what the figure makes of each, and what these runs say of the claim, with the runs
behind each) and, for every setting (runs equal in every config field but the policy, bit widths
and cache; a sweep that mixes e.g. two `eval.limit` values or seeds has two settings, each with
its own files, a name that comes again numbered from its second on, and stderr says what was
grouped and left out):
- `accuracy_vs_miss_rate.png`: accuracy against the high-bit-normalised miss rate (the paper's;
  `--miss-rate` picks another), a line per series through its cache sizes, 95 % intervals from
  the number of documents, the Pareto front (the shape of SliceMoE Fig. 8);
- `energy_latency.png`: decode energy gain and speed-up per decoded token over the paper's
  baseline, high-bit Cache-Prior, at matched accuracy: each run against the cheapest baseline
  run at its model, cache bytes, eviction, bit widths where the baseline ran there, hardware and
  task that is at least as accurate (Fig. 9);
- `warmup.png`: runs that differ only in their cache warmup, miss rate per decode step and
  decode cost against the empty cache (Fig. 10);
- `miss_ratio_curves.png`: the miss-ratio curve of every request stream the sweep recorded,
  with the sweep's runs of that stream on it;
- `optimality_gap.png`: where replayed runs were set beside Belady's oracle
  (slicemoe.optimality), each run's decode miss rate against Belady's on the same stream and
  DRAM bytes, per cache size;
- `table1.md` and `table1.csv`: for runs on a text (perplexity), Table 1's layout: the high-bit
  path and each scheme's low path at each Matryoshka bit width.
Where a policy's runs differ in warmup, Figs. 8 and 9 keep the warmup it ran at the most cache
sizes (the others are the warmup figure's). A saving counts only at matched accuracy: the run is
not less accurate than the run it is compared with, by an exact McNemar test on the per-problem
results both logged (problems.json), else by overlapping Wilson intervals; each verdict lists
apart the savings bought with accuracy.

The modules, in the order the report uses them: `read` (MLflow to one row per run), `group`
(which runs may share a figure, and their series labels), `compare` (matched baselines and the
statistics), `figures`, `table1`, `verdict` (what the runs say of each paper claim) and `page`
(every section, written as files and index.html).
"""
