"""The application layer: what the ``nni-steppingnet`` commands orchestrate on top of the library.

The library (graph, stepping, MACs, export, importance, construction, training, runtime,
baselines, the NNI and torch-pruning integrations) never imports this package, nor
``config``, ``flow``, ``flow_cli``, ``report`` and ``cli`` (the other application modules, kept at
their first-release paths). Here:

* :mod:`.compare`: orchestration of ``compare`` and ``ablate`` (teachers, baselines, runs);
* :mod:`.compare_report`: statistics over seeds and the markdown tables;
* :mod:`.compare_plot`: the accuracy-vs-MACs figure;
* :mod:`.compare_spec`: the methods, variants and formats (light, for the parser);
* :mod:`.compare_cli`: the subcommands' arguments and printing.
"""

from __future__ import annotations

__all__: list[str] = []
