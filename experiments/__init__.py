"""The experiment harness around the ``prune`` library: everything a pruning *run* needs that
is not the method itself.

- ``data``, ``squad``, ``tasks``: task specs, GLUE (TSV or hub) and SQuAD loading, the seeded
  sample set, evaluation sets and scoring (``metrics``, ``evaluation``);
- ``checkpoints``: resolving and loading the checkpoint to prune; ``finetune``: the embedded
  demo's one-time fine-tuning;
- ``caches``: content-keyed caches (Fisher information, latency tables) and fingerprints;
- ``records``: run records written atomically, with the environment they came from;
- ``tracking``: optional experiment trackers (W&B);
- ``sweeps/``: the Hydra sweep configs (``conf/experiment`` links to it).

``run.py`` wires a Hydra config to these and to ``prune``; ``analysis/`` reads the records.
"""
