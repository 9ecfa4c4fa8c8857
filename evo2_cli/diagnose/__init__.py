"""`evo2 diagnose-grads`: its config and variants (config.py), training the variants with recording hooks
(run.py, record.py), the explosion detector and origin (detect.py), the post-hoc review of a run
(posthoc.py, posthoc_report.py) and the report of a diagnosis (report/)."""
